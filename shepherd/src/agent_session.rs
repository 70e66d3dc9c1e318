//! The host side of one agent conversation: Hello, Spawn, relaying output and stdin, Exit and
//! Ack (see [`guest_agent::protocol`]). What the agent may say when is decided by
//! [`crate::agent_protocol::SessionState`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_agent::protocol::{
    Filesystems, Frame, FrameReader, Rusage, Spawn, SpawnStage, Stream, MAX_DATA_CHUNK,
};

use crate::agent_protocol::{AgentEvent, ProtocolViolation, SessionState};
use crate::job_control::AgentLink;
use crate::output_writer::OutputWriter;
use crate::timings::{now_ms, Timings};

/// Where the job's stdin comes from.
pub enum StdinSource {
    /// `/dev/null` in the guest.
    Null,
    /// Bytes read from this reader until EOF.
    Reader(Box<dyn Read + Send>),
}

/// The job's standard streams on the host side.
pub struct JobIo {
    pub stdin: StdinSource,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
}

/// Why a job did not produce an exit status. (Serialisable: the VMM process reports it to the
/// shepherd.)
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum JobError {
    #[error("the guest agent never connected: {0}")]
    AgentNeverConnected(String),
    /// The VM ended by itself (the guest reset, shut down or crashed, or the VMM could not
    /// run it) before its agent connected: what was booted does not boot.
    #[error("the guest did not boot: {0}")]
    GuestDidNotBoot(String),
    #[error("lost the guest agent: {0}")]
    AgentLost(String),
    #[error("the job could not be started in the guest ({stage:?}): {message}")]
    SpawnFailed {
        #[serde(with = "SpawnStageDef")]
        stage: SpawnStage,
        errno: i32,
        message: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The guest agent sent a frame its session state does not allow.
    #[error(transparent)]
    ProtocolViolation(#[from] ProtocolViolation),
    #[error("VM: {0}")]
    Vm(String),
}

/// [`SpawnStage`] on the wire between the VMM process and the shepherd.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "SpawnStage")]
enum SpawnStageDef {
    Credentials,
    Limits,
    Cwd,
    Exec,
    Other,
    Filesystems,
}

impl JobError {
    /// The same error with its texts cut to what a channel message carries.
    pub(crate) fn bounded(self) -> JobError {
        use crate::vmm_process::message::bounded_text as cut;
        match self {
            JobError::AgentNeverConnected(m) => JobError::AgentNeverConnected(cut(m)),
            JobError::GuestDidNotBoot(m) => JobError::GuestDidNotBoot(cut(m)),
            JobError::AgentLost(m) => JobError::AgentLost(cut(m)),
            JobError::SpawnFailed {
                stage,
                errno,
                message,
            } => JobError::SpawnFailed {
                stage,
                errno,
                message: cut(message),
            },
            JobError::Protocol(m) => JobError::Protocol(cut(m)),
            JobError::ProtocolViolation(v) => JobError::ProtocolViolation(v),
            JobError::Vm(m) => JobError::Vm(cut(m)),
        }
    }
}

/// What the agent reported at the end of the job.
pub struct AgentExit {
    pub wait_status: i32,
    pub rusage: Rusage,
}

/// How long the agent may take to sync and close the connection after our Ack.
const AGENT_CLOSE_PATIENCE: Duration = Duration::from_secs(10);

/// How long the agent may take between connecting and saying Hello.
const HELLO_PATIENCE: Duration = Duration::from_secs(30);

fn lost(e: impl std::fmt::Display) -> JobError {
    JobError::AgentLost(e.to_string())
}

fn forward_stdin(mut source: Box<dyn Read + Send>, link: AgentLink) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if !matches!(link.send(&Frame::Stdin(buf[..n].to_vec())), Ok(true)) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = link.send(&Frame::Eof(Stream::Stdin));
    });
}

