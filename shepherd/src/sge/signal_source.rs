//! The signals execd sends the shepherd, read from a `signalfd`. Execd leaves them blocked
//! across exec (and may already have sent some); they stay blocked in every thread, so none is
//! lost or acted on by a default disposition.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals execd uses to talk to a shepherd.
pub const EXECD_SIGNALS: [Signal; 7] = [
    Signal::SIGTTOU,
    Signal::SIGTTIN,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCONT,
    Signal::SIGWINCH,
    Signal::SIGTSTP,
];

/// A signalfd over [`EXECD_SIGNALS`].
pub struct SignalSource {
    fd: SignalFd,
}

impl SignalSource {
    /// Blocks the signals in this thread (threads started later inherit that) and opens the
    /// signalfd. Call before any thread is started.
    pub fn new() -> nix::Result<Self> {
        let mut set = SigSet::empty();
        for s in EXECD_SIGNALS {
            set.add(s);
        }
        // SIGHUP stays blocked too and is never read: a shepherd must outlive its execd and
        // the terminal or session that started execd (std::process::Command children start
        // with an empty mask)
        let mut blocked = set;
        blocked.add(Signal::SIGHUP);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(SignalSource { fd })
    }

    /// Waits up to `timeout` and returns the signals that arrived, in order.
    pub fn wait(&mut self, timeout: Duration) -> Vec<i32> {
        let ms = timeout.as_millis().min(60_000) as u16;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            out.push(info.ssi_signo as i32);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pending_blocked_signal() {
        // run in a child: the mask and the signal are per process
        // SAFETY: the child only runs this test's code and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = (|| {
                    let mut src = SignalSource::new().ok()?;
                    nix::sys::signal::raise(Signal::SIGUSR1).ok()?;
                    nix::sys::signal::raise(Signal::SIGTSTP).ok()?;
                    // blocked, not read, and not fatal
                    nix::sys::signal::raise(Signal::SIGHUP).ok()?;
                    let got = src.wait(Duration::from_millis(500));
                    (got.contains(&libc::SIGUSR1)
                        && got.contains(&libc::SIGTSTP)
                        && !got.contains(&libc::SIGHUP))
                    .then_some(())
                })();
                // SAFETY: _exit ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(if ok.is_some() { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
