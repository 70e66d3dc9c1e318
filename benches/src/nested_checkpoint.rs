//! Benchmark 13 (`nested-checkpoint`): checkpoints of a running job on real KVM, in the nested real-KVM host: for
//! 256 MiB, 1 GiB and 4 GiB guests, the snapshot's size, how long the VM is paused for it and
//! how long `run` takes from SIGUSR2 to its exit (snapshot written, VM stopped); then the
//! restore in a new `run --restore` process: VM restored (guest RAM and state loaded), first
//! guest instruction, and the job's agent reconnected (the job running again), each in ms since
//! that process's main(). Everything there is emulated twice: the absolute times are not
//! hardware's; how they grow with the guest's size carries over.
//!
//! Like benchmark 9 the harness runs itself inside the nested host (`nested-checkpoint-inside`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::{BenchContext, UnderTest};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;

/// The result's id.
pub const ID: &str = "nested-checkpoint";
/// Guest sizes measured, MiB.
const SIZES_MIB: [u32; 3] = [256, 1024, 4096];
/// The job: counts on stdout, 10 lines a second, until killed.
const JOB: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done";
/// How long any step may take in the nested host before the run counts as failed.
const PATIENCE: Duration = Duration::from_secs(180);

/// Options of `nested-checkpoint`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// A build made by benches/build-under-test.sh inside the repository (the nested host
    /// sees only the repository), measured as "…, baseline" variants in the same run.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

/// `run` for the benchmark's job, with a checkpoint directory.
fn run_command(ut: &UnderTest, mem: u32, dir: &Path, restore: bool) -> Command {
    let mut cmd = Command::new(&ut.shepherd);
    cmd.args([
        "run",
        "--backend",
        "embedded",
        "--network",
        "none",
        "--timings",
    ])
    .args(["--mem", &mem.to_string()])
    .arg("--checkpoint-dir")
    .arg(dir.join("ckpt"));
    if restore {
        cmd.arg("--restore");
    } else {
        cmd.args(["--", "sh", "-c", JOB]);
    }
    cmd.env("SGE_VIRTUALIZER_KERNEL", &ut.kernel)
        .env("SGE_VIRTUALIZER_INITRD", &ut.initrd)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn wait_for(what: &str, mut ready: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ready()? {
        if start.elapsed() > PATIENCE {
            bail!("{what}: not within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    text
}

fn signal(child: &Child, sig: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) of our own child, which has not been reaped yet.
    if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
        bail!("kill: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `{"checkpoint": {"Taken": {...}}}` line `run --timings` prints.
fn checkpoint_report(stderr: &str) -> anyhow::Result<serde_json::Value> {
    for line in stderr.lines().rev() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
            continue;
        };
        if let Some(taken) = v.get("checkpoint").and_then(|c| c.get("Taken")) {
            return Ok(taken.clone());
        }
        if let Some(other) = v.get("checkpoint") {
            bail!("the checkpoint was not taken: {other}");
        }
    }
    bail!("no checkpoint report in run's stderr: {}", stderr.trim())
}

/// One checkpoint and restore of a `mem` MiB guest.
fn once(ut: &UnderTest, mem: u32) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("out");
    let out = || -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)?)
    };
    let mut first = run_command(ut, mem, dir.path(), false)
        .stdout(out()?)
        .spawn()
        .context("starting run")?;
    let counting = wait_for("the job counting to 10", || Ok(lines_in(&out_path) >= 10));
    if let Err(e) = counting {
        let _ = first.kill();
        let _ = first.wait();
        return Err(e);
    }
    let asked = Instant::now();
    signal(&first, libc::SIGUSR2)?;
    let status = first.wait()?;
    let checkpoint_wall = asked.elapsed().as_secs_f64() * 1000.0;
    let stderr = stderr_of(&mut first);
    if status.code() != Some(99) {
        bail!(
            "run did not exit 99 after SIGUSR2 ({status}): {}",
            stderr.trim()
        );
    }
    let report = checkpoint_report(&stderr)?;
    let number = |key: &str| {
        report
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("{key} missing in {report}"))
    };
    let at_checkpoint = lines_in(&out_path);

    let mut second = run_command(ut, mem, dir.path(), true)
        .stdout(out()?)
        .spawn()
        .context("starting run --restore")?;
    let going_on = wait_for("the restored job counting on", || {
        Ok(lines_in(&out_path) >= at_checkpoint + 3)
    });
    let _ = signal(&second, libc::SIGTERM);
    let status = second.wait()?;
    let stderr = stderr_of(&mut second);
    going_on.with_context(|| format!("run --restore ({status}): {}", stderr.trim()))?;
    let t = crate::shepherd_run::parse_timings(&stderr)?;
    let text = std::fs::read_to_string(&out_path)?;
    let expected: String = (1..=text.lines().count())
        .map(|i| format!("{i}\n"))
        .collect();
    if text != expected {
        bail!("the job's output is not 1..N without a gap or a duplicate");
    }
    let mut sample = vec![
        (
            "snapshot_size",
            number("snapshot_bytes")? / (1024.0 * 1024.0),
        ),
        ("vm_paused", number("paused_ms")?),
        ("checkpoint_wall", checkpoint_wall),
    ];
    for (name, value) in [
        ("restore_vm_created", t.vm_created_ms),
        ("restore_first_instruction", t.first_instruction_ms),
        ("restore_job_running", t.agent_hello_ms),
    ] {
        if let Some(v) = value {
            sample.push((name, v));
        }
    }
    Ok(sample)
}

