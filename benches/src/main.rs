//! `bench-report`: the benchmarks of sge_virtualizer and the generator of `benches/REPORT.md`.
//!
//! Each benchmark runs its variants interleaved (A, B, A, B, …) after discarded warm-up rounds,
//! stores every sample in `benches/results/<id>.json`, and `report` renders the Markdown report
//! and the phase chart from those files. `all` runs everything, then `report`.

mod boot_latency;
mod boot_phases;
mod chart;
mod clock;
mod context;
mod embedded_vm;
mod file_server;
mod findings;
mod fuse_mount;
mod grid_engine;
mod image_formats;
mod interleave;
mod job_latency;
mod kvm_primitives;
mod machine;
mod memory_overhead;
mod memory_return;
mod nested_checkpoint;
mod nested_kvm;
mod network;
mod optimisation;
mod proc_memory;
mod qemu_microvm;
mod relay;
mod report;
mod results;
mod shepherd_run;
mod signal_latency;
mod stats;
mod syscall_profile;
mod tiny_guest;
mod virtio_fs_driver;
// child_main runs in bench-vm (vm_child_main.rs); bench-report uses the report type and config.
#[allow(dead_code)]
mod vm_child;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use context::{workspace_root, BenchContext, UnderTest};
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
    /// Measure the build in DIR (made by benches/build-under-test.sh: DIR/sge_virtualizer,
    /// DIR/guest/) instead of target/release/sge_virtualizer and build/guest/.
    #[arg(long, global = true)]
    under_test: Option<PathBuf>,
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
    /// 3b: guest memory given back: host RSS of a 16 GiB guest idle, holding 1 GiB, after.
    MemoryReturn,
    /// 10: OS image formats: import time, size and job start (ext4, EROFS, EROFS lz4hc).
    Images,
    /// 11: job network: guest → host-loopback TCP throughput and connect latency (passt in
    /// `run`, QEMU's slirp and passt in a bare QEMU) vs the same client on the host.
    Network,
    /// 4a: output relay throughput guest → host file.
    Relay,
    /// 4b: signal round trip shepherd → job handler → output back.
    Signal,
    /// 5: Grid Engine qsub -sync y wall time, stock shepherd vs sge_virtualizer.
    Gridengine,
    /// 7: this host's KVM cost of creating and destroying a VM, step by step.
    Kvm,
    /// Where the embedded VMM's time goes: system calls of a tiny-guest boot under strace.
    Profile,
    /// 8: the virtio-fs file server: device + FUSE server vs direct host I/O, and a
    /// /dev/fuse mount (root) vs the host directory.
    Fs,
    /// 9: `run -- /bin/true` on real KVM in the nested host: embedded vs QEMU -accel kvm.
    Nested,
    /// The inside of `nested` (run by it in the nested host): writes the result to `--json`.
    #[command(hide = true)]
    NestedInside {
        #[arg(long)]
        json: PathBuf,
    },
    /// 12: the guest kernel's boot on real KVM in the nested host: the same kernel, initramfs and
    /// command line under the embedded VMM, QEMU microvm -accel kvm and (given) Firecracker.
    NestedBoot {
        #[command(flatten)]
        opts: boot_phases::Options,
    },
    /// 13: checkpoint and restore of a running job on real KVM in the nested host, for 256 MiB,
    /// 1 GiB and 4 GiB guests: snapshot size, pause, restore to the job running again.
    NestedCheckpoint {
        #[command(flatten)]
        opts: nested_checkpoint::Options,
    },
    /// The inside of `nested-checkpoint` (run by it in the nested host).
    #[command(hide = true)]
    NestedCheckpointInside {
        #[command(flatten)]
        opts: nested_checkpoint::Options,
        #[arg(long)]
        json: PathBuf,
    },
    /// The inside of `nested-boot` (run by it in the nested host): writes the result to `--json`.
    #[command(hide = true)]
    NestedBootInside {
        #[command(flatten)]
        opts: boot_phases::Options,
        #[arg(long)]
        json: PathBuf,
    },
    /// Every benchmark (1-8, 10, 11), then the report. A benchmark that cannot run here is reported
    /// with the reason.
    All,
    /// Before/after of an optimisation: `run -- /bin/true` with two builds, interleaved.
    Compare {
        /// Result name (stored as results/opt-NAME.json).
        #[arg(long)]
        name: String,
        /// What changed, for the report.
        #[arg(long)]
        title: String,
        /// A note for the report (repeatable): what changed, what could not be isolated.
        #[arg(long)]
        note: Vec<String>,
        /// Build directories (benches/build-under-test.sh), the baseline first.
        #[arg(required = true, num_args = 2..)]
        builds: Vec<PathBuf>,
    },
    /// Before/after of a vmm change: the tiny guest booted by `bench-vm` builds
    /// (benches/build-bench-vm.sh), interleaved.
    CompareVmm {
        /// Result name (stored as results/opt-NAME.json).
        #[arg(long)]
        name: String,
        /// What changed, for the report.
        #[arg(long)]
        title: String,
        /// A note for the report (repeatable).
        #[arg(long)]
        note: Vec<String>,
        /// Boot the same guest with QEMU microvm (KVM, TCG) in the same run, for the ratio.
        #[arg(long)]
        with_qemu: bool,
        /// Build directories (benches/build-bench-vm.sh), the baseline first.
        #[arg(required = true, num_args = 2..)]
        builds: Vec<PathBuf>,
    },
    /// Before/after of guest kernel command-line words with one build (`run --cmdline`).
    CompareCmdline {
        /// Result name (stored as results/opt-NAME.json).
        #[arg(long)]
        name: String,
        /// What changed, for the report.
        #[arg(long)]
        title: String,
        /// A note for the report (repeatable).
        #[arg(long)]
        note: Vec<String>,
        /// Extra command-line words per variant, the baseline first ("" = default).
        #[arg(long, required = true, num_args = 1, allow_hyphen_values = true)]
        cmdline: Vec<String>,
    },
    /// Render REPORT.md and the chart from the stored results.
    Report,
    /// Write the tiny test guest (ELF) used by `boot` and `memory`, e.g. for strace/perf runs.
    TinyGuest {
        /// Output file.
        out: PathBuf,
        /// Halt after signalling instead of triple-faulting.
        #[arg(long)]
        halt: bool,
    },
}

