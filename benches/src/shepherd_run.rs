//! Starting `sge_virtualizer run` the way the benchmarks need it: a chosen backend, the guest
//! image of this workspace, `--timings`, and the job's stdout piped to the harness.

use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::context::UnderTest;

/// The `--timings` JSON line (ms since the shepherd's process start).
#[derive(Debug, Clone, Deserialize)]
pub struct PhaseTimings {
    pub backend: String,
    pub vm_created_ms: Option<f64>,
    pub first_instruction_ms: Option<f64>,
    pub agent_hello_ms: Option<f64>,
    pub job_spawned_ms: Option<f64>,
    pub job_exited_ms: Option<f64>,
    pub vm_gone_ms: Option<f64>,
    pub guest_init_ms: Option<f64>,
}

/// `sge_virtualizer run --backend <backend> -n --timings -- <job…>`, stdout and stderr piped.
pub fn command(ut: &UnderTest, backend: &str, job: &[&str]) -> Command {
    command_with(ut, backend, &[], job)
}

/// [`command`] with more `run` options (`--mem 256`).
pub fn command_with(ut: &UnderTest, backend: &str, options: &[&str], job: &[&str]) -> Command {
    let mut cmd = Command::new(&ut.shepherd);
    cmd.args(["run", "--backend", backend, "-n", "--timings"]);
    cmd.args(options);
    if !ut.extra_cmdline.is_empty() {
        cmd.args(["--cmdline", &ut.extra_cmdline]);
    }
    cmd.arg("--")
        .args(job)
        .env("SGE_VIRTUALIZER_KERNEL", &ut.kernel)
        .env("SGE_VIRTUALIZER_INITRD", &ut.initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

pub fn spawn(ut: &UnderTest, backend: &str, job: &[&str]) -> anyhow::Result<Child> {
    command(ut, backend, job)
        .spawn()
        .with_context(|| format!("starting {}", ut.shepherd.display()))
}

/// Finds the `--timings` line in the shepherd's stderr.
pub fn parse_timings(stderr: &str) -> anyhow::Result<PhaseTimings> {
    let Some(line) = stderr
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{') && l.contains("vm_gone_ms"))
    else {
        bail!(
            "no --timings line in the shepherd's stderr: {}",
            stderr.trim()
        );
    };
    serde_json::from_str(line).with_context(|| format!("parsing timings {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_timings_line() {
        let err = "some log\n{\"backend\":\"qemu\",\"backend_reason\":\"requested\",\
            \"vm_created_ms\":2.0,\"first_instruction_ms\":null,\"agent_hello_ms\":888.0,\
            \"job_spawned_ms\":904.0,\"job_exited_ms\":935.5,\"vm_gone_ms\":1722.5,\
            \"guest_init_ms\":636.0}\n";
        let t = parse_timings(err).unwrap();
        assert_eq!(t.backend, "qemu");
        assert_eq!(t.first_instruction_ms, None);
        assert_eq!(t.vm_gone_ms, Some(1722.5));
        assert!(parse_timings("nothing").is_err());
    }
}
