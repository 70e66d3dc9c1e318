//! Where the guest's serial console goes: nowhere, a bounded in-memory ring (the last N bytes),
//! or a file capped at N bytes. Bounded either way, so a chatty or hostile guest cannot fill the
//! host's memory or disk.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::lock_device;

/// Where serial console output goes (part of [`crate::VmConfig`]).
#[derive(Debug, Clone, Default)]
pub enum SerialSink {
    /// Discard it.
    #[default]
    Discard,
    /// Keep the last `capacity` bytes in memory; read them with
    /// [`crate::VmHandle::console_output`].
    Memory {
        /// Bytes kept.
        capacity: usize,
    },
    /// Write to a new file, stopping after `max_bytes`. The file must not exist: it is created
    /// with `O_EXCL | O_NOFOLLOW` (mode 0600), so a VMM running as root never writes through a
    /// symlink or into a file someone else put under the name.
    File {
        /// The file.
        path: PathBuf,
        /// Cap on bytes written.
        max_bytes: u64,
    },
    /// Write to a file the caller opened (for a VMM whose identity may not create files where
    /// the log lives), stopping after `max_bytes`.
    OpenFile {
        /// The file; the console writes through its own duplicate of the descriptor.
        file: std::sync::Arc<File>,
        /// Cap on bytes written.
        max_bytes: u64,
    },
}

/// A bounded ring buffer of console bytes, shared with the VM handle.
#[derive(Debug, Clone)]
pub struct ConsoleRing {
    inner: Arc<Mutex<RingState>>,
}

#[derive(Debug)]
struct RingState {
    bytes: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl ConsoleRing {
    /// A ring keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RingState {
                bytes: VecDeque::with_capacity(capacity.min(1 << 20)),
                capacity,
                total: 0,
            })),
        }
    }

    /// The bytes currently kept.
    pub fn contents(&self) -> Vec<u8> {
        lock_device(&self.inner).bytes.iter().copied().collect()
    }

    /// Total bytes ever written (kept or not).
    pub fn total_written(&self) -> u64 {
        lock_device(&self.inner).total
    }

    fn push(&self, data: &[u8]) {
        let mut s = lock_device(&self.inner);
        s.total += data.len() as u64;
        if s.capacity == 0 {
            return;
        }
        let keep = &data[data.len().saturating_sub(s.capacity)..];
        let overflow = (s.bytes.len() + keep.len()).saturating_sub(s.capacity);
        s.bytes.drain(..overflow);
        s.bytes.extend(keep);
    }
}

/// The writer behind the serial port.
#[derive(Debug)]
pub enum ConsoleLog {
    /// Output is dropped.
    Discard,
    /// Output goes to a ring.
    Memory(ConsoleRing),
    /// Output goes to a file, up to a cap.
    File {
        /// The open file.
        file: File,
        /// Bytes still allowed.
        remaining: u64,
    },
}

impl ConsoleLog {
    /// Opens the sink. Returns the log and, for a memory sink, the ring to read it back.
    pub fn open(sink: &SerialSink) -> std::io::Result<(Self, Option<ConsoleRing>)> {
        Ok(match sink {
            SerialSink::Discard => (Self::Discard, None),
            SerialSink::Memory { capacity } => {
                let ring = ConsoleRing::new(*capacity);
                (Self::Memory(ring.clone()), Some(ring))
            }
            SerialSink::File { path, max_bytes } => (
                Self::File {
                    file: OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(path)?,
                    remaining: *max_bytes,
                },
                None,
            ),
            SerialSink::OpenFile { file, max_bytes } => (
                Self::File {
                    file: file.try_clone()?,
                    remaining: *max_bytes,
                },
                None,
            ),
        })
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Discard => {}
            Self::Memory(ring) => ring.push(buf),
            Self::File { file, remaining } => {
                let n = (buf.len() as u64).min(*remaining) as usize;
                if n > 0 {
                    // A failing log file must not stop the guest: the bytes are dropped.
                    if file.write_all(&buf[..n]).is_ok() {
                        *remaining -= n as u64;
                    }
                }
            }
        }
        // Always report the whole buffer as taken: the serial port must never see back-pressure.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Self::File { file, .. } = self {
            let _ = file.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_bytes() {
        let (mut log, ring) = ConsoleLog::open(&SerialSink::Memory { capacity: 4 }).unwrap();
        let ring = ring.unwrap();
        log.write_all(b"abc").unwrap();
        log.write_all(b"defgh").unwrap();
        assert_eq!(ring.contents(), b"efgh");
        log.write_all(b"i").unwrap();
        assert_eq!(ring.contents(), b"fghi");
        assert_eq!(ring.total_written(), 9);
    }

    #[test]
    fn file_stops_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (mut log, _) = ConsoleLog::open(&SerialSink::File {
            path: path.clone(),
            max_bytes: 5,
        })
        .unwrap();
        assert_eq!(log.write(b"hello world").unwrap(), 11);
        log.write_all(b"more").unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    }

    #[test]
    fn an_open_file_is_written_through_its_own_descriptor_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let file = std::sync::Arc::new(File::create(&path).unwrap());
        let (mut log, _) = ConsoleLog::open(&SerialSink::OpenFile {
            file: file.clone(),
            max_bytes: 5,
        })
        .unwrap();
        drop(file);
        log.write_all(b"hello world").unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    }

    /// The attack: the job user, who can see the run directory, plants `console.log` as a
    /// symlink to a host file before the VMM (root) creates it.
    #[test]
    fn a_planted_symlink_or_file_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("console.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let sink = SerialSink::File {
            path: path.clone(),
            max_bytes: 1 << 20,
        };
        if let Ok((mut log, _)) = ConsoleLog::open(&sink) {
            log.write_all(b"guest bytes").unwrap();
            log.flush().unwrap();
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        std::fs::hard_link(&victim, &path).unwrap();
        assert!(
            ConsoleLog::open(&sink).is_err(),
            "an existing file is not reused"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