fn main() -> anyhow::Result<()> {
    if grid_engine::started_as_shepherd() {
        return grid_engine::dispatch();
    }
    let cli = Cli::parse();
    if let Cmd::TinyGuest { out, halt } = &cli.command {
        let after = if *halt {
            tiny_guest::AfterSignal::Halt
        } else {
            tiny_guest::AfterSignal::Exit
        };
        tiny_guest::write(out, after).with_context(|| format!("writing {}", out.display()))?;
        return Ok(());
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
    let (under_test, under_test_args) = match &cli.under_test {
        Some(dir) => (
            UnderTest::from_build_dir(dir),
            format!(" --under-test {}", dir.display()),
        ),
        None => (UnderTest::working_tree(&root), String::new()),
    };
    let ctx = BenchContext {
        runs: cli.runs,
        warmup: cli.warmup,
        work_dir: work.path().to_path_buf(),
        under_test,
        under_test_args,
        machine: machine::MachineInfo::collect(),
    };
    let load_before = results::load_average();
    let single = match &cli.command {
        Cmd::Boot => Some(boot_latency::run(&ctx)?),
        Cmd::Job => Some(job_latency::run(&ctx)?),
        Cmd::Memory => Some(memory_overhead::run(&ctx)?),
        Cmd::MemoryReturn => Some(memory_return::run(&ctx)?),
        Cmd::Images => Some(image_formats::run(&ctx)?),
        Cmd::Network => Some(network::run(&ctx)?),
        Cmd::Nested => Some(nested_kvm::run(&ctx)?),
        Cmd::NestedInside { json } => {
            nested_kvm::inside(&ctx, json)?;
            return Ok(());
        }
        Cmd::NestedCheckpoint { opts } => Some(nested_checkpoint::run(&ctx, opts)?),
        Cmd::NestedCheckpointInside { opts, json } => {
            nested_checkpoint::inside(&ctx, opts, json)?;
            return Ok(());
        }
        Cmd::NestedBoot { opts } => Some(boot_phases::run(&ctx, opts, cli.under_test.as_deref())?),
        Cmd::NestedBootInside { opts, json } => {
            boot_phases::inside(&ctx, opts, json)?;
            return Ok(());
        }
        Cmd::Relay => Some(relay::run(&ctx)?),
        Cmd::Signal => Some(signal_latency::run(&ctx)?),
        Cmd::Gridengine => match grid_engine::run(&ctx) {
            Ok(r) => Some(r),
            Err(e) => {
                // Record why, so the report says it instead of showing stale numbers.
                let why = format!("{e:#}");
                BenchResult::not_measured(&ctx, "gridengine", "Grid Engine qsub -sync y", &why)
                    .save(&results_dir)?;
                return Err(e);
            }
        },
        Cmd::Profile => Some(syscall_profile::run(&ctx)?),
        Cmd::Kvm => Some(kvm_primitives::run(&ctx)?),
        Cmd::Fs => Some(file_server::run(&ctx)?),
        Cmd::Compare {
            name,
            title,
            note,
            builds,
        } => Some(optimisation::run(
            &ctx,
            &optimisation::Comparison {
                name: name.clone(),
                title: title.clone(),
                notes: note.clone(),
                builds: builds.clone(),
                with_qemu: false,
            },
        )?),
        Cmd::CompareVmm {
            name,
            title,
            note,
            with_qemu,
            builds,
        } => Some(optimisation::run_vmm(
            &ctx,
            &optimisation::Comparison {
                name: name.clone(),
                title: title.clone(),
                notes: note.clone(),
                builds: builds.clone(),
                with_qemu: *with_qemu,
            },
        )?),
        Cmd::CompareCmdline {
            name,
            title,
            note,
            cmdline,
        } => Some(optimisation::run_cmdline(
            &ctx,
            &optimisation::Comparison {
                name: name.clone(),
                title: title.clone(),
                notes: note.clone(),
                builds: Vec::new(),
                with_qemu: false,
            },
            cmdline,
        )?),
        Cmd::All => None,
        Cmd::Report | Cmd::TinyGuest { .. } => {
            unreachable!("handled above")
        }
    };
    if let Some(mut result) = single {
        result.load_average = format!("{load_before} before, {} after", results::load_average());
        let path = result.save(&results_dir)?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    type Bench = fn(&BenchContext) -> anyhow::Result<BenchResult>;
    let all: [(&str, &str, Bench); 12] = [
        (
            "boot",
            "VMM start to first guest instruction",
            boot_latency::run,
        ),
        ("job", "sge_virtualizer run -- /bin/true", job_latency::run),
        ("memory", "VMM memory overhead", memory_overhead::run),
        (
            "memory-return",
            "Guest memory given back",
            memory_return::run,
        ),
        ("relay", "Output relay throughput", relay::run),
        ("signal", "Signal round trip", signal_latency::run),
        ("gridengine", "Grid Engine qsub -sync y", grid_engine::run),
        ("profile", "Embedded VMM system calls", syscall_profile::run),
        ("kvm", "Host KVM primitives", kvm_primitives::run),
        ("fs", "virtio-fs file server", file_server::run),
        ("images", "OS image formats", image_formats::run),
        (
            "network",
            "Job network: TCP to the host's loopback",
            network::run,
        ),
    ];
    for (id, title, bench) in all {
        let before = results::load_average();
        let mut result = bench(&ctx).unwrap_or_else(|e| {
            eprintln!("{id}: not measured: {e:#}");
            BenchResult::not_measured(&ctx, id, title, &format!("{e:#}"))
        });
        result.load_average = format!("{before} before, {} after", results::load_average());
        let path = result.save(&results_dir)?;
        eprintln!("wrote {}", path.display());
    }
    let path = report::write(&out_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
