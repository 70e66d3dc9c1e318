//! `bench-report`: the benchmarks of sge_virtualizer and the generator of `benches/REPORT.md`.
//!
//! Each benchmark runs its variants interleaved (A, B, A, B, …) after discarded warm-up rounds,
//! stores every sample in `benches/results/<id>.json`, and `report` renders the Markdown report
//! and the phase chart from those files. `all` runs everything, then `report`.

mod boot_latency;
mod chart;
mod clock;
mod context;
mod embedded_vm;
mod interleave;
mod job_latency;
mod machine;
mod memory_overhead;
mod proc_memory;
mod qemu_microvm;
mod relay;
mod report;
mod results;
mod shepherd_run;
mod signal_latency;
mod stats;
mod tiny_guest;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use context::{workspace_root, BenchContext};
use results::BenchResult;

#[derive(Parser)]
#[command(
    name = "bench-report",
    about = "sge_virtualizer benchmarks and their report"
)]
struct Cli {
    /// Measured runs per variant.
    #[arg(long, default_value_t = 20, global = true)]
    runs: usize,
    /// Warm-up runs per variant (discarded).
    #[arg(long, default_value_t = 2, global = true)]
    warmup: usize,
    /// The sge_virtualizer binary (default: target/release/sge_virtualizer of the workspace).
    #[arg(long, global = true)]
    shepherd: Option<PathBuf>,
    /// Where results/*.json, REPORT.md and the chart go (default: benches/).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// 1: VMM start to first guest instruction and VM gone, tiny guest, embedded vs QEMU.
    Boot,
    /// 2: `sge_virtualizer run -- /bin/true` per backend with phases, vs host fork+exec.
    Job,
    /// 3: VMM memory overhead after boot, embedded vs QEMU.
    Memory,
    /// 4a: output relay throughput guest → host file.
    Relay,
    /// 4b: signal round trip shepherd → job handler → output back.
    Signal,
    /// Render REPORT.md and the chart from the stored results.
    Report,
    /// (internal) Boot the tiny guest with the embedded VMM and report on stdout.
    #[command(hide = true)]
    EmbeddedVm {
        #[arg(long)]
        guest: PathBuf,
        #[arg(long, default_value_t = 128)]
        mem: u32,
        #[arg(long)]
        hold: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::EmbeddedVm { guest, mem, hold } = &cli.command {
        return embedded_vm::child_main(guest, *mem, *hold);
    }
    let root = workspace_root();
    let out_dir = cli.out.clone().unwrap_or_else(|| root.join("benches"));
    let results_dir = out_dir.join("results");
    if let Cmd::Report = cli.command {
        let path = report::write(&out_dir)?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    let work = tempfile::Builder::new()
        .prefix("bench-report.")
        .tempdir()
        .context("creating a scratch directory")?;
    let ctx = BenchContext {
        runs: cli.runs,
        warmup: cli.warmup,
        work_dir: work.path().to_path_buf(),
        shepherd: cli
            .shepherd
            .clone()
            .unwrap_or_else(|| root.join("target/release/sge_virtualizer")),
        kernel: root.join("build/guest/vmlinux"),
        initrd: root.join("build/guest/initramfs.cpio"),
        machine: machine::MachineInfo::collect(),
    };
    let result: BenchResult = match cli.command {
        Cmd::Boot => boot_latency::run(&ctx)?,
        Cmd::Job => job_latency::run(&ctx)?,
        Cmd::Memory => memory_overhead::run(&ctx)?,
        Cmd::Relay => relay::run(&ctx)?,
        Cmd::Signal => signal_latency::run(&ctx)?,
        Cmd::Report | Cmd::EmbeddedVm { .. } => unreachable!("handled above"),
    };
    let path = result.save(&results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
