//! Starting the job: fork, become the job (own session, credentials, limits, cwd, stdio), exec.
//!
//! Written on `fork`/`execve` directly rather than `std::process::Command` because the host must
//! learn *which step* failed (a bad cwd and a missing program are different Grid Engine failure
//! states), and because credentials have to be switched in a precise order: limits and nice
//! while still privileged, then groups, gid, uid, and only then `chdir` as the job user.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::protocol::{Spawn, SpawnStage, StdinMode, RLIM_INFINITY};

/// A started job and the host ends of its stdio pipes.
pub struct JobProcess {
    pub pid: libc::pid_t,
    /// Write end of the stdin pipe (only in [`StdinMode::Frames`]).
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
}

/// Why the job did not start.
#[derive(Debug, thiserror::Error)]
#[error("{stage:?} failed: {message}")]
pub struct SpawnError {
    pub stage: SpawnStage,
    pub errno: i32,
    pub message: String,
}

impl SpawnError {
    fn new(stage: SpawnStage, errno: i32, what: &str) -> Self {
        let text = std::io::Error::from_raw_os_error(errno);
        SpawnError {
            stage,
            errno,
            message: format!("{what}: {text}"),
        }
    }
}

/// Everything the child needs, prepared before `fork` so the child never allocates.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    groups: Vec<libc::gid_t>,
    rlimits: Vec<(u32, libc::rlimit)>,
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError {
        stage: SpawnStage::Other,
        errno: libc::EINVAL,
        message: format!("{what} contains a NUL byte"),
    })
}

/// Resolves `argv[0]` the way `execvp` would, but against the *job's* `PATH`.
fn resolve_program(name: &[u8], env: &[Vec<u8>]) -> Result<Vec<u8>, SpawnError> {
    if name.is_empty() {
        return Err(SpawnError::new(
            SpawnStage::Exec,
            libc::ENOENT,
            "empty program name",
        ));
    }
    if name.contains(&b'/') {
        return Ok(name.to_vec());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(name);
        let p = Path::new(std::ffi::OsStr::from_bytes(&candidate));
        if p.is_file() {
            return Ok(candidate);
        }
    }
    Err(SpawnError::new(
        SpawnStage::Exec,
        libc::ENOENT,
        &format!("{} not found in PATH", String::from_utf8_lossy(name)),
    ))
}

