//! Writes one of the job's output streams on a thread of its own, so that a destination that
//! stops taking bytes (a FIFO whose reader stopped reading, a stalled network or FUSE file
//! system) holds up the job's output, as it would on the host, but never the agent session for
//! ever: once the job's VM is being stopped, the session stops waiting for the writer, drops
//! what is left and goes on to report the job's end. Nothing joins the writer thread; a write
//! that never returns ends with the process.
//!
//! The writer counts the stream's bytes written (from the offset the session started at, which
//! a restored session takes from its checkpoint) and reports each new count, which the session
//! acknowledges to the agent. A checkpoint holds the writer between writes to read the count
//! and the destination's length together ([`OutputWriter::hold`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes queued for the writer before the session waits (the guest's output then waits too).
const QUEUE_LIMIT: usize = 1 << 20;
/// How often a waiting session looks at the abandon flag.
const ABANDON_CHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes queued or being written.
    bytes: usize,
    /// The destination failed (EPIPE and the like): later output is dropped.
    broken: bool,
    /// Why, as an errno, until [`OutputWriter::take_failure`] takes it.
    failure: Option<i32>,
    /// No more output will come: the writer ends once the queue is empty.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// The stream's offset after the last byte written.
    written: AtomicU64,
    /// Held by the writer thread across each write and its count.
    io: Mutex<()>,
}

/// Told each new count of bytes written (the stream's offset after them).
pub(crate) type OnWritten = Box<dyn Fn(u64) + Send>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The session's end of one stream's writer thread.
pub(crate) struct OutputWriter {
    shared: Arc<Shared>,
    /// Set when the job's VM is being stopped: waiting for the destination stops.
    abandoned: Arc<AtomicBool>,
}

impl OutputWriter {
    /// Starts the writer thread for `out`.
    #[cfg(test)]
    pub(crate) fn start(
        name: &str,
        out: Box<dyn Write + Send>,
        abandoned: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        Self::start_at(name, out, abandoned, 0, Box::new(|_| {}))
    }

