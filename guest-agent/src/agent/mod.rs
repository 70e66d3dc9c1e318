//! The guest agent: connects to the host, starts the job it is sent, relays its stdio and
//! signals, reaps everything, reports the exit, and ends the VM.
//!
//! Threads: the main loop below; a reaper (`reaper`); one pump per output pipe
//! (`output_pump`); a reader of host frames (`host_reader`, one per connection) with its stdin
//! feeder. They talk to the main loop through one channel of `event::Event`s. Output is kept
//! until the host acknowledges it (`output_log`, `host_link`): when the connection is lost while
//! the job runs (after a restore from a snapshot the guest's vsock transport is reset), the main
//! loop connects again and the session resumes where the host's files end.
//!
//! The same code runs as PID 1 in a guest (over vsock) and as an ordinary process over a Unix
//! socket in tests; only mounting (done by the caller) and ending the VM differ.

mod connection;
mod event;
mod guest_memory;
mod host_link;
mod host_reader;
mod job_process;
pub mod network;
mod output_log;
mod output_pump;
pub mod pid1;
mod reaper;
pub mod rootfs;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub use connection::{ConnectError, Endpoint};
use event::Event;
use host_link::HostLink;
use host_reader::ReaderContext;

use crate::protocol::{
    BootTimes, Frame, FrameReader, ProtocolError, SpawnStage, Stream, PROTOCOL_VERSION,
};

/// How long output may take to reach EOF after the job's group was killed before the agent
/// kills more widely (everything in the guest, as PID 1) and gives up on the pipes.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the host's Ack of Exit.
const ACK_PATIENCE: Duration = Duration::from_secs(30);
/// How long to wait, after SpawnFailed, for the host to close the connection.
const SPAWN_FAILED_PATIENCE: Duration = Duration::from_secs(10);
/// How long to try to connect again after the connection was lost while the job ran. A host
/// that ended the session on purpose has closed its listener, and the attempts fail at once
/// until then; a restored VM's host listens before the VM runs.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(3);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub endpoint: Endpoint,
    /// How long to keep retrying the connection to the host.
    pub connect_patience: Duration,
    /// PID 1 in a guest: may kill every process, and ends the VM afterwards.
    pub pid1: bool,
    /// CLOCK_BOOTTIME / CLOCK_REALTIME at process start, for Hello.
    pub start_boottime_ns: u64,
    pub start_realtime_ns: u64,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job ran and its exit was acknowledged by the host.
    JobEnded { wait_status: i32 },
    /// The job could not be started; the host was told why.
    SpawnFailed,
    /// The host vanished or misbehaved; the job's process group was killed.
    HostGone(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("host closed the connection before sending a job")]
    NoJob,
    #[error("expected Spawn from the host, got {0}")]
    UnexpectedFrame(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Nanoseconds on `clock`.
pub fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill has no memory-safety preconditions; ESRCH is fine to ignore.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// Sends `failed` (a SpawnFailed frame) and waits, at most [`SPAWN_FAILED_PATIENCE`], until the
/// host has read it: the host closes the connection once it has. Ending the VM straight after
/// sending could lose the frame in the vsock transport (seen with QEMU under load), and the
/// host would then only know that the connection closed.
fn report_spawn_failure(
    writer: &HostLink,
    conn: &std::fs::File,
    reader: &mut FrameReader<&std::fs::File>,
    failed: &Frame,
) -> Result<Outcome, AgentError> {
    writer.send(failed)?;
    let patience = nix::sys::time::TimeVal::new(SPAWN_FAILED_PATIENCE.as_secs() as i64, 0);
    // Without the timeout the wait below could only be longer, never wrong: not worth failing.
    let _ =
        nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &patience);
    while let Ok(Some(_)) = reader.read_frame() {}
    Ok(Outcome::SpawnFailed)
}

