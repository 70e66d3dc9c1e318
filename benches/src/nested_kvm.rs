//! Benchmark 9: the job path on real KVM, in the nested real-KVM host
//! (`scripts/nested-kvm-host.sh`: Debian's kvm-amd inside QEMU TCG). The embedded VMM against
//! QEMU with `-accel kvm` on the same host, interleaved, phase by phase. Everything there is
//! emulated twice, so the absolute times are not hardware's; the ratios carry over.
//!
//! The harness runs itself inside the nested host (`nested-inside`), which writes the result
//! to a file in the shared repository; the outer side labels it and stores it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::context::BenchContext;
use crate::interleave::{run_interleaved, Variant};
use crate::job_latency::shepherd_true_with;
use crate::results::BenchResult;

/// Guest RAM of both VMMs' guests (the old fixed default; a host-sized guest would measure the
/// guest kernel's page array instead of the VMMs).
const GUEST_MIB: &str = "256";

/// Refuses to measure where KVM cannot run Linux: an `inside` subcommand run elsewhere.
pub fn require_real_kvm(ctx: &BenchContext) -> anyhow::Result<()> {
    ctx.require_shepherd()?;
    if !ctx.machine.kvm_can_run_linux {
        bail!(
            "KVM cannot run a Linux guest here ({}): not the nested real-KVM host?",
            ctx.machine.kvm_probe
        );
    }
    Ok(())
}

/// Inside the nested host: both backends, interleaved; the result goes to `out`.
pub fn inside(ctx: &BenchContext, out: &Path) -> anyhow::Result<()> {
    require_real_kvm(ctx)?;
    let mem = ["--mem", GUEST_MIB];
    let mut variants = vec![
        Variant::new("embedded VMM (nested real KVM)", "ms", || {
            shepherd_true_with(&ctx.under_test, "embedded", &mem)
        }),
        Variant::new("QEMU microvm, -accel kvm (nested real KVM)", "ms", || {
            shepherd_true_with(&ctx.under_test, "qemu", &mem)
        }),
    ];
    eprintln!(
        "nested: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let result = BenchResult::measured(ctx, "nested", "nested", series, outcomes, Vec::new());
    let text = serde_json::to_string(&result)?;
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}

/// Boots the nested host and runs this benchmark's hidden `inside` subcommand there (with the
/// context's runs and warm-up rounds), which writes its result into the shared repository;
/// returns that result as the inside measured it.
pub fn run_inside(
    ctx: &BenchContext,
    inside: &str,
    extra: &[String],
    timeout_s: u32,
) -> anyhow::Result<BenchResult> {
    let root = crate::context::workspace_root();
    let script = root.join("scripts/nested-kvm-host.sh");
    let out = root.join(format!("target/{inside}.json"));
    let _ = std::fs::remove_file(&out);
    let exe = std::env::current_exe().context("this benchmark's own path")?;
    let status = Command::new(&script)
        .args([
            "run",
            "--cpus",
            "4",
            "--timeout",
            &timeout_s.to_string(),
            "--share",
        ])
        .arg(&root)
        .arg("--")
        .arg(&exe)
        .args([
            inside,
            "--runs",
            &ctx.runs.to_string(),
            "--warmup",
            &ctx.warmup.to_string(),
        ])
        .args(extra)
        .arg("--json")
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Outside: boots the nested host, runs [`inside`] there, and returns its result, labelled.
pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let inner = run_inside(ctx, "nested-inside", &[], 1200)?;
    let mut result = BenchResult::measured(
        ctx,
        "nested",
        "Nested real KVM: sge_virtualizer run -- /bin/true, embedded VMM vs QEMU -accel kvm",
        inner.series,
        inner.outcomes,
        vec![
            format!(
                "Measured inside the nested real-KVM host (scripts/nested-kvm-host.sh: Debian's \
                 kvm-amd in QEMU TCG, 4 vCPUs) on this machine: {}. Guest code and both VMMs run \
                 emulated twice, so absolute times are not hardware's; the ratio between the \
                 two VMMs, measured interleaved in one boot, is what carries over.",
                inner.machine.kvm_probe
            ),
            format!(
                "Job: /bin/true, 1 vCPU, {GUEST_MIB} MiB for both VMMs, stdin /dev/null; phases \
                 from the shepherd's --timings (ms since its main()). QEMU has no \
                 first-instruction timestamp."
            ),
        ],
    );
    result.machine = inner.machine;
    Ok(result)
}
