//! Before/after measurements of an optimisation: `sge_virtualizer run -- /bin/true` with two or
//! more builds (each made by `benches/build-under-test.sh` from a commit; the first is "before"),
//! interleaved, phase by phase. Stored as `results/opt-<name>.json` and shown in the report's Optimisations section.

use std::path::PathBuf;

use anyhow::bail;

use crate::context::{BenchContext, UnderTest};
use crate::interleave::{run_interleaved, Variant};
use crate::job_latency::shepherd_true;
use crate::results::{utc_now, BenchResult};

/// What to compare.
pub struct Comparison {
    /// Result id without the `opt-` prefix.
    pub name: String,
    pub title: String,
    /// Notes from the command line, first in the report.
    pub notes: Vec<String>,
    /// Build directories in order, the first being the baseline.
    pub builds: Vec<PathBuf>,
    /// compare-vmm: also boot the same guest with QEMU microvm (KVM and TCG) in the same run.
    pub with_qemu: bool,
}

fn short(ut: &UnderTest) -> String {
    ut.revision
        .strip_prefix("commit ")
        .and_then(|r| r.get(..7))
        .unwrap_or(&ut.revision)
        .to_string()
}

pub fn run(ctx: &BenchContext, c: &Comparison) -> anyhow::Result<BenchResult> {
    if c.builds.len() < 2 {
        bail!("compare needs at least two build directories");
    }
    let builds: Vec<UnderTest> = c
        .builds
        .iter()
        .map(|d| UnderTest::from_build_dir(d))
        .collect();
    for b in &builds {
        b.require()?;
    }
    let backend = if ctx.machine.kvm_can_run_linux {
        "embedded"
    } else {
        "qemu"
    };
    let mut variants: Vec<Variant<'_>> = builds
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let role = if i == 0 { "before" } else { "after" };
            Variant::new(format!("{role} ({})", short(b)), "ms", move || {
                shepherd_true(b, backend)
            })
        })
        .collect();
    eprintln!(
        "opt-{}: {} warm-up + {} runs per variant",
        c.name, ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let dirs: Vec<String> = c.builds.iter().map(|d| d.display().to_string()).collect();
    let mut notes = c.notes.clone();
    notes.extend(
        builds
            .iter()
            .map(|b| format!("{}: {}", short(b), b.revision)),
    );
    notes.push(format!(
        "Job: `sge_virtualizer run --backend {backend} -n --timings -- /bin/true`, each build \
         with its own guest image (the agent is part of the image)."
    ));
    Ok(BenchResult {
        id: format!("opt-{}", c.name),
        title: c.title.clone(),
        command: format!(
            "for each commit: benches/build-under-test.sh <commit> <dir>; then cargo run \
             --release -p benchmarks -- compare --name {} --title '…' {} --runs {} --warmup {}",
            c.name,
            dirs.join(" "),
            ctx.runs,
            ctx.warmup
        ),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: builds
            .iter()
            .map(UnderTest::describe)
            .collect::<Vec<_>>()
            .join("; "),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes,
    })
}

