//! The VMM's own process under a hostile job user (issue 18 items 2 and the structure, issue 12's
//! "a VMM fault never loses the result"): `sge_virtualizer run --user U` as root, and U, with a
//! shell on the host, signals and re-limits every process and thread of the job it may.
//!
//! * the root process is never stopped and its limits never change;
//! * the VMM process is U through and through (ids, groups, no capabilities, no-new-privs);
//! * killing the VMM process (SIGKILL, SIGSEGV, SIGSYS, before the agent connects or while
//!   the job runs) ends the run with a clear reason instead of killing or hanging the root
//!   process.
//!
//! The embedded backend's VMM starts its vCPU threads before the guest kernel runs, so its
//! attack surface is there even where the guest cannot reach user space (PVM here); the QEMU
//! backend runs the whole job under TCG.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{guest_run, parent_pid, report_skip};

/// The job user: an account with no other processes of its own in the tests' way.
const JOB_USER: &str = "nobody";
const JOB_UID: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// `sge_virtualizer run --user nobody` with `script` as the job; stdout piped.
fn start_run(backend: &str, script: &str) -> Child {
    guest_run(backend)
        .args(["--user", JOB_USER, "-n"])
        .args(["--", "/bin/sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sge_virtualizer")
}

/// A field of `/proc/<path>/status` (`Uid`, `Groups`, ...), split on white space.
fn status_field(path: &str, key: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{path}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")).map(str::to_string))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The state letter of `pid` (`R`, `S`, `T`, ...).
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 2..].chars().next())
        .unwrap_or('?')
}

/// `root` and every process below it.
fn process_tree(root: u32) -> BTreeSet<u32> {
    let mut tree = BTreeSet::from([root]);
    loop {
        let before = tree.len();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if parent_pid(pid).is_some_and(|p| tree.contains(&p)) {
                tree.insert(pid);
            }
        }
        if tree.len() == before {
            return tree;
        }
    }
}

/// Every thread (`(pid, tid)`) in the tree below `root` that the job user may signal: its real
/// or saved uid is the user's (kill(2) and prlimit(2) compare against those).
fn job_user_tasks(root: u32) -> Vec<(u32, u32)> {
    let uid = JOB_UID.to_string();
    let mut tasks = Vec::new();
    for pid in process_tree(root) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in dir.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let ids = status_field(&format!("{pid}/task/{tid}"), "Uid");
            if ids.len() >= 3 && (ids[0] == uid || ids[2] == uid) {
                tasks.push((pid, tid));
            }
        }
    }
    tasks
}

/// The VMM process among the job user's `tasks`: the root process's child that is not the
/// job's passt (also the root's child and the job user's, started for the job's network).
fn vmm_process(root: u32, tasks: &[(u32, u32)]) -> Option<u32> {
    tasks
        .iter()
        .map(|(pid, _)| *pid)
        .find(|pid| parent_pid(*pid) == Some(root) && !is_passt(*pid))
}

/// Whether process `pid` is a passt.
fn is_passt(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("passt"))
}

/// Runs `program args` as the job user; whether it succeeded.
fn as_job_user(program: &str, args: &[String]) -> bool {
    Command::new(program)
        .args(args)
        .uid(JOB_UID)
        .gid(JOB_UID)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The "Max open files" line of `/proc/<pid>/limits`.
fn open_files_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string()
}

