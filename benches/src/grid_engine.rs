//! Benchmark 5: Grid Engine — wall time of `qsub -sync y -b y /bin/true` on the one-host cell of
//! `scripts/sge-cell.sh`, with the stock shepherd and with sge_virtualizer, interleaved.
//!
//! Switching `shepherd_cmd` between runs would wait on execd's configuration refresh, so for the
//! benchmark `shepherd_cmd` points at a copy of this binary (the dispatcher): started by execd
//! as `sge_shepherd-<job>`, it reads a mode file and execs either the stock shepherd or
//! sge_virtualizer with the same `argv[0]` and arguments. Both variants pay the same extra exec.
//! Jobs not submitted by the benchmark (another user of the shared cell) go to the previous
//! `shepherd_cmd`, which is restored afterwards.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};
use crate::context::{workspace_root, BenchContext};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;

/// Where the dispatcher, its mode file and the copies of the binary and image live (execd
/// must be able to reach them as the admin user, and the job user must read the image).
const BENCH_DIR: &str = "/var/tmp/sge-bench";
const DISPATCHER: &str = "sge_shepherd_dispatch";
const MODE_FILE: &str = "mode";
/// Holds the `shepherd_cmd` in force before the benchmark, for other jobs.
const PREVIOUS_FILE: &str = "previous";
/// The benchmark's job name; only these jobs follow the mode file.
const JOB_NAME: &str = "bench_true";
/// One line per dispatched benchmark job: `<job id> <mode>`, to check each run went where
/// it should (another user of the cell may change shepherd_cmd meanwhile).
const DISPATCH_LOG: &str = "dispatch.log";
/// One line per start of the dispatcher, ours or not (`argv[0]`, cwd, decision).
const DEBUG_LOG: &str = "dispatch-debug.log";
const STOCK_SHEPHERD: &str = "/usr/sbin/sge_shepherd";
/// The job user of the cell (scripts/sge-cell.sh).
const JOB_USER: &str = "sgetest";

/// Whether this process was started by execd as a shepherd (`argv[0]` `sge_shepherd-<job>`).
pub fn started_as_shepherd() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("sge_shepherd"))
}

/// The dispatcher: exec the shepherd the mode file names, keeping `argv[0]` and the arguments.
pub fn dispatch() -> anyhow::Result<()> {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let dir = Path::new(BENCH_DIR);
    // execd starts the shepherd in the job's active_jobs directory, whose `config` names it.
    let config = std::fs::read_to_string("config").unwrap_or_default();
    let ours = config.lines().any(|l| l == format!("job_name={JOB_NAME}"));
    let mode = if ours {
        let mode = std::fs::read_to_string(dir.join(MODE_FILE)).unwrap_or_default();
        let job_id = config
            .lines()
            .find_map(|l| l.strip_prefix("job_id="))
            .unwrap_or("?");
        append_line(
            &dir.join(DISPATCH_LOG),
            &format!("{job_id} {}", mode.trim()),
        );
        mode
    } else {
        let previous = std::fs::read_to_string(dir.join(PREVIOUS_FILE)).unwrap_or_default();
        match previous.trim() {
            "" | "none" | "NONE" => "stock".to_string(),
            other => format!("exec {other}"),
        }
    };
    // Every start, ours or not, for diagnosing where execd runs shepherds.
    let cwd = std::env::current_dir().unwrap_or_default();
    append_line(
        &dir.join(DEBUG_LOG),
        &format!(
            "argv0={} cwd={} config_lines={} ours={ours} mode={}",
            argv0.to_string_lossy(),
            cwd.display(),
            config.lines().count(),
            mode.trim()
        ),
    );
    let mut cmd = if mode.trim() == "stock" {
        Command::new(STOCK_SHEPHERD)
    } else if let Some(other) = mode.strip_prefix("exec ") {
        Command::new(other)
    } else {
        let mut c = Command::new(dir.join("sge_virtualizer"));
        c.env("SGE_VIRTUALIZER_CONFIG", dir.join("settings.toml"));
        c
    };
    let err = cmd.arg0(argv0).args(args).exec();
    Err(err).context("exec of the shepherd failed")
}

fn append_line(path: &Path, line: &str) {
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
}

fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("/bin/sh")
        .args(["-c", cmd])
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn install(ctx: &BenchContext) -> anyhow::Result<PathBuf> {
    let dir = Path::new(BENCH_DIR);
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let copy = |from: &Path, name: &str, mode: u32| -> anyhow::Result<PathBuf> {
        let to = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &to)?;
        Ok(to)
    };
    let dispatcher = copy(&std::env::current_exe()?, DISPATCHER, 0o755)?;
    copy(&ctx.under_test.shepherd, "sge_virtualizer", 0o755)?;
    let kernel = copy(&ctx.under_test.kernel, "vmlinux", 0o644)?;
    let initrd = copy(&ctx.under_test.initrd, "initramfs.cpio", 0o644)?;
    std::fs::write(
        dir.join("settings.toml"),
        format!(
            "kernel = \"{}\"\ninitramfs = \"{}\"\nbackend = \"{}\"\n",
            kernel.display(),
            initrd.display(),
            if ctx.machine.kvm_can_run_linux {
                "auto"
            } else {
                "qemu"
            }
        ),
    )?;
    Ok(dispatcher)
}

fn set_mode(mode: &str) -> anyhow::Result<()> {
    std::fs::write(Path::new(BENCH_DIR).join(MODE_FILE), mode)?;
    Ok(())
}

/// Where the shepherd_cmd in force is set: the global configuration, or a host-local one
/// (`qconf -sconf <host>`), which overrides it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConfigScope {
    Global,
    Host(String),
}

impl ConfigScope {
    /// The scope whose shepherd_cmd execd uses on this host.
    fn effective() -> anyhow::Result<ConfigScope> {
        let host = sh("SGE_ROOT=/var/lib/gridengine SGE_CELL=default \
                       /usr/lib/gridengine/gethostname -aname")?
        .trim()
        .to_string();
        let hosts = sh("qconf -sconfl 2>/dev/null || true")?;
        if hosts.lines().any(|l| l.trim() == host) {
            let conf = sh(&format!("qconf -sconf '{host}'"))?;
            if conf.lines().any(|l| l.starts_with("shepherd_cmd")) {
                return Ok(ConfigScope::Host(host));
            }
        }
        Ok(ConfigScope::Global)
    }

    fn name(&self) -> String {
        match self {
            ConfigScope::Global => "global configuration".into(),
            ConfigScope::Host(h) => format!("host-local configuration of {h}"),
        }
    }

