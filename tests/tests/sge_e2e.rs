//! Grid Engine end to end: a real one-host Son of Grid Engine cell (Debian's gridengine-master,
//! -exec and -client, brought up by `scripts/sge-cell.sh`) with `shepherd_cmd` set to the built
//! `sge_virtualizer`, jobs submitted as the test user `sgetest`, and the results read back
//! through `qacct`, `qstat` and the active job directories (`KEEP_ACTIVE=true`).
//!
//! Needs root (the cell and the job user), the guest image in `build/guest/`, and QEMU with
//! `vhost-device-vsock` (the VM backend here is QEMU TCG). Without them each test says SKIPPED.
//! The tests share one cell and run one at a time (two cores, TCG guests: timing checks need
//! the CPU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use integration_tests::{parent_pid, repo_root, report_skip, sge_virtualizer_bin};

/// Everything outside the repository the cell's daemons and the job user must read.
const TEST_ROOT: &str = "/var/tmp/sge_virtualizer-e2e";
const JOB_USER: &str = "sgetest";
const SPOOL: &str = "/var/spool/gridengine/execd";
/// The OS image store the cell's jobs use (the image tests build bullseye and bookworm there;
/// building is cached).
const IMAGE_STORE: &str = "/var/lib/sge_virtualizer/images";
/// Where the shepherds on this host count each queue's shortages in a row.
const SHORTAGES: &str = "/var/lib/sge_virtualizer/shortages";
/// A queue's guest RAM no test host can back (64 TiB): a shortage that never passes.
const HUGE_GUEST: &str = "memory_mib = 67108864";
/// The queue notify time sge-cell.sh configures (`SGE_CELL_NOTIFY`).
const NOTIFY_SECS: u64 = 5;

/// The cell, set up once for all tests; `Err` says why the tests cannot run here.
fn cell() -> &'static Result<Cell, String> {
    static CELL: OnceLock<Result<Cell, String>> = OnceLock::new();
    CELL.get_or_init(Cell::set_up)
}

/// One test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `body` with the cell, or reports why it cannot.
fn with_cell(test: &str, body: impl FnOnce(&Cell)) {
    let _guard = serial();
    match cell() {
        Ok(c) => body(c),
        Err(why) => report_skip(test, why),
    }
}

