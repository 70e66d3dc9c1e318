//! A job's `-o`/`-e`/`-i` path that is a FIFO the job user made: opened so that the shepherd's
//! main thread, the one that reads execd's signals, never waits in `open(2)` for the other end.
//!
//! The stock shepherd opens these in the job's child, where a blocking open only holds up the
//! job (qdel kills the child). Here the files are opened in the shepherd itself, so every open
//! is non-blocking: an output FIFO opens only while it has a reader (else `ENXIO`, the job's
//! error), and is then switched back to blocking writes (the procedures and the output writer
//! see an ordinary descriptor; a reader that stops reading holds up only the output writer
//! thread, see [`crate::output_writer`]). An input FIFO opens at once; the wait for its
//! writer happens on the stdin-forwarding thread, which nothing waits for.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Clears `O_NONBLOCK` on `file`'s open file description.
pub fn set_blocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; F_GETFL/F_SETFL touch only its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The job's stdin: a file read as opened, or a FIFO whose wait for a writer (the stock
/// shepherd's job waits for one in `open`) is done by the first `read`, on the thread that
/// forwards stdin to the guest.
pub enum JobInput {
    File(File),
    /// Opened with `O_NONBLOCK`; `waited` once a writer came (or data is there).
    Fifo {
        file: File,
        waited: bool,
    },
}

impl JobInput {
    /// Wraps a descriptor opened with `O_NONBLOCK`: a FIFO waits for its writer on first
    /// read; anything else reads as usual (blocking again).
    pub fn from_nonblocking(file: File) -> std::io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let is_fifo = file.metadata()?.file_type().is_fifo();
        if !is_fifo {
            set_blocking(&file)?;
            return Ok(JobInput::File(file));
        }
        Ok(JobInput::Fifo {
            file,
            waited: false,
        })
    }
}

impl Read for JobInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            JobInput::File(f) => f.read(buf),
            JobInput::Fifo { file, waited } => {
                if !*waited {
                    // A read end opened before any writer polls neither readable nor hung up
                    // until a writer comes and writes or closes (a blocking read would return
                    // end-of-file at once instead).
                    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
                    loop {
                        match poll(&mut fds, PollTimeout::NONE) {
                            Ok(_) => break,
                            Err(nix::errno::Errno::EINTR) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    set_blocking(file)?;
                    *waited = true;
                }
                file.read(buf)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs `f` on a thread and fails the test if it takes longer than `limit` (the old code
    /// blocked in `open` for ever: the thread is left behind then, the test fails).
    pub(crate) fn bounded<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("still blocked after {limit:?}"))
    }

    #[test]
    fn an_input_fifo_opens_at_once_and_reads_what_a_later_writer_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut input = JobInput::from_nonblocking(f).unwrap();
        let writer_path = fifo.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut w = File::options().write(true).open(writer_path).unwrap();
            w.write_all(b"late data").unwrap();
        });
        let read = bounded(Duration::from_secs(10), move || {
            let mut s = String::new();
            input.read_to_string(&mut s).map(|_| s)
        });
        writer.join().unwrap();
        assert_eq!(read.unwrap(), "late data");
    }
}
