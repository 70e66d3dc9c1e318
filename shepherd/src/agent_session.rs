//! The host side of one agent conversation: Hello, Spawn, relaying output and stdin, Exit and
//! Ack (see [`guest_agent::protocol`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use guest_agent::protocol::{
    Filesystems, Frame, FrameReader, Rusage, Spawn, SpawnStage, Stream, MAX_DATA_CHUNK,
    PROTOCOL_VERSION,
};

use crate::job_control::AgentLink;
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

/// Why a job did not produce an exit status.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the guest agent never connected: {0}")]
    AgentNeverConnected(String),
    #[error("lost the guest agent: {0}")]
    AgentLost(String),
    #[error("the job could not be started in the guest ({stage:?}): {message}")]
    SpawnFailed {
        stage: SpawnStage,
        errno: i32,
        message: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("VM: {0}")]
    Vm(String),
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

/// Writes job output; a host reader that went away (EPIPE) stops the writing, not the job.
struct OutputSink {
    out: Box<dyn Write + Send>,
    broken: bool,
}

impl OutputSink {
    fn write(&mut self, data: &[u8]) {
        if !self.broken && (self.out.write_all(data).is_err() || self.out.flush().is_err()) {
            self.broken = true;
        }
    }
    fn flush(&mut self) {
        if !self.broken {
            let _ = self.out.flush();
        }
    }
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
    stream
        .set_read_timeout(Some(HELLO_PATIENCE))
        .map_err(lost)?;
    let boot = match reader.read_frame() {
        Ok(Some(Frame::Hello { version, boot })) if version == PROTOCOL_VERSION => boot,
        Ok(Some(Frame::Hello { version, .. })) => {
            return Err(JobError::Protocol(format!(
                "agent speaks protocol version {version}, this shepherd {PROTOCOL_VERSION}"
            )))
        }
        Ok(Some(other)) => {
            return Err(JobError::Protocol(format!("expected Hello, got {other:?}")))
        }
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

    let mut out = OutputSink {
        out: stdout,
        broken: false,
    };
    let mut err = OutputSink {
        out: stderr,
        broken: false,
    };
    let mut stdin = Some(stdin);
    let mut on_started = Some(on_started);
    loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Err(lost("connection closed before the job's exit was reported")),
            Err(e) => return Err(lost(e)),
        };
        match frame {
            Frame::Started { .. } => {
                timings.job_spawned_ms = now_ms();
                link.attach(writer_stream.try_clone().map_err(lost)?)
                    .map_err(lost)?;
                if let Some(StdinSource::Reader(r)) = stdin.take() {
                    forward_stdin(r, link.clone());
                }
                if let Some(f) = on_started.take() {
                    f();
                }
            }
            Frame::SpawnFailed {
                stage,
                errno,
                message,
            } => {
                return Err(JobError::SpawnFailed {
                    stage,
                    errno,
                    message,
                })
            }
            Frame::Stdout(data) => out.write(&data),
            Frame::Stderr(data) => err.write(&data),
            Frame::Eof(Stream::Stdout) => out.flush(),
            Frame::Eof(Stream::Stderr) => err.flush(),
            Frame::Exit {
                wait_status,
                rusage,
            } => {
                timings.job_exited_ms = now_ms();
                out.flush();
                err.flush();
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
            Frame::Error { message } => return Err(lost(format!("agent error: {message}"))),
            other => {
                return Err(JobError::Protocol(format!(
                    "unexpected frame from the agent: {other:?}"
                )))
            }
        }
    }
}
