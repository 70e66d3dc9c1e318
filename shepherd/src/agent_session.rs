//! The host side of one agent conversation: Hello, Spawn, relaying output and stdin, Exit and
//! Ack (see [`guest_agent::protocol`]). What the agent may say when is decided by
//! [`crate::agent_protocol::SessionState`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_agent::protocol::{
    Filesystems, Frame, FrameReader, GuestMemoryReport, GuestNetwork, Rusage, Spawn, SpawnStage,
    Stream, MAX_DATA_CHUNK,
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
    /// The VMM could not go on running the VM before its agent connected (QEMU exited with an
    /// error, a device or vCPU thread failed): a host problem that may pass.
    #[error("the VM could not be run: {0}")]
    VmFailedToRun(String),
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
    Network,
}

impl JobError {
    /// The same error with its texts cut to what a channel message carries.
    pub(crate) fn bounded(self) -> JobError {
        use crate::vmm_process::message::bounded_text as cut;
        match self {
            JobError::AgentNeverConnected(m) => JobError::AgentNeverConnected(cut(m)),
            JobError::GuestDidNotBoot(m) => JobError::GuestDidNotBoot(cut(m)),
            JobError::VmFailedToRun(m) => JobError::VmFailedToRun(cut(m)),
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
    pub memory: GuestMemoryReport,
    /// See [`crate::launch::JobOutcome::output_failures`].
    pub output_failures: Vec<String>,
}

/// What the agent sets up before the job: its file systems, then its name and network.
#[derive(Debug, Default)]
pub(crate) struct GuestSetup {
    pub filesystems: Option<Filesystems>,
    pub network: Option<GuestNetwork>,
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
    setup: GuestSetup,
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
    let mut first_frames = match setup.filesystems {
        Some(fs) => encode(&Frame::Filesystems(fs))?,
        None => Vec::new(),
    };
    if let Some(net) = setup.network {
        first_frames.extend(encode(&Frame::Network(net))?);
    }
    first_frames.extend(encode(&Frame::Spawn(spawn))?);
    writer_stream.write_all(&first_frames).map_err(lost)?;

    // A destination that stops taking bytes holds up the job's output, not the session for
    // ever: the writers give up once the VM is being stopped. A destination that fails
    // (EPIPE: a host reader went away) stops the writing, not the job.
    let out = OutputWriter::start("stdout", stdout, link.output_abandoned()).map_err(lost)?;
    let err = OutputWriter::start("stderr", stderr, link.output_abandoned()).map_err(lost)?;
    let mut stdin = Some(stdin);
    let mut on_started = Some(on_started);
    let mut failures = Vec::new();
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
            }) => {
                err.write(&data);
                failures.extend(stop_failed_stream(&err, Stream::Stderr, link));
            }
            Ok(AgentEvent::Output { data, .. }) => {
                out.write(&data);
                failures.extend(stop_failed_stream(&out, Stream::Stdout, link));
            }
            Ok(AgentEvent::OutputEnded(Stream::Stderr)) => err.drain(),
            Ok(AgentEvent::OutputEnded(_)) => out.drain(),
            Ok(AgentEvent::Exited {
                wait_status,
                rusage,
                memory,
            }) => {
                timings.job_exited_ms = now_ms();
                out.drain();
                err.drain();
                failures.extend(stop_failed_stream(&out, Stream::Stdout, link));
                failures.extend(stop_failed_stream(&err, Stream::Stderr, link));
                // Every output byte is written: now the agent may end the VM. It closes the
                // connection once its file systems are synced; after that the VM may be
                // stopped without waiting for the guest's own reset.
                let _ = link.send(&Frame::Ack);
                let _ = stream.set_read_timeout(Some(AGENT_CLOSE_PATIENCE));
                let _ = reader.read_frame();
                return Ok(AgentExit {
                    wait_status,
                    rusage,
                    memory,
                    output_failures: failures,
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

/// When the destination of one of the job's streams failed (a full quota or file system, the
/// job's file-size limit, a reader that went away), the job must see its own later writes
/// fail, as they would on the host: the agent is told to close that stream's pipe (the job's
/// next write gets EPIPE), and a file-size limit first sends SIGXFSZ, as the kernel does to a
/// writer past its `RLIMIT_FSIZE`. Returns the failure for the trace, once.
fn stop_failed_stream(writer: &OutputWriter, stream: Stream, link: &AgentLink) -> Option<String> {
    let e = writer.take_failure()?;
    if e.raw_os_error() == Some(libc::EFBIG) {
        let _ = link.send(&Frame::Signal {
            signo: libc::SIGXFSZ,
        });
    }
    let _ = link.send(&Frame::Eof(stream));
    let name = match stream {
        Stream::Stderr => "stderr",
        _ => "stdout",
    };
    Some(format!(
        "the job's {name} file could not be written ({e}): the job's later writes to it fail"
    ))
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
        let stdout = Captured::default();
        let (result, _) = converse_into(after_spawn, Box::new(stdout.clone()));
        let out = stdout.0.lock().unwrap().clone();
        (result, out)
    }

    /// [`converse_with`] writing the job's stdout to `stdout`; also returns the frames the
    /// session sent to the agent after Spawn.
    fn converse_into(
        after_spawn: Vec<Frame>,
        stdout: Box<dyn Write + Send>,
    ) -> (Result<AgentExit, JobError>, Vec<Frame>) {
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
                // (a pause lets the session's output writer meet the destination first)
                if matches!(frame, Frame::Stdout(_)) {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
            let mut sent = Vec::new();
            while let Ok(Some(frame)) = reader.read_frame() {
                let ack = frame == Frame::Ack;
                sent.push(frame);
                if ack {
                    break;
                }
            }
            sent
        });
        let io = JobIo {
            stdin: StdinSource::Null,
            stdout,
            stderr: Box::new(std::io::sink()),
        };
        let result = converse(
            host,
            GuestSetup::default(),
            Spawn::default(),
            io,
            &AgentLink::default(),
            &mut Timings::default(),
            || {},
        );
        let sent = fake_agent.join().unwrap();
        (result, sent)
    }

    /// A file past the job's file-size limit (EFBIG in the VMM process, which ignores
    /// SIGXFSZ).
    struct TooBig;

    impl Write for TooBig {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EFBIG))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 18: output the host cannot write makes the job's own writes fail, as on the host:
    /// past the file-size limit the job gets SIGXFSZ, as the kernel sends it, and the agent is
    /// told to close the stream; the failure is reported for the trace.
    #[test]
    fn output_past_the_file_size_limit_sends_sigxfsz_and_closes_the_stream() {
        let (result, sent) = converse_into(
            vec![
                Frame::Started { pid: 42 },
                Frame::Stdout(b"too much".to_vec()),
                Frame::Stdout(b"more".to_vec()),
                Frame::Eof(Stream::Stdout),
                Frame::Eof(Stream::Stderr),
                Frame::Exit {
                    wait_status: libc::SIGXFSZ,
                    rusage: Rusage::default(),
                    memory: GuestMemoryReport::default(),
                },
            ],
            Box::new(TooBig),
        );
        let exit = result.map_err(|e| e.to_string()).unwrap();
        assert_eq!(
            sent,
            vec![
                Frame::Signal {
                    signo: libc::SIGXFSZ
                },
                Frame::Eof(Stream::Stdout),
                Frame::Ack
            ]
        );
        assert_eq!(exit.output_failures.len(), 1, "{:?}", exit.output_failures);
        assert!(
            exit.output_failures[0].contains("stdout"),
            "{:?}",
            exit.output_failures
        );
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
                memory: GuestMemoryReport::default(),
            },
        ]);
        assert_eq!(result.map(|e| e.wait_status).ok(), Some(7 << 8));
        assert_eq!(out, b"hi");
    }
}