fn prepare(spawn: &Spawn) -> Result<Prepared, SpawnError> {
    let first = spawn
        .argv
        .first()
        .ok_or_else(|| SpawnError::new(SpawnStage::Exec, libc::EINVAL, "empty argv"))?;
    let program = cstring(&resolve_program(first, &spawn.env)?, "program")?;
    let argv = spawn
        .argv
        .iter()
        .map(|a| cstring(a, "argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = spawn
        .env
        .iter()
        .map(|e| cstring(e, "environment entry"))
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = if spawn.cwd.is_empty() {
        cstring(b"/", "cwd")?
    } else {
        cstring(&spawn.cwd, "cwd")?
    };
    let to_rlim = |v: u64| {
        if v == RLIM_INFINITY {
            libc::RLIM_INFINITY
        } else {
            v as libc::rlim_t
        }
    };
    let rlimits = spawn
        .rlimits
        .iter()
        .map(|r| {
            (
                r.resource,
                libc::rlimit {
                    rlim_cur: to_rlim(r.soft),
                    rlim_max: to_rlim(r.hard),
                },
            )
        })
        .collect();
    Ok(Prepared {
        program,
        argv,
        envp,
        cwd,
        groups: spawn.groups.clone(),
        rlimits,
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SpawnError::new(SpawnStage::Other, e as i32, "pipe"))
}

/// Starts the job. On success the child is running `argv` as its own session leader.
pub fn start(spawn: &Spawn) -> Result<JobProcess, SpawnError> {
    let prepared = prepare(spawn)?;
    let (stdin_read, stdin_write) = match spawn.stdin {
        StdinMode::Frames => {
            let (r, w) = pipe()?;
            (r, Some(w))
        }
        StdinMode::Null => {
            let null = File::open("/dev/null").map_err(|e| {
                SpawnError::new(
                    SpawnStage::Other,
                    e.raw_os_error().unwrap_or(0),
                    "/dev/null",
                )
            })?;
            (OwnedFd::from(null), None)
        }
    };
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (status_read, status_write) = pipe()?;

    let mut argv_ptrs: Vec<*const libc::c_char> =
        prepared.argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> =
        prepared.envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());

    // SAFETY: fork has no memory-safety preconditions; the child below only makes
    // async-signal-safe system calls on data prepared before the fork, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(SpawnError::new(SpawnStage::Other, errno, "fork"));
    }
    if pid == 0 {
        // SAFETY: in the child of fork; see become_job.
        unsafe {
            become_job(
                &prepared,
                spawn.uid,
                spawn.gid,
                spawn.nice,
                [
                    stdin_read.as_raw_fd(),
                    stdout_write.as_raw_fd(),
                    stderr_write.as_raw_fd(),
                ],
                status_write.as_raw_fd(),
                argv_ptrs.as_ptr(),
                envp_ptrs.as_ptr(),
            )
        }
    }
    drop(status_write);
    drop(stdin_read);
    drop(stdout_write);
    drop(stderr_write);

    // The status pipe is close-on-exec: EOF with no bytes means execve succeeded.
    let mut report = [0u8; 5];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reading into a live, correctly sized stack buffer.
        let n = unsafe {
            libc::read(
                status_read.as_raw_fd(),
                report[got..].as_mut_ptr().cast(),
                report.len() - got,
            )
        };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got == report.len() {
        let stage = match report[0] {
            0 => SpawnStage::Credentials,
            1 => SpawnStage::Limits,
            2 => SpawnStage::Cwd,
            3 => SpawnStage::Exec,
            _ => SpawnStage::Other,
        };
        let errno = i32::from_le_bytes([report[1], report[2], report[3], report[4]]);
        // Reap the failed child so it does not linger as a zombie.
        let mut status = 0;
        // SAFETY: plain waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let what = match stage {
            SpawnStage::Cwd => format!("cannot change to {}", prepared.cwd.to_string_lossy()),
            SpawnStage::Exec => format!("cannot execute {}", prepared.program.to_string_lossy()),
            SpawnStage::Credentials => {
                format!("cannot switch to uid {} gid {}", spawn.uid, spawn.gid)
            }
            SpawnStage::Limits => "cannot apply limits".to_string(),
            SpawnStage::Other | SpawnStage::Filesystems | SpawnStage::Network => {
                "cannot set up the job".to_string()
            }
        };
        return Err(SpawnError::new(stage, errno, &what));
    }
    Ok(JobProcess {
        pid,
        stdin: stdin_write.map(File::from),
        stdout: File::from(stdout_read),
        stderr: File::from(stderr_read),
    })
}

/// Runs in the forked child: applies the job's identity and execs it, or reports the failing
/// step on `status_fd` and exits 127.
///
/// # Safety
/// Must only be called in the child right after `fork`. Uses only async-signal-safe calls.
#[allow(clippy::too_many_arguments)]
unsafe fn become_job(
    p: &Prepared,
    uid: u32,
    gid: u32,
    nice: i32,
    stdio: [libc::c_int; 3],
    status_fd: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    let fail = |stage: u8| -> ! {
        let errno = *libc::__errno_location();
        let e = errno.to_le_bytes();
        let report = [stage, e[0], e[1], e[2], e[3]];
        libc::write(status_fd, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    };
    // Default dispositions and an empty mask: the agent's (Rust ignores SIGPIPE) must not leak
    // into the job.
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    if libc::setsid() < 0 {
        fail(4);
    }
    for (resource, limit) in &p.rlimits {
        if libc::setrlimit(*resource as _, limit) < 0 {
            fail(1);
        }
    }
    if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) < 0 {
        fail(1);
    }
    if libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0 && libc::getuid() == 0 {
        fail(0);
    }
    if libc::getgid() != gid && libc::setgid(gid) < 0 {
        fail(0);
    }
    if libc::getuid() != uid && libc::setuid(uid) < 0 {
        fail(0);
    }
    if libc::chdir(p.cwd.as_ptr()) < 0 {
        fail(2);
    }
    for (target, fd) in stdio.iter().enumerate() {
        let target = target as libc::c_int;
        // dup2 onto itself keeps close-on-exec set, so clear it by hand in that case.
        let ok = if *fd == target {
            libc::fcntl(target, libc::F_SETFD, 0) >= 0
        } else {
            libc::dup2(*fd, target) >= 0
        };
        if !ok {
            fail(4);
        }
    }
    libc::execve(p.program.as_ptr(), argv, envp);
    fail(3)
}