/// Runs the conversation on an accepted connection until the job's exit is acknowledged.
/// `filesystems`, when given, goes to the agent right before `spawn`.
pub(crate) fn converse(
    stream: UnixStream,
    filesystems: Option<Filesystems>,
    mut spawn: Spawn,
    io: JobIo,
    link: &AgentLink,
    timings: &mut Timings,
    on_started: impl FnOnce(),
) -> Result<AgentExit, JobError> {
    let mut reader = FrameReader::new(stream.try_clone().map_err(lost)?);
    let mut state = SessionState::AwaitingHello;
    stream
        .set_read_timeout(Some(HELLO_PATIENCE))
        .map_err(lost)?;
    let boot = match reader.read_frame() {
        Ok(Some(frame)) => match state.accept(frame) {
            Ok(AgentEvent::Hello(boot)) => boot,
            other => return Err(session_error(other)),
        },
        Ok(None) => return Err(lost("connection closed before Hello")),
        Err(e) => return Err(lost(e)),
    };
    stream.set_read_timeout(None).map_err(lost)?;
    timings.agent_hello_ms = now_ms();
    timings.guest_init_ms = Some(boot.agent_start_ns as f64 / 1e6);

    let JobIo {
        stdin,
        stdout,
        stderr,
    } = io;
    spawn.stdin = match stdin {
        StdinSource::Null => guest_agent::protocol::StdinMode::Null,
        StdinSource::Reader(_) => guest_agent::protocol::StdinMode::Frames,
    };
    let mut writer_stream = stream.try_clone().map_err(lost)?;
    let encode = |frame: &Frame| {
        guest_agent::protocol::encode(frame).map_err(|e| JobError::Protocol(e.to_string()))
    };
    let mut first_frames = match filesystems {
        Some(fs) => encode(&Frame::Filesystems(fs))?,
        None => Vec::new(),
    };
    first_frames.extend(encode(&Frame::Spawn(spawn))?);
    writer_stream.write_all(&first_frames).map_err(lost)?;

    // A destination that stops taking bytes holds up the job's output, not the session for
    // ever: the writers give up once the VM is being stopped. A destination that fails
    // (EPIPE: a host reader went away) stops the writing, not the job.
    let out = OutputWriter::start("stdout", stdout, link.output_abandoned()).map_err(lost)?;
    let err = OutputWriter::start("stderr", stderr, link.output_abandoned()).map_err(lost)?;
    let mut stdin = Some(stdin);
    let mut on_started = Some(on_started);
    let ended = loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break lost("connection closed before the job's exit was reported"),
            Err(e) => break lost(e),
        };
        match state.accept(frame) {
            Ok(AgentEvent::Started { .. }) => {
                timings.job_spawned_ms = now_ms();
                let attached = writer_stream
                    .try_clone()
                    .and_then(|s| link.attach(s).map_err(std::io::Error::other));
                if let Err(e) = attached {
                    break lost(e);
                }
                if let Some(StdinSource::Reader(r)) = stdin.take() {
                    forward_stdin(r, link.clone());
                }
                if let Some(f) = on_started.take() {
                    f();
                }
            }
            Ok(AgentEvent::Output {
                stream: Stream::Stderr,
                data,
            }) => err.write(&data),
            Ok(AgentEvent::Output { data, .. }) => out.write(&data),
            Ok(AgentEvent::OutputEnded(Stream::Stderr)) => err.drain(),
            Ok(AgentEvent::OutputEnded(_)) => out.drain(),
            Ok(AgentEvent::Exited {
                wait_status,
                rusage,
            }) => {
                timings.job_exited_ms = now_ms();
                out.drain();
                err.drain();
                // Every output byte is written: now the agent may end the VM. It closes the
                // connection once its file systems are synced; after that the VM may be
                // stopped without waiting for the guest's own reset.
                let _ = link.send(&Frame::Ack);
                let _ = stream.set_read_timeout(Some(AGENT_CLOSE_PATIENCE));
                let _ = reader.read_frame();
                return Ok(AgentExit {
                    wait_status,
                    rusage,
                });
            }
            other => break session_error(other),
        }
    };
    // What the job wrote before the session ended goes out too (unless the VM is stopped).
    out.drain();
    err.drain();
    Err(ended)
}

