//! The OS image load sensor: execd's load-sensor protocol (sge_execd(8), "load_sensor" in
//! sge_conf(5)), publishing the images of this host's store as the `vm_image` complex
//! ([`super::image_request`]), so the scheduler places an image's jobs where it is.
//!
//! execd writes a line each load report interval; the sensor answers with `begin`, one
//! `host:complex:value` line and `end`. `quit` (or the end of its input) ends it.

use std::io::{self, BufRead, Write};

use super::image_request::{host_value, COMPLEX};

/// Answers execd until it says `quit` or closes the pipe. `images` lists the store's images at
/// each report (a store that cannot be read is reported as empty: no jobs are sent here for an
/// image this host cannot show).
pub fn serve(
    input: impl BufRead,
    mut output: impl Write,
    host: &str,
    mut images: impl FnMut() -> Vec<String>,
) -> io::Result<()> {
    for line in input.lines() {
        if line?.trim() == "quit" {
            break;
        }
        let value = host_value(&images());
        // One write, so execd never reads half a report.
        output.write_all(format!("begin\n{host}:{COMPLEX}:{value}\nend\n").as_bytes())?;
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
        serve(&b"\n\nquit\n\n"[..], &mut out, "node1", || {
            calls += 1;
            if calls == 1 {
                vec!["bullseye".into()]
            } else {
                vec!["bookworm".into(), "bullseye".into()]
            }
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "begin\nnode1:vm_image:/bullseye/\nend\n\
             begin\nnode1:vm_image:/bookworm/bullseye/\nend\n"
        );
    }

    #[test]
    fn the_end_of_input_ends_it() {
        let mut out = Vec::new();
        serve(&b""[..], &mut out, "h", Vec::new).unwrap();
        assert!(out.is_empty());
    }
}
