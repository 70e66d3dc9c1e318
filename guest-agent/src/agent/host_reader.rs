//! Reads the host's frames: stdin data for the job, signals for its process group, output
//! streams the host can no longer write, the final Ack. Runs on its own thread so a signal is delivered while the main loop waits.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::Arc;

use super::event::Event;
use crate::protocol::{Frame, FrameReader, Stream};

/// Feeds the job's stdin pipe from its own thread, so a job that does not read stdin cannot
/// stall signal delivery. The channel is bounded (64 chunks of at most 64 KiB): beyond that the
/// host reader waits, which pushes back on the host.
fn spawn_stdin_feeder(stdin: Option<File>) -> SyncSender<Option<Vec<u8>>> {
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

/// Reads frames until the connection ends. `job_pgid` is the job's process group.
pub fn run(
    conn: File,
    job_pgid: libc::pid_t,
    stdin: Option<File>,
    refused: RefusedOutput,
    events: Sender<Event>,
) {
    let feeder = spawn_stdin_feeder(stdin);
    let mut reader = FrameReader::new(conn);
    loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => {
                let _ = events.send(Event::HostGone("host closed the connection".into()));
                return;
            }
            Err(e) => {
                let _ = events.send(Event::HostGone(format!("reading from host: {e}")));
                return;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                let _ = feeder.send(Some(data));
            }
            Frame::Eof(Stream::Stdin) => {
                let _ = feeder.send(None);
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
