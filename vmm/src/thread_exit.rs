//! Joining the VMM's threads with a deadline. A thread can be stuck where only a fatal signal
//! ends it — the event thread in a request to a FUSE file system the job user mounted inside a
//! shared directory, which never answers — and stopping a VM must not wait for it for ever:
//! such a thread is left behind (it owns or shares everything it uses) and ends with the
//! process.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long stopping a VM waits for all of its threads together.
pub(crate) const THREAD_EXIT_PATIENCE: Duration = Duration::from_secs(3);
/// How often a join looks again.
const POLL: Duration = Duration::from_millis(5);

/// Joins `thread` if it ends by `deadline`; otherwise leaves it running, detached, and says so.
/// Returns whether it was joined.
pub(crate) fn join_by(thread: JoinHandle<()>, deadline: Instant) -> bool {
    loop {
        if thread.is_finished() {
            let _ = thread.join();
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                thread = thread.thread().name().unwrap_or("?"),
                "VMM thread did not end within its deadline; left behind"
            );
            return false;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_never_ends_is_left_behind_at_the_deadline() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let start = Instant::now();
        assert!(!join_by(stuck, start + Duration::from_millis(100)));
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(tx);
        let quick = std::thread::spawn(|| {});
        assert!(join_by(quick, Instant::now() + Duration::from_secs(5)));
    }
}
