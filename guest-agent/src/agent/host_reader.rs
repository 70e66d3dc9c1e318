//! Reads the host's frames on one connection: stdin data for the job, signals for its process
//! group, acknowledgements of written output, output streams the host can no longer write, the
//! final Ack. Runs on its own thread (one per connection) so a signal is delivered while the
//! main loop waits.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::Arc;

use super::event::Event;
use super::host_link::HostLink;
use crate::protocol::{Frame, FrameReader, ProtocolError, Stream};

/// Feeds the job's stdin pipe from its own thread, so a job that does not read stdin cannot
/// stall signal delivery. The channel is bounded (64 chunks of at most 64 KiB): beyond that the
/// host reader waits, which pushes back on the host.
pub fn spawn_stdin_feeder(stdin: Option<File>) -> SyncSender<Option<Vec<u8>>> {
    let (tx, rx) = sync_channel::<Option<Vec<u8>>>(64);
    std::thread::spawn(move || {
        let mut pipe = stdin;
        while let Ok(msg) = rx.recv() {
            match msg {
                Some(data) => {
                    if let Some(p) = pipe.as_mut() {
                        if p.write_all(&data).is_err() {
                            // The job closed its stdin: drop the rest, as a pipe would.
                            pipe = None;
                        }
                    }
                }
                None => pipe = None,
            }
        }
    });
    tx
}

/// Which output streams the host refused (their destination failed); the pumps close them.
#[derive(Debug, Clone, Default)]
pub struct RefusedOutput {
    pub stdout: Arc<AtomicBool>,
    pub stderr: Arc<AtomicBool>,
}

/// What a reader thread works with, shared by the readers of successive connections.
#[derive(Clone)]
pub struct ReaderContext {
    /// The job's process group.
    pub job_pgid: libc::pid_t,
    pub feeder: SyncSender<Option<Vec<u8>>>,
    pub link: HostLink,
    pub refused: RefusedOutput,
    pub events: Sender<Event>,
}

/// Reads frames until connection `generation` ends.
pub fn run(conn: File, generation: u64, cx: ReaderContext) {
    let ReaderContext {
        job_pgid,
        feeder,
        link,
        refused,
        events,
    } = cx;
    let mut reader = FrameReader::new(conn);
    loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => {
                let why = "host closed the connection".to_string();
                let _ = events.send(Event::ConnectionLost { generation, why });
                return;
            }
            Err(e @ (ProtocolError::Io(_) | ProtocolError::UnexpectedEof)) => {
                let why = format!("reading from host: {e}");
                let _ = events.send(Event::ConnectionLost { generation, why });
                return;
            }
            Err(e) => {
                let _ = events.send(Event::HostGone(format!("reading from host: {e}")));
                return;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                link.stdin_received(data.len());
                let _ = feeder.send(Some(data));
            }
            Frame::Eof(Stream::Stdin) => {
                link.stdin_ended();
                let _ = feeder.send(None);
            }
            Frame::OutputAck {
                stream: stream @ (Stream::Stdout | Stream::Stderr),
                offset,
            } => {
                if let Err(e) = link.ack(stream, offset) {
                    let _ = events.send(Event::HostGone(format!(
                        "the host acknowledged {stream:?} {e}"
                    )));
                    return;
                }
            }
            Frame::Eof(Stream::Stdout) => refused.stdout.store(true, Ordering::SeqCst),
            Frame::Eof(Stream::Stderr) => refused.stderr.store(true, Ordering::SeqCst),
            Frame::Signal { signo } => {
                // SAFETY: kill has no memory-safety preconditions. A negative pid addresses the
                // job's whole process group; ESRCH (group already gone) is fine to ignore.
                unsafe { libc::kill(-job_pgid, signo) };
            }
            Frame::Ack => {
                let _ = events.send(Event::Acked);
            }
            Frame::Error { message } => {
                let _ = events.send(Event::HostGone(format!("host reported: {message}")));
                return;
            }
            other => {
                let _ = events.send(Event::HostGone(format!(
                    "unexpected frame from host: {other:?}"
                )));
                return;
            }
        }
    }
}