/// Waits until the tree below `root` has tasks of the job user (the VM is up).
fn wait_for_job_user_tasks(child: &mut Child) -> Vec<(u32, u32)> {
    let start = Instant::now();
    loop {
        let tasks = job_user_tasks(child.id());
        // The VMM process, and (embedded) its vCPU thread or (QEMU) its helpers; the job's
        // passt, also the job user's, comes before them and does not count.
        let vm_tasks = tasks.iter().filter(|(pid, _)| !is_passt(*pid)).count();
        if vm_tasks >= 2 && vmm_process(child.id(), &tasks).is_some() {
            return tasks;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("run ended before the VM was up: {status}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no task of the job user appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to end within `patience`; its exit code (None: a signal) and stderr.
fn finish(mut child: Child, patience: Duration) -> (Option<i32>, Option<i32>, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sge_virtualizer did not end within {patience:?} of its VMM's death");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    use std::os::unix::process::ExitStatusExt;
    (status.code(), status.signal(), err)
}

/// The job user's attack on a running job: STOP and re-limit every task it may, then KILL them.
fn stop_relimit_and_kill(backend: &str) {
    if !is_root() {
        report_skip(
            &format!("{backend}: stop_relimit_and_kill"),
            "needs root to run a job as another user",
        );
        return;
    }
    if backend == "embedded" && !std::path::Path::new("/dev/kvm").exists() {
        report_skip("embedded: stop_relimit_and_kill", "no /dev/kvm");
        return;
    }
    let mut child = start_run(backend, "echo up; sleep 60");
    let root = child.id();
    let tasks = wait_for_job_user_tasks(&mut child);
    let limit_before = open_files_limit(root);
    let tids: Vec<String> = tasks.iter().map(|(_, tid)| tid.to_string()).collect();
    for tid in &tids {
        as_job_user("kill", &["-STOP".into(), tid.clone()]);
        as_job_user(
            "prlimit",
            &["--pid".into(), tid.clone(), "--nofile=5:5".into()],
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let root_state = state(root);
    let limit_after = open_files_limit(root);
    for tid in &tids {
        as_job_user("kill", &["-CONT".into(), tid.clone()]);
    }
    assert_ne!(
        root_state, 'T',
        "the job user stopped the root process through one of {tasks:?}"
    );
    assert_eq!(
        limit_after, limit_before,
        "the job user changed the root process's limits"
    );
    assert!(
        tasks.iter().all(|(pid, _)| *pid != root),
        "threads of the root process run as the job user: {tasks:?}"
    );

    // The VMM process itself: the job user through and through.
    let vmm = vmm_process(root, &tasks).expect("a VMM process of the job user");
    let p = vmm.to_string();
    let uid = JOB_UID.to_string();
    assert_eq!(status_field(&p, "Uid"), vec![uid.clone(); 4]);
    assert_eq!(status_field(&p, "Gid"), vec![uid.clone(); 4]);
    assert_eq!(status_field(&p, "Groups"), vec![uid]);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            status_field(&p, cap),
            vec!["0000000000000000"],
            "{cap} of the VMM process"
        );
    }
    assert_eq!(status_field(&p, "NoNewPrivs"), vec!["1"]);
    assert_eq!(status_field(&p, "Seccomp"), vec!["2"], "no seccomp filter");

    // Now kill everything the user may kill.
    for tid in &tids {
        as_job_user("kill", &["-KILL".into(), tid.clone()]);
    }
    let (code, signal, err) = finish(child, Duration::from_secs(30));
    assert_eq!(signal, None, "the root process was killed; stderr: {err}");
    assert_eq!(code, Some(125), "{err}");
    // Killed, or (re-limited to 5 descriptors) failed on its own first: either way, said so.
    assert!(
        err.contains("VMM process") && err.contains("killed by signal 9")
            || err.contains("Too many open files"),
        "no clear reason: {err}"
    );
}

#[test]
fn qemu_the_job_user_cannot_stop_relimit_or_kill_the_root_process() {
    stop_relimit_and_kill("qemu");
}

#[test]
fn embedded_the_job_user_cannot_stop_relimit_or_kill_the_root_process() {
    stop_relimit_and_kill("embedded");
}

/// Delivers `signal` to the VMM process at `moment` ("booting": as soon as it exists, before
/// the agent connects; "running": once the job printed) and checks the run ends with the reason.
fn vmm_killed_by(signal: i32, moment: &str) {
    if !is_root() {
        report_skip(
            &format!("vmm_killed_by({signal}, {moment})"),
            "needs root to run a job as another user",
        );
        return;
    }
    let mut child = start_run("qemu", "echo up; sleep 60");
    let root = child.id();
    if moment == "running" {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        assert_eq!(line, "up\n", "the job did not start");
    }
    let tasks = wait_for_job_user_tasks(&mut child);
    let vmm = vmm_process(root, &tasks).expect("the VMM process");
    // The job user sends it (SIGSYS and SIGSEGV stand for a seccomp kill and a crash).
    assert!(as_job_user(
        "kill",
        &[format!("-{signal}"), vmm.to_string()]
    ));
    let (code, sig, err) = finish(child, Duration::from_secs(30));
    assert_eq!(sig, None, "the root process died: {err}");
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("VMM process") && err.contains(&format!("killed by signal {signal}")),
        "no clear reason: {err}"
    );
}

#[test]
fn a_vmm_killed_while_booting_is_reported() {
    vmm_killed_by(libc::SIGKILL, "booting");
}

#[test]
fn a_vmm_segfaulting_while_the_job_runs_is_reported() {
    vmm_killed_by(libc::SIGSEGV, "running");
}

#[test]
fn a_vmm_killed_by_seccomp_while_booting_is_reported() {
    vmm_killed_by(libc::SIGSYS, "booting");
}

#[test]
fn a_vmm_killed_while_the_job_runs_is_reported() {
    vmm_killed_by(libc::SIGKILL, "running");
}

/// Issue 18 item 4: the job's output is written by the job user's process, so the user's
/// limits (and quota) apply to it, not root's. The job user lowers its VMM process's file-size
/// limit while the job runs; the job's output then stops at that size and the run ends with the
/// reason, instead of root writing it all.
#[test]
fn the_output_is_written_under_the_job_users_limits() {
    if !is_root() {
        report_skip(
            "the_output_is_written_under_the_job_users_limits",
            "needs root to run a job as another user",
        );
        return;
    }
    const LIMIT: u64 = 100_000;
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = guest_run("qemu")
        .args(["--user", JOB_USER, "-n"])
        .args([
            "--",
            "/bin/sh",
            "-c",
            "echo ready; sleep 3; head -c 1000000 /dev/zero; echo done",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sge_virtualizer");
    let root = child.id();
    let start = Instant::now();
    while !std::fs::read_to_string(&out_path)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmm = vmm_process(root, &job_user_tasks(root)).expect("the VMM process");
    assert!(as_job_user(
        "prlimit",
        &[
            "--pid".into(),
            vmm.to_string(),
            format!("--fsize={LIMIT}:{LIMIT}"),
        ]
    ));
    let (code, sig, err) = finish(child, Duration::from_secs(60));
    let written = std::fs::metadata(&out_path).unwrap().len();
    assert!(
        written <= LIMIT,
        "{written} bytes of output written past the job user's limit of {LIMIT}"
    );
    assert_eq!(sig, None, "the root process died: {err}");
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains(&format!("killed by signal {}", libc::SIGXFSZ)),
        "no clear reason: {err}"
    );
}
