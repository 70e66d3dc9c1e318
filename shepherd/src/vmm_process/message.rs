//! The typed messages between the root shepherd and its VMM process, one per datagram on a
//! `SOCK_SEQPACKET` socket pair: signals and stop requests down; the VM's start (or why it
//! could not start), the job's start, and its end (exit with wait status, rusage and timings,
//! or the failure) up.
//!
//! The VMM process runs as the job user, who may be hostile: the parent reads at most
//! [`MAX_MESSAGE`] bytes per message, and nothing in a message can make the parent charge the
//! host or the queue (a start failure re-queues the job, every other report is the job's).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, SystemTime};

use guest_agent::protocol::{GuestMemoryReport, Rusage};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use serde::{Deserialize, Serialize};

use crate::agent_session::JobError;
use crate::checkpoint::taker::AfterCheckpoint;
use crate::checkpoint::CheckpointReport;
use crate::timings::Timings;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The longest text (an error, a reason) a message carries; longer text is cut.
const MAX_TEXT: usize = 8 * 1024;

/// From the shepherd to its VMM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToVmm {
    /// Deliver this signal to the job's process group in the guest.
    Signal(i32),
    /// Stop the VM now; the job's end is then reported as the agent lost.
    StopVm,
    /// Take a checkpoint of the job (the job must have been launched with a checkpoint
    /// directory); with [`AfterCheckpoint::StayPaused`] the VM is stopped after it, and the
    /// job's end is [`JobError::Migrated`].
    Checkpoint(AfterCheckpoint),
    /// Suspend (`true`) or resume (`false`) the VM's vCPUs: a suspended job's guest uses no
    /// CPU and runs no timers. Where the backend cannot pause, nothing happens.
    Suspend(bool),
}

/// Why the VM could not be started, by the kind of [`crate::backend::BackendError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFailure {
    Unavailable(String),
    Start(String),
    Guest(String),
    /// The job's checkpoint could not be restored: sound but not on this host (`elsewhere`),
    /// or unusable anywhere.
    Restore {
        elsewhere: bool,
        message: String,
    },
}

/// From the VMM process to the shepherd. (A handful per job: the size of the largest variant
/// does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum FromVmm {
    /// The VM was created (its backend started it); timings so far.
    VmStarted {
        vm_created_ms: Option<f64>,
        first_instruction_ms: Option<f64>,
        /// The checkpoint the VM was restored from, when it was not booted.
        restored: Option<u64>,
    },
    /// The VM could not be started; the process exits after this.
    StartFailed(StartFailure),
    /// The agent started the job.
    JobStarted,
    /// The job ended and the guest reported it; every output byte is written.
    Exited {
        wait_status: i32,
        #[serde(with = "RusageDef")]
        rusage: Rusage,
        #[serde(with = "GuestMemoryReportDef")]
        memory: GuestMemoryReport,
        job_started: SystemTime,
        job_ended: SystemTime,
        timings: Timings,
        /// [`crate::launch::JobOutcome::output_failures`], one per stream at most.
        output_failures: Vec<String>,
    },
    /// The job did not produce an exit status.
    Failed(JobError),
    /// A checkpoint was taken, or why not (the job runs on either way, unless it was a
    /// migration's, after which the VM stops).
    Checkpointed(CheckpointOutcome),
}

/// What came of a checkpoint request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CheckpointOutcome {
    Taken(CheckpointReport),
    /// Not now: the job is not running yet, or has ended (routine for periodic checkpoints).
    NotNow(String),
    Failed(String),
}

/// [`GuestMemoryReport`] on the wire.
#[derive(Serialize, Deserialize)]
#[serde(remote = "GuestMemoryReport")]
struct GuestMemoryReportDef {
    total_kib: u64,
    oom_kills: u64,
}

/// [`Rusage`] on the wire (the protocol crate knows nothing of serde).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Rusage")]
struct RusageDef {
    utime_us: u64,
    stime_us: u64,
    maxrss: i64,
    ixrss: i64,
    idrss: i64,
    isrss: i64,
    minflt: i64,
    majflt: i64,
    nswap: i64,
    inblock: i64,
    oublock: i64,
    msgsnd: i64,
    msgrcv: i64,
    nsignals: i64,
    nvcsw: i64,
    nivcsw: i64,
}