struct Cell {
    host: String,
    guest_release: String,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/root/.cargo/bin"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Cell {
    fn set_up() -> Result<Cell, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (installs and runs a Grid Engine cell)".into());
        }
        let image = repo_root().join("build/guest");
        for f in ["vmlinux", "initramfs.cpio", "manifest.json"] {
            if !image.join(f).is_file() {
                return Err(format!(
                    "guest image file {} missing (scripts/build-guest-image.sh)",
                    image.join(f).display()
                ));
            }
        }
        if find_program("qemu-system-x86_64").is_none() {
            return Err("qemu-system-x86_64 not installed".into());
        }
        let Some(vhost) = find_program("vhost-device-vsock") else {
            return Err("vhost-device-vsock not installed".into());
        };
        // The VMM runs as the job user: its helper must be executable by that user, which a
        // copy in root's home is not.
        let public_vhost = Path::new("/usr/local/bin/vhost-device-vsock");
        if !public_vhost.is_file() {
            std::fs::copy(&vhost, public_vhost).map_err(|e| format!("copy {vhost:?}: {e}"))?;
        }
        let manifest = std::fs::read_to_string(image.join("manifest.json")).unwrap_or_default();
        let guest_release = serde_json::from_str::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|v| v["kernel_release"].as_str().map(str::to_string))
            .ok_or("manifest.json has no kernel_release")?;

        // Binary and image where sgeadmin and the job user can reach them.
        let root = Path::new(TEST_ROOT);
        std::fs::create_dir_all(root).map_err(|e| e.to_string())?;
        let bin = root.join("sge_virtualizer");
        let tmp = root.join("sge_virtualizer.new");
        std::fs::copy(sge_virtualizer_bin(), &tmp).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &bin).map_err(|e| e.to_string())?;
        for f in ["vmlinux", "initramfs.cpio"] {
            std::fs::copy(image.join(f), root.join(f)).map_err(|e| e.to_string())?;
        }
        // a "kernel" that is none, and an initramfs the kernel cannot use (it panics)
        std::fs::write(root.join("garbage-kernel"), b"not a kernel\n")
            .map_err(|e| e.to_string())?;
        std::fs::write(root.join("garbage-initramfs"), b"not an initramfs\n")
            .map_err(|e| e.to_string())?;
        let settings = root.join("settings.toml");
        std::fs::write(
            &settings,
            format!(
                "kernel = \"{r}/vmlinux\"\ninitramfs = \"{r}/initramfs.cpio\"\nbackend = \"qemu\"\n\
                 image_store = \"{IMAGE_STORE}\"\njob_images = [\"bookworm\", \"nosuch\"]\n\
                 [queues.\"bullseye.q\"]\nimage = \"bullseye\"\n\
                 [queues.\"seqnokernel.q\"]\nkernel = \"{r}/missing/vmlinux\"\n\
                 [queues.\"seqbadvm.q\"]\ninitramfs = \"{r}/garbage-initramfs\"\n\
                 [queues.\"seqnotkernel.q\"]\nkernel = \"{r}/garbage-kernel\"\n\
                 [queues.\"shortage.q\"]\n{HUGE_GUEST}\n\
                 [queues.\"outsiders.q\"]\ndelegate = \"never\"\n\
                 [queues.\"noshare.q\"]\nshare_job_dirs = false\n",
                r = TEST_ROOT
            ),
        )
        .map_err(|e| e.to_string())?;

        let script = repo_root().join("scripts/sge-cell.sh");
        let out = run(Command::new(&script)
            .arg("start")
            .arg(&bin)
            .env("SGE_CELL_VIRTUALIZER_CONFIG", &settings)
            .env("SGE_CELL_KEEP_ACTIVE", "true")
            .env("SGE_CELL_NOTIFY", format!("00:00:0{NOTIFY_SECS}")));
        if !out.status.success() {
            panic!("sge-cell.sh start failed:\n{}", text(&out));
        }
        let host = String::from_utf8_lossy(
            &run(Command::new("/usr/lib/gridengine/gethostname")
                .arg("-aname")
                .env("SGE_ROOT", "/var/lib/gridengine")
                .env("SGE_CELL", "default"))
            .stdout,
        )
        .trim()
        .to_string();
        let cell = Cell {
            host,
            guest_release,
        };
        for q in [
            "seqnokernel.q",
            "seqbadvm.q",
            "seqnotkernel.q",
            "seqgood.q",
            "shortage.q",
            "settings.q",
            "bullseye.q",
            "outsiders.q",
            "noshare.q",
        ] {
            cell.add_queue(q, &[]);
        }
        let root = Path::new(TEST_ROOT);
        for (name, body) in [
            (
                "prolog.sh",
                "#!/bin/sh\necho \"prolog $1 on $(uname -r)\"\n",
            ),
            (
                "epilog.sh",
                "#!/bin/sh\necho \"epilog exit=$SGE_JOBEXIT_STAT\"\n",
            ),
            (
                "pe_start.sh",
                "#!/bin/sh\necho \"pe_start hosts=$(wc -l < \"$1\")\"\n",
            ),
            (
                "pe_stop.sh",
                "#!/bin/sh\necho \"pe_stop exit=$SGE_JOBEXIT_STAT\"\n",
            ),
            // a job owner's prolog that takes the working directory from its owner after the
            // shepherd checked it (it runs in it)
            ("lock_cwd.sh", "#!/bin/sh\nchmod 0 .\n"),
        ] {
            std::fs::write(root.join(name), body).map_err(|e| e.to_string())?;
            std::fs::set_permissions(
                root.join(name),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .map_err(|e| e.to_string())?;
        }
        let prolog = format!("{TEST_ROOT}/prolog.sh $job_id");
        let epilog = format!("{TEST_ROOT}/epilog.sh");
        let pe = root.join("vmpe");
        std::fs::write(
            &pe,
            format!(
                "pe_name vmpe\nslots 4\nuser_lists NONE\nxuser_lists NONE\n\
                 start_proc_args {TEST_ROOT}/pe_start.sh $pe_hostfile\n\
                 stop_proc_args {TEST_ROOT}/pe_stop.sh\nallocation_rule $pe_slots\n\
                 control_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\n\
                 accounting_summary FALSE\nqsort_args NONE\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let verb = if run(Command::new("qconf").args(["-sp", "vmpe"]))
            .status
            .success()
        {
            "-Mp"
        } else {
            "-Ap"
        };
        let out = run(Command::new("qconf").arg(verb).arg(&pe));
        if !out.status.success() {
            return Err(format!("qconf {verb} vmpe: {}", text(&out)));
        }
        cell.add_queue(
            "prolog.q",
            &[
                ("prolog", &prolog),
                ("epilog", &epilog),
                ("pe_list", "vmpe"),
            ],
        );
        cell.add_queue(
            "lockcwd.q",
            &[
                ("prolog", &format!("{TEST_ROOT}/lock_cwd.sh")),
                ("pe_list", "vmpe"),
            ],
        );
        Ok(cell)
    }

    /// A one-slot copy of all.q named `name` (for the fault tests' VM settings), with some
    /// attributes replaced.
    fn add_queue(&self, name: &str, attributes: &[(&str, &str)]) {
        let conf = text(&run(Command::new("qconf").args(["-sq", "all.q"])));
        let conf: String = conf
            .lines()
            .map(|l| {
                if l.starts_with("qname") {
                    format!("qname {name}\n")
                } else if l.starts_with("slots") {
                    "slots 1\n".into()
                } else if let Some((k, v)) = attributes
                    .iter()
                    .find(|(k, _)| l.split_whitespace().next() == Some(k))
                {
                    format!("{k} {v}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let file = Path::new(TEST_ROOT).join(name);
        std::fs::write(&file, conf).unwrap();
        let verb = if run(Command::new("qconf").args(["-sq", name]))
            .status
            .success()
        {
            "-Mq"
        } else {
            "-Aq"
        };
        let out = run(Command::new("qconf").arg(verb).arg(&file));
        assert!(out.status.success(), "qconf {verb} {name}: {}", text(&out));
        let _ = run(Command::new("qmod").args(["-c", &format!("{name}@{}", self.host)]));
    }

    /// A fresh directory owned by the job user for one test's scripts and output.
    fn work_dir(&self, test: &str) -> PathBuf {
        let dir = PathBuf::from(format!("/home/{JOB_USER}/sge_e2e/{test}"));
        let _ = std::fs::remove_dir_all(&dir);
        let out = run(Command::new("runuser").args([
            "-u",
            JOB_USER,
            "--",
            "mkdir",
            "-p",
            dir.to_str().unwrap(),
        ]));
        assert!(out.status.success(), "{}", text(&out));
        dir
    }

    /// Writes a job script owned by the job user.
    fn script(&self, dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let u = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
        std::os::unix::fs::chown(&p, Some(u.uid.as_raw()), Some(u.gid.as_raw())).unwrap();
        p
    }

    /// Submits as the job user from `dir` (to all.q unless `args` name a queue: the other
    /// queues are the fault tests'); returns the job id.
    fn qsub(&self, dir: &Path, args: &[&str]) -> u32 {
        self.try_qsub(dir, args)
            .unwrap_or_else(|e| panic!("qsub {args:?}: {e}"))
    }

    /// Submits without `-q`: the scheduler chooses the queue.
    fn qsub_unrouted(&self, dir: &Path, args: &[&str]) -> u32 {
        self.submit(dir, &[], args)
            .unwrap_or_else(|e| panic!("qsub {args:?}: {e}"))
    }

    /// [`Self::qsub`], with qsub's complaint when it refuses the job.
    fn try_qsub(&self, dir: &Path, args: &[&str]) -> Result<u32, String> {
        let queue: &[&str] = if args.contains(&"-q") {
            &[]
        } else {
            &["-q", "all.q"]
        };
        self.submit(dir, queue, args)
    }

    fn submit(&self, dir: &Path, queue: &[&str], args: &[&str]) -> Result<u32, String> {
        let out = run(Command::new("runuser")
            .args(["-u", JOB_USER, "--", "env", "-C", dir.to_str().unwrap()])
            .args(["qsub", "-terse", "-cwd"])
            .args(queue)
            .args(args));
        if !out.status.success() {
            return Err(text(&out));
        }
        let s = String::from_utf8_lossy(&out.stdout);
        Ok(s.trim()
            .split('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("qsub printed {s:?}")))
    }

    /// The accounting records of `job` (one per run), as key → value.
    fn accounting(&self, job: u32) -> Vec<HashMap<String, String>> {
        let out = run(Command::new("qacct").args(["-j", &job.to_string()]));
        let mut records = Vec::new();
        let mut cur: Option<HashMap<String, String>> = None;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with("=====") {
                records.extend(cur.take());
                cur = Some(HashMap::new());
                continue;
            }
            if let (Some(rec), Some((k, v))) = (cur.as_mut(), line.split_once(char::is_whitespace))
            {
                rec.insert(k.to_string(), v.trim().to_string());
            }
        }
        records.extend(cur);
        records
    }

    /// Waits until `job` has at least `n` accounting records.
    fn wait_accounting(
        &self,
        job: u32,
        n: usize,
        timeout: Duration,
    ) -> Vec<HashMap<String, String>> {
        let start = Instant::now();
        loop {
            let r = self.accounting(job);
            if r.len() >= n {
                return r;
            }
            assert!(
                start.elapsed() < timeout,
                "job {job}: {} accounting records after {timeout:?}, expected {n}; qstat:\n{}\ntrace:\n{}",
                r.len(),
                text(&run(Command::new("qstat").args(["-f", "-u", "*"]))),
                self.active_file(job, "trace").unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The job's active directory (kept after the job by KEEP_ACTIVE).
    fn active_dir(&self, job: u32) -> Option<PathBuf> {
        let spool = std::fs::read_dir(SPOOL).ok()?;
        spool
            .flatten()
            .map(|host| host.path().join("active_jobs").join(format!("{job}.1")))
            .find(|p| p.is_dir())
    }

    fn active_file(&self, job: u32, name: &str) -> Option<String> {
        std::fs::read_to_string(self.active_dir(job)?.join(name)).ok()
    }

    /// Waits until the job's VM runs (the shepherd wrote `job_pid`) and returns the directory.
    fn wait_running(&self, job: u32, timeout: Duration) -> PathBuf {
        let start = Instant::now();
        loop {
            if let Some(d) = self.active_dir(job) {
                if d.join("job_pid").is_file() {
                    return d;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "job {job} did not start within {timeout:?}:\n{}",
                text(&run(Command::new("qstat").args(["-f", "-u", "*"])))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `file` exists and contains `needle`.
    fn wait_for_text(&self, file: &Path, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let t = std::fs::read_to_string(file).unwrap_or_default();
            if t.contains(needle) {
                return t;
            }
            assert!(
                start.elapsed() < timeout,
                "{} has no {needle:?} after {timeout:?}: {t:?}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `job` is in the error state Eqw (a job error).
    fn wait_eqw(&self, job: u32) {
        let start = Instant::now();
        while self.job_state(job).as_deref() != Some("Eqw") {
            assert!(
                start.elapsed() < JOB_WAIT,
                "job {job} not in Eqw: {:?}",
                self.job_state(job)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// qstat's state letters for `job`, `None` once it left qstat.
    fn job_state(&self, job: u32) -> Option<String> {
        let out = run(Command::new("qstat").args(["-u", "*"]));
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(&job.to_string())).then(|| f.nth(3).unwrap_or("").to_string())
        })
    }

    /// The state column of queue instance `queue@host` (empty when fine).
    fn queue_state(&self, queue: &str) -> String {
        let qi = format!("{queue}@{}", self.host);
        let out = run(Command::new("qstat").args(["-f", "-q", &qi]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&qi))
            .and_then(|l| l.split_whitespace().nth(5).map(str::to_string))
            .unwrap_or_default()
    }

    /// Queue instances of this host in an error state (`E` among their state letters).
    fn queues_in_error(&self) -> Vec<String> {
        let out = run(Command::new("qstat").args(["-f"]));
        let suffix = format!("@{}", self.host);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|q| q.ends_with(&suffix))
            })
            .filter(|l| l.split_whitespace().nth(5).is_some_and(|s| s.contains('E')))
            .map(|l| l.to_string())
            .collect()
    }

    /// Sets `shepherd_cmd`: `none` (the stock shepherd) or the virtualizer.
    fn set_shepherd(&self, stock: bool) {
        let bin = Path::new(TEST_ROOT).join("sge_virtualizer");
        let shepherd = if stock { "none" } else { bin.to_str().unwrap() };
        let out = run(Command::new(repo_root().join("scripts/sge-cell.sh"))
            .args(["shepherd", shepherd])
            .env("SGE_CELL_KEEP_ACTIVE", "true"));
        assert!(out.status.success(), "{}", text(&out));
        // execd takes the new configuration with its next load report
        std::thread::sleep(Duration::from_secs(3));
    }

    fn qdel(&self, job: u32) {
        let _ = run(Command::new("qdel").arg(job.to_string()));
    }

    /// Host processes that carry the job's additional group id (the VMM and its helpers).
    /// Waits up to 10 s until no process carries the job's `gid` and `pid` (the shepherd, or
    /// another process of the job's that need not carry it) is gone.
    fn wait_nothing_left(&self, gid: u32, pid: u32) {
        let start = Instant::now();
        loop {
            let left = self.processes_with_group(gid);
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if left.is_empty() && !alive {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "left over: {left:?}, pid {pid} alive: {alive}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn processes_with_group(&self, gid: u32) -> Vec<u32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let in_group = status
                .lines()
                .find(|l| l.starts_with("Groups:"))
                .is_some_and(|l| l.split_whitespace().skip(1).any(|g| g == gid.to_string()));
            if in_group {
                pids.push(pid);
            }
        }
        pids
    }

    fn add_grp_id(&self, job: u32) -> u32 {
        let config = self.active_file(job, "config").expect("job config");
        config
            .lines()
            .find_map(|l| l.strip_prefix("add_grp_id="))
            .and_then(|v| v.trim().parse().ok())
            .expect("add_grp_id in config")
    }
}

fn field<'a>(rec: &'a HashMap<String, String>, key: &str) -> &'a str {
    rec.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {key} in {rec:?}"))
}

/// The leading number of a qacct value ("100 : assumedly after job" → 100).
fn number(rec: &HashMap<String, String>, key: &str) -> f64 {
    let v = field(rec, key);
    v.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key} = {v:?} is not a number"))
}

/// Every shepherd of the job left an `exit_status`, whatever happened.
fn assert_exit_status_written(cell: &Cell, job: u32) {
    let s = cell
        .active_file(job, "exit_status")
        .unwrap_or_else(|| panic!("job {job}: no exit_status file"));
    assert!(!s.trim().is_empty(), "job {job}: empty exit_status");
    // The job user, who has a shell on the host, must not be able to rewrite what execd reads
    // (a 7 in exit_status puts the host in error).
    let user = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
    let dir = cell.active_dir(job).expect("active job directory");
    for name in ["exit_status", "error", "trace"] {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        let owner = std::os::unix::fs::MetadataExt::uid(&meta);
        assert_ne!(
            owner,
            user.uid.as_raw(),
            "job {job}: {name} belongs to the job user"
        );
    }
}

const JOB_WAIT: Duration = Duration::from_secs(120);

#[test]
fn script_job_runs_in_the_guest() {
    with_cell("script_job_runs_in_the_guest", |c| {
        let dir = c.work_dir("script");
        c.script(
            &dir,
            "job.sh",
            "#!/bin/sh\necho \"kernel=$(uname -r)\"\necho \"arg=$1 job=$JOB_ID\"\n\
             echo \"pwd=$(pwd)\"\necho made > made-in-guest.txt\n\
             echo tmp > \"$TMPDIR/t\" && cat \"$TMPDIR/t\"\nsleep 2\necho done\n",
        );
        let job = c.qsub(&dir, &["-o", "out.txt", "-e", "err.txt", "job.sh", "first"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        assert_eq!(
            out,
            format!(
                "kernel={}\narg=first job={job}\npwd={}\ntmp\ndone\n",
                c.guest_release,
                dir.display()
            )
        );
        // the job's cwd is the host's, and what it writes there belongs to the job user
        let made = dir.join("made-in-guest.txt");
        assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&made).unwrap());
        let user = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
        assert_eq!(owner, user.uid.as_raw());
        assert_eq!(std::fs::read_to_string(dir.join("err.txt")).unwrap(), "");
        let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_ne!(
            host_release.trim(),
            c.guest_release,
            "host and guest kernels must differ for this check"
        );
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 0.0);
        assert!(number(&rec[0], "ru_wallclock") > 0.0, "{rec:?}");
        assert_exit_status_written(c, job);
        assert_eq!(c.active_file(job, "error").unwrap_or_default(), "");
    });
}

#[test]
fn binary_false_exits_1() {
    with_cell("binary_false_exits_1", |c| {
        let dir = c.work_dir("false");
        let job = c.qsub(&dir, &["-b", "y", "/bin/false"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 1.0, "{rec:?}");
    });
}

#[test]
fn exit_99_reschedules_and_100_sets_error_state() {
    with_cell("exit_99_reschedules_and_100_sets_error_state", |c| {
        let dir = c.work_dir("exit99");
        c.script(
            &dir,
            "resched.sh",
            "#!/bin/sh\necho \"run RESTARTED=$RESTARTED\"\n[ \"$RESTARTED\" = 1 ] && exit 0\nexit 99\n",
        );
        let job = c.qsub(&dir, &["-o", "out.txt", "-j", "y", "resched.sh"]);
        let rec = c.wait_accounting(job, 2, Duration::from_secs(180));
        assert!(field(&rec[0], "failed").starts_with("25"), "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 99.0);
        assert_eq!(number(&rec[1], "failed"), 0.0, "{rec:?}");
        assert_eq!(number(&rec[1], "exit_status"), 0.0);
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        assert_eq!(out, "run RESTARTED=0\nrun RESTARTED=1\n");

        let dir = c.work_dir("exit100");
        c.script(&dir, "apperror.sh", "#!/bin/sh\nexit 100\n");
        let job = c.qsub(&dir, &["apperror.sh"]);
        c.wait_eqw(job);
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        c.qdel(job);
    });
}

#[test]
fn qdel_kills_the_job_and_its_vm() {
    with_cell("qdel_kills_the_job_and_its_vm", |c| {
        let dir = c.work_dir("qdel");
        c.script(&dir, "sleeper.sh", "#!/bin/sh\necho started\nsleep 300\n");
        let job = c.qsub(&dir, &["-o", "out.txt", "sleeper.sh"]);
        c.wait_running(job, JOB_WAIT);
        c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
        let gid = c.add_grp_id(job);
        assert!(
            !c.processes_with_group(gid).is_empty(),
            "the VMM carries add_grp_id"
        );
        // job_pid names the VMM process (the shepherd's child, the job user's), which carries
        // the job's add_grp_id
        let job_pid: u32 = c
            .active_file(job, "job_pid")
            .and_then(|p| p.trim().parse().ok())
            .expect("job_pid file");
        let comm = std::fs::read_to_string(format!("/proc/{job_pid}/comm")).unwrap_or_default();
        let mut want = format!("sge_vmm-{job}");
        want.truncate(15);
        assert_eq!(comm.trim_end(), want, "job_pid {job_pid}");
        assert!(c.processes_with_group(gid).contains(&job_pid));
        let shepherd: u32 = c
            .active_file(job, "pid")
            .and_then(|p| p.trim().parse().ok())
            .expect("pid file");
        assert_eq!(
            parent_pid(job_pid),
            Some(shepherd),
            "the VMM process is the shepherd's"
        );
        c.qdel(job);
        let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
        assert!(field(&rec[0], "failed").starts_with("100"), "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
        // nothing of the job is left on the host
        c.wait_nothing_left(gid, shepherd);
        assert_exit_status_written(c, job);
    });
}

/// Issue 13: a job streaming to a server on the host's loopback through its passt, deleted in
/// the middle of the transfer: the job ends as a qdel'ed job does, its passt (which carries the
/// job's add_grp_id, so Grid Engine's kill reaches it too) is gone with it, nothing is left,
/// and the server sees the connection end.
#[test]
fn qdel_during_a_network_transfer_ends_the_job_and_its_passt() {
    with_cell(
        "qdel_during_a_network_transfer_ends_the_job_and_its_passt",
        |c| {
            use std::io::Read;
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
            let port = listener.local_addr().unwrap().port();
            let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (ended_tx, ended_rx) = std::sync::mpsc::channel();
            {
                let received = received.clone();
                std::thread::spawn(move || {
                    let (mut conn, _) = listener.accept().unwrap();
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                received.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                    let _ = ended_tx.send(());
                });
            }
            let dir = c.work_dir("network_qdel");
            c.script(
                &dir,
                "stream.sh",
                &format!(
                    "#!/bin/sh\nset -- $(ip route show default)\necho started via $3\n\
                 cat /dev/zero | nc $3 {port}\necho nc ended $?\n"
                ),
            );
            let job = c.qsub(&dir, &["-o", "out.txt", "stream.sh"]);
            c.wait_running(job, JOB_WAIT);
            c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
            let start = Instant::now();
            while received.load(std::sync::atomic::Ordering::SeqCst) < 1 << 20 {
                assert!(
                    start.elapsed() < JOB_WAIT,
                    "the job's transfer did not get going: {} bytes",
                    received.load(std::sync::atomic::Ordering::SeqCst)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let gid = c.add_grp_id(job);
            let group = c.processes_with_group(gid);
            let passt: Vec<u32> = group
                .iter()
                .copied()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|comm| comm.starts_with("passt"))
                })
                .collect();
            assert_eq!(
                passt.len(),
                1,
                "one passt with the job's add_grp_id: {group:?}"
            );
            let uid = proc_status(passt[0], "Uid:");
            let job_uid = nix::unistd::User::from_name(JOB_USER)
                .unwrap()
                .unwrap()
                .uid
                .to_string();
            assert!(uid.iter().all(|u| *u == job_uid), "passt's uids {uid:?}");
            c.qdel(job);
            let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
            assert!(field(&rec[0], "failed").starts_with("100"), "{rec:?}");
            assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
            c.wait_nothing_left(gid, passt[0]);
            ended_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the server's connection did not end with the job");
            assert_exit_status_written(c, job);
        },
    );
}

/// Issue 13: a job that asks for no network (`-v SGE_VM_NETWORK=none`) gets no eth0, while its
/// queue's jobs have one; its host name is still the execution host's.
#[test]
fn a_job_may_ask_for_no_network() {
    with_cell("a_job_may_ask_for_no_network", |c| {
        let dir = c.work_dir("network_none");
        c.script(
            &dir,
            "nets.sh",
            "#!/bin/sh\nls /sys/class/net | tr '\\n' ' '\nhostname\n",
        );
        let with = c.qsub(&dir, &["-o", "with.txt", "nets.sh"]);
        let without = c.qsub(
            &dir,
            &["-o", "without.txt", "-v", "SGE_VM_NETWORK=none", "nets.sh"],
        );
        c.wait_accounting(with, 1, JOB_WAIT);
        c.wait_accounting(without, 1, JOB_WAIT);
        let host = nix::sys::utsname::uname().unwrap();
        let host = host.nodename().to_string_lossy().into_owned();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        assert_eq!(read("with.txt"), format!("eth0 lo {host}\n"));
        assert_eq!(read("without.txt"), format!("lo {host}\n"));
    });
}

/// A field of `/proc/<pid>/status`, split on white space.
fn proc_status(pid: u32, key: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")).map(str::to_string))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Runs `args` as the job user; whether it succeeded.
fn as_job_user(args: &[&str]) -> bool {
    run(Command::new("runuser")
        .args(["-u", JOB_USER, "--"])
        .args(args))
    .status
    .success()
}

/// Issue 18 (the structure and item 2) and issue 12 ("a VMM fault never loses the result"):
/// the VMM runs in a child of the shepherd that is the job user, with add_grp_id among its
/// groups; the job user stopping and re-limiting it reaches neither the root shepherd's state
/// nor its limits; and the VMM process dying of SIGKILL, SIGSEGV or SIGSYS — before the agent
/// connects or while the job runs — is the job's error (100, not 30's Eqw nor a queue error)
/// with exit_status, usage and the reason written.
#[test]
fn a_vmm_process_killed_by_its_owner_is_the_jobs_error() {
    with_cell("a_vmm_process_killed_by_its_owner_is_the_jobs_error", |c| {
        let user = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
        for (signal, while_running) in [
            (libc::SIGKILL, true),
            (libc::SIGSYS, false),
            (libc::SIGSEGV, true),
        ] {
            let dir = c.work_dir(&format!("vmmkill{signal}"));
            c.script(
                &dir,
                "job.sh",
                "#!/bin/sh
echo started
sleep 300
",
            );
            let job = c.qsub(&dir, &["-o", "out.txt", "-j", "y", "job.sh"]);
            // job_pid is written as soon as the VM is started, before its agent connects.
            let active = c.wait_running(job, JOB_WAIT);
            if while_running {
                c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
            }
            let read = |name: &str| -> u32 {
                std::fs::read_to_string(active.join(name))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no {name}"))
            };
            let (shepherd, vmm) = (read("pid"), read("job_pid"));
            assert_eq!(
                parent_pid(vmm),
                Some(shepherd),
                "job_pid is the shepherd's child"
            );
            let uid = user.uid.as_raw().to_string();
            assert_eq!(
                proc_status(vmm, "Uid"),
                vec![uid; 4],
                "the VMM process's uids"
            );
            assert_eq!(proc_status(vmm, "CapEff"), vec!["0000000000000000"]);
            assert_eq!(proc_status(vmm, "NoNewPrivs"), vec!["1"]);
            let gid = c.add_grp_id(job);
            assert!(
                proc_status(vmm, "Groups").contains(&gid.to_string()),
                "add_grp_id {gid} not among the VMM process's groups"
            );
            assert!(c.processes_with_group(gid).contains(&vmm));
            // The job's output is the VMM process's to write: the root shepherd holds no
            // descriptor of it while the job runs.
            let out = dir.join("out.txt");
            let holds = |pid: u32| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| {
                        d.flatten()
                            .any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == out))
                    })
                    .unwrap_or(false)
            };
            assert!(
                !holds(shepherd),
                "the root shepherd holds {}",
                out.display()
            );
            assert!(
                holds(vmm),
                "the VMM process does not hold {}",
                out.display()
            );

            if signal == libc::SIGKILL {
                // Stop and re-limit every process of the job first: the shepherd stays as it was.
                let limits = |pid: u32| {
                    std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default()
                };
                let before = limits(shepherd);
                let mut tasks = Vec::new();
                for pid in c.processes_with_group(gid) {
                    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                        .unwrap()
                        .flatten()
                    {
                        tasks.push(t.file_name().to_string_lossy().into_owned());
                    }
                }
                for tid in &tasks {
                    as_job_user(&["kill", "-STOP", tid]);
                    as_job_user(&["prlimit", "--pid", tid, "--nofile=5:5"]);
                }
                std::thread::sleep(Duration::from_millis(300));
                let state = proc_status(shepherd, "State");
                for tid in &tasks {
                    as_job_user(&["kill", "-CONT", tid]);
                }
                assert_ne!(
                    state.first().map(String::as_str),
                    Some("T"),
                    "shepherd stopped"
                );
                assert_eq!(limits(shepherd), before, "the shepherd's limits changed");
            }
            assert!(
                as_job_user(&["kill", &format!("-{signal}"), &vmm.to_string()]),
                "the job user may signal its VMM process"
            );
            let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
            assert!(field(&rec[0], "failed").starts_with("100"), "{rec:?}");
            assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
            assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
            assert_exit_status_written(c, job);
            assert!(c.active_file(job, "usage").is_some(), "no usage file");
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.contains("VMM process") && error.contains(&format!("signal {signal}")),
                "no clear reason: {error:?}"
            );
            // The shepherd is gone, and so is everything of the job.
            let start = Instant::now();
            while Path::new(&format!("/proc/{shepherd}")).exists()
                || !c.processes_with_group(gid).is_empty()
            {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "job {job} left processes"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
}

/// Issue 18 item 2: qdel of a job whose VMM process its owner stopped (SIGSTOP) still ends the
/// job within a bounded time: the stop request goes unanswered, and the shepherd kills the
/// process after its grace.
#[test]
fn qdel_ends_a_job_whose_vmm_process_its_owner_stopped() {
    with_cell("qdel_ends_a_job_whose_vmm_process_its_owner_stopped", |c| {
        let dir = c.work_dir("vmmstopped");
        c.script(&dir, "job.sh", "#!/bin/sh\necho started\nsleep 300\n");
        let job = c.qsub(&dir, &["-o", "out.txt", "job.sh"]);
        let active = c.wait_running(job, JOB_WAIT);
        c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
        let vmm = std::fs::read_to_string(active.join("job_pid")).unwrap();
        assert!(as_job_user(&["kill", "-STOP", vmm.trim()]));
        let start = Instant::now();
        c.qdel(job);
        let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "qdel took {:?}",
            start.elapsed()
        );
        assert!(field(&rec[0], "failed").starts_with("100"), "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        assert_exit_status_written(c, job);
    });
}

/// Lines in `file`.
fn line_count(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn suspend_and_resume_stop_and_continue_the_job() {
    with_cell("suspend_and_resume_stop_and_continue_the_job", |c| {
        let dir = c.work_dir("suspend");
        c.script(
            &dir,
            "counter.sh",
            "#!/bin/sh\ni=0\nwhile :; do i=$((i+1)); echo $i; sleep 0.2; done\n",
        );
        let job = c.qsub(&dir, &["-o", "out.txt", "counter.sh"]);
        c.wait_running(job, JOB_WAIT);
        let out = dir.join("out.txt");
        c.wait_for_text(&out, "3\n", JOB_WAIT);
        let out_of = |args: &[&str]| {
            let o = run(Command::new("qmod").args(args));
            assert!(o.status.success(), "qmod {args:?}: {}", text(&o));
        };
        out_of(&["-sj", &job.to_string()]);
        std::thread::sleep(Duration::from_secs(2));
        let frozen = line_count(&out);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            line_count(&out),
            frozen,
            "the counter must not move while suspended"
        );
        assert!(c.job_state(job).unwrap_or_default().contains('s'));
        out_of(&["-usj", &job.to_string()]);
        std::thread::sleep(Duration::from_secs(3));
        assert!(line_count(&out) > frozen + 3, "the counter must move again");
        c.qdel(job);
        c.wait_accounting(job, 1, Duration::from_secs(60));
    });
}

#[test]
fn notify_sends_usr1_before_suspend_and_usr2_before_kill() {
    with_cell(
        "notify_sends_usr1_before_suspend_and_usr2_before_kill",
        |c| {
            let dir = c.work_dir("notify");
            c.script(
                &dir,
                "notified.sh",
                "#!/bin/sh\ntrap 'echo got USR1' USR1\ntrap 'echo got USR2' USR2\necho ready\n\
             while :; do sleep 0.2; done\n",
            );
            let job = c.qsub(&dir, &["-notify", "-o", "out.txt", "notified.sh"]);
            c.wait_running(job, JOB_WAIT);
            let out = dir.join("out.txt");
            c.wait_for_text(&out, "ready", JOB_WAIT);
            let t0 = Instant::now();
            assert!(run(Command::new("qmod").args(["-sj", &job.to_string()]))
                .status
                .success());
            c.wait_for_text(&out, "got USR1", Duration::from_secs(NOTIFY_SECS));
            assert!(
                t0.elapsed() < Duration::from_secs(NOTIFY_SECS),
                "USR1 came before the STOP"
            );
            assert!(run(Command::new("qmod").args(["-usj", &job.to_string()]))
                .status
                .success());
            std::thread::sleep(Duration::from_secs(1));
            let t1 = Instant::now();
            c.qdel(job);
            c.wait_for_text(&out, "got USR2", Duration::from_secs(NOTIFY_SECS));
            let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
            let killed_after = t1.elapsed();
            assert!(
                killed_after >= Duration::from_secs(NOTIFY_SECS - 1),
                "KILL only after the notify time, came after {killed_after:?}"
            );
            assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
        },
    );
}

#[test]
fn h_rt_kills_a_sleeping_job_after_10_seconds() {
    with_cell("h_rt_kills_a_sleeping_job_after_10_seconds", |c| {
        let dir = c.work_dir("h_rt");
        c.script(&dir, "long.sh", "#!/bin/sh\nsleep 300\n");
        let job = c.qsub(&dir, &["-l", "h_rt=0:0:10", "long.sh"]);
        let rec = c.wait_accounting(job, 1, Duration::from_secs(90));
        assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
        let wall = number(&rec[0], "ru_wallclock");
        assert!(
            (9.0..=20.0).contains(&wall),
            "killed after {wall} s: {rec:?}"
        );
    });
}

/// 10 MiB of a recognisable pattern, as the guest's `yes | head -c` produces it.
fn pattern(bytes: usize) -> Vec<u8> {
    b"0123456789abcdefghijklmnopqrstuvwxyz\n"
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect()
}

#[test]
fn ten_mib_of_stdout_stderr_separate_and_merged() {
    with_cell("ten_mib_of_stdout_stderr_separate_and_merged", |c| {
        const SIZE: usize = 10 * 1024 * 1024;
        let dir = c.work_dir("bigout");
        c.script(
            &dir,
            "big.sh",
            &format!(
                "#!/bin/sh\necho to-stderr >&2\nyes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {SIZE}\n"
            ),
        );
        let job = c.qsub(&dir, &["-o", "out.txt", "-e", "err.txt", "big.sh"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "exit_status"), 0.0, "{rec:?}");
        let out = std::fs::read(dir.join("out.txt")).unwrap();
        assert_eq!(out.len(), SIZE);
        assert!(out == pattern(SIZE), "stdout differs from the pattern");
        assert_eq!(
            std::fs::read_to_string(dir.join("err.txt")).unwrap(),
            "to-stderr\n"
        );

        let job = c.qsub(&dir, &["-j", "y", "-o", "merged.txt", "big.sh"]);
        c.wait_accounting(job, 1, JOB_WAIT);
        let merged = std::fs::read(dir.join("merged.txt")).unwrap();
        assert_eq!(merged.len(), SIZE + "to-stderr\n".len());
        assert!(merged.starts_with(b"to-stderr\n") || merged.ends_with(b"to-stderr\n"));
    });
}

/// The qmaster's log lines that name `job`: where SoGE 8.1.9 keeps the reason a queue went
/// into error. (Its `qstat -explain E` line is fixed text naming only the job: "queue Q marked
/// QERROR as result of job N's failure at host H"; the first line of the shepherd's `error`
/// file goes to "job N.1 failed on host H general before job because: ...".)
fn qmaster_log_of(job: u32) -> String {
    let log = std::fs::read_to_string("/var/spool/gridengine/qmaster/messages").unwrap_or_default();
    let needle = format!("job {job}.1 failed");
    log.lines()
        .filter(|l| l.contains(&needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `qstat -explain E` for `queue` on this host.
fn explain_error(c: &Cell, queue: &str) -> String {
    text(&run(Command::new("qstat").args([
        "-explain",
        "E",
        "-q",
        &format!("{queue}@{}", c.host),
    ])))
}

/// Asserts `queue` went into error because of `job`, with `reason` as the job's failure
/// reason where the administrator looks: `qstat -explain E` names the job, and the qmaster's
/// log gives the reason for that job.
fn assert_queue_error_explained(c: &Cell, queue: &str, job: u32, reason: &str) {
    assert!(c.queue_state(queue).contains('E'), "{queue} not in error");
    let explain = explain_error(c, queue);
    assert!(
        explain.contains(&format!("marked QERROR as result of job {job}'s failure")),
        "qstat -explain E: {explain}"
    );
    let log = qmaster_log_of(job);
    assert!(log.contains(reason), "qmaster log for job {job}: {log}");
}

/// Scheduler, queue order and enabled queues for a test that lets the scheduler choose the
/// queue (no `-q`): put back whatever happens.
struct SchedulerChoice<'a> {
    cell: &'a Cell,
    sched: String,
}

impl<'a> SchedulerChoice<'a> {
    /// Only `queues` enabled on this host, tried by `seq_no` in the order given.
    fn only(cell: &'a Cell, queues: &[&str]) -> Self {
        let sched = text(&run(Command::new("qconf").arg("-ssconf")));
        let seqno: String = sched
            .lines()
            .map(|l| {
                if l.starts_with("queue_sort_method") {
                    "queue_sort_method seqno\n".to_string()
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let file = Path::new(TEST_ROOT).join("sched.seqno");
        std::fs::write(&file, seqno).unwrap();
        assert!(run(Command::new("qconf").arg("-Msconf").arg(&file))
            .status
            .success());
        for (seq, q) in queues.iter().enumerate() {
            cell.add_queue(q, &[("seq_no", &(seq * 10).to_string())]);
        }
        let _ = run(Command::new("qmod").args(["-d", &format!("*@{}", cell.host)]));
        for q in queues {
            let _ = run(Command::new("qmod").args(["-e", &format!("{q}@{}", cell.host)]));
        }
        SchedulerChoice { cell, sched }
    }
}

impl Drop for SchedulerChoice<'_> {
    fn drop(&mut self) {
        let file = Path::new(TEST_ROOT).join("sched.saved");
        if std::fs::write(&file, &self.sched).is_ok() {
            let _ = run(Command::new("qconf").arg("-Msconf").arg(&file));
        }
        let all = format!("*@{}", self.cell.host);
        let _ = run(Command::new("qmod").args(["-e", &all]));
        let _ = run(Command::new("qmod").args(["-c", &all]));
    }
}

/// Issue 20: a job submitted without `-q` while the queue the scheduler prefers is broken by
/// the administrator's configuration (`broken`, `seq_no` 0) runs and finishes in the good
/// queue; the broken queue is in error with the reason; the job has a few accounting records,
/// not an unbounded number (it used to be re-queued to the broken queue for ever).
fn assert_job_goes_around_broken_queue(c: &Cell, broken: &str, reason: &str) {
    let good = "seqgood.q";
    let _choice = SchedulerChoice::only(c, &[broken, good]);
    let dir = c.work_dir(broken);
    let job = c.qsub_unrouted(&dir, &["-b", "y", "/bin/echo", "ran"]);
    let start = Instant::now();
    let records = loop {
        let r = c.accounting(job);
        if r.iter().any(|rec| field(rec, "failed") == "0") {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "job {job} did not finish in {good} within 180 s: {} records; qstat:\n{}",
            r.len(),
            text(&run(Command::new("qstat").args(["-f", "-u", "*"])))
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let last = records.last().unwrap();
    assert_eq!(field(last, "qname"), good, "{records:?}");
    assert_eq!(number(last, "exit_status"), 0.0);
    assert!(
        records.len() <= 3,
        "{} accounting records: {records:?}",
        records.len()
    );
    for rec in &records[..records.len() - 1] {
        assert_eq!(field(rec, "qname"), broken, "{records:?}");
        assert!(field(rec, "failed").starts_with("11"), "{records:?}");
    }
    assert_queue_error_explained(c, broken, job, reason);
    assert_eq!(c.queue_state(good), "", "the good queue stays usable");
    assert_exit_status_written(c, job);
}

#[test]
fn a_job_goes_around_a_queue_whose_kernel_is_missing() {
    with_cell("a_job_goes_around_a_queue_whose_kernel_is_missing", |c| {
        assert_job_goes_around_broken_queue(c, "seqnokernel.q", "guest kernel");
    });
}

/// The queue's guest kernel panics (its initramfs is not one): the VM ends by itself before
/// its agent connects.
#[test]
fn a_job_goes_around_a_queue_whose_guest_does_not_boot() {
    with_cell("a_job_goes_around_a_queue_whose_guest_does_not_boot", |c| {
        assert_job_goes_around_broken_queue(c, "seqbadvm.q", "guest does not boot");
    });
}

/// The queue's guest kernel is not a kernel: refused before any VM starts.
#[test]
fn a_job_goes_around_a_queue_whose_kernel_is_not_a_kernel() {
    with_cell(
        "a_job_goes_around_a_queue_whose_kernel_is_not_a_kernel",
        |c| {
            assert_job_goes_around_broken_queue(
                c,
                "seqnotkernel.q",
                "is neither an ELF vmlinux nor a bzImage",
            );
        },
    );
}

/// The shortage streak of `queue` starts from nothing (root's state on this host).
fn forget_shortages(queue: &str) {
    let _ = std::fs::remove_file(Path::new(SHORTAGES).join(queue));
}

/// Issue 20: a shortage (guest RAM the host cannot back now) re-queues the job without a queue
/// error, and the job runs once the shortage passes.
#[test]
fn a_shortage_requeues_the_job_and_it_runs_once_the_shortage_passes() {
    with_cell(
        "a_shortage_requeues_the_job_and_it_runs_once_the_shortage_passes",
        |c| {
            forget_shortages("shortage.q");
            let path = Path::new(TEST_ROOT).join("settings.toml");
            let good = std::fs::read_to_string(&path).unwrap();
            let restore = RestoreSettings(good.clone());
            let dir = c.work_dir("shortage");
            let job = c.qsub(&dir, &["-q", "shortage.q", "-b", "y", "/bin/true"]);
            let _delete = ForceDelete(c, job);
            let rec = c.wait_accounting(job, 1, JOB_WAIT);
            assert!(field(&rec[0], "failed").starts_with("25"), "{rec:?}");
            assert_eq!(
                c.queue_state("shortage.q"),
                "",
                "a shortage is not an error"
            );
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.contains("can't start the job's VM now") && error.contains("MemAvailable"),
                "error file: {error:?}"
            );
            assert!(c.active_file(job, "noresources").is_some());
            assert_exit_status_written(c, job);
            // the shortage passes: the queue's guest fits the host again
            std::fs::write(&path, good.replace(HUGE_GUEST, "")).unwrap();
            let start = Instant::now();
            let records = loop {
                let r = c.accounting(job);
                if r.last().is_some_and(|rec| field(rec, "failed") == "0") {
                    break r;
                }
                assert!(start.elapsed() < JOB_WAIT, "job {job} never ran: {r:?}");
                std::thread::sleep(Duration::from_millis(250));
            };
            drop(restore);
            assert!(records.len() <= 4, "{records:?}");
            for rec in &records[..records.len() - 1] {
                assert!(field(rec, "failed").starts_with("25"), "{records:?}");
            }
            assert_eq!(c.queue_state("shortage.q"), "");
        },
    );
}

/// Issue 20: a shortage that never passes re-queues the job the configured number of times in
/// a row (3 by default), and the next one puts the queue in error with the reason.
#[test]
fn a_shortage_that_never_passes_puts_the_queue_in_error_after_the_limit() {
    with_cell(
        "a_shortage_that_never_passes_puts_the_queue_in_error_after_the_limit",
        |c| {
            forget_shortages("shortage.q");
            let dir = c.work_dir("shortage_forever");
            let job = c.qsub(&dir, &["-q", "shortage.q", "-b", "y", "/bin/true"]);
            let _delete = ForceDelete(c, job);
            let records = c.wait_accounting(job, 4, Duration::from_secs(240));
            for (i, rec) in records[..3].iter().enumerate() {
                assert!(
                    field(rec, "failed").starts_with("25"),
                    "record {i}: {records:?}"
                );
            }
            assert!(
                field(&records[3], "failed").starts_with("11"),
                "{records:?}"
            );
            let start = Instant::now();
            while !c.queue_state("shortage.q").contains('E') {
                assert!(
                    start.elapsed() < JOB_WAIT,
                    "shortage.q never went into error"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
            assert_queue_error_explained(c, "shortage.q", job, "4 shortages in a row");
            assert_eq!(
                c.queue_state("all.q"),
                "",
                "only the short queue is in error"
            );
            assert_exit_status_written(c, job);
            c.qdel(job);
            let _ = run(Command::new("qmod").args(["-c", &format!("shortage.q@{}", c.host)]));
        },
    );
}

#[test]
fn vm_dying_mid_job_fails_the_job_only() {
    with_cell("vm_dying_mid_job_fails_the_job_only", |c| {
        let dir = c.work_dir("vmdies");
        c.script(&dir, "victim.sh", "#!/bin/sh\necho started\nsleep 300\n");
        let job = c.qsub(&dir, &["-o", "out.txt", "victim.sh"]);
        c.wait_running(job, JOB_WAIT);
        c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
        // the guest agent is PID 1 in the guest: it dies with the VM's processes
        let gid = c.add_grp_id(job);
        for pid in c.processes_with_group(gid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let rec = c.wait_accounting(job, 1, Duration::from_secs(60));
        assert!(field(&rec[0], "failed").starts_with("100"), "{rec:?}");
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(
            error.starts_with("sge_virtualizer: the job's VM failed"),
            "error file: {error:?}"
        );
        assert_exit_status_written(c, job);
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
    });
}

#[test]
fn execd_restart_keeps_the_job_and_reaps_it_later() {
    with_cell("execd_restart_keeps_the_job_and_reaps_it_later", |c| {
        let dir = c.work_dir("restart");
        c.script(
            &dir,
            "survivor.sh",
            "#!/bin/sh\necho started\nsleep 20\necho finished\n",
        );
        let job = c.qsub(&dir, &["-o", "out.txt", "survivor.sh"]);
        c.wait_running(job, JOB_WAIT);
        c.wait_for_text(&dir.join("out.txt"), "started", JOB_WAIT);
        let shepherd: u32 = c
            .active_file(job, "pid")
            .and_then(|p| p.trim().parse().ok())
            .expect("pid file");
        let comm = std::fs::read_to_string(format!("/proc/{shepherd}/comm")).unwrap();
        assert!(comm.starts_with("sge_shep"), "comm {comm:?}");
        let script = repo_root().join("scripts/sge-cell.sh");
        let settings = Path::new(TEST_ROOT).join("settings.toml");
        let out = run(Command::new(&script).arg("stop-execd"));
        assert!(out.status.success(), "{}", text(&out));
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            Path::new(&format!("/proc/{shepherd}")).exists(),
            "the shepherd outlives execd"
        );
        let out = run(Command::new(&script)
            .arg("start")
            .env("SGE_CELL_VIRTUALIZER_CONFIG", &settings)
            .env("SGE_CELL_KEEP_ACTIVE", "true")
            .env("SGE_CELL_NOTIFY", format!("00:00:0{NOTIFY_SECS}")));
        assert!(out.status.success(), "{}", text(&out));
        // execd looks for lost shepherds every 60 s
        let rec = c.wait_accounting(job, 1, Duration::from_secs(150));
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 0.0, "{rec:?}");
        assert!(number(&rec[0], "ru_wallclock") >= 18.0, "{rec:?}");
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        assert_eq!(out, "started\nfinished\n");
    });
}

#[test]
fn prolog_and_epilog_run_on_the_host_around_the_job() {
    with_cell("prolog_and_epilog_run_on_the_host_around_the_job", |c| {
        let dir = c.work_dir("prolog");
        c.script(
            &dir,
            "job.sh",
            "#!/bin/sh\necho \"job on $(uname -r)\"\nexit 5\n",
        );
        let job = c.qsub(
            &dir,
            &["-q", "prolog.q", "-j", "y", "-o", "out.txt", "job.sh"],
        );
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        assert_eq!(number(&rec[0], "exit_status"), 5.0, "{rec:?}");
        let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        assert_eq!(
            out,
            format!(
                "prolog {job} on {}\njob on {}\nepilog exit=5\n",
                host_release.trim(),
                c.guest_release
            )
        );
    });
}

#[test]
fn pe_start_and_pe_stop_run_on_the_host() {
    with_cell("pe_start_and_pe_stop_run_on_the_host", |c| {
        let dir = c.work_dir("pe");
        c.script(&dir, "pejob.sh", "#!/bin/sh\necho \"job NSLOTS=$NSLOTS\"\n");
        let job = c.qsub(&dir, &["-q", "prolog.q", "-pe", "vmpe", "1", "pejob.sh"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        let read = |name: String| std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert_eq!(
            read(format!("pejob.sh.po{job}")),
            "pe_start hosts=1\npe_stop exit=0\n"
        );
        assert_eq!(read(format!("pejob.sh.pe{job}")), "");
        assert_eq!(
            read(format!("pejob.sh.o{job}")),
            format!(
                "prolog {job} on {}\njob NSLOTS=1\nepilog exit=0\n",
                host_release()
            )
        );
    });
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// Puts the good settings file back, whatever happens in the test.
struct RestoreSettings(String);

impl Drop for RestoreSettings {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(TEST_ROOT).join("settings.toml"), &self.0);
    }
}

/// Issue 20: a settings file that does not parse is every queue's on this host: the host's
/// error (every queue of the host in `E`), with the reason; repaired and cleared, the re-queued
/// job runs.
#[test]
fn an_unparsable_settings_file_puts_the_host_in_error() {
    with_cell("an_unparsable_settings_file_puts_the_host_in_error", |c| {
        let path = Path::new(TEST_ROOT).join("settings.toml");
        let restore = RestoreSettings(std::fs::read_to_string(&path).unwrap());
        let all = format!("*@{}", c.host);
        std::fs::write(&path, "memory_mib = \"lots\"\n").unwrap();
        let dir = c.work_dir("badsettings");
        let job = c.qsub(&dir, &["-q", "settings.q", "-b", "y", "/bin/true"]);
        let start = Instant::now();
        while !(c.queue_state("settings.q").contains('E') && c.queue_state("all.q").contains('E')) {
            assert!(
                start.elapsed() < JOB_WAIT,
                "the host's queues never went into error: {:?}",
                c.queues_in_error()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        drop(restore);
        let reason = format!(
            "sge_virtualizer: bad sge_virtualizer settings {}",
            path.display()
        );
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(error.starts_with(&reason), "error file: {error:?}");
        assert_eq!(c.active_file(job, "exit_status").unwrap_or_default(), "7\n");
        assert!(
            qmaster_log_of(job).contains(&reason),
            "{}",
            qmaster_log_of(job)
        );
        // with the file repaired and the host's queues cleared, the re-queued job runs
        assert!(run(Command::new("qmod").args(["-c", &all]))
            .status
            .success());
        let rec = c.wait_accounting(job, 2, JOB_WAIT);
        assert!(field(&rec[0], "failed").starts_with('7'), "{rec:?}");
        assert_eq!(number(&rec[1], "failed"), 0.0, "{rec:?}");
        assert!(c.queues_in_error().is_empty(), "{:?}", c.queues_in_error());
    });
}

#[test]
fn interactive_qrsh_is_delegated_to_the_stock_shepherd() {
    with_cell("interactive_qrsh_is_delegated_to_the_stock_shepherd", |c| {
        let dir = c.work_dir("qrsh");
        let out = run(Command::new("runuser")
            .args(["-u", JOB_USER, "--", "env", "-C", dir.to_str().unwrap()])
            .args(["qrsh", "-q", "all.q", "uname -r; exit 4"]));
        // the stock shepherd ran it on the host, not in a VM
        let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            host_release,
            "{}",
            text(&out)
        );
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
        assert_eq!(c.queue_state("all.q"), "");
    });
}

#[test]
fn a_queue_that_never_delegates_refuses_interactive_jobs_as_the_jobs_error() {
    with_cell(
        "a_queue_that_never_delegates_refuses_interactive_jobs_as_the_jobs_error",
        |c| {
            let dir = c.work_dir("qrsh_never");
            let marker = dir.join("ran-on-the-host");
            // Bounded: a refused job left in Eqw would keep qrsh waiting for ever.
            let out = run(Command::new("runuser")
                .args(["-u", JOB_USER, "--", "env", "-C", dir.to_str().unwrap()])
                .args(["timeout", "120", "qrsh", "-q", "outsiders.q"])
                .arg(format!("touch {}; exit 4", marker.display())));
            assert!(!marker.exists(), "the task ran on the host: {}", text(&out));
            let code = out.status.code();
            assert!(
                code != Some(4) && code != Some(124),
                "{code:?}: {}",
                text(&out)
            );
            assert_eq!(
                c.queue_state("outsiders.q"),
                "",
                "queue must not be in error"
            );
        },
    );
}

#[test]
fn h_vmem_limits_the_job_in_the_guest_and_sizes_the_vm_below_it() {
    with_cell(
        "h_vmem_limits_the_job_in_the_guest_and_sizes_the_vm_below_it",
        |c| {
            let dir = c.work_dir("h_vmem");
            c.script(
                &dir,
                "limits.sh",
                // long enough for execd's PDC (1 s interval) to measure the VMM
                "#!/bin/sh\necho \"vmem=$(ulimit -v) cpu=$(ulimit -t)\"\nsleep 4\n",
            );
            let job = c.qsub(
                &dir,
                &[
                    "-l",
                    "h_vmem=400M,h_cpu=0:1:40",
                    "-o",
                    "out.txt",
                    "limits.sh",
                ],
            );
            let rec = c.wait_accounting(job, 1, JOB_WAIT);
            assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
            assert_eq!(
                std::fs::read_to_string(dir.join("out.txt")).unwrap(),
                "vmem=409600 cpu=100\n"
            );
            // 400 MiB minus the VMM's allowance, so that execd's PDC does not kill the VMM
            let trace = c.active_file(job, "trace").unwrap_or_default();
            assert!(trace.contains(" 208 MiB "), "trace: {trace}");
            let maxvmem = field(&rec[0], "maxvmem");
            assert!(
                maxvmem.ends_with("MB"),
                "maxvmem {maxvmem}: the PDC saw the VMM"
            );
            assert!(number(&rec[0], "maxvmem") < 400.0, "maxvmem {maxvmem}");
        },
    );
}

/// A job that allocates and touches `$1` MiB in one buffer (`dd`'s block, filled by one read),
/// then reports dd's status and the guest's size.
const ALLOCATING_JOB: &str =
    "#!/bin/sh\ndd if=/dev/zero of=/dev/null bs=\"$1\"M count=1 2>/dev/null\n\
                              st=$?\necho \"dd=$st\"\ngrep MemTotal /proc/meminfo\nexit $st\n";

#[test]
fn a_job_with_no_memory_request_gets_the_hosts_memory() {
    with_cell("a_job_with_no_memory_request_gets_the_hosts_memory", |c| {
        let dir = c.work_dir("no_mem_request");
        c.script(&dir, "allocate.sh", ALLOCATING_JOB);
        // 2 GiB, where the guest's old fixed size was 256 MiB
        let job = c.qsub(&dir, &["-o", "out.txt", "allocate.sh", "2047"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap_or_default();
        let trace = c.active_file(job, "trace").unwrap_or_default();
        assert_eq!(number(&rec[0], "exit_status"), 0.0, "{out}\n{trace}");
        assert!(out.starts_with("dd=0\n"), "{out}");
        assert!(
            trace.contains("MiB reserve and the VMM's"),
            "the trace says which rule sized the guest: {trace}"
        );
        // qacct's maxvmem is the VMM's resident memory: the 2 GB the job held, not the
        // guest's whole (lazily mapped) size
        let maxvmem = field(&rec[0], "maxvmem");
        eprintln!("no request: {out:?}; qacct maxvmem {maxvmem}");
        assert!(number(&rec[0], "maxvmem") > 0.0, "maxvmem {maxvmem}");
    });
}

#[test]
fn a_job_beyond_its_h_vmem_is_killed_by_the_guests_oom_killer_and_the_trace_says_so() {
    with_cell(
        "a_job_beyond_its_h_vmem_is_killed_by_the_guests_oom_killer_and_the_trace_says_so",
        |c| {
            let dir = c.work_dir("h_vmem_oom");
            c.script(&dir, "allocate.sh", ALLOCATING_JOB);
            // 900 MiB: under the job's RLIMIT_AS (h_vmem, 1 GiB), over its guest's 832 MiB
            let job = c.qsub(
                &dir,
                &["-l", "h_vmem=1G", "-o", "out.txt", "allocate.sh", "900"],
            );
            let rec = c.wait_accounting(job, 1, JOB_WAIT);
            let out = std::fs::read_to_string(dir.join("out.txt")).unwrap_or_default();
            let trace = c.active_file(job, "trace").unwrap_or_default();
            assert_eq!(number(&rec[0], "exit_status"), 137.0, "{out}\n{trace}");
            assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
            assert!(out.starts_with("dd=137\n"), "{out}");
            assert!(
                trace.contains("guest RAM 832 MiB: the job's h_vmem (1024 MiB)"),
                "{trace}"
            );
            assert!(
                trace.contains("the guest ran out of memory: its kernel's OOM killer killed"),
                "{trace}"
            );
            assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        },
    );
}

#[test]
fn a_memory_consumable_request_sizes_the_guest() {
    with_cell("a_memory_consumable_request_sizes_the_guest", |c| {
        let dir = c.work_dir("mem_free_request");
        c.script(&dir, "size.sh", "#!/bin/sh\ngrep MemTotal /proc/meminfo\n");
        let job = c.qsub(&dir, &["-l", "mem_free=600M", "-o", "out.txt", "size.sh"]);
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "exit_status"), 0.0, "{rec:?}");
        let trace = c.active_file(job, "trace").unwrap_or_default();
        assert!(
            trace.contains("guest RAM 408 MiB: the job's request mem_free=600 MiB"),
            "{trace}"
        );
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap_or_default();
        let total_kib: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal: {out:?}"));
        assert!(
            (300 << 10..=408 << 10).contains(&total_kib),
            "MemTotal {total_kib} kB for a 408 MiB guest"
        );
    });
}

#[test]
fn unwritable_output_file_puts_only_the_job_in_error_state() {
    with_cell(
        "unwritable_output_file_puts_only_the_job_in_error_state",
        |c| {
            let dir = c.work_dir("badoutput");
            // root's home is not writable for the job user
            let job = c.qsub(&dir, &["-o", "/root/forbidden.txt", "-b", "y", "/bin/true"]);
            c.wait_eqw(job);
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.starts_with("error: can't open output file \"/root/forbidden.txt\""),
                "error file: {error:?}"
            );
            assert_eq!(
                c.active_file(job, "exit_status").unwrap_or_default(),
                "26\n"
            );
            assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
            c.qdel(job);
            let _ = std::fs::remove_dir_all(&dir);
        },
    );
}

#[test]
fn array_tasks_get_their_own_output_files_and_stdin_is_relayed() {
    with_cell(
        "array_tasks_get_their_own_output_files_and_stdin_is_relayed",
        |c| {
            let dir = c.work_dir("array");
            c.script(
                &dir,
                "task.sh",
                "#!/bin/sh\necho \"task $SGE_TASK_ID\"\ncat\n",
            );
            let input = c.script(&dir, "input.txt", "line one\nline two\n");
            let job = c.qsub(
                &dir,
                &["-t", "1-2", "-i", input.to_str().unwrap(), "task.sh"],
            );
            let start = Instant::now();
            while c.accounting(job).len() < 2 {
                assert!(start.elapsed() < JOB_WAIT, "array job {job} did not finish");
                std::thread::sleep(Duration::from_millis(250));
            }
            for task in 1..=2 {
                let out = std::fs::read_to_string(dir.join(format!("task.sh.o{job}.{task}")))
                    .unwrap_or_default();
                assert_eq!(out, format!("task {task}\nline one\nline two\n"));
            }
        },
    );
}

#[test]
fn a_shell_missing_in_the_guest_is_the_jobs_error() {
    with_cell("a_shell_missing_in_the_guest_is_the_jobs_error", |c| {
        let dir = c.work_dir("noshell");
        c.script(&dir, "job.sh", "echo never\n");
        // the initramfs guest has only BusyBox /bin/sh
        let job = c.qsub(&dir, &["-S", "/bin/no-such-shell", "job.sh"]);
        c.wait_eqw(job);
        // 30, not 27: execd charges 27 to the queue unless the job named its own shell, and
        // whatever a guest reports must never put a queue in error (issue 12 item 4)
        assert_eq!(
            c.active_file(job, "exit_status").unwrap_or_default(),
            "30\n"
        );
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(
            error.starts_with("sge_virtualizer: the job could not be started in the VM"),
            "error file: {error:?}"
        );
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        c.qdel(job);
    });
}

/// Builds (or finds, cached) OS image `name` from Debian `suite` in [`IMAGE_STORE`]; `Err` says
/// why the test cannot run (debootstrap cannot reach the mirror).
fn ensure_image(suite: &str) -> Result<(), String> {
    let out = run(Command::new(sge_virtualizer_bin()).args([
        "image",
        "build",
        "--debootstrap",
        suite,
        suite,
        "--store",
        IMAGE_STORE,
    ]));
    if out.status.success() {
        return Ok(());
    }
    let t = text(&out);
    if [
        "Failed getting release file",
        "Couldn't download",
        "Temporary failure resolving",
    ]
    .iter()
    .any(|m| t.contains(m))
    {
        return Err(format!("debootstrap cannot reach the Debian mirror: {t}"));
    }
    panic!("image build {suite}: {t}");
}

/// Runs `body` when the cell and the named images are there, or says why not.
fn with_cell_and_images(test: &str, suites: &[&str], body: impl FnOnce(&Cell)) {
    with_cell(test, |c| {
        for suite in suites {
            if let Err(why) = ensure_image(suite) {
                report_skip(test, &why);
                return;
            }
        }
        body(c)
    });
}

#[test]
fn a_queue_with_a_bullseye_image_runs_its_jobs_in_debian_11() {
    let test = "a_queue_with_a_bullseye_image_runs_its_jobs_in_debian_11";
    with_cell_and_images(test, &["bullseye"], |c| {
        let dir = c.work_dir("bullseyeq");
        c.script(
            &dir,
            "job.sh",
            "#!/bin/sh\ncat /etc/debian_version\nreadlink -f /bin/sh\ncat input.txt > output.txt\n",
        );
        std::fs::write(dir.join("input.txt"), "from the host\n").unwrap();
        let job = c.qsub(
            &dir,
            &["-q", "bullseye.q", "-o", "out.txt", "-j", "y", "job.sh"],
        );
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        let host = std::fs::read_to_string("/etc/debian_version").unwrap();
        assert!(out.starts_with("11."), "job output: {out:?}");
        assert!(
            !host.starts_with("11."),
            "host must not be Debian 11: {host}"
        );
        assert!(out.contains("dash"), "the image's own /bin/sh: {out:?}");
        let made = dir.join("output.txt");
        assert_eq!(std::fs::read_to_string(&made).unwrap(), "from the host\n");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&made).unwrap());
        let user = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
        assert_eq!(owner, user.uid.as_raw());
    });
}

#[test]
fn jobs_in_two_images_run_at_the_same_time() {
    let test = "jobs_in_two_images_run_at_the_same_time";
    with_cell_and_images(test, &["bullseye", "bookworm"], |c| {
        let dir = c.work_dir("twoimages");
        // Each job marks that it runs, then waits for the other's mark: both finish only if
        // they ran at the same time.
        let body = |me: &str, other: &str| {
            format!(
                "#!/bin/sh\ntouch {me}.running\ni=0\nwhile [ ! -e {other}.running ]; do\n\
                 sleep 0.2; i=$((i+1)); [ $i -gt 600 ] && exit 3\ndone\ncat /etc/debian_version\n"
            )
        };
        c.script(&dir, "a.sh", &body("a", "b"));
        c.script(&dir, "b.sh", &body("b", "a"));
        let a = c.qsub(&dir, &["-q", "bullseye.q", "-o", "a.out", "a.sh"]);
        let b = c.qsub(
            &dir,
            &["-v", "SGE_VM_IMAGE=bookworm", "-o", "b.out", "b.sh"],
        );
        for job in [a, b] {
            let rec = c.wait_accounting(job, 1, JOB_WAIT * 2);
            assert_eq!(number(&rec[0], "exit_status"), 0.0, "{rec:?}");
        }
        let a_out = std::fs::read_to_string(dir.join("a.out")).unwrap();
        let b_out = std::fs::read_to_string(dir.join("b.out")).unwrap();
        assert!(a_out.starts_with("11."), "{a_out:?}");
        assert!(b_out.starts_with("12."), "{b_out:?}");
    });
}

#[test]
fn a_cwd_the_job_user_cannot_reach_is_the_jobs_error_not_a_requeue() {
    with_cell(
        "a_cwd_the_job_user_cannot_reach_is_the_jobs_error_not_a_requeue",
        |c| {
            // Outside $HOME, so it is a share of its own (a directory inside the $HOME share
            // is reached through it, and the guest's chdir reports it instead).
            let dir = PathBuf::from("/var/tmp/sge_e2e_unreachablecwd");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            let u = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
            std::os::unix::fs::chown(&dir, Some(u.uid.as_raw()), Some(u.gid.as_raw())).unwrap();
            // Submitted on hold, then taken from the job user: root could still enter it, the
            // job user cannot, and the shepherd asks for the job user (before any VM, as the
            // stock shepherd's chdir would: state 28). Output goes elsewhere, so opening the
            // output files does not fail instead.
            let job = c.qsub(
                &dir,
                &["-h", "-o", "/dev/null", "-j", "y", "-b", "y", "/bin/true"],
            );
            std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            let out = run(Command::new("qrls").arg(job.to_string()));
            assert!(out.status.success(), "qrls: {}", text(&out));
            c.wait_eqw(job);
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.starts_with(&format!("error: can't chdir to {}: ", dir.display())),
                "error file: {error:?}"
            );
            assert_eq!(
                c.active_file(job, "exit_status").unwrap_or_default(),
                "28\n"
            );
            assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
            c.qdel(job);
        },
    );
}

#[test]
fn a_cwd_on_procfs_is_never_shared_and_is_the_jobs_error() {
    with_cell(
        "a_cwd_on_procfs_is_never_shared_and_is_the_jobs_error",
        |c| {
            // `qsub -wd /proc`: served by the VMM's file server (a thread of the shepherd), the guest
            // would read the shepherd's own /proc/self (maps, descriptors, environment).
            let job = c.qsub(
                Path::new("/proc"),
                &[
                    "-o",
                    "/dev/null",
                    "-j",
                    "y",
                    "-b",
                    "y",
                    "/bin/cat",
                    "/proc/self/environ",
                ],
            );
            c.wait_eqw(job);
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.starts_with("sge_virtualizer: ")
                    && error.contains("/proc")
                    && error.contains("kernel interface file system"),
                "error file: {error:?}"
            );
            assert_exit_status_written(c, job);
            assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
            c.qdel(job);
        },
    );
}

/// The administrator's set-up for scheduling by OS image (man page, "OS IMAGES IN GRID
/// ENGINE"): the `vm_image` complex, the load sensor that publishes each host's images, and the
/// JSV (returned; a cell would name it in `jsv_url`, the tests pass it to `qsub -jsv`). Waits
/// until this host publishes its images.
fn enable_image_scheduling(c: &Cell) -> PathBuf {
    let root = Path::new(TEST_ROOT);
    let wrapper = |name: &str, args: &str| {
        let path = root.join(name);
        let tmp = root.join(format!("{name}.new"));
        std::fs::write(
            &tmp,
            format!(
                "#!/bin/sh\nexec {}/sge_virtualizer {args}\n",
                root.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    };
    let sensor = wrapper(
        "vm_image_load_sensor",
        &format!("sge load-sensor --store {IMAGE_STORE}"),
    );
    let jsv = wrapper("vm_image_jsv", "sge jsv");
    let complexes = text(&run(Command::new("qconf").arg("-sc")));
    if !complexes.lines().any(|l| l.starts_with("vm_image ")) {
        let file = root.join("complexes");
        std::fs::write(
            &file,
            format!("{complexes}vm_image  vmi  RESTRING  ==  YES  NO  NONE  0\n"),
        )
        .unwrap();
        let out = run(Command::new("qconf").arg("-Mc").arg(&file));
        assert!(out.status.success(), "qconf -Mc: {}", text(&out));
    }
    let global = text(&run(Command::new("qconf").args(["-sconf", "global"])));
    let line = format!("load_sensor                  {}", sensor.display());
    if !global.lines().any(|l| l == line) {
        // One line per key (qconf continues long values with a backslash).
        let mut conf: Vec<String> = Vec::new();
        let mut continued = false;
        for l in global.lines() {
            let piece = if continued { l.trim_start() } else { l };
            match conf.last_mut().filter(|_| continued) {
                Some(last) => last.push_str(piece.trim_end_matches('\\')),
                None => conf.push(piece.trim_end_matches('\\').to_string()),
            }
            continued = l.ends_with('\\');
        }
        conf.retain(|l| !l.starts_with("load_sensor "));
        conf.push(line);
        // qconf -Mconf takes the configuration's name from the file's.
        let dir = root.join("qconf");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("global");
        std::fs::write(&file, conf.join("\n") + "\n").unwrap();
        let out = run(Command::new("qconf").arg("-Mconf").arg(&file));
        assert!(out.status.success(), "qconf -Mconf: {}", text(&out));
    }
    let start = Instant::now();
    loop {
        let shown = text(&run(
            Command::new("qhost").args(["-F", "vm_image", "-h", &c.host])
        ));
        if shown.contains("vm_image=/") && shown.contains("/bookworm/") {
            return jsv;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the load sensor did not publish this host's images within 90 s: {shown}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_job_asking_for_an_image_runs_where_the_image_is_and_waits_where_none_has_it() {
    let test = "a_job_asking_for_an_image_runs_where_the_image_is_and_waits_where_none_has_it";
    with_cell_and_images(test, &["bullseye", "bookworm"], |c| {
        let jsv = enable_image_scheduling(c);
        let jsv = jsv.to_str().unwrap();
        let dir = c.work_dir("vmimage");
        c.script(
            &dir,
            "job.sh",
            "#!/bin/sh\n. /etc/os-release\necho $ID $VERSION_ID\n",
        );
        // Asked for as users write it: the JSV makes it the scheduler's pattern. (bullseye.q's
        // own image, so its queue allows it; the host is Debian 12.)
        let job = c.qsub(
            &dir,
            &[
                "-q",
                "bullseye.q",
                "-jsv",
                jsv,
                "-l",
                "vm_image=bullseye",
                "-o",
                "out.txt",
                "-j",
                "y",
                "job.sh",
            ],
        );
        let rec = c.wait_accounting(job, 1, JOB_WAIT);
        assert_eq!(number(&rec[0], "exit_status"), 0.0, "{rec:?}");
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap();
        assert_eq!(out, "debian 11\n", "the image's os-release");

        // No host has it: the job waits, with the scheduler's reason, and is in no error.
        let waiting = c.qsub(
            &dir,
            &[
                "-jsv",
                jsv,
                "-l",
                "vm_image=nosuch",
                "-o",
                "/dev/null",
                "-j",
                "y",
                "job.sh",
            ],
        );
        let details = text(&run(
            Command::new("qstat").args(["-j", &waiting.to_string()])
        ));
        assert!(
            details.contains("vm_image=*/nosuch/*"),
            "the JSV did not rewrite the request: {details}"
        );
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(c.job_state(waiting).as_deref(), Some("qw"));
        let why = text(&run(Command::new("qalter").args([
            "-w",
            "p",
            &waiting.to_string(),
        ])));
        assert!(why.contains("vm_image"), "qalter -w p: {why}");
        c.qdel(waiting);

        // The host has it, but the queue does not allow it: the job's error, not the queue's.
        let refused = c.qsub(
            &dir,
            &[
                "-jsv",
                jsv,
                "-l",
                "vm_image=bullseye",
                "-o",
                "/dev/null",
                "-j",
                "y",
                "job.sh",
            ],
        );
        c.wait_eqw(refused);
        let error = c.active_file(refused, "error").unwrap_or_default();
        assert!(
            error.contains("\"bullseye\" may not be requested"),
            "error file: {error:?}"
        );
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        c.qdel(refused);

        // A name that cannot be an image is refused at submission.
        let bad = c.try_qsub(&dir, &["-jsv", jsv, "-l", "vm_image=../etc", "job.sh"]);
        assert!(
            bad.as_ref()
                .is_err_and(|e| e.contains("invalid image name")),
            "{bad:?}"
        );
    });
}

#[test]
fn an_unknown_image_is_the_jobs_error_not_the_queues() {
    with_cell("an_unknown_image_is_the_jobs_error_not_the_queues", |c| {
        let dir = c.work_dir("unknownimage");
        // allowed by the settings, but no such image in the store
        let job = c.qsub(&dir, &["-v", "SGE_VM_IMAGE=nosuch", "-b", "y", "/bin/true"]);
        c.wait_eqw(job);
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(
            error.starts_with("sge_virtualizer: ") && error.contains("nosuch"),
            "error file: {error:?}"
        );
        assert_exit_status_written(c, job);
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        c.qdel(job);
    });
}

/// Puts the virtualizer back as the shepherd and clears queue errors, whatever happens.
struct RestoreShepherd<'a>(&'a Cell);

impl Drop for RestoreShepherd<'_> {
    fn drop(&mut self) {
        self.0.set_shepherd(false);
        let _ = run(Command::new("qmod").args(["-c", "*"]));
    }
}

/// Runs a job that cannot enter its working directory under the stock shepherd and under ours:
/// the same job-error state under both, the job in error (Eqw), and no queue of the host in
/// error. `prepare` makes the job's working directory and returns the qsub arguments.
fn assert_cwd_failure_like_the_stock_shepherd(
    c: &Cell,
    case: &str,
    prepare: impl Fn(&Path) -> Vec<String>,
) {
    let mut states = Vec::new();
    for stock in [true, false] {
        c.set_shepherd(stock);
        let dir = c.work_dir(&format!(
            "cwd_{case}_{}",
            if stock { "stock" } else { "vm" }
        ));
        let args = prepare(&dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let job = c.qsub(&dir, &args);
        c.wait_eqw(job);
        let trace = c.active_file(job, "trace").unwrap_or_default();
        assert_eq!(
            trace.contains("sge_virtualizer:"),
            !stock,
            "{case}: job {job} ran under the wrong shepherd: {trace}"
        );
        let state = c
            .active_file(job, "exit_status")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(
            c.queues_in_error().is_empty(),
            "{case} (stock {stock}): queues in error {:?}; exit_status {state}; error {error:?}",
            c.queues_in_error()
        );
        c.qdel(job);
        states.push((state, error));
    }
    assert_eq!(
        states[1].0, states[0].0,
        "{case}: our state differs from the stock shepherd's: {states:?}"
    );
    assert_eq!(states[1].0, "28", "{case}: {states:?}");
    // the host's chdir or the guest's: either way the reason says it
    assert!(
        states[1].1.contains("Permission denied"),
        "{case}: {states:?}"
    );
}

#[test]
fn an_unenterable_working_directory_is_the_jobs_error_as_with_the_stock_shepherd() {
    with_cell(
        "an_unenterable_working_directory_is_the_jobs_error_as_with_the_stock_shepherd",
        |c| {
            let _ = run(Command::new("qmod").args(["-c", "*"]));
            let _restore = RestoreShepherd(c);
            // root may enter /root, the job user may not; the queue's prolog and pe_start run
            // as the job user
            let root_cwd = |pe: bool| {
                move |_: &Path| {
                    let mut a: Vec<String> = ["-q", "prolog.q", "-wd", "/root", "-o", "/dev/null"]
                        .map(String::from)
                        .to_vec();
                    if pe {
                        a.extend(["-pe", "vmpe", "1"].map(String::from));
                    }
                    a.extend(["-j", "y", "-b", "y", "/bin/true"].map(String::from));
                    a
                }
            };
            assert_cwd_failure_like_the_stock_shepherd(c, "prolog", root_cwd(false));
            assert_cwd_failure_like_the_stock_shepherd(c, "pe_start", root_cwd(true));
            // the job owner takes the directory away in the prolog, after every check: the
            // job itself, and pe_start, then cannot enter it
            let locked_cwd = |pe: bool| {
                move |dir: &Path| {
                    let cwd = dir.join("locked");
                    let out = run(Command::new("runuser").args([
                        "-u",
                        JOB_USER,
                        "--",
                        "mkdir",
                        cwd.to_str().unwrap(),
                    ]));
                    assert!(out.status.success(), "{}", text(&out));
                    let mut a: Vec<String> = vec![
                        "-q".into(),
                        "lockcwd.q".into(),
                        "-wd".into(),
                        cwd.display().to_string(),
                        "-o".into(),
                        dir.join("out.txt").display().to_string(),
                    ];
                    if pe {
                        a.extend(["-pe", "vmpe", "1"].map(String::from));
                    }
                    a.extend(["-j", "y", "-b", "y", "/bin/true"].map(String::from));
                    a
                }
            };
            assert_cwd_failure_like_the_stock_shepherd(c, "changed_job", locked_cwd(false));
            assert_cwd_failure_like_the_stock_shepherd(c, "changed_pe_start", locked_cwd(true));
        },
    );
}

#[test]
fn a_one_mib_script_and_one_with_a_nul_byte_run_with_and_without_shared_directories() {
    with_cell(
        "a_one_mib_script_and_one_with_a_nul_byte_run_with_and_without_shared_directories",
        |c| {
            let dir = c.work_dir("bigscript");
            // 1 MiB: far beyond one argument or environment string (128 KiB) and beyond one
            // protocol frame; it reads the job's own stdin after it
            let mut big = b"#!/bin/sh\necho \"big $1\"\ncat\nexit 0\n#".to_vec();
            big.resize(1 << 20, b'x');
            big.push(b'\n');
            std::fs::write(dir.join("big.sh"), &big).unwrap();
            let nul = b"#!/bin/sh\necho nul\nexit 0\n#\0after the NUL\n";
            std::fs::write(dir.join("nul.sh"), nul).unwrap();
            c.script(&dir, "input.txt", "the job's stdin\n");
            let u = nix::unistd::User::from_name(JOB_USER).unwrap().unwrap();
            for f in ["big.sh", "nul.sh"] {
                std::os::unix::fs::chown(dir.join(f), Some(u.uid.as_raw()), Some(u.gid.as_raw()))
                    .unwrap();
            }
            let _ = run(Command::new("qmod").args(["-c", "*"]));
            for queue in ["noshare.q", "all.q"] {
                let out = |name: &str| dir.join(format!("{name}.{queue}.out"));
                let big_job = c.qsub(
                    &dir,
                    &[
                        "-q",
                        queue,
                        "-i",
                        dir.join("input.txt").to_str().unwrap(),
                        "-o",
                        out("big").to_str().unwrap(),
                        "-j",
                        "y",
                        "big.sh",
                        "arg",
                    ],
                );
                // qsub itself refuses a script with a NUL byte ("Script length does not match
                // declared length"): then nothing reaches the shepherd (its unit tests cover it)
                let nul_out = out("nul");
                let nul_args = [
                    "-q",
                    queue,
                    "-o",
                    nul_out.to_str().unwrap(),
                    "-j",
                    "y",
                    "nul.sh",
                ];
                let nul_job = match c.try_qsub(&dir, &nul_args) {
                    Ok(job) => Some(job),
                    Err(e) if e.contains("Script length does not match") => None,
                    Err(e) => panic!("qsub nul.sh: {e}"),
                };
                for job in std::iter::once(big_job).chain(nul_job) {
                    let rec = c.wait_accounting(job, 1, JOB_WAIT);
                    assert_eq!(
                        number(&rec[0], "failed"),
                        0.0,
                        "{queue}: {rec:?}; error: {:?}",
                        c.active_file(job, "error")
                    );
                    assert_eq!(number(&rec[0], "exit_status"), 0.0, "{queue}: {rec:?}");
                }
                assert_eq!(
                    std::fs::read_to_string(out("big")).unwrap_or_default(),
                    "big arg\nthe job's stdin\n",
                    "{queue}"
                );
                if nul_job.is_some() {
                    assert_eq!(
                        std::fs::read_to_string(out("nul")).unwrap_or_default(),
                        "nul\n",
                        "{queue}"
                    );
                }
                assert!(c.queues_in_error().is_empty(), "{:?}", c.queues_in_error());
            }
        },
    );
}

#[test]
fn an_environment_too_large_for_the_guest_is_the_jobs_error_before_any_vm() {
    with_cell(
        "an_environment_too_large_for_the_guest_is_the_jobs_error_before_any_vm",
        |c| {
            let dir = c.work_dir("bigenv");
            let _ = run(Command::new("qmod").args(["-c", "*"]));
            // 2,000 variables, 1.3 MB: more than one message to the guest agent takes (and
            // less than the host's execve takes for qsub; Grid Engine itself takes minutes to
            // dispatch a job with tens of thousands of variables)
            let vars: Vec<(String, String)> = (0..2_000)
                .map(|i| (format!("SGE_E2E_VAR_{i:05}"), "x".repeat(640)))
                .collect();
            let start = Instant::now();
            // not run(): its panic message would print every variable
            let out = Command::new("runuser")
                .args(["-u", JOB_USER, "--", "env", "-C", dir.to_str().unwrap()])
                .args([
                    "qsub",
                    "-terse",
                    "-V",
                    "-q",
                    "all.q",
                    "-o",
                    "/dev/null",
                    "-j",
                    "y",
                ])
                .args(["-b", "y", "/bin/true"])
                .envs(vars)
                .output()
                .unwrap_or_else(|e| panic!("running qsub -V with 2,000 variables: {e}"));
            assert!(out.status.success(), "qsub: {}", text(&out));
            let job: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            c.wait_eqw(job);
            let error = c.active_file(job, "error").unwrap_or_default();
            assert!(
                error.starts_with("sge_virtualizer: the job's arguments and environment"),
                "error file: {error:?}"
            );
            assert_eq!(
                c.active_file(job, "exit_status").unwrap_or_default(),
                "30\n"
            );
            // refused before any VM: nothing was started for it
            let trace = c.active_file(job, "trace").unwrap_or_default();
            assert!(!trace.contains("starting VM"), "{trace}");
            assert!(c.queues_in_error().is_empty(), "{:?}", c.queues_in_error());
            eprintln!(
                "2,000 variables: job in Eqw {:?} after qsub",
                start.elapsed()
            );
            c.qdel(job);
        },
    );
}

/// Issue 18 item 6: how long qdel may take to end a job whose VM is hard-stopped (2 s after
/// the kill), with room for TCG and execd's reporting; far below the 10 s more the shepherd
/// would wait for a VM that does not stop before giving up on it.
const QDEL_BOUND: Duration = Duration::from_secs(30);

/// `qdel -f`s a job a failed test left behind (on the old code its shepherd never ended).
struct ForceDelete<'a>(&'a Cell, u32);

impl Drop for ForceDelete<'_> {
    fn drop(&mut self) {
        if self.0.job_state(self.1).is_some() {
            let _ = run(Command::new("qdel").args(["-f", &self.1.to_string()]));
        }
    }
}

/// A FIFO made by the job user in `dir`.
fn job_user_fifo(dir: &Path, name: &str) -> PathBuf {
    let fifo = dir.join(name);
    let out = run(Command::new("runuser")
        .args(["-u", JOB_USER, "--", "mkfifo"])
        .arg(&fifo));
    assert!(out.status.success(), "mkfifo: {}", text(&out));
    fifo
}

/// Opens one end of a FIFO without waiting for the other (the shepherd's end is open).
fn open_fifo_end(fifo: &Path, write: bool) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .unwrap_or_else(|e| panic!("open {}: {e}", fifo.display()))
}

/// qdel ends `job` within [`QDEL_BOUND`]: killed (137), `exit_status` written, the queue out
/// of error, and the job's real end reported (not the shepherd giving up on its VM).
fn assert_qdel_ends(c: &Cell, job: u32, queue: &str) {
    c.qdel(job);
    let rec = c.wait_accounting(job, 1, QDEL_BOUND);
    assert_eq!(number(&rec[0], "exit_status"), 137.0, "{rec:?}");
    assert_exit_status_written(c, job);
    assert_eq!(c.queue_state(queue), "", "queue must not be in error");
    let trace = c.active_file(job, "trace").unwrap_or_default();
    assert!(
        !trace.contains("did not stop within"),
        "the shepherd gave up on the VM instead of seeing the job end:\n{trace}"
    );
}

#[test]
fn a_fifo_as_output_never_blocks_the_shepherd() {
    with_cell("a_fifo_as_output_never_blocks_the_shepherd", |c| {
        let dir = c.work_dir("fifo_out");
        c.script(
            &dir,
            "talk.sh",
            "#!/bin/sh\necho hello-through-fifo\nsleep 300\n",
        );
        let fifo = job_user_fifo(&dir, "out.fifo");

        // No reader: the job's error (the shepherd used to block in open, deaf to qdel).
        let job = c.qsub(&dir, &["-o", "out.fifo", "talk.sh"]);
        let _cleanup = ForceDelete(c, job);
        let start = Instant::now();
        while c.job_state(job).as_deref() != Some("Eqw") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "job {job} with a reader-less FIFO as -o not in Eqw: {:?}; trace:\n{}",
                c.job_state(job),
                c.active_file(job, "trace").unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let error = c.active_file(job, "error").unwrap_or_default();
        assert!(
            error.contains("no process has open for reading"),
            "{error:?}"
        );
        assert_eq!(c.active_file(job, "exit_status").as_deref(), Some("26\n"));
        assert_eq!(c.queue_state("all.q"), "", "queue must not be in error");
        c.qdel(job);

        // With a reader: the output arrives there, and qdel ends the job.
        let mut reader = open_fifo_end(&fifo, false);
        let job = c.qsub(&dir, &["-o", "out.fifo", "talk.sh"]);
        let _cleanup = ForceDelete(c, job);
        c.wait_running(job, Duration::from_secs(60));
        let mut got = Vec::new();
        let start = Instant::now();
        while !String::from_utf8_lossy(&got).contains("hello-through-fifo") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no output through the FIFO: {:?}",
                String::from_utf8_lossy(&got)
            );
            let mut buf = [0u8; 4096];
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the FIFO: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_qdel_ends(c, job, "all.q");
    });
}

#[test]
fn a_stalled_fifo_reader_does_not_keep_qdel_from_ending_the_job() {
    with_cell(
        "a_stalled_fifo_reader_does_not_keep_qdel_from_ending_the_job",
        |c| {
            let dir = c.work_dir("fifo_stall");
            // Far more output than the FIFO and the shepherd's queue hold.
            c.script(&dir, "flood.sh", "#!/bin/sh\necho started\nexec yes\n");
            let fifo = job_user_fifo(&dir, "out.fifo");
            // A reader that never reads.
            let _reader = open_fifo_end(&fifo, false);
            let job = c.qsub(&dir, &["-o", "out.fifo", "flood.sh"]);
            let _cleanup = ForceDelete(c, job);
            c.wait_running(job, Duration::from_secs(60));
            // Let the output back up to the reader.
            std::thread::sleep(Duration::from_secs(5));
            assert!(c.job_state(job).is_some(), "the flood ended by itself");
            assert_qdel_ends(c, job, "all.q");
        },
    );
}

/// A FUSE file system whose server never answers, mounted for the job user (as `fusermount`
/// would mount it for them: no `allow_other`, so root's accesses are refused at once and only
/// the job user's wait). Not even the connection's INIT is answered, so every request from the
/// job user blocks until the connection is aborted or the waiting process gets a fatal signal.
struct StalledFuse {
    mount_point: PathBuf,
    device: Option<std::fs::File>,
}

impl StalledFuse {
    fn mount(mount_point: &Path, user: &str) -> Result<StalledFuse, String> {
        use std::os::fd::AsRawFd;
        let user = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| format!("no user {user}"))?;
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| format!("cannot open /dev/fuse: {e}"))?;
        let options = format!(
            "fd={},rootmode=40000,user_id={},group_id={}",
            device.as_raw_fd(),
            user.uid,
            user.gid
        );
        nix::mount::mount(
            Some("stalled"),
            mount_point,
            Some("fuse"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| format!("cannot mount a FUSE file system: {e}"))?;
        Ok(StalledFuse {
            mount_point: mount_point.to_path_buf(),
            device: Some(device),
        })
    }
}

impl Drop for StalledFuse {
    fn drop(&mut self) {
        // Closing the server's end aborts the connection: every waiting request ends.
        drop(self.device.take());
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_stalled_fuse_mount_in_a_share_does_not_keep_qdel_from_ending_the_job() {
    let test = "a_stalled_fuse_mount_in_a_share_does_not_keep_qdel_from_ending_the_job";
    with_cell(test, |c| {
        let dir = c.work_dir("fuse_stall");
        c.script(
            &dir,
            "look.sh",
            "#!/bin/sh\necho started\nls stalled/\necho ls-returned\n",
        );
        let mount_point = dir.join("stalled");
        let out = run(Command::new("runuser")
            .args(["-u", JOB_USER, "--", "mkdir"])
            .arg(&mount_point));
        assert!(out.status.success(), "mkdir: {}", text(&out));
        let fuse = match StalledFuse::mount(&mount_point, JOB_USER) {
            Ok(fuse) => fuse,
            Err(why) => return report_skip(test, &why),
        };
        // The mount stalls its user as it should: a `stat` there waits until killed.
        let out = run(Command::new("runuser")
            .args(["-u", JOB_USER, "--", "timeout", "3", "stat"])
            .arg(&mount_point));
        assert_eq!(out.status.code(), Some(124), "{}", text(&out));

        // The job's cwd is shared into its VM; its `ls` reaches the mount through the VMM.
        let job = c.qsub(&dir, &["-o", "out.txt", "look.sh"]);
        let _cleanup = ForceDelete(c, job);
        c.wait_running(job, Duration::from_secs(60));
        c.wait_for_text(&dir.join("out.txt"), "started", Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(3));
        let out = std::fs::read_to_string(dir.join("out.txt")).unwrap_or_default();
        assert!(
            !out.contains("ls-returned"),
            "the job's ls did not wait on the mount: {out:?}"
        );
        assert!(c.job_state(job).is_some(), "the job ended by itself");
        assert_qdel_ends(c, job, "all.q");
        drop(fuse);
    });
}

#[test]
fn a_fifo_as_input_never_blocks_the_shepherd() {
    with_cell("a_fifo_as_input_never_blocks_the_shepherd", |c| {
        let dir = c.work_dir("fifo_in");
        c.script(
            &dir,
            "reader.sh",
            "#!/bin/sh\nread line\necho \"got $line\"\nsleep 300\n",
        );
        let fifo = job_user_fifo(&dir, "in.fifo");
        // No writer yet: the job starts (the shepherd used to block in open, deaf to qdel)
        // and its stdin waits for one.
        let job = c.qsub(&dir, &["-i", "in.fifo", "-o", "out.txt", "reader.sh"]);
        let _cleanup = ForceDelete(c, job);
        c.wait_running(job, Duration::from_secs(60));
        let mut writer = open_fifo_end(&fifo, true);
        std::io::Write::write_all(&mut writer, b"through-the-fifo\n").unwrap();
        c.wait_for_text(
            &dir.join("out.txt"),
            "got through-the-fifo",
            Duration::from_secs(60),
        );
        assert_qdel_ends(c, job, "all.q");
        drop(writer);

        // A writer that never comes: qdel still ends the job.
        let job = c.qsub(&dir, &["-i", "in.fifo", "-o", "out2.txt", "reader.sh"]);
        let _cleanup = ForceDelete(c, job);
        c.wait_running(job, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(2));
        assert_qdel_ends(c, job, "all.q");
    });
}

#[test]
fn a_terminate_method_is_followed_by_the_vms_hard_stop() {
    with_cell("a_terminate_method_is_followed_by_the_vms_hard_stop", |c| {
        // A method that ends nothing: the job in its VM is out of its reach anyway.
        c.add_queue("termmethod.q", &[("terminate_method", "/bin/true")]);
        let dir = c.work_dir("termmethod");
        c.script(&dir, "sleeper.sh", "#!/bin/sh\necho started\nsleep 300\n");
        let job = c.qsub(&dir, &["-q", "termmethod.q", "-o", "out.txt", "sleeper.sh"]);
        let _cleanup = ForceDelete(c, job);
        c.wait_running(job, Duration::from_secs(60));
        c.wait_for_text(&dir.join("out.txt"), "started", Duration::from_secs(60));
        assert_qdel_ends(c, job, "termmethod.q");
        let trace = c.active_file(job, "trace").unwrap_or_default();
        assert!(trace.contains("started method"), "{trace}");
    });
}

#[test]
fn stdin_the_job_never_reads_does_not_keep_qdel_from_ending_it() {
    with_cell(
        "stdin_the_job_never_reads_does_not_keep_qdel_from_ending_it",
        |c| {
            let dir = c.work_dir("unread_stdin");
            c.script(&dir, "deaf.sh", "#!/bin/sh\necho started\nsleep 300\n");
            // Far more than the connection and the agent's stdin queue hold: the stdin frames
            // back up to the shepherd, whose signals to the job used to wait behind them.
            let input = c.script(&dir, "big.in", &"x".repeat(32 << 20));
            let input = input.file_name().unwrap().to_str().unwrap();
            let job = c.qsub(&dir, &["-i", input, "-o", "out.txt", "deaf.sh"]);
            let _cleanup = ForceDelete(c, job);
            c.wait_running(job, Duration::from_secs(60));
            c.wait_for_text(&dir.join("out.txt"), "started", Duration::from_secs(60));
            std::thread::sleep(Duration::from_secs(3));
            assert_qdel_ends(c, job, "all.q");
        },
    );
}

/// The host's `vm_ready` as execd last reported it (`qhost -F vm_ready`), `None` before any.
fn reported_vm_ready(c: &Cell) -> Option<String> {
    let out = run(Command::new("qhost").args(["-F", "vm_ready", "-h", &c.host]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once("hl:vm_ready=").map(|(_, v)| v.trim()))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v.to_string())
}

fn wait_vm_ready(c: &Cell, want: &str) {
    let start = Instant::now();
    while reported_vm_ready(c).as_deref() != Some(want) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "vm_ready is {:?}, not {want}, after 90 s; execd messages:\n{}",
            reported_vm_ready(c),
            std::fs::read_dir(SPOOL)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|h| std::fs::read_to_string(h.path().join("messages")).ok())
                .collect::<String>()
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The load sensor configuration and the complex, taken back whatever happens.
struct LoadSensor;

impl LoadSensor {
    fn install(script: &Path) -> LoadSensor {
        let complexes = text(&run(Command::new("qconf").arg("-sc")));
        if !complexes.lines().any(|l| l.starts_with("vm_ready ")) {
            let file = Path::new(TEST_ROOT).join("complexes");
            std::fs::write(
                &file,
                format!("{complexes}vm_ready vm_ready INT <= YES NO 0 0\n"),
            )
            .unwrap();
            let out = run(Command::new("qconf").arg("-Mc").arg(&file));
            assert!(out.status.success(), "qconf -Mc: {}", text(&out));
        }
        set_load_sensor(&script.display().to_string());
        LoadSensor
    }
}

impl Drop for LoadSensor {
    fn drop(&mut self) {
        set_load_sensor("none");
    }
}

fn set_load_sensor(value: &str) {
    let global = text(&run(Command::new("qconf").args(["-sconf", "global"])));
    let mut found = false;
    let mut conf: String = global
        .lines()
        .filter(|l| !l.starts_with("#"))
        .map(|l| {
            if l.starts_with("load_sensor ") {
                found = true;
                format!("load_sensor                  {value}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    if !found {
        conf.push_str(&format!("load_sensor                  {value}\n"));
    }
    // qconf -Mconf takes the configuration's name from the file's
    let dir = Path::new(TEST_ROOT).join("conf");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("global");
    std::fs::write(&file, conf).unwrap();
    let out = run(Command::new("qconf").arg("-Mconf").arg(&file));
    assert!(out.status.success(), "qconf -Mconf: {}", text(&out));
}

/// Issue 20 item 3: `sge_virtualizer check --load-sensor` as the host's Grid Engine load
/// sensor: execd publishes `vm_ready` 1 while the host can run its VMs and 0 once the guest
/// kernel is gone, so a load threshold or a job request can keep jobs off a broken host.
#[test]
fn as_execds_load_sensor_check_reports_a_broken_host_as_not_ready() {
    with_cell(
        "as_execds_load_sensor_check_reports_a_broken_host_as_not_ready",
        |c| {
            let root = Path::new(TEST_ROOT);
            let settings = root.join("sensor.toml");
            let good = format!(
                "kernel = \"{TEST_ROOT}/vmlinux\"\ninitramfs = \"{TEST_ROOT}/initramfs.cpio\"\n\
                 backend = \"qemu\"\n"
            );
            std::fs::write(&settings, &good).unwrap();
            let script = root.join("vm_ready_sensor.sh");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\nexec {TEST_ROOT}/sge_virtualizer check --load-sensor \
                     --settings {}\n",
                    settings.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let _sensor = LoadSensor::install(&script);
            wait_vm_ready(c, "1");
            std::fs::write(&settings, good.replace("/vmlinux", "/missing/vmlinux")).unwrap();
            wait_vm_ready(c, "0");
            std::fs::write(&settings, &good).unwrap();
            wait_vm_ready(c, "1");
        },
    );
}

/// Runs a job that writes 20 MB to its stdout file under `-l h_fsize=1M` and returns its
/// `exit_status` in qacct and the file's size.
fn fsize_limited_job(c: &Cell, dir: &Path, name: &str) -> (f64, u64) {
    c.script(
        dir,
        &format!("{name}.sh"),
        "#!/bin/sh\nhead -c 20000000 /dev/zero\n",
    );
    let out = dir.join(format!("{name}.out"));
    let job = c.qsub(
        dir,
        &[
            "-l",
            "h_fsize=1M",
            "-o",
            out.to_str().unwrap(),
            "-j",
            "y",
            &format!("{name}.sh"),
        ],
    );
    let rec = c.wait_accounting(job, 1, JOB_WAIT);
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    (number(&rec[0], "exit_status"), size)
}

/// Issue 18: `h_fsize` limits the job's output as under the stock shepherd: the file stops at
/// the limit and the job is killed by SIGXFSZ (exit status 128 + 25), under both shepherds.
/// (The VMM process, which writes the output, has the job's file-size limit.)
#[test]
fn h_fsize_limits_the_jobs_output_as_under_the_stock_shepherd() {
    with_cell(
        "h_fsize_limits_the_jobs_output_as_under_the_stock_shepherd",
        |c| {
            let dir = c.work_dir("fsize");
            let ours = fsize_limited_job(c, &dir, "ours");
            let stock = {
                let _restore = RestoreShepherd(c);
                c.set_shepherd(true);
                fsize_limited_job(c, &dir, "stock")
            };
            assert_eq!(stock, (153.0, 1 << 20), "the stock shepherd");
            assert_eq!(ours, stock, "ours, against the stock shepherd");
        },
    );
}

/// A small ext4 file system mounted for one test, owned by the job user; unmounted whatever
/// happens.
struct SmallFs {
    mount: PathBuf,
    image: PathBuf,
}

impl SmallFs {
    /// Makes a 32 MiB file system at `mount` with `mkfs` options and `mount` options; `Err`
    /// says why it cannot be made here.
    fn make(mount: &Path, mkfs: &[&str], options: &str) -> Result<SmallFs, String> {
        let image = Path::new(TEST_ROOT).join("small-fs.img");
        let _ = run(Command::new("umount").arg(mount));
        std::fs::create_dir_all(mount).map_err(|e| e.to_string())?;
        step(Command::new("truncate").args(["-s", "32M"]).arg(&image))?;
        step(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^has_journal"])
                .args(mkfs)
                .arg(&image),
        )?;
        step(
            Command::new("mount")
                .args(["-o", &format!("loop,{options}")])
                .arg(&image)
                .arg(mount),
        )?;
        let fs = SmallFs {
            mount: mount.to_path_buf(),
            image,
        };
        step(Command::new("chown").arg(JOB_USER).arg(mount))?;
        Ok(fs)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg(&self.mount));
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Runs `cmd`, `Err` with its output when it fails.
fn step(cmd: &mut Command) -> Result<(), String> {
    let out = run(cmd);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", text(&out).trim()))
    }
}

/// Runs a job that writes 30 MB to `out` (on a small file system) and checks that the file
/// stayed within `most` bytes, that the job saw its write fail (as its own write on the host
/// would have), that the reason (`errno_text`) is in the trace, and that no queue went into
/// error.
fn assert_output_stops_like_the_users_write(
    c: &Cell,
    dir: &Path,
    out: &Path,
    most: u64,
    errno_text: &str,
) {
    c.script(
        dir,
        "fill.sh",
        "#!/bin/sh\ntrap '' PIPE\nhead -c 30000000 /dev/zero\necho \"head=$?\" >&2\n",
    );
    let job = c.qsub(
        dir,
        &["-o", out.to_str().unwrap(), "-e", "err.txt", "fill.sh"],
    );
    let rec = c.wait_accounting(job, 1, JOB_WAIT);
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    assert!(
        size <= most,
        "{size} bytes, more than the job user may write ({most})"
    );
    assert!(size > 0, "nothing written");
    let err = std::fs::read_to_string(dir.join("err.txt")).unwrap_or_default();
    assert!(
        err.contains("head=1"),
        "the job did not see its write fail: {err:?}"
    );
    assert_eq!(number(&rec[0], "failed"), 0.0, "{rec:?}");
    let trace = c.active_file(job, "trace").unwrap_or_default();
    assert!(
        trace.contains(&format!("could not be written ({errno_text}")),
        "{trace}"
    );
    assert!(c.queues_in_error().is_empty(), "{:?}", c.queues_in_error());
    assert_exit_status_written(c, job);
}

/// Issue 18: the job's output is written by the job user, never by root: on a file system
/// whose last half is reserved for root, the output stops where the job user's own write
/// would (root's CAP_SYS_RESOURCE would have filled it), the job sees its write fail, and no
/// queue goes into error.
#[test]
fn output_beyond_the_space_the_user_may_use_fails_as_the_users_write_would() {
    const TEST: &str = "output_beyond_the_space_the_user_may_use_fails_as_the_users_write_would";
    with_cell(TEST, |c| {
        let dir = c.work_dir("reserved");
        let fs = match SmallFs::make(&dir.join("mnt"), &["-m", "50"], "rw") {
            Ok(fs) => fs,
            Err(why) => return report_skip(TEST, &why),
        };
        let out = fs.mount.join("out.txt");
        assert_output_stops_like_the_users_write(
            c,
            &dir,
            &out,
            17 << 20,
            "No space left on device",
        );
    });
}

/// Issue 18: output beyond the job user's disk quota fails as the user's own write would.
/// Needs a host kernel with quota support (CONFIG_QUOTA); says SKIPPED where it has none.
#[test]
fn output_beyond_the_users_quota_fails_as_the_users_write_would() {
    const TEST: &str = "output_beyond_the_users_quota_fails_as_the_users_write_would";
    with_cell(TEST, |c| {
        let dir = c.work_dir("quota");
        if find_program("setquota").is_none() {
            return report_skip(
                TEST,
                "setquota not installed (Debian package quota; scripts/setup.sh)",
            );
        }
        let fs = match SmallFs::make(
            &dir.join("mnt"),
            &["-O", "quota", "-E", "quotatype=usrquota"],
            "usrquota",
        ) {
            Ok(fs) => fs,
            Err(why) => {
                let kernel = run(&mut Command::new("dmesg"));
                let no_quota = text(&kernel).contains("not built with CONFIG_QUOTA");
                let why = if no_quota {
                    format!("this host's kernel has no quota support (CONFIG_QUOTA): {why}")
                } else {
                    why
                };
                return report_skip(TEST, &why);
            }
        };
        let quota = step(
            Command::new("setquota")
                .args(["-u", JOB_USER, "1024", "1024", "0", "0"])
                .arg(&fs.mount),
        );
        assert!(quota.is_ok(), "{quota:?}");
        let out = fs.mount.join("out.txt");
        assert_output_stops_like_the_users_write(c, &dir, &out, 1 << 20, "Disk quota exceeded");
    });
}

/// The `usage` line of `qstat -j job` (execd's online usage), if any.
fn online_usage(job: u32) -> Option<String> {
    let out = run(Command::new("qstat").args(["-j", &job.to_string()]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("usage"))
        .map(str::to_string)
}

/// The seconds in a qstat `cpu=[D:]HH:MM:SS` field.
fn cpu_seconds(usage: &str) -> u64 {
    let field = usage
        .split(|c: char| c == ',' || c.is_whitespace())
        .find_map(|f| f.strip_prefix("cpu="))
        .unwrap_or("0");
    field
        .split(':')
        .fold(0, |acc, part| acc * 60 + part.parse::<u64>().unwrap_or(0))
}

/// Issue 18 item 3: execd's process data collector sees the job's VM (the VMM process and its
/// helpers carry the job's `add_grp_id`): `qstat -j` shows the job's online CPU and memory
/// usage while it runs, and a job with `h_cpu` spinning in its VM is ended within the limit's
/// reach, with the CPU time in its accounting. (Here the VM runs under QEMU; the embedded
/// VMM's vCPUs are threads of the same VMM process.)
#[test]
fn online_usage_and_h_cpu_cover_the_jobs_vm() {
    with_cell("online_usage_and_h_cpu_cover_the_jobs_vm", |c| {
        let dir = c.work_dir("h_cpu");
        c.script(&dir, "spin.sh", "#!/bin/sh\nwhile :; do :; done\n");
        let job = c.qsub(&dir, &["-l", "h_cpu=0:0:15", "spin.sh"]);
        let _delete = ForceDelete(c, job);
        c.wait_running(job, JOB_WAIT);
        let start = Instant::now();
        let usage = loop {
            match online_usage(job) {
                Some(u) if cpu_seconds(&u) >= 2 && u.contains("maxvmem=") => break u,
                other => assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no online CPU usage for job {job} after 60 s: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert!(!usage.contains("maxvmem=0.000"), "no memory usage: {usage}");
        let rec = c.wait_accounting(job, 1, Duration::from_secs(120));
        let exit = number(&rec[0], "exit_status");
        assert!(exit > 128.0, "the spinning job was not killed: {rec:?}");
        let cpu = number(&rec[0], "cpu");
        assert!((10.0..=60.0).contains(&cpu), "cpu {cpu} s: {rec:?}");
        let wall = number(&rec[0], "ru_wallclock");
        assert!(wall <= 90.0, "ran {wall} s with h_cpu 15 s: {rec:?}");
    });
}
