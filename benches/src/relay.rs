//! Benchmark 4a: output relay throughput, guest → host file. The job writes a fixed amount of
//! zeros to its stdout with dd; the shepherd relays it over vsock into a host file.

use std::fs::File;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};
use crate::context::BenchContext;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::shepherd_run;

/// Bytes the job writes per run.
const MIB_PER_RUN: u64 = 64;
const BYTES: u64 = MIB_PER_RUN << 20;

fn dd_args(to_null: bool) -> Vec<String> {
    let mut a = vec![
        "dd".to_string(),
        "if=/dev/zero".into(),
        "bs=1M".into(),
        format!("count={MIB_PER_RUN}"),
    ];
    if to_null {
        a.push("of=/dev/null".into());
    }
    a
}

fn mb_per_s(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / 1e6 / (ms / 1000.0)
}

/// The job's output lands in `out`; throughput over job spawned → job exited (the agent sends
/// Exit only after the output is drained and relayed).
fn through_shepherd(
    ctx: &BenchContext,
    backend: &str,
    to_null: bool,
    out: &std::path::Path,
) -> anyhow::Result<Sample> {
    let args = dd_args(to_null);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let output = shepherd_run::command(&ctx.under_test, backend, &argv)
        .stdout(Stdio::from(file))
        .output()
        .context("running sge_virtualizer")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "sge_virtualizer failed ({}): {}",
            output.status,
            stderr.trim()
        );
    }
    let size = std::fs::metadata(out)?.len();
    let expected = if to_null { 0 } else { BYTES };
    if size != expected {
        bail!("the host file has {size} bytes, expected {expected}");
    }
    let t = shepherd_run::parse_timings(&stderr)?;
    let (Some(spawned), Some(exited)) = (t.job_spawned_ms, t.job_exited_ms) else {
        bail!("no job_spawned/job_exited timings");
    };
    Ok(vec![
        ("throughput", mb_per_s(BYTES, exited - spawned)),
        ("job_duration", exited - spawned),
    ])
}

fn host_dd(out: &std::path::Path) -> anyhow::Result<Sample> {
    let args = dd_args(false);
    let file = File::create(out)?;
    let start = monotonic_ns();
    let status = Command::new(&args[0])
        .args(&args[1..])
        .stdout(Stdio::from(file))
        .stderr(Stdio::null())
        .status()
        .context("running dd")?;
    let ms = ms_between(start, monotonic_ns());
    if !status.success() || std::fs::metadata(out)?.len() != BYTES {
        bail!("host dd failed ({status})");
    }
    Ok(vec![
        ("throughput", mb_per_s(BYTES, ms)),
        ("job_duration", ms),
    ])
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let out = ctx.work_dir.join("relay.out");
    let o = out.as_path();
    let mut variants = vec![
        Variant::new("host dd → file (no VM)", "MB/s | ms", || host_dd(o)),
        Variant::new(
            "QEMU backend (TCG): dd → stdout → host file",
            "MB/s | ms",
            || through_shepherd(ctx, "qemu", false, o),
        ),
        Variant::new(
            "QEMU backend (TCG): dd → /dev/null in the guest (no relay)",
            "MB/s | ms",
            || through_shepherd(ctx, "qemu", true, o),
        ),
    ];
    let mut notes = vec![
        format!(
            "The job runs `{}` ({MIB_PER_RUN} MiB of zeros to stdout); the shepherd's stdout is \
             a host file (on {}), checked for the full size after each run.",
            dd_args(false).join(" "),
            ctx.work_dir.display()
        ),
        "throughput = bytes / (job_exited − job_spawned) from --timings: from the Spawn \
         frame's reply to the Exit frame, which the agent sends only after the last output \
         frame; it includes the guest producing the data."
            .into(),
        "The `/dev/null` variant is the same dd with no output to relay: the guest's own cost \
         under TCG, for comparison (its MB/s counts the same 64 MiB)."
            .into(),
    ];
    if ctx.machine.kvm_can_run_linux {
        variants.push(Variant::new(
            "embedded backend: dd → stdout → host file",
            "MB/s | ms",
            || through_shepherd(ctx, "embedded", false, o),
        ));
    } else {
        notes.push(
            "Embedded backend not measured: a Linux user space cannot run under this host's KVM."
                .into(),
        );
    }
    eprintln!(
        "relay: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (mut series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    for s in &mut series {
        s.unit = if s.metric == "throughput" {
            "MB/s"
        } else {
            "ms"
        }
        .into();
    }
    Ok(BenchResult::measured(
        ctx,
        "relay",
        "Output relay throughput, guest → host file",
        series,
        outcomes,
        notes,
    ))
}