    fn current(&self) -> anyhow::Result<String> {
        let conf = match self {
            ConfigScope::Global => sh("qconf -sconf global")?,
            ConfigScope::Host(h) => sh(&format!("qconf -sconf '{h}'"))?,
        };
        Ok(conf
            .lines()
            .find_map(|l| l.strip_prefix("shepherd_cmd"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "none".into()))
    }

    fn set(&self, value: &str) -> anyhow::Result<()> {
        match self {
            ConfigScope::Global => {
                let script = workspace_root().join("scripts/sge-cell.sh");
                let out = Command::new(&script)
                    .args(["shepherd", value])
                    .stdout(Stdio::null())
                    .output()
                    .with_context(|| format!("running {}", script.display()))?;
                if !out.status.success() {
                    bail!(
                        "sge-cell.sh shepherd {value} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            ConfigScope::Host(h) => {
                // qconf -Mconf takes the configuration's name from the file's name.
                let conf = sh(&format!("qconf -sconf '{h}'"))?;
                let body: String = conf
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| {
                        if l.starts_with("shepherd_cmd") {
                            format!("shepherd_cmd                 {value}\n")
                        } else {
                            format!("{l}\n")
                        }
                    })
                    .collect();
                let dir = tempfile::tempdir()?;
                let file = dir.path().join(h);
                std::fs::write(&file, body)?;
                sh(&format!("qconf -Mconf '{}' >/dev/null", file.display()))?;
            }
        }
        Ok(())
    }
}

fn qsub_true(mode: &str) -> anyhow::Result<Sample> {
    set_mode(mode)?;
    let start = monotonic_ns();
    let out = Command::new("runuser")
        .args(["-u", JOB_USER, "--", "qsub", "-sync", "y", "-b", "y"])
        .args([
            "-o",
            "/dev/null",
            "-e",
            "/dev/null",
            "-N",
            JOB_NAME,
            "/bin/true",
        ])
        .current_dir("/tmp")
        .stdin(Stdio::null())
        .output()
        .context("running qsub")?;
    let ms = ms_between(start, monotonic_ns());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "Your job 45 ("bench_true") has been submitted"
    let job_id = stdout
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap_or("?")
        .to_string();
    if !out.status.success() {
        bail!(
            "qsub -sync y failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = std::fs::read_to_string(Path::new(BENCH_DIR).join(DISPATCH_LOG)).unwrap_or_default();
    if !log.lines().any(|l| l == format!("{job_id} {mode}")) {
        bail!(
            "job {job_id} was not recorded by the dispatcher in mode {mode} (shepherd_cmd not \
             in force for it, or the dispatcher could not write its log)"
        );
    }
    Ok(vec![("wall", ms)])
}

/// Refuses to touch a cell that is down, has jobs, or has a queue in an error state.
fn check_cell() -> anyhow::Result<()> {
    let jobs = sh("qstat -u '*'")?;
    let count = jobs
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .count();
    if count > 0 {
        bail!(
            "the shared cell had {count} job(s) of other users (qstat -u '*'); the benchmark \
             does not switch shepherd_cmd under them"
        );
    }
    let queues = sh("qstat -f")?;
    if let Some(l) = queues.lines().find(|l| {
        l.starts_with("all.q@") && l.split_whitespace().nth(5).is_some_and(|s| s.contains('E'))
    }) {
        bail!("queue in error state: {l}");
    }
    Ok(())
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    sh("command -v qsub qconf runuser >/dev/null")
        .context("Grid Engine clients not installed (scripts/sge-cell.sh start)")?;
    check_cell()?;
    let dispatcher = install(ctx)?;
    let scope = ConfigScope::effective()?;
    let previous = scope.current()?;
    if previous == dispatcher.to_string_lossy() {
        bail!("shepherd_cmd already is {previous} (left from an interrupted run?); reset it first");
    }
    std::fs::write(Path::new(BENCH_DIR).join(PREVIOUS_FILE), &previous)?;
    // execd may start shepherds under its admin user's effective uid: let any uid append.
    for log in [DISPATCH_LOG, DEBUG_LOG] {
        let path = Path::new(BENCH_DIR).join(log);
        std::fs::write(&path, "")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    }
    scope.set(&dispatcher.to_string_lossy())?;
    // execd picks the configuration change up with its next load report.
    std::thread::sleep(std::time::Duration::from_secs(5));
    // One probe job: if execd did not start it through the dispatcher, the switch did not
    // take effect and every measurement would be of some other shepherd.
    if let Err(e) = qsub_true("stock") {
        let now = scope.current().unwrap_or_default();
        if now == dispatcher.to_string_lossy() {
            let _ = scope.set(&previous);
        }
        bail!(
            "a probe job did not go through the dispatcher ({e:#}) after setting shepherd_cmd in \
             the cell's {}; see {BENCH_DIR}/{DEBUG_LOG}",
            scope.name()
        );
    }
    let mut variants = vec![
        Variant::new("stock sge_shepherd", "ms", || qsub_true("stock")),
        Variant::new("sge_virtualizer (QEMU backend, TCG)", "ms", || {
            qsub_true("virtualizer")
        }),
    ];
    let _ = writeln!(
        std::io::stderr(),
        "gridengine: {} warm-up + {} runs per variant",
        ctx.warmup,
        ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    // Put the previous value back unless someone else changed it meanwhile.
    let restored = match scope.current() {
        Ok(now) if now == dispatcher.to_string_lossy() => scope.set(&previous),
        Ok(now) => Err(anyhow::anyhow!(
            "shepherd_cmd was changed to `{now}` by someone else during the run; left as is"
        )),
        Err(e) => Err(e),
    };
    let mut notes = vec![
        format!(
            "`runuser -u {JOB_USER} -- qsub -sync y -b y -o /dev/null -e /dev/null /bin/true`, \
             wall time from the harness's fork of runuser to qsub's exit; the cell's scheduler \
             runs every second (schedule_interval 0:0:1, flush_submit_sec 1, flush_finish_sec 1, \
             load_report_time 1 s, as scripts/sge-cell.sh sets them), so most of the time is \
             scheduling, the same for both."
        ),
        format!(
            "shepherd_cmd = {BENCH_DIR}/{DISPATCHER} (a copy of bench-report) for both variants; \
             it execs {STOCK_SHEPHERD} or a copy of sge_virtualizer (settings: \
             {BENCH_DIR}/settings.toml) with argv[0] kept; jobs not named {JOB_NAME} go to \
             the previous shepherd_cmd, `{previous}`, which is restored after the run \
             (set in the cell's {}, the one execd uses on this host).",
            scope.name()
        ),
    ];
    if let Err(e) = restored {
        notes.push(format!("restoring shepherd_cmd failed: {e:#}"));
    }
    Ok(BenchResult::measured(
        ctx,
        "gridengine",
        "Grid Engine: qsub -sync y -b y /bin/true, stock shepherd vs sge_virtualizer",
        series,
        outcomes,
        notes,
    ))
}