/// Before/after of a change to the vmm crate: the tiny guest booted by `bench-vm` binaries
/// built with `benches/build-bench-vm.sh` (first = before), interleaved, in fresh processes.
pub fn run_vmm(ctx: &BenchContext, c: &Comparison) -> anyhow::Result<BenchResult> {
    if c.builds.len() < 2 {
        bail!("compare-vmm needs at least two build directories");
    }
    let guest = ctx.work_dir.join("tiny-exit.elf");
    crate::tiny_guest::write(&guest, crate::tiny_guest::AfterSignal::Exit)?;
    let g = guest.as_path();
    let builds: Vec<(PathBuf, String)> = c
        .builds
        .iter()
        .map(|d| {
            let rev = std::fs::read_to_string(d.join("REVISION"))
                .map(|r| r.trim().to_string())
                .unwrap_or_else(|_| d.display().to_string());
            (d.join("bench-vm"), rev)
        })
        .collect();
    for (bin, _) in &builds {
        if !bin.is_file() {
            bail!(
                "{} not found (benches/build-bench-vm.sh builds it)",
                bin.display()
            );
        }
    }
    let mut variants: Vec<Variant<'_>> = builds
        .iter()
        .enumerate()
        .map(|(i, (bin, rev))| {
            let role = if i == 0 { "before" } else { "after" };
            let label = if rev.contains("+ patch") {
                format!(
                    "{role}: vmm + {}",
                    rev.rsplit("+ patch ").next().unwrap_or(rev)
                )
            } else {
                format!("{role}: vmm at {}", rev.get(..7).unwrap_or(rev))
            };
            Variant::new(label, "ms", move || {
                let (start, r, gone) = crate::embedded_vm::run_child_binary(bin, g, 128, false)?;
                let ms = |t: u64| crate::clock::ms_between(start, t);
                Ok(vec![
                    ("first_vcpu_run", ms(r.first_vcpu_run_ns)),
                    ("first_instruction", ms(r.boot_timer_ns)),
                    ("vm_gone", ms(gone)),
                    (
                        "main_to_first_instruction",
                        crate::clock::ms_between(r.main_ns, r.boot_timer_ns),
                    ),
                ])
            })
        })
        .collect();
    if c.with_qemu {
        for accel in [
            crate::qemu_microvm::Accel::Kvm,
            crate::qemu_microvm::Accel::Tcg,
        ] {
            let label = format!("QEMU microvm, {}", accel.name().to_uppercase());
            variants.push(Variant::new(label, "ms", move || {
                let (first, gone) = crate::qemu_microvm::boot_once(g, accel, 128)?;
                Ok(vec![("first_instruction", first), ("vm_gone", gone)])
            }));
        }
    }
    eprintln!(
        "opt-{}: {} warm-up + {} runs per variant",
        c.name, ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let dirs: Vec<String> = c.builds.iter().map(|d| d.display().to_string()).collect();
    let mut notes = c.notes.clone();
    notes.extend(
        builds
            .iter()
            .map(|(b, rev)| format!("{}: {rev}", b.display())),
    );
    notes.push(
        "Each run: a fresh `bench-vm` process boots the tiny guest (128 MiB, 1 vCPU) to its \
         triple fault. first_vcpu_run / first_instruction / vm_gone: ms since the fork/exec; \
         main_to_first_instruction: from the child's main() (without exec and loading)."
            .into(),
    );
    Ok(BenchResult {
        id: format!("opt-{}", c.name),
        title: c.title.clone(),
        command: format!(
            "benches/build-bench-vm.sh HEAD <dir> [PATCH] per variant; then cargo run --release \
             -p benchmarks -- compare-vmm --name {} --title '…' {} --runs {} --warmup {}",
            c.name,
            dirs.join(" "),
            ctx.runs,
            ctx.warmup
        ),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: builds
            .iter()
            .map(|(b, rev)| format!("{}: {rev}", b.display()))
            .collect::<Vec<_>>()
            .join("; "),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes,
    })
}

/// Before/after of guest kernel command-line words: the same build, `run --cmdline` varied
/// (the first value is the baseline; "" is the default command line).
pub fn run_cmdline(
    ctx: &BenchContext,
    c: &Comparison,
    cmdlines: &[String],
) -> anyhow::Result<BenchResult> {
    if cmdlines.len() < 2 {
        bail!("compare-cmdline needs at least two --cmdline values");
    }
    ctx.under_test.require()?;
    let backend = if ctx.machine.kvm_can_run_linux {
        "embedded"
    } else {
        "qemu"
    };
    let uts: Vec<UnderTest> = cmdlines
        .iter()
        .map(|cl| UnderTest {
            extra_cmdline: cl.clone(),
            ..ctx.under_test.clone()
        })
        .collect();
    let mut variants: Vec<Variant<'_>> = uts
        .iter()
        .enumerate()
        .map(|(i, ut)| {
            let role = if i == 0 { "before" } else { "after" };
            let label = if ut.extra_cmdline.is_empty() {
                format!("{role}: default command line")
            } else {
                format!("{role}: + `{}`", ut.extra_cmdline)
            };
            Variant::new(label, "ms", move || shepherd_true(ut, backend))
        })
        .collect();
    eprintln!(
        "opt-{}: {} warm-up + {} runs per variant",
        c.name, ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let mut notes = c.notes.clone();
    notes.push(format!(
        "Job: `sge_virtualizer run --backend {backend} -n --timings [--cmdline …] -- /bin/true`, \
         one build ({}), the extra kernel command-line words varied.",
        ctx.under_test.revision
    ));
    let args: Vec<String> = cmdlines
        .iter()
        .map(|c| format!("--cmdline '{c}'"))
        .collect();
    Ok(BenchResult {
        id: format!("opt-{}", c.name),
        title: c.title.clone(),
        command: format!(
            "cargo run --release -p benchmarks -- compare-cmdline --name {} --title '…' {} \
             --runs {} --warmup {}{}",
            c.name,
            args.join(" "),
            ctx.runs,
            ctx.warmup,
            ctx.under_test_args
        ),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: ctx.under_test.describe(),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes,
    })
}