/// Runs one job session to its end.
pub fn run(config: &AgentConfig) -> Result<Outcome, AgentError> {
    if !config.pid1 {
        // Orphans of the job come to us, as they would to PID 1 in the guest.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let conn = connection::connect_with_retry(&config.endpoint, config.connect_patience)?;
    let connected_ns = clock_ns(nix::time::ClockId::CLOCK_BOOTTIME);
    let writer = HostLink::new(conn.try_clone()?);
    writer.send(&Frame::Hello {
        version: PROTOCOL_VERSION,
        boot: BootTimes {
            agent_start_ns: config.start_boottime_ns,
            connected_ns,
            agent_start_realtime_ns: config.start_realtime_ns,
        },
    })?;

    let mut reader = FrameReader::new(&conn);
    // A frame the agent cannot read is reported to the host before the agent gives up, so the
    // host can say why rather than only that the connection closed.
    let mut next_frame = || {
        reader.read_frame().inspect_err(|e| {
            let _ = writer.send(&Frame::Error {
                message: format!("guest agent: {e}"),
            });
        })
    };
    let mut first = next_frame()?;
    // The OS image and shared directories come first: the job must see them from its first
    // instruction.
    if let Some(Frame::Filesystems(fs)) = &first {
        let entered = if config.pid1 {
            rootfs::enter(fs)
        } else {
            Err(rootfs::RootfsError::NotPid1)
        };
        if let Err(e) = entered {
            let failed = Frame::SpawnFailed {
                stage: SpawnStage::Filesystems,
                errno: e.errno(),
                message: e.to_string(),
            };
            return report_spawn_failure(&writer, &conn, &mut reader, &failed);
        }
        first = next_frame()?;
    }
    // The name and network, in the job's root (after Filesystems) and before the job. An agent
    // that is not PID 1 runs on a host whose name and network already are the job's.
    if let Some(Frame::Network(net)) = &first {
        if config.pid1 {
            if let Err(e) = network::configure(net) {
                let failed = Frame::SpawnFailed {
                    stage: SpawnStage::Network,
                    errno: e.errno(),
                    message: e.to_string(),
                };
                return report_spawn_failure(&writer, &conn, &mut reader, &failed);
            }
        }
        first = next_frame()?;
    }
    let spawn = match first {
        Some(Frame::Spawn(s)) => s,
        Some(other) => return Err(AgentError::UnexpectedFrame(format!("{other:?}"))),
        None => return Err(AgentError::NoJob),
    };

    let job = match job_process::start(&spawn) {
        Ok(job) => job,
        Err(e) => {
            let failed = Frame::SpawnFailed {
                stage: e.stage,
                errno: e.errno,
                message: e.message,
            };
            return report_spawn_failure(&writer, &conn, &mut reader, &failed);
        }
    };
    let pgid = job.pid; // The job called setsid: its pid is its process group id.
    writer.send(&Frame::Started { pid: job.pid })?;

    let (tx, rx) = channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || reaper::run(job.pid, tx));
    }
    let refused = host_reader::RefusedOutput::default();
    for (pipe, stream, refused) in [
        (job.stdout, Stream::Stdout, refused.stdout.clone()),
        (job.stderr, Stream::Stderr, refused.stderr.clone()),
    ] {
        let (w, tx) = (writer.clone(), tx.clone());
        std::thread::spawn(move || output_pump::pump(pipe, stream, w, refused, tx));
    }
    let readers = ReaderContext {
        job_pgid: pgid,
        feeder: host_reader::spawn_stdin_feeder(job.stdin),
        link: writer.clone(),
        refused,
        events: tx,
    };
    {
        let cx = readers.clone();
        std::thread::spawn(move || host_reader::run(conn, 0, cx));
    }
    let session = Session {
        config,
        pgid,
        link: &writer,
        events: &rx,
        readers,
    };
    Ok(session.supervise())
}

/// The running job's session, for the main loop.
struct Session<'a> {
    config: &'a AgentConfig,
    pgid: libc::pid_t,
    link: &'a HostLink,
    events: &'a Receiver<Event>,
    /// For the reader of a new connection (its clone of the event sender stays here, which is
    /// fine: the main loop never waits for every sender to be gone, only with deadlines).
    readers: ReaderContext,
}