    /// Starts the writer thread for `out`, whose stream is at `offset` already; `on_written`
    /// hears each new offset once its bytes are written.
    pub(crate) fn start_at(
        name: &str,
        mut out: Box<dyn Write + Send>,
        abandoned: Arc<AtomicBool>,
        offset: u64,
        on_written: OnWritten,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            written: AtomicU64::new(offset),
            io: Mutex::new(()),
        });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || loop {
                let chunk = {
                    let mut q = theirs.lock();
                    loop {
                        if let Some(c) = q.chunks.pop_front() {
                            break c;
                        }
                        if q.closed {
                            let _ = out.flush();
                            return;
                        }
                        q = theirs.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                };
                let io = theirs.io.lock().unwrap_or_else(|p| p.into_inner());
                let result = out.write_all(&chunk).and_then(|()| out.flush());
                let written = match result {
                    Ok(()) => {
                        theirs
                            .written
                            .fetch_add(chunk.len() as u64, Ordering::SeqCst)
                            + chunk.len() as u64
                    }
                    Err(_) => theirs.written.load(Ordering::SeqCst),
                };
                drop(io);
                if result.is_ok() {
                    on_written(written);
                }
                let mut q = theirs.lock();
                q.bytes -= chunk.len();
                if let Err(e) = result {
                    q.broken = true;
                    q.failure = Some(e.raw_os_error().unwrap_or(libc::EIO));
                    q.bytes -= q.chunks.drain(..).map(|c| c.len()).sum::<usize>();
                }
                theirs.changed.notify_all();
            })?;
        Ok(OutputWriter { shared, abandoned })
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Waits (while the writer is behind by more than `limit` bytes) unless abandoned.
    /// Returns the lock, or `None` when the output is to be dropped.
    fn wait_below(&self, limit: usize) -> Option<MutexGuard<'_, Queue>> {
        let mut q = self.shared.lock();
        loop {
            if q.broken || self.abandoned() {
                return None;
            }
            if q.bytes <= limit {
                return Some(q);
            }
            q = self
                .shared
                .changed
                .wait_timeout(q, ABANDON_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Queues `data`; waits while the writer is too far behind (backpressure).
    pub(crate) fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let limit = QUEUE_LIMIT.saturating_sub(data.len());
        if let Some(mut q) = self.wait_below(limit) {
            q.bytes += data.len();
            q.chunks.push_back(data.to_vec());
            self.shared.changed.notify_all();
        }
    }

    /// Why the destination failed, the first time this is asked after it did.
    pub(crate) fn take_failure(&self) -> Option<std::io::Error> {
        self.shared
            .lock()
            .failure
            .take()
            .map(std::io::Error::from_raw_os_error)
    }

    /// The stream's offset after the last byte written.
    pub(crate) fn written(&self) -> u64 {
        self.shared.written.load(Ordering::SeqCst)
    }

    /// Keeps the writer between two writes while the guard lives: [`Self::written`] and the
    /// destination's length then agree. `None` when a write does not end within `patience`
    /// (a stalled destination).
    pub(crate) fn hold(&self, patience: Duration) -> Option<MutexGuard<'_, ()>> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match self.shared.io.try_lock() {
                Ok(guard) => return Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until everything queued is written (or the output is dropped).
    pub(crate) fn drain(&self) {
        let _ = self.wait_below(0);
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.closed = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A destination that takes `accept` bytes and then blocks until `release` says so.
    struct Stalling {
        accepted: Arc<Mutex<Vec<u8>>>,
        accept: usize,
        release: mpsc::Receiver<()>,
    }

    impl Write for Stalling {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let mut got = self.accepted.lock().unwrap();
            if got.len() >= self.accept {
                drop(got);
                let _ = self.release.recv();
                return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
            }
            let n = data.len().min(self.accept - got.len());
            got.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 18 item 6: a reader that stops reading used to block the session (and with it
    /// the job's result) for ever; once abandoned, writing and draining return.
    #[test]
    fn a_stalled_destination_holds_the_output_until_abandoned() {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (release, stall) = mpsc::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let w = OutputWriter::start(
            "test",
            Box::new(Stalling {
                accepted: accepted.clone(),
                accept: 10,
                release: stall,
            }),
            abandoned.clone(),
        )
        .unwrap();
        let (done_tx, done) = mpsc::channel();
        let session = std::thread::spawn(move || {
            w.write(b"0123456789");
            // More than the queue holds: waits, as the guest's output waits for the reader.
            w.write(&vec![b'x'; QUEUE_LIMIT]);
            w.write(b"more");
            w.drain();
            let _ = done_tx.send(Instant::now());
        });
        assert!(
            done.recv_timeout(Duration::from_millis(500)).is_err(),
            "the session did not wait for a slow reader"
        );
        let abandoned_at = Instant::now();
        abandoned.store(true, Ordering::SeqCst);
        let finished = done
            .recv_timeout(Duration::from_secs(5))
            .expect("the session still waits for a stalled reader after the VM was stopped");
        assert!(finished.duration_since(abandoned_at) < Duration::from_secs(1));
        session.join().unwrap();
        assert_eq!(&accepted.lock().unwrap()[..], b"0123456789");
        drop(release);
    }

    /// A destination that fails with `errno` after `accept` bytes.
    struct Failing {
        accept: usize,
        errno: i32,
    }

    impl Write for Failing {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if self.accept == 0 {
                return Err(std::io::Error::from_raw_os_error(self.errno));
            }
            let n = data.len().min(self.accept);
            self.accept -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 18: why a destination failed (a quota, the file-size limit) reaches the session
    /// once, so it can make the job's own writes fail; later output is dropped, not waited on.
    #[test]
    fn a_failed_destination_is_reported_once_and_later_output_dropped() {
        let w = OutputWriter::start(
            "test",
            Box::new(Failing {
                accept: 5,
                errno: libc::EDQUOT,
            }),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        w.write(b"0123456789");
        w.drain();
        let e = w.take_failure().expect("the failure");
        assert_eq!(e.raw_os_error(), Some(libc::EDQUOT));
        assert!(w.take_failure().is_none());
        let start = Instant::now();
        w.write(&vec![b'x'; 4 * QUEUE_LIMIT]);
        w.drain();
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn everything_is_written_in_order_before_drain_returns() {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (_release, stall) = mpsc::channel();
        let w = OutputWriter::start(
            "test",
            Box::new(Stalling {
                accepted: accepted.clone(),
                accept: usize::MAX,
                release: stall,
            }),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let chunk = vec![(i % 251) as u8; 3000];
            w.write(&chunk);
            expected.extend(chunk);
        }
        w.drain();
        assert_eq!(*accepted.lock().unwrap(), expected);
    }
}
