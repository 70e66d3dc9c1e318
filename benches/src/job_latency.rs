//! Benchmark 2: `sge_virtualizer run -- /bin/true` end to end per backend, with the phase
//! breakdown of `--timings`, next to a host fork+exec of /bin/true (the floor).

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};
use crate::context::{BenchContext, UnderTest};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::shepherd_run;

/// The phases of `--timings`, in order, with the report's names.
pub const PHASES: [&str; 6] = [
    "vm_created",
    "first_instruction",
    "agent_hello",
    "job_spawned",
    "job_exited",
    "vm_gone",
];

fn host_true() -> anyhow::Result<Sample> {
    let start = monotonic_ns();
    let status = Command::new("/bin/true")
        .stdin(Stdio::null())
        .status()
        .context("running /bin/true")?;
    let end = monotonic_ns();
    if !status.success() {
        bail!("/bin/true failed: {status}");
    }
    Ok(vec![("wall", ms_between(start, end))])
}

/// One `sge_virtualizer run -- /bin/true`: wall time and the `--timings` phases.
pub fn shepherd_true(ut: &UnderTest, backend: &str) -> anyhow::Result<Sample> {
    shepherd_true_with(ut, backend, &[])
}

/// [`shepherd_true`] with more `run` options.
pub fn shepherd_true_with(
    ut: &UnderTest,
    backend: &str,
    options: &[&str],
) -> anyhow::Result<Sample> {
    let start = monotonic_ns();
    let output = shepherd_run::command_with(ut, backend, options, &["/bin/true"])
        .output()
        .context("running sge_virtualizer")?;
    let end = monotonic_ns();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "sge_virtualizer failed ({}): {}",
            output.status,
            stderr.trim()
        );
    }
    let t = shepherd_run::parse_timings(&stderr)?;
    if t.backend != backend {
        bail!(
            "asked for backend {backend}, the shepherd used {}",
            t.backend
        );
    }
    let mut sample = vec![("wall", ms_between(start, end))];
    let phases = [
        t.vm_created_ms,
        t.first_instruction_ms,
        t.agent_hello_ms,
        t.job_spawned_ms,
        t.job_exited_ms,
        t.vm_gone_ms,
    ];
    for (name, value) in PHASES.iter().zip(phases) {
        if let Some(v) = value {
            sample.push((name, v));
        }
    }
    if let Some(v) = t.guest_init_ms {
        sample.push(("guest_kernel_boot", v));
    }
    Ok(sample)
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let mut variants = vec![
        Variant::new("host fork+exec", "ms", host_true),
        Variant::new("sge_virtualizer, QEMU backend (TCG)", "ms", || {
            shepherd_true(&ctx.under_test, "qemu")
        }),
        Variant::new("sge_virtualizer, QEMU backend (TCG), 256 MiB", "ms", || {
            shepherd_true_with(&ctx.under_test, "qemu", &["--mem", "256"])
        }),
    ];
    let mut notes = vec![
        "Job: /bin/true, 1 vCPU, guest RAM the run command's default (the host's memory less \
         1 GiB and the VMM's 192 MiB, mapped lazily; the 256 MiB variant: the old fixed \
         default, for what a host-sized guest costs at boot: the guest kernel writes a page \
         array of 1/64 of its RAM), stdin /dev/null. \
         wall = harness fork/exec of the shepherd to its exit; the phases are the shepherd's \
         own `--timings` (ms since its main() started, a few hundred µs after the exec)."
            .into(),
        "guest_kernel_boot = the guest's CLOCK_BOOTTIME when the agent (PID 1) started: the \
         guest kernel's own boot time, on the guest clock (under TCG the guest clock runs at \
         its own pace)."
            .into(),
        "The QEMU backend has no first-instruction timestamp (QEMU has no boot-timer device): \
         that phase is left out for it."
            .into(),
    ];
    if ctx.machine.kvm_can_run_linux {
        variants.push(Variant::new(
            "sge_virtualizer, embedded backend",
            "ms",
            || shepherd_true(&ctx.under_test, "embedded"),
        ));
    } else {
        notes.push(format!(
            "Embedded backend not measured: a Linux user space cannot run under this host's \
             KVM ({}).",
            ctx.machine.kvm_probe
        ));
    }
    eprintln!(
        "job: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    Ok(BenchResult::measured(
        ctx,
        "job",
        "sge_virtualizer run -- /bin/true end to end, phase by phase",
        series,
        outcomes,
        notes,
    ))
}
