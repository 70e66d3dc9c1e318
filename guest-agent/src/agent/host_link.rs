//! The agent's sending side of its connection to the host, shared by the output pumps and the
//! main loop, and the one place a lost connection is replaced by a new one.
//!
//! Two locks, never held the other way round: `conn` while a frame is written (it serialises
//! frames, and a reconnection against every sender), `logs` only briefly (the reader thread
//! takes it for acknowledgements, so it never waits behind a blocked write). Output goes into
//! its [`OutputLog`] before it is written, under `conn`: a frame is on exactly one connection,
//! or in the log to be sent again from the host's offset.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::output_log::{OffsetOutOfRange, OutputLog};
use crate::protocol::{
    Frame, FrameReader, FrameWriter, ProtocolError, ReconnectPoint, Stream, MAX_DATA_CHUNK,
    PROTOCOL_VERSION,
};

/// Unacknowledged bytes kept per stream (guest memory) before the job's writes wait for the
/// host: more than the host's own write queue and the vsock buffers together, so a healthy
/// host never makes the job wait for acknowledgements.
const KEEP_LIMIT: usize = 4 << 20;
/// How long the host may take to answer a [`Frame::Reconnect`].
const RESUME_PATIENCE: Duration = Duration::from_secs(10);

/// Why a new connection could not take over the session.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    #[error("resuming the session: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the host answered the reconnection with {0}")]
    UnexpectedAnswer(String),
    #[error("the host closed the new connection without resuming")]
    Closed,
    #[error("the host resumed {stream:?} at an offset the agent cannot serve: {range}")]
    Offset {
        stream: Stream,
        range: OffsetOutOfRange,
    },
}

#[derive(Default)]
struct Logs {
    stdout: OutputLog,
    stderr: OutputLog,
    /// The Exit frame once sent, until the session ends: sent again on a new connection.
    exit: Option<Frame>,
    stdin_received: u64,
    stdin_ended: bool,
}

impl Logs {
    fn of(&mut self, stream: Stream) -> &mut OutputLog {
        match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }
}

struct Inner {
    /// The current connection's writing end.
    conn: Mutex<FrameWriter<File>>,
    /// Counts connections: an event about an older one is stale. Read without `conn`, which a
    /// blocked write may hold.
    generation: AtomicU64,
    logs: Mutex<Logs>,
    /// Signalled when acknowledgements make room in a log.
    room: Condvar,
}