/// Cuts `text` to [`MAX_TEXT`] bytes (at a character boundary).
pub fn bounded_text(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [cut]");
    }
    text
}

/// One end of the socket pair.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// What a receive gave.
#[derive(Debug)]
pub enum Received<T> {
    Message(T),
    /// Nothing within the timeout.
    Nothing,
    /// The other side closed its end (or died).
    Closed,
}

/// Why a message could not be sent or read.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("VMM channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("VMM channel: malformed message: {0}")]
    Malformed(String),
}

impl Channel {
    /// A connected pair (close-on-exec: no helper the VMM starts inherits either end).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Another handle on the same end (for a second thread).
    pub fn try_clone(&self) -> Result<Channel, ChannelError> {
        Ok(Channel {
            fd: self.fd.try_clone()?,
        })
    }

    /// Sends one message without waiting: a peer that does not read (a VMM process its owner
    /// stopped) must never hold up the shepherd's signal relay; the message is then lost and
    /// the caller's deadlines take over.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), ChannelError> {
        let bytes =
            serde_json::to_vec(message).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::Malformed(format!(
                "{} bytes, more than {MAX_MESSAGE}",
                bytes.len()
            )));
        }
        loop {
            match socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                &bytes,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
    }

    /// Waits up to `timeout` (`None`: for ever) for one message.
    pub fn receive<T: for<'de> Deserialize<'de>>(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Received<T>, ChannelError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let wait = match timeout {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => return Ok(Received::Nothing),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Received::Nothing),
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let n = match socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &mut buf,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return Ok(Received::Closed),
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                return Ok(Received::Nothing)
            }
            Err(nix::errno::Errno::ECONNRESET) => return Ok(Received::Closed),
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        if n > MAX_MESSAGE {
            return Err(ChannelError::Malformed(format!(
                "more than {MAX_MESSAGE} bytes"
            )));
        }
        serde_json::from_slice(&buf[..n])
            .map(Received::Message)
            .map_err(|e| ChannelError::Malformed(e.to_string()))
    }

    /// The raw descriptor (for the child to keep across its clean-up).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_whole_and_a_closed_end_reads_as_closed() {
        let (a, b) = Channel::pair().unwrap();
        a.send(&ToVmm::Signal(15)).unwrap();
        a.send(&ToVmm::StopVm).unwrap();
        let got: Received<ToVmm> = b.receive(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(got, Received::Message(ToVmm::Signal(15))));
        let got: Received<ToVmm> = b.receive(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(got, Received::Message(ToVmm::StopVm)));
        let got: Received<ToVmm> = b.receive(Some(Duration::from_millis(10))).unwrap();
        assert!(matches!(got, Received::Nothing));
        b.send(&FromVmm::Failed(JobError::Vm("x".into()))).unwrap();
        let got: Received<FromVmm> = a.receive(None).unwrap();
        assert!(matches!(got, Received::Message(FromVmm::Failed(JobError::Vm(m))) if m == "x"));
        drop(a);
        let got: Received<FromVmm> = b.receive(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(got, Received::Closed));
    }

    #[test]
    fn sending_never_waits_on_a_peer_that_does_not_read() {
        let (a, _never_reads) = Channel::pair().unwrap();
        let start = std::time::Instant::now();
        let mut refused = false;
        for _ in 0..100_000 {
            if a.send(&ToVmm::Signal(10)).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the buffer never filled");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn garbage_from_the_vmm_process_is_an_error_not_a_panic() {
        let (a, b) = Channel::pair().unwrap();
        socket::send(a.raw_fd(), b"{not json", MsgFlags::empty()).unwrap();
        let got = b.receive::<FromVmm>(Some(Duration::from_secs(1)));
        assert!(matches!(got, Err(ChannelError::Malformed(_))), "{got:?}");
        socket::send(
            a.raw_fd(),
            &vec![b' '; MAX_MESSAGE + 100],
            MsgFlags::empty(),
        )
        .unwrap();
        let got = b.receive::<FromVmm>(Some(Duration::from_secs(1)));
        assert!(matches!(got, Err(ChannelError::Malformed(_))), "{got:?}");
    }
}