impl Session<'_> {
    /// The next event within `timeout` (none: without one), with lost connections replaced
    /// here: a loss that cannot be repaired comes out as [`Event::HostGone`].
    fn next_event(&self, timeout: Option<Duration>) -> Result<Event, RecvTimeoutError> {
        loop {
            let event = match timeout {
                Some(t) => self.events.recv_timeout(t)?,
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected)?,
            };
            match event {
                Event::ConnectionLost { generation, why } => {
                    if generation != self.link.generation() {
                        continue; // an older connection, already replaced
                    }
                    match self.reconnect() {
                        // On the guest's console (the host keeps its tail for errors).
                        Ok(()) => eprintln!("sge-vm-agent: {why}; connected again"),
                        Err(e) => return Ok(Event::HostGone(format!("{why}; {e}"))),
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Connects again and resumes the session; a new reader takes the new connection.
    fn reconnect(&self) -> Result<(), String> {
        let conn = connection::reconnect(&self.config.endpoint, RECONNECT_PATIENCE)
            .map_err(|e| e.to_string())?;
        let reader_end = conn.try_clone().map_err(|e| e.to_string())?;
        let generation = self.link.reconnect(conn).map_err(|e| e.to_string())?;
        let cx = self.readers.clone();
        std::thread::spawn(move || host_reader::run(reader_end, generation, cx));
        Ok(())
    }
}

impl Session<'_> {
    /// The main loop: wait for the job, drain its output, report, wait for the Ack.
    fn supervise(self) -> Outcome {
        let session = self;
        let Session {
            config,
            pgid,
            link: writer,
            ..
        } = session;
        let events = |timeout| session.next_event(timeout);
        let mut open_streams = 2;
        let exit = loop {
            match events(None) {
                Ok(Event::JobExited {
                    wait_status,
                    rusage,
                }) => break (wait_status, rusage),
                Ok(Event::OutputClosed) => open_streams -= 1,
                // (next_event replaces lost connections itself)
                Ok(Event::Acked | Event::ConnectionLost { .. }) => {}
                Ok(Event::HostGone(why)) => {
                    kill_group(pgid);
                    // Let the reaper collect the job so nothing of it outlives us.
                    let deadline = Instant::now() + DRAIN_GRACE;
                    while let Ok(ev) = session
                        .events
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        if matches!(ev, Event::JobExited { .. }) {
                            break;
                        }
                    }
                    return Outcome::HostGone(why);
                }
                Err(_) => return Outcome::HostGone("agent threads ended".into()),
            }
        };

        // As the stock shepherd does: once the job's top process is gone, nothing of its group
        // may survive. Data already in the pipes stays readable.
        kill_group(pgid);
        let mut deadline = Instant::now() + DRAIN_GRACE;
        let mut widened = false;
        while open_streams > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match events(Some(left)) {
                Ok(Event::OutputClosed) => open_streams -= 1,
                Ok(Event::HostGone(why)) => return Outcome::HostGone(why),
                Ok(_) => {}
                Err(_) if !widened => {
                    // Something that left the job's group (setsid) still holds a pipe open.
                    if config.pid1 {
                        // SAFETY: kill(-1) from PID 1 signals everything but init.
                        unsafe { libc::kill(-1, libc::SIGKILL) };
                    }
                    widened = true;
                    deadline = Instant::now() + DRAIN_GRACE;
                }
                Err(_) => break,
            }
        }

        // Everything of the job is reaped (not just dead) before its end is reported: the reaper
        // thread collects the killed group; zombies would still answer kill(-pgid, 0).
        let deadline = Instant::now() + DRAIN_GRACE;
        // SAFETY: kill with signal 0 only checks whether the group still has members.
        while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }

        // A write that fails leaves the Exit to a new connection, which the reader's report of
        // the lost one brings about.
        let _ = writer.send_exit(Frame::Exit {
            wait_status: exit.0,
            rusage: exit.1,
            memory: guest_memory::report(),
        });
        let deadline = Instant::now() + ACK_PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events(Some(left)) {
                Ok(Event::Acked) => {
                    if config.pid1 {
                        // Everything the job wrote to disks reaches them before the host, seeing
                        // the connection close, may stop the VM.
                        // SAFETY: kill(-1) from PID 1 signals everything but init.
                        unsafe { libc::kill(-1, libc::SIGKILL) };
                        nix::unistd::sync();
                    }
                    writer.close();
                    return Outcome::JobEnded {
                        wait_status: exit.0,
                    };
                }
                Ok(Event::HostGone(why)) => return Outcome::HostGone(why),
                Ok(_) => {}
                Err(_) => return Outcome::HostGone("no Ack from host".into()),
            }
        }
    }
}