/// A cloneable handle on the session's connection.
#[derive(Clone)]
pub struct HostLink(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another sender panicked mid-frame; the stream is then
    // unusable, which the caller learns from the next write error.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostLink {
    pub fn new(conn: File) -> Self {
        HostLink(Arc::new(Inner {
            conn: Mutex::new(FrameWriter::new(conn)),
            generation: AtomicU64::new(0),
            logs: Mutex::new(Logs::default()),
            room: Condvar::new(),
        }))
    }

    /// Which connection is current.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::SeqCst)
    }

    /// Sends a frame that is not kept for a new connection (Hello, Started, SpawnFailed, Error).
    pub fn send(&self, frame: &Frame) -> Result<(), ProtocolError> {
        lock(&self.0.conn).write_frame(frame)
    }

    /// Sends job output: kept until acknowledged (waiting while too much is kept), then written.
    /// A write that fails leaves it kept: the reader notices the lost connection, and a new
    /// one carries it.
    pub fn send_output(&self, stream: Stream, data: &[u8]) {
        {
            let mut logs = lock(&self.0.logs);
            while logs.of(stream).kept() >= KEEP_LIMIT {
                logs = self
                    .0
                    .room
                    .wait_timeout(logs, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let mut conn = lock(&self.0.conn);
        lock(&self.0.logs).of(stream).append(data);
        let frame = match stream {
            Stream::Stderr => Frame::Stderr(data.to_vec()),
            _ => Frame::Stdout(data.to_vec()),
        };
        let _ = conn.write_frame(&frame);
    }

    /// Ends an output stream (its Eof is sent again on a new connection).
    pub fn end_output(&self, stream: Stream) {
        let mut conn = lock(&self.0.conn);
        lock(&self.0.logs).of(stream).ended = true;
        let _ = conn.write_frame(&Frame::Eof(stream));
    }

    /// Sends the job's Exit (sent again on a new connection until the host's Ack).
    pub fn send_exit(&self, exit: Frame) -> Result<(), ProtocolError> {
        let mut conn = lock(&self.0.conn);
        lock(&self.0.logs).exit = Some(exit.clone());
        conn.write_frame(&exit)
    }

    /// The host has written `stream` up to `offset`.
    pub fn ack(&self, stream: Stream, offset: u64) -> Result<(), OffsetOutOfRange> {
        let acked = lock(&self.0.logs).of(stream).ack(offset);
        self.0.room.notify_all();
        acked
    }

    /// `n` more bytes of stdin were taken from the host.
    pub fn stdin_received(&self, n: usize) {
        lock(&self.0.logs).stdin_received += n as u64;
    }

    /// The host ended stdin.
    pub fn stdin_ended(&self) {
        lock(&self.0.logs).stdin_ended = true;
    }

    /// Makes `new` the session's connection: says [`Frame::Reconnect`], takes the host's
    /// [`Frame::Resume`] and sends again what the host lacks (output from its offsets, the
    /// Eofs and the Exit already sent). Every sender waits meanwhile. Returns the new
    /// connection's generation.
    pub fn reconnect(&self, new: File) -> Result<u64, ReconnectError> {
        let mut conn = lock(&self.0.conn);
        let mut writer = FrameWriter::new(new.try_clone().map_err(ProtocolError::Io)?);
        let point = {
            let logs = lock(&self.0.logs);
            ReconnectPoint {
                version: PROTOCOL_VERSION,
                stdout_sent: logs.stdout.sent(),
                stderr_sent: logs.stderr.sent(),
                stdin_received: logs.stdin_received,
                stdin_ended: logs.stdin_ended,
            }
        };
        writer.write_frame(&Frame::Reconnect(point))?;
        let patience = nix::sys::time::TimeVal::new(RESUME_PATIENCE.as_secs() as i64, 0);
        let _ = nix::sys::socket::setsockopt(
            &new,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &patience,
        );
        let answer = FrameReader::new(&new).read_frame()?;
        let none = nix::sys::time::TimeVal::new(0, 0);
        let _ =
            nix::sys::socket::setsockopt(&new, nix::sys::socket::sockopt::ReceiveTimeout, &none);
        let (stdout_at, stderr_at) = match answer {
            Some(Frame::Resume { stdout, stderr }) => (stdout, stderr),
            Some(Frame::Error { message }) => {
                return Err(ReconnectError::UnexpectedAnswer(format!(
                    "Error: {message}"
                )))
            }
            Some(other) => return Err(ReconnectError::UnexpectedAnswer(format!("{other:?}"))),
            None => return Err(ReconnectError::Closed),
        };
        let (replay, exit) = {
            let logs = lock(&self.0.logs);
            let mut replay = Vec::new();
            for (stream, log, at) in [
                (Stream::Stdout, &logs.stdout, stdout_at),
                (Stream::Stderr, &logs.stderr, stderr_at),
            ] {
                match log.bytes_after(at) {
                    Ok(bytes) => replay.push((stream, bytes, log.ended)),
                    Err(range) => {
                        let e = ReconnectError::Offset { stream, range };
                        // Told on the new connection: the old one is gone.
                        let _ = writer.write_frame(&Frame::Error {
                            message: format!("guest agent: {e}"),
                        });
                        return Err(e);
                    }
                }
            }
            (replay, logs.exit.clone())
        };
        for (stream, bytes, ended) in replay {
            for chunk in bytes.chunks(MAX_DATA_CHUNK) {
                let frame = match stream {
                    Stream::Stderr => Frame::Stderr(chunk.to_vec()),
                    _ => Frame::Stdout(chunk.to_vec()),
                };
                writer.write_frame(&frame)?;
            }
            if ended {
                writer.write_frame(&Frame::Eof(stream))?;
            }
        }
        if let Some(exit) = exit {
            writer.write_frame(&exit)?;
        }
        *conn = writer;
        Ok(self.0.generation.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Closes the connection in both directions (for every clone of the socket), telling the
    /// host that the agent is done and has nothing more to say.
    pub fn close(&self) {
        let conn = lock(&self.0.conn);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(conn.get_ref()),
            nix::sys::socket::Shutdown::Both,
        );
    }
}
