//! The OS image load sensor: execd's load-sensor protocol (sge_execd(8), "load_sensor" in
//! sge_conf(5)), publishing the images of this host's store as the `vm_image` complex
//! ([`super::image_request`]), so the scheduler places an image's jobs where it is, and this
//! host's CPU class as `vm_cpu_class` ([`super::cpu_class`]), so a checkpointed job is restored
//! only where it can go on.
//!
//! execd writes a line each load report interval; the sensor answers with `begin`, one
//! `host:complex:value` line and `end`. `quit` (or the end of its input) ends it.

use std::io::{self, BufRead, Write};

use super::cpu_class;
use super::image_request::{host_value, COMPLEX};

/// Answers execd until it says `quit` or closes the pipe. `images` lists the store's images at
/// each report (a store that cannot be read is reported as empty: no jobs are sent here for an
/// image this host cannot show). `cpu_class`: this host's, where it has one.
pub fn serve(
    input: impl BufRead,
    mut output: impl Write,
    host: &str,
    mut images: impl FnMut() -> Vec<String>,
    cpu_class: Option<&str>,
) -> io::Result<()> {
    for line in input.lines() {
        if line?.trim() == "quit" {
            break;
        }
        let value = host_value(&images());
        let class = cpu_class
            .map(|c| format!("{host}:{}:{c}\n", cpu_class::COMPLEX))
            .unwrap_or_default();
        // One write, so execd never reads half a report.
        output.write_all(format!("begin\n{host}:{COMPLEX}:{value}\n{class}end\n").as_bytes())?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_gets_the_current_images_until_quit() {
        let mut calls = 0;
        let mut out = Vec::new();
        serve(
            &b"\n\nquit\n\n"[..],
            &mut out,
            "node1",
            || {
                calls += 1;
                if calls == 1 {
                    vec!["bullseye".into()]
                } else {
                    vec!["bookworm".into(), "bullseye".into()]
                }
            },
            None,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "begin\nnode1:vm_image:/bullseye/\nend\n\
             begin\nnode1:vm_image:/bookworm/bullseye/\nend\n"
        );
    }

    #[test]
    fn the_cpu_class_comes_with_each_report() {
        let mut out = Vec::new();
        serve(&b"\n"[..], &mut out, "n", Vec::new, Some("cpu-0123abcd")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "begin\nn:vm_image:/\nn:vm_cpu_class:cpu-0123abcd\nend\n"
        );
    }

    #[test]
    fn the_end_of_input_ends_it() {
        let mut out = Vec::new();
        serve(&b""[..], &mut out, "h", Vec::new, None).unwrap();
        assert!(out.is_empty());
    }
}
