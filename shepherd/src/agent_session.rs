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

use std::sync::Arc;

use crate::agent_protocol::{AgentEvent, ProtocolViolation, SessionState};
use crate::job_control::AgentLink;
use crate::output_writer::OutputWriter;
use crate::session_progress::{SessionProgress, StreamTap};
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
    /// stdout's destination when it is a regular file (another descriptor of it): a checkpoint
    /// records its length, and a restore cuts it back to that.
    pub stdout_file: Option<std::fs::File>,
    /// The same for stderr.
    pub stderr_file: Option<std::fs::File>,
}

impl JobIo {
    /// `stdin`, `stdout` and `stderr` with no destination files for checkpoints.
    pub fn streams(
        stdin: StdinSource,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
    ) -> JobIo {
        JobIo {
            stdin,
            stdout,
            stderr,
            stdout_file: None,
            stderr_file: None,
        }
    }
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
    /// The job was checkpointed and its VM stopped: it goes on when restored.
    #[error("the job was checkpointed and its VM stopped (checkpoint {generation} in {dir})")]
    Migrated { dir: String, generation: u64 },
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
            JobError::Migrated { dir, generation } => JobError::Migrated {
                dir: cut(dir),
                generation,
            },
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

/// Forwards stdin from `source` to the agent, after skipping the first `skip` bytes (which a
/// restored job had taken already).
fn forward_stdin(source: Box<dyn Read + Send>, skip: u64, link: AgentLink) {
    std::thread::spawn(move || {
        let mut source = source;
        if skip > 0 && std::io::copy(&mut (&mut source).take(skip), &mut std::io::sink()).is_err() {
            return;
        }
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

/// How a session begins. (One per job: the size of the larger variant does not matter.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum SessionStart {
    /// A freshly booted VM: its agent says Hello, and is sent what it sets up, then the job.
    Fresh { setup: GuestSetup, spawn: Spawn },
    /// A VM restored from a checkpoint, whose job runs already: its agent reconnects and
    /// resumes stdout and stderr at these offsets (what the host's files hold).
    Resume(StreamOffsets),
}

/// Offsets in the job's stdout and stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOffsets {
    pub stdout: u64,
    pub stderr: u64,
}

/// The job's output streams on the host side, written by their own threads.
struct Outputs {
    out: Arc<OutputWriter>,
    err: Arc<OutputWriter>,
}

/// Starts the writers of the job's stdout and stderr at `at`; each acknowledges what it has
/// written to the agent, from a thread of its own so a writer never waits on the connection.
fn start_outputs(
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    at: StreamOffsets,
    link: &AgentLink,
) -> Result<Outputs, JobError> {
    let (acks, acked) = std::sync::mpsc::channel::<(Stream, u64)>();
    let ack = |stream: Stream| -> crate::output_writer::OnWritten {
        let acks = acks.clone();
        Box::new(move |offset| {
            let _ = acks.send((stream, offset));
        })
    };
    let abandoned = link.output_abandoned();
    let out = OutputWriter::start_at(
        "stdout",
        stdout,
        abandoned.clone(),
        at.stdout,
        ack(Stream::Stdout),
    )
    .map_err(lost)?;
    let err = OutputWriter::start_at("stderr", stderr, abandoned, at.stderr, ack(Stream::Stderr))
        .map_err(lost)?;
    let link = link.clone();
    std::thread::Builder::new()
        .name("output-acks".into())
        .spawn(move || {
            // Ends with the writers, which own the sending ends.
            while let Ok(first) = acked.recv() {
                // Only the latest offset of each stream matters.
                let mut latest = [None, None];
                for (stream, offset) in std::iter::once(first).chain(acked.try_iter()) {
                    latest[usize::from(stream == Stream::Stderr)] = Some((stream, offset));
                }
                for (stream, offset) in latest.into_iter().flatten() {
                    if link.send(&Frame::OutputAck { stream, offset }).is_err() {
                        return;
                    }
                }
            }
        })
        .map_err(lost)?;
    Ok(Outputs {
        out: Arc::new(out),
        err: Arc::new(err),
    })
}

/// Reads the agent's first frame on the connection within [`HELLO_PATIENCE`].
fn first_frame(
    stream: &UnixStream,
    reader: &mut FrameReader<UnixStream>,
    state: &mut SessionState,
) -> Result<AgentEvent, JobError> {
    stream
        .set_read_timeout(Some(HELLO_PATIENCE))
        .map_err(lost)?;
    let event = match reader.read_frame() {
        Ok(Some(frame)) => state.accept(frame).map_err(JobError::from)?,
        Ok(None) => return Err(lost("connection closed before the agent's first frame")),
        Err(e) => return Err(lost(e)),
    };
    stream.set_read_timeout(None).map_err(lost)?;
    Ok(event)
}

/// Ends a session's [`SessionProgress`] however the session ends.
struct ProgressEnds<'a>(&'a SessionProgress);

impl Drop for ProgressEnds<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Runs the conversation on an accepted connection until the job's exit is acknowledged.
/// `progress` follows the session for checkpoints.
#[allow(clippy::too_many_arguments)]
pub(crate) fn converse(
    stream: UnixStream,
    start: SessionStart,
    io: JobIo,
    link: &AgentLink,
    progress: &SessionProgress,
    timings: &mut Timings,
    on_started: impl FnOnce(),
) -> Result<AgentExit, JobError> {
    let _ends = ProgressEnds(progress);
    let mut reader = FrameReader::new(stream.try_clone().map_err(lost)?);
    let mut writer_stream = stream.try_clone().map_err(lost)?;
    let JobIo {
        stdin,
        stdout,
        stderr,
        stdout_file,
        stderr_file,
    } = io;
    let mut stdin = Some(stdin);
    let mut on_started = Some(on_started);
    let (mut state, at) = match start {
        SessionStart::Fresh { setup, mut spawn } => {
            let mut state = SessionState::AwaitingHello;
            let boot = match first_frame(&stream, &mut reader, &mut state) {
                Ok(AgentEvent::Hello(boot)) => boot,
                Ok(other) => return Err(session_error(Ok(other))),
                Err(e) => return Err(e),
            };
            timings.agent_hello_ms = now_ms();
            timings.guest_init_ms = Some(boot.agent_start_ns as f64 / 1e6);
            spawn.stdin = match stdin {
                Some(StdinSource::Reader(_)) => guest_agent::protocol::StdinMode::Frames,
                _ => guest_agent::protocol::StdinMode::Null,
            };
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
            (state, StreamOffsets::default())
        }
        SessionStart::Resume(at) => {
            let mut state = SessionState::AwaitingReconnect;
            let point = match first_frame(&stream, &mut reader, &mut state) {
                Ok(AgentEvent::Reconnected(point)) => point,
                Ok(other) => return Err(session_error(Ok(other))),
                Err(e) => return Err(e),
            };
            if point.stdout_sent < at.stdout || point.stderr_sent < at.stderr {
                return Err(JobError::Protocol(format!(
                    "the restored job has written {} bytes of stdout and {} of stderr, fewer \
                     than the checkpoint's files hold ({} and {}): the snapshot and the \
                     checkpoint's record do not belong together",
                    point.stdout_sent, point.stderr_sent, at.stdout, at.stderr
                )));
            }
            let resume = Frame::Resume {
                stdout: at.stdout,
                stderr: at.stderr,
            };
            let bytes = guest_agent::protocol::encode(&resume)
                .map_err(|e| JobError::Protocol(e.to_string()))?;
            writer_stream.write_all(&bytes).map_err(lost)?;
            // The restored job is running again: its agent's "hello" after a restore.
            timings.agent_hello_ms = now_ms();
            tracing::info!(
                stdout = at.stdout,
                stderr = at.stderr,
                "the restored job's agent reconnected; resuming"
            );
            attach(
                &writer_stream,
                link,
                &mut stdin,
                point.stdin_received,
                point.stdin_ended,
            )?;
            if let Some(f) = on_started.take() {
                f();
            }
            (state, at)
        }
    };

    // A destination that stops taking bytes holds up the job's output, not the session for
    // ever: the writers give up once the VM is being stopped. A destination that fails
    // (EPIPE: a host reader went away) stops the writing, not the job.
    let Outputs { out, err } = start_outputs(stdout, stderr, at, link)?;
    progress.begin(
        state,
        StreamTap {
            writer: out.clone(),
            file: stdout_file,
        },
        StreamTap {
            writer: err.clone(),
            file: stderr_file,
        },
    );
    let mut failures = Vec::new();
    let ended = loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break lost("connection closed before the job's exit was reported"),
            Err(e) => break lost(e),
        };
        let event = state.accept(frame);
        progress.set_state(state);
        match event {
            Ok(AgentEvent::Started { .. }) => {
                timings.job_spawned_ms = now_ms();
                if let Err(e) = attach(&writer_stream, link, &mut stdin, 0, false) {
                    break e;
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

/// The job runs: signals and stdin may go to the agent now. `stdin_received` bytes of stdin
/// the agent had already (a restored job's) are skipped; `stdin_ended`: it wants no more.
fn attach(
    writer_stream: &UnixStream,
    link: &AgentLink,
    stdin: &mut Option<StdinSource>,
    stdin_received: u64,
    stdin_ended: bool,
) -> Result<(), JobError> {
    writer_stream
        .try_clone()
        .and_then(|s| link.attach(s).map_err(std::io::Error::other))
        .map_err(lost)?;
    if let Some(StdinSource::Reader(r)) = stdin.take() {
        if !stdin_ended {
            forward_stdin(r, stdin_received, link.clone());
        }
    }
    Ok(())
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
    use guest_agent::protocol::{BootTimes, FrameWriter, ReconnectPoint, PROTOCOL_VERSION};
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
        let io = JobIo::streams(StdinSource::Null, stdout, Box::new(std::io::sink()));
        let result = converse(
            host,
            SessionStart::Fresh {
                setup: GuestSetup::default(),
                spawn: Spawn::default(),
            },
            io,
            &AgentLink::default(),
            &SessionProgress::default(),
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
    /// Runs a resumed session (at `at`) against a fake agent of a restored VM that says
    /// `Reconnect` with `sent`, reads the host's answer, then sends `then`. Returns the
    /// session's result, the job's stdout, and every frame the host sent.
    fn resume_with(
        at: StreamOffsets,
        sent: StreamOffsets,
        then: Vec<Frame>,
    ) -> (Result<AgentExit, JobError>, Vec<u8>, Vec<Frame>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let fake_agent = std::thread::spawn(move || {
            let mut writer = FrameWriter::new(guest.try_clone().unwrap());
            let mut reader = FrameReader::new(guest);
            writer
                .write_frame(&Frame::Reconnect(ReconnectPoint {
                    version: PROTOCOL_VERSION,
                    stdout_sent: sent.stdout,
                    stderr_sent: sent.stderr,
                    ..ReconnectPoint::default()
                }))
                .unwrap();
            let mut got = Vec::new();
            match reader.read_frame() {
                Ok(Some(answer @ Frame::Resume { .. })) => got.push(answer),
                _ => return got,
            }
            for frame in &then {
                let _ = writer.write_frame(frame);
                std::thread::sleep(Duration::from_millis(20));
            }
            while let Ok(Some(frame)) = reader.read_frame() {
                let ack = frame == Frame::Ack;
                got.push(frame);
                if ack {
                    break;
                }
            }
            got
        });
        let stdout = Captured::default();
        let io = JobIo::streams(
            StdinSource::Null,
            Box::new(stdout.clone()),
            Box::new(std::io::sink()),
        );
        let mut started = false;
        let result = converse(
            host,
            SessionStart::Resume(at),
            io,
            &AgentLink::default(),
            &SessionProgress::default(),
            &mut Timings::default(),
            || started = true,
        );
        let frames = fake_agent.join().unwrap();
        if result.is_ok() {
            assert!(started, "a resumed job counts as started");
        }
        let out = stdout.0.lock().unwrap().clone();
        (result, out, frames)
    }

    /// Issue 14: a restored VM's agent reconnects; the host tells it the offsets its files
    /// hold, writes what comes after them, acknowledges in the stream's own offsets (not from
    /// zero), and the job's exit comes through.
    #[test]
    fn a_resumed_session_continues_at_the_checkpoints_offsets() {
        let at = StreamOffsets {
            stdout: 100,
            stderr: 7,
        };
        let (result, out, frames) = resume_with(
            at,
            StreamOffsets {
                stdout: 104,
                stderr: 7,
            },
            vec![
                Frame::Stdout(b"more".to_vec()),
                Frame::Eof(Stream::Stdout),
                Frame::Eof(Stream::Stderr),
                Frame::Exit {
                    wait_status: 3 << 8,
                    rusage: Rusage::default(),
                    memory: GuestMemoryReport::default(),
                },
            ],
        );
        assert_eq!(
            result.map(|e| e.wait_status).map_err(|e| e.to_string()),
            Ok(3 << 8)
        );
        assert_eq!(out, b"more");
        assert_eq!(
            frames.first(),
            Some(&Frame::Resume {
                stdout: 100,
                stderr: 7
            })
        );
        assert!(
            frames.contains(&Frame::OutputAck {
                stream: Stream::Stdout,
                offset: 104
            }),
            "{frames:?}"
        );
        assert_eq!(frames.last(), Some(&Frame::Ack));
    }

    /// An agent that has sent fewer bytes than the checkpoint's files hold does not belong to
    /// that checkpoint: refused before anything is written.
    #[test]
    fn a_restored_agent_behind_the_checkpoint_is_refused() {
        let at = StreamOffsets {
            stdout: 100,
            stderr: 0,
        };
        let sent = StreamOffsets {
            stdout: 50,
            stderr: 0,
        };
        let (result, out, frames) = resume_with(at, sent, vec![]);
        let err = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("do not belong together"), "{err}");
        assert!(out.is_empty());
        assert!(frames.is_empty(), "{frames:?}");
    }
}
