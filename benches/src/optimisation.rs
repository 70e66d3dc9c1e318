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