/// The error that ends a session on `result` of [`SessionState::accept`]: a spawn the guest
/// refused, an error the agent reported, or a protocol violation. (Only meaningful for those;
/// any other event, which the caller handles itself, reads as a violation here.)
pub(crate) fn session_error(result: Result<AgentEvent, ProtocolViolation>) -> JobError {
    match result {
        Ok(AgentEvent::SpawnRefused {
            stage,
            errno,
            message,
        }) => JobError::SpawnFailed {
            stage,
            errno,
            message,
        },
        Ok(AgentEvent::AgentFailed { message }) => lost(format!("agent error: {message}")),
        // Not reached by callers (they handle the other events); no guest bytes in the text.
        Ok(_) => JobError::Protocol("agent event out of place".into()),
        Err(violation) => violation.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::{BootTimes, FrameWriter, PROTOCOL_VERSION};
    use std::sync::{Arc, Mutex};

    /// Collects what the session writes as the job's output.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs the real session against a fake guest agent on the other end of a socket pair,
    /// which sends `after_spawn` once it has read the Spawn frame. Returns the session's result
    /// and the job's stdout.
    fn converse_with(after_spawn: Vec<Frame>) -> (Result<AgentExit, JobError>, Vec<u8>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let fake_agent = std::thread::spawn(move || {
            let mut writer = FrameWriter::new(guest.try_clone().unwrap());
            let mut reader = FrameReader::new(guest);
            writer
                .write_frame(&Frame::Hello {
                    version: PROTOCOL_VERSION,
                    boot: BootTimes::default(),
                })
                .unwrap();
            assert!(matches!(reader.read_frame(), Ok(Some(Frame::Spawn(_)))));
            for frame in &after_spawn {
                // The host may hang up at the first frame it refuses.
                if writer.write_frame(frame).is_err() {
                    break;
                }
            }
        });
        let stdout = Captured::default();
        let io = JobIo {
            stdin: StdinSource::Null,
            stdout: Box::new(stdout.clone()),
            stderr: Box::new(std::io::sink()),
        };
        let result = converse(
            host,
            None,
            Spawn::default(),
            io,
            &AgentLink::default(),
            &mut Timings::default(),
            || {},
        );
        fake_agent.join().unwrap();
        let out = stdout.0.lock().unwrap().clone();
        (result, out)
    }

    /// Issue 12 item 4: a guest that forges SpawnFailed after Started (it used to end the job
    /// with a spawn failure, which execd charged to the queue) is refused as a protocol
    /// violation of a started job.
    #[test]
    fn a_forged_spawn_failure_after_started_is_refused() {
        let (result, out) = converse_with(vec![
            Frame::Started { pid: 42 },
            Frame::Stdout(b"job output\n".to_vec()),
            Frame::SpawnFailed {
                stage: SpawnStage::Credentials,
                errno: libc::EPERM,
                message: "forged".into(),
            },
        ]);
        match result {
            Err(JobError::ProtocolViolation(v)) => {
                assert!(v.state.job_started(), "{v}");
                assert_eq!(v.what, "SpawnFailed");
            }
            other => panic!("expected a protocol violation, got {:?}", other.err()),
        }
        assert_eq!(out, b"job output\n");
    }

    #[test]
    fn a_spawn_failure_before_started_is_reported_as_such() {
        let (result, _) = converse_with(vec![Frame::SpawnFailed {
            stage: SpawnStage::Exec,
            errno: libc::ENOENT,
            message: "no such program".into(),
        }]);
        assert!(
            matches!(
                result,
                Err(JobError::SpawnFailed {
                    stage: SpawnStage::Exec,
                    errno: libc::ENOENT,
                    ..
                })
            ),
            "{:?}",
            result.err()
        );
    }

    #[test]
    fn a_well_behaved_agent_gets_its_exit_through() {
        let (result, out) = converse_with(vec![
            Frame::Started { pid: 42 },
            Frame::Stdout(b"hi".to_vec()),
            Frame::Eof(Stream::Stdout),
            Frame::Eof(Stream::Stderr),
            Frame::Exit {
                wait_status: 7 << 8,
                rusage: Rusage::default(),
            },
        ]);
        assert_eq!(result.map(|e| e.wait_status).ok(), Some(7 << 8));
        assert_eq!(out, b"hi");
    }
}