/// Inside the nested host: every size, interleaved; the result goes to `out`.
pub fn inside(ctx: &BenchContext, opts: &Options, out: &Path) -> anyhow::Result<()> {
    crate::nested_kvm::require_real_kvm(ctx)?;
    let ut = &ctx.under_test;
    let baseline = opts.baseline.as_deref().map(UnderTest::from_build_dir);
    let mut variants: Vec<Variant> = Vec::new();
    for &mem in &SIZES_MIB {
        variants.push(Variant::new(format!("{mem} MiB guest"), "ms", move || {
            once(ut, mem)
        }));
        if let Some(b) = &baseline {
            variants.push(Variant::new(
                format!("{mem} MiB guest, baseline"),
                "ms",
                move || once(b, mem),
            ));
        }
    }
    eprintln!(
        "nested-checkpoint: {} warm-up + {} runs per size",
        ctx.warmup, ctx.runs
    );
    let (mut series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    for s in &mut series {
        if s.metric == "snapshot_size" {
            s.unit = "MiB".into();
        }
    }
    let result = BenchResult::measured(ctx, ID, ID, series, outcomes, Vec::new());
    std::fs::write(out, serde_json::to_string(&result)?)
        .with_context(|| format!("writing {}", out.display()))
}

/// Outside: boots the nested host, runs [`inside`] there, and returns its result, labelled.
pub fn run(ctx: &BenchContext, opts: &Options) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let root = crate::context::workspace_root();
    let mut extra = Vec::new();
    let mut notes = Vec::new();
    if let Some(dir) = &opts.baseline {
        let dir =
            std::fs::canonicalize(dir).with_context(|| format!("--baseline {}", dir.display()))?;
        if !dir.starts_with(&root) {
            bail!(
                "--baseline {} is outside the repository, which is all the nested host sees",
                dir.display()
            );
        }
        let b = UnderTest::from_build_dir(&dir);
        notes.push(format!("baseline: {} ({})", b.revision, dir.display()));
        extra = vec!["--baseline".to_string(), dir.display().to_string()];
    }
    let inner = crate::nested_kvm::run_inside(ctx, "nested-checkpoint-inside", &extra, 2400)?;
    let mut result = BenchResult::measured(
        ctx,
        ID,
        "Nested real KVM: checkpoint and restore of a running job (run --checkpoint-dir, \
         SIGUSR2, run --restore), by guest size",
        inner.series,
        inner.outcomes,
        vec![
            format!(
                "Measured inside the nested real-KVM host (scripts/nested-kvm-host.sh: Debian's \
                 kvm-amd in QEMU TCG, 4 vCPUs) on this machine: {}. Guest code and the VMM run \
                 emulated twice: absolute times are not hardware's (the issue's goal, a 1 GiB \
                 guest running again within 10 ms of the restore's start, is for real \
                 hardware); how each figure grows with the guest's size carries over.",
                inner.machine.kvm_probe
            ),
            "Job: a shell loop printing a counter every 100 ms to a file, 1 vCPU, no network; \
             SIGUSR2 after 10 lines. snapshot_size: the snapshot file (guest RAM written \
             sparsely: only pages that hold data); vm_paused: the vCPUs paused until the \
             snapshot was written (the VM then stays stopped); checkpoint_wall: SIGUSR2 to \
             run's exit (99). restore_*: ms since the restoring process's main(): the VM \
             restored (RAM and state loaded), its first guest instruction, and the job's \
             agent reconnected and resumed (the job running again). Each run checks the \
             output is 1..N with no gap or duplicate."
                .into(),
        ]
        .into_iter()
        .chain(notes)
        .collect(),
    );
    result.machine = inner.machine;
    Ok(result)
}
