//! The VMM's own process: after the root shepherd has set a job up, the VM runs in a child of
//! it (a fork of the same binary, no exec) that is the job user through and through — real,
//! effective and saved uid and gid, the job's supplementary groups with `add_grp_id` (so
//! execd's process collector finds it), no capabilities, no-new-privs, death with the shepherd
//! — with a process-wide seccomp deny-list, and then the VMM's threads install their own
//! allow-lists. The job's output is written there, never by root.
//!
//! The job user may stop, re-limit or kill that process: none of it reaches the root parent,
//! which only waits ([`supervisor`]), relays signals and stop requests down the [`message`]
//! channel, enforces a deadline on every phase, and turns a child that died without a report
//! into the job's error.

pub mod message;
pub mod supervisor;
mod syscall_filter;

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::backend::VmmCredentials;
use message::{Channel, ChannelError, FromVmm, StartFailure};
pub use supervisor::{VmmControl, VmmProcess};

/// Why the VMM process could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error(
        "the shepherd runs {0} threads; the VMM process is forked only from a single-threaded \
         shepherd"
    )]
    Threads(usize),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("fork: {0}")]
    Fork(nix::Error),
}

/// How long a thread that was just joined may still be listed in `/proc/self/task` (its join
/// returns when it cleared its tid, a little before the kernel removes it).
const JOINED_THREAD_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// How many threads this process runs, once threads that were already joined are gone.
fn thread_count() -> usize {
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(1)
    };
    let start = std::time::Instant::now();
    loop {
        let n = count();
        if n <= 1 || start.elapsed() >= JOINED_THREAD_PATIENCE {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Forks the VMM process, which takes `identity` (none: it keeps this process's) and runs
/// `body` with its end of the channel, then exits. `body` runs only in the child; in the parent
/// it is dropped unrun, which closes the parent's copies of every descriptor it owns.
/// `parent_only`: descriptors the parent keeps that the child must not have (the child closes
/// its copies first: a lock the job user could release or convert, for one).
///
/// Outside unit tests (whose harness runs threads) the caller must be single-threaded: a fork
/// copies only the calling thread, and a lock another thread held would stay locked in the
/// child for ever.
pub fn fork(
    identity: Option<&VmmCredentials>,
    parent_only: &[BorrowedFd<'_>],
    body: impl FnOnce(&Channel),
) -> Result<VmmProcess, ForkError> {
    let threads = if cfg!(test) { 1 } else { thread_count() };
    if threads > 1 {
        return Err(ForkError::Threads(threads));
    }
    let (parent_end, child_end) = Channel::pair()?;
    let control_end = parent_end.try_clone()?;
    let identity = identity.cloned();
    let shepherd = nix::unistd::getpid();
    // SAFETY: the child runs only code of this process's copy; outside tests there is no other
    // thread whose locks could be held (checked above), and the first thing the child does is
    // a handful of raw system calls.
    match unsafe { nix::unistd::fork() }.map_err(ForkError::Fork)? {
        ForkResult::Parent { child } => {
            drop(child_end);
            drop(body);
            Ok(VmmProcess::new(child, parent_end, control_end))
        }
        ForkResult::Child => {
            for fd in parent_only {
                // SAFETY: this copy of the process never uses the objects that own these
                // descriptors (they stay with the parent, and the child ends in _exit without
                // dropping them), so closing the numbers here cannot disturb an owner.
                unsafe { libc::close(fd.as_raw_fd()) };
            }
            drop(parent_end);
            drop(control_end);
            let code = child_main(shepherd, identity.as_ref(), &child_end, body);
            // SAFETY: _exit ends the process without running this copy's destructors or
            // exit handlers (which belong to the parent: its temporary directories, its
            // result files).
            unsafe { libc::_exit(code) }
        }
    }
}

/// The child's life: take the identity, harden, run `body`. Returns the exit code.
fn child_main(
    shepherd: Pid,
    identity: Option<&VmmCredentials>,
    channel: &Channel,
    body: impl FnOnce(&Channel),
) -> i32 {
    reset_signals();
    if let Err(e) = take_identity(identity, shepherd) {
        let _ = channel.send(&FromVmm::StartFailed(StartFailure::Start(format!(
            "the VMM process cannot take the job user's identity: {e}"
        ))));
        return 1;
    }
    if let Err(e) = syscall_filter::install() {
        let _ = channel.send(&FromVmm::StartFailed(StartFailure::Start(e.to_string())));
        return 1;
    }
    name_process();
    // The parent's panic hook writes the parent's result files; a panic here is reported over
    // the channel instead.
    std::panic::set_hook(Box::new(|_| {}));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(channel)));
    if let Err(panic) = ran {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let _ = channel.send(&FromVmm::Failed(crate::agent_session::JobError::Vm(
            message::bounded_text(format!("the VMM process panicked: {what}")),
        )));
        return 101;
    }
    0
}

/// Default dispositions and an empty signal mask: the parent blocks the signals it reads from
/// a signalfd and may have handlers whose pipes it shares with this copy.
fn reset_signals() {
    for signo in 1..32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        // SAFETY: setting a default disposition has no memory-safety preconditions.
        unsafe { libc::signal(signo, libc::SIG_DFL) };
    }
    // SAFETY: an empty, initialised set; the old mask is not asked for.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Takes `identity` for the whole process (groups, then gid, then uid: real, effective and
/// saved, which also clears every capability), then no-new-privs and death with the shepherd.
fn take_identity(identity: Option<&VmmCredentials>, shepherd: Pid) -> nix::Result<()> {
    if let Some(c) = identity {
        if nix::unistd::geteuid().as_raw() != c.uid || nix::unistd::getuid().as_raw() != c.uid {
            let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
            nix::unistd::setgroups(&groups)?;
            let gid = Gid::from_raw(c.gid);
            nix::unistd::setresgid(gid, gid, gid)?;
            let uid = Uid::from_raw(c.uid);
            nix::unistd::setresuid(uid, uid, uid)?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(nix::Error::last());
    }
    // After the identity change, which clears the parent-death signal.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(nix::Error::last());
    }
    if nix::unistd::getppid() != shepherd {
        // The shepherd died before the signal was armed.
        return Err(nix::Error::ESRCH);
    }
    Ok(())
}

/// `sge_vmm-<job>` (`sge_vmm` outside Grid Engine) instead of the shepherd's
/// `sge_shepherd-<job>`: after a restart execd finds
/// shepherds by that name, and this process is not one. The job id comes from `argv[0]`, which
/// execd sets to `sge_shepherd-<job>` (the shepherd's own name is cut to 15 bytes).
fn name_process() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let argv0 = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name = match argv0.strip_prefix("sge_shepherd-") {
        Some(job) => format!("sge_vmm-{job}"),
        None => "sge_vmm".to_string(),
    }
    .into_bytes();
    name.truncate(15);
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
}
