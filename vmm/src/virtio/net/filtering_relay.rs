//! The allow-list enforced between the VM and passt: [`run`] relays frames between two connected
//! stream sockets in passt's "qemu" framing (each frame preceded by its length, 4 bytes big
//! endian) — the guest's end (the other end of the virtio-net device's stream,
//! [`crate::config::NetConfig::stream`]) and passt's — sending each frame from the guest
//! through [`EgressPolicy::judge`] and each frame from passt to the guest unchanged, and
//! injecting the policy's refusals (TCP RST, ICMP port unreachable) towards the guest.
//!
//! # Memory
//!
//! Bounded whatever either side sends: one [`FrameDecoder`] per direction (a length prefix and
//! the largest frame, allocated once), which is also the only copy of the frame on its way
//! out (it is written straight from the decoder, in parts if the socket takes it so), and a
//! queue of at most [`REFUSAL_QUEUE`] refusals (more are dropped, counted in
//! [`RelayReport::refusals_lost`]). A direction whose destination takes nothing more stops
//! reading its source (the decoder holds a complete frame, so nothing is read), so the source's
//! writes block: backpressure, never an unbounded buffer. Refusals and passt's frames take
//! turns towards the guest, whole frames at a time. When a relay ends its buffers are kept for
//! the next one instead of freed (at most a few sets; see `Buffers` for why).
//!
//! # The end
//!
//! The relay ends when either side's stream ends or fails (a send or receive error, a hang-up),
//! or announces a frame of a length passt never uses (0, or more than
//! [`MAX_FRAME_LEN`]): after that the framing cannot be trusted. Both sockets are then closed,
//! so the other side sees its stream end too, and [`run`] returns a [`RelayReport`] (counters
//! and why it ended) for the caller's trace. A caller that wants it to end sooner shuts one of
//! the sockets down (`shutdown(2)` on a dup it kept). Frames still on their way are lost then;
//! the side that ended could not have used them.
//!
//! # System calls
//!
//! [`run`] makes only the system calls in [`RELAY_SYSCALLS`], from its first instruction to its
//! return (allocation included), so that the caller can run it on a thread of its own under a
//! seccomp filter built from that list (plus what the thread's own start and exit need): the
//! relay is the one piece of the VMM process that parses what the guest sends outside a VM
//! exit. Sockets are used with `MSG_DONTWAIT` (their own `O_NONBLOCK` is left as it is) and
//! sends with `MSG_NOSIGNAL` (a closed peer is an `EPIPE`, not a `SIGPIPE`); they are closed
//! with a plain `close` (an `OwnedFd`'s drop first asks `fcntl(F_GETFD)` in debug builds).
//! Nothing is logged from the loop.

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, recv, sendmsg, sockopt, MsgFlags, SockType, UnixAddr};

use super::egress_filter::{EgressPolicy, RefusalFrame, Verdict};
use super::passt_stream::{encode_len, Fill, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use super::NetError;

/// Every system call [`run`] (and [`Relay::new`] with [`Relay::run`]) may make, as
/// `libc::SYS_*` numbers, for the caller's seccomp filter.
pub const RELAY_SYSCALLS: &[libc::c_long] = &[
    // The loop: waiting for either socket, receiving (glibc's recv is recvfrom), sending a
    // length prefix and its frame together.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    // The start: both fds must be stream sockets (SO_TYPE).
    libc::SYS_getsockopt,
    // The end: both sockets closed.
    libc::SYS_close,
    // The start: the buffers taken from the spares (a lock, which may wait) or allocated, in
    // a malloc arena glibc may have to make for the thread (mmap, munmap of what is past its
    // alignment, mprotect to grow it), or the main heap (brk); freeing (small blocks only,
    // see `Buffers`) may give pages back (madvise).
    libc::SYS_futex,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
];

/// Refusals waiting for the guest's socket, at most; more are dropped (and counted).
pub const REFUSAL_QUEUE: usize = 32;

/// Frames handled in one direction before the other gets its turn.
const BUDGET: usize = 64;

/// One of the relay's two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The VM's end: the virtio-net device's stream.
    Guest,
    /// passt's.
    Passt,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Guest => "the guest's side",
            Side::Passt => "passt's side",
        })
    }
}

/// Why the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// That side's stream ended (it closed or shut down its writing).
    Eof(Side),
    /// Receiving from or sending to that side failed (`EPIPE`, `ECONNRESET`, ...).
    Io {
        /// Where.
        side: Side,
        /// The error.
        errno: Errno,
    },
    /// That side announced a frame of a length passt never uses (0 or past
    /// [`MAX_FRAME_LEN`]); nothing was allocated for it.
    FrameLength {
        /// Where.
        side: Side,
        /// The length announced.
        len: u32,
    },
    /// poll(2) reported a hang-up or an error on that side that no receive or send could
    /// make anything of.
    Hangup(Side),
    /// poll(2) itself failed.
    Poll(Errno),
}

impl fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayEnd::Eof(side) => write!(f, "{side} closed its stream"),
            RelayEnd::Io { side, errno } => write!(f, "{side}: {}", errno.desc()),
            RelayEnd::FrameLength { side, len } => write!(
                f,
                "{side} announced a frame of {len} bytes (frames are 1..={MAX_FRAME_LEN})"
            ),
            RelayEnd::Hangup(side) => write!(f, "{side} hung up"),
            RelayEnd::Poll(errno) => write!(f, "poll: {}", errno.desc()),
        }
    }
}

/// What the relay did, for the caller's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayReport {
    /// Frames from the guest the policy let through, all of each sent to passt.
    pub passed: u64,
    /// Frames from the guest dropped without a reply.
    pub dropped: u64,
    /// Frames from the guest refused with a reply (queued, or lost: [`Self::refusals_lost`]).
    pub refused: u64,
    /// Replies to refused frames dropped because [`REFUSAL_QUEUE`] were already waiting.
    pub refusals_lost: u64,
    /// Frames from passt delivered to the guest (refusals not included).
    pub to_guest: u64,
    /// Why it ended.
    pub ended_by: RelayEnd,
}

/// What goes to the guest, whole frames at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToGuest {
    /// Nothing under way: the next frame may come from either source.
    Idle,
    /// The frame at the front of the passt decoder.
    Passt,
    /// The refusal at the front of the queue.
    Refusal,
}

/// What a direction waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// It handled [`BUDGET`] frames and has more to do.
    More,
    /// Bytes to read from this side.
    Read(Side),
    /// Room to write on this side.
    Write(Side),
}

/// The relay between the guest's and passt's streams, set up and not yet run. [`run`] does
/// both; the two steps let a caller set it up before installing its seccomp filter.
pub struct Relay<'p> {
    guest: Option<OwnedFd>,
    passt: Option<OwnedFd>,
    policy: &'p EgressPolicy,
    /// `None` only while the loop runs (it holds them).
    buffers: Option<Buffers>,
    /// Bytes (prefix included) of the frame at the front of `from_guest` that passt took.
    to_passt_sent: usize,
    to_guest: ToGuest,
    /// Bytes (prefix included) of the frame under way to the guest that its socket took.
    to_guest_sent: usize,
    /// Whether the last frame to the guest was a refusal (the next goes to passt's, if any).
    last_was_refusal: bool,
    /// Whether this round moved a byte or handled a frame.
    progress: bool,
    report: RelayReport,
    ended: bool,
}

/// A relay's memory: a reassembly buffer per direction and the refusal queue.
///
/// Kept for the next relay rather than freed ([`SPARE_BUFFERS`]): freeing 64 KiB blocks makes
/// glibc trim the thread's malloc arena, and the first trim in a process reads
/// `/proc/sys/vm/overcommit_memory` (`openat`), which no filter for this thread should allow.
struct Buffers {
    from_guest: FrameDecoder,
    from_passt: FrameDecoder,
    refusals: VecDeque<RefusalFrame>,
}

/// Buffers of relays that ended, at most [`MAX_SPARES`] (a process runs one relay per VM).
static SPARE_BUFFERS: Mutex<Vec<Buffers>> = Mutex::new(Vec::new());
const MAX_SPARES: usize = 4;

impl Buffers {
    /// Spare buffers, emptied, or new ones.
    fn take() -> Self {
        let spare = SPARE_BUFFERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match spare {
            Some(mut b) => {
                b.from_guest.clear();
                b.from_passt.clear();
                b.refusals.clear();
                b
            }
            None => Self {
                from_guest: FrameDecoder::new(),
                from_passt: FrameDecoder::new(),
                refusals: VecDeque::with_capacity(REFUSAL_QUEUE),
            },
        }
    }

    /// Keeps the buffers for the next relay (the list's room is made once, for all of them).
    fn give_back(self) {
        let mut spares = SPARE_BUFFERS.lock().unwrap_or_else(PoisonError::into_inner);
        if spares.capacity() == 0 {
            spares.reserve_exact(MAX_SPARES);
        }
        if spares.len() < MAX_SPARES {
            spares.push(self);
        }
    }
}

/// Closes `fd` with a plain `close` (see the module doc).
fn close(fd: OwnedFd) {
    let _ = nix::unistd::close(fd.into_raw_fd());
}

fn check_stream(fd: &OwnedFd, side: Side) -> Result<(), NetError> {
    match getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Stream) => Ok(()),
        Ok(other) => Err(NetError::Config(format!(
            "the filtering relay needs a SOCK_STREAM socket on {side}, not {other:?}"
        ))),
        Err(e) => Err(NetError::Config(format!(
            "the filtering relay needs a socket on {side}: {e}"
        ))),
    }
}

/// Relays frames between `guest` and `passt` through `policy` until either side ends (see the
/// module doc); closes both. Err only when either fd is not a connected stream socket.
pub fn run(guest: OwnedFd, passt: OwnedFd, policy: &EgressPolicy) -> Result<RelayReport, NetError> {
    Ok(Relay::new(guest, passt, policy)?.run())
}

impl<'p> Relay<'p> {
    /// A relay between `guest` and `passt` (stream sockets, connected), enforcing `policy`.
    /// Takes its buffers (allocated, or left by a relay that ended); closes both fds when
    /// either is not a stream socket.
    pub fn new(guest: OwnedFd, passt: OwnedFd, policy: &'p EgressPolicy) -> Result<Self, NetError> {
        if let Err(e) =
            check_stream(&guest, Side::Guest).and_then(|()| check_stream(&passt, Side::Passt))
        {
            close(guest);
            close(passt);
            return Err(e);
        }
        Ok(Self {
            guest: Some(guest),
            passt: Some(passt),
            policy,
            buffers: Some(Buffers::take()),
            to_passt_sent: 0,
            to_guest: ToGuest::Idle,
            to_guest_sent: 0,
            last_was_refusal: false,
            progress: false,
            report: RelayReport {
                passed: 0,
                dropped: 0,
                refused: 0,
                refusals_lost: 0,
                to_guest: 0,
                // Replaced when it ends.
                ended_by: RelayEnd::Hangup(Side::Guest),
            },
            ended: false,
        })
    }

    /// Relays until either side ends, closes both sockets, and reports. Blocks. Called again,
    /// it returns the same report at once.
    pub fn run(&mut self) -> RelayReport {
        if !self.ended {
            let fds = (self.guest.take(), self.passt.take());
            if let ((Some(guest), Some(passt)), Some(mut buffers)) = (fds, self.buffers.take()) {
                self.report.ended_by = self.relay(&mut buffers, guest.as_fd(), passt.as_fd());
                close(guest);
                close(passt);
                buffers.give_back();
            }
            self.ended = true;
        }
        self.report
    }

    /// The loop: each direction in turn until it waits, then poll(2) for what they wait for.
    fn relay(&mut self, b: &mut Buffers, guest: BorrowedFd, passt: BorrowedFd) -> RelayEnd {
        // A side poll(2) reported hung up or in error: the next round must get somewhere.
        let mut hangup: Option<Side> = None;
        loop {
            self.progress = false;
            let out = match self.guest_to_passt(b, guest, passt) {
                Ok(wait) => wait,
                Err(end) => return end,
            };
            let back = match self.passt_to_guest(b, guest, passt) {
                Ok(wait) => wait,
                Err(end) => return end,
            };
            if let Some(side) = hangup.take() {
                if !self.progress {
                    return RelayEnd::Hangup(side);
                }
            }
            if out == Wait::More || back == Wait::More {
                continue;
            }
            let mut guest_events = PollFlags::empty();
            let mut passt_events = PollFlags::empty();
            for wait in [out, back] {
                match wait {
                    Wait::Read(Side::Guest) => guest_events |= PollFlags::POLLIN,
                    Wait::Write(Side::Guest) => guest_events |= PollFlags::POLLOUT,
                    Wait::Read(Side::Passt) => passt_events |= PollFlags::POLLIN,
                    Wait::Write(Side::Passt) => passt_events |= PollFlags::POLLOUT,
                    Wait::More => {}
                }
            }
            // A side nothing waits for is left out: poll(2) would report its hang-up at once,
            // with nothing to do about it until a direction gets to it.
            let mut fds = [
                PollFd::new(guest, guest_events),
                PollFd::new(passt, passt_events),
            ];
            let sides = [Side::Guest, Side::Passt];
            let range = match (guest_events.is_empty(), passt_events.is_empty()) {
                (false, true) => 0..1,
                (true, false) => 1..2,
                _ => 0..2,
            };
            match poll(&mut fds[range.clone()], PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return RelayEnd::Poll(e),
            }
            let trouble = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
            for i in range {
                if fds[i].revents().is_some_and(|r| r.intersects(trouble)) {
                    hangup = Some(sides[i]);
                }
            }
        }
    }

    /// Frames from the guest, judged, to passt (or dropped, or refused) until the guest has
    /// nothing more or passt takes nothing more.
    fn guest_to_passt(
        &mut self,
        b: &mut Buffers,
        guest: BorrowedFd,
        passt: BorrowedFd,
    ) -> Result<Wait, RelayEnd> {
        for _ in 0..BUDGET {
            let frame = match b.from_guest.peek_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => match fill(&mut b.from_guest, guest) {
                    Ok(Fill::Read(_)) => {
                        self.progress = true;
                        continue;
                    }
                    Ok(Fill::Eof) => return Err(RelayEnd::Eof(Side::Guest)),
                    // Not reached: without a complete frame there is room.
                    Ok(Fill::Full) => continue,
                    Err(Errno::EAGAIN) => return Ok(Wait::Read(Side::Guest)),
                    Err(errno) => {
                        return Err(RelayEnd::Io {
                            side: Side::Guest,
                            errno,
                        })
                    }
                },
                Err(e) => return Err(frame_length(Side::Guest, &e)),
            };
            // A frame partly sent has passed already (judge is pure: judging it again on
            // every resumption would say the same).
            if self.to_passt_sent == 0 {
                match self.policy.judge(frame) {
                    Verdict::Pass => {}
                    Verdict::Drop(_) => {
                        self.report.dropped += 1;
                        b.from_guest.consume_frame();
                        self.progress = true;
                        continue;
                    }
                    Verdict::Refuse(reply) => {
                        self.report.refused += 1;
                        if b.refusals.len() < REFUSAL_QUEUE {
                            b.refusals.push_back(reply);
                        } else {
                            self.report.refusals_lost += 1;
                        }
                        b.from_guest.consume_frame();
                        self.progress = true;
                        continue;
                    }
                }
            }
            match send_frame(passt, frame, &mut self.to_passt_sent, &mut self.progress) {
                Ok(true) => {
                    self.report.passed += 1;
                    self.to_passt_sent = 0;
                    b.from_guest.consume_frame();
                }
                Ok(false) => return Ok(Wait::Write(Side::Passt)),
                Err(errno) => {
                    return Err(RelayEnd::Io {
                        side: Side::Passt,
                        errno,
                    })
                }
            }
        }
        Ok(Wait::More)
    }

    /// Frames from passt and refusals, taking turns, to the guest until neither has one or the
    /// guest takes nothing more.
    fn passt_to_guest(
        &mut self,
        b: &mut Buffers,
        guest: BorrowedFd,
        passt: BorrowedFd,
    ) -> Result<Wait, RelayEnd> {
        for _ in 0..BUDGET {
            if self.to_guest == ToGuest::Idle {
                let from_passt = match b.from_passt.peek_frame() {
                    Ok(frame) => frame.is_some(),
                    Err(e) => return Err(frame_length(Side::Passt, &e)),
                };
                let refusal = !b.refusals.is_empty();
                self.to_guest = match (refusal, from_passt) {
                    (true, true) if self.last_was_refusal => ToGuest::Passt,
                    (true, _) => ToGuest::Refusal,
                    (false, true) => ToGuest::Passt,
                    (false, false) => match fill(&mut b.from_passt, passt) {
                        Ok(Fill::Read(_)) => {
                            self.progress = true;
                            continue;
                        }
                        Ok(Fill::Eof) => return Err(RelayEnd::Eof(Side::Passt)),
                        // Not reached: without a complete frame there is room.
                        Ok(Fill::Full) => continue,
                        Err(Errno::EAGAIN) => return Ok(Wait::Read(Side::Passt)),
                        Err(errno) => {
                            return Err(RelayEnd::Io {
                                side: Side::Passt,
                                errno,
                            })
                        }
                    },
                };
            }
            let frame = match self.to_guest {
                ToGuest::Refusal => b.refusals.front().map(RefusalFrame::as_bytes),
                ToGuest::Passt => b.from_passt.peek_frame().ok().flatten(),
                ToGuest::Idle => None,
            };
            let Some(frame) = frame else {
                // Not reached: a source is chosen only with a frame.
                self.to_guest = ToGuest::Idle;
                continue;
            };
            match send_frame(guest, frame, &mut self.to_guest_sent, &mut self.progress) {
                Ok(true) => {
                    if self.to_guest == ToGuest::Refusal {
                        b.refusals.pop_front();
                        self.last_was_refusal = true;
                    } else {
                        b.from_passt.consume_frame();
                        self.report.to_guest += 1;
                        self.last_was_refusal = false;
                    }
                    self.to_guest = ToGuest::Idle;
                    self.to_guest_sent = 0;
                }
                Ok(false) => return Ok(Wait::Write(Side::Guest)),
                Err(errno) => {
                    return Err(RelayEnd::Io {
                        side: Side::Guest,
                        errno,
                    })
                }
            }
        }
        Ok(Wait::More)
    }
}

impl Drop for Relay<'_> {
    /// Closes the sockets of a relay that never ran (with a plain `close`, as [`Relay::run`]),
    /// and keeps its buffers for the next.
    fn drop(&mut self) {
        if let Some(fd) = self.guest.take() {
            close(fd);
        }
        if let Some(fd) = self.passt.take() {
            close(fd);
        }
        if let Some(buffers) = self.buffers.take() {
            buffers.give_back();
        }
    }
}

/// The end for a decoder's refused length prefix.
fn frame_length(side: Side, e: &NetError) -> RelayEnd {
    let len = match e {
        NetError::PeerFrameLength { len } => *len,
        // Not reached: the decoder refuses only lengths.
        _ => 0,
    };
    RelayEnd::FrameLength { side, len }
}

/// Reads once from `fd` into `decoder`, without blocking.
fn fill(decoder: &mut FrameDecoder, fd: BorrowedFd) -> Result<Fill, Errno> {
    decoder
        .fill(|buf| loop {
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Err(Errno::EINTR) => continue,
                other => return other.map_err(std::io::Error::from),
            }
        })
        .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
}

/// Sends what `fd` takes now of `frame` behind its length prefix, from byte `*sent` on (prefix
/// included), without blocking; `Ok(true)` once all of it is out, `Ok(false)` when the socket
/// is full. Sets `progress` when a byte went out.
fn send_frame(
    fd: BorrowedFd,
    frame: &[u8],
    sent: &mut usize,
    progress: &mut bool,
) -> Result<bool, Errno> {
    // Frames come from a decoder (1..=MAX_FRAME_LEN bytes) or are refusals (a few dozen).
    let prefix = encode_len(frame.len()).ok_or(Errno::EMSGSIZE)?;
    let total = LEN_PREFIX + frame.len();
    while *sent < total {
        let (head, tail) = match sent.checked_sub(LEN_PREFIX) {
            None => (&prefix[*sent..], frame),
            Some(in_frame) => (&[][..], &frame[in_frame..]),
        };
        let iov = [IoSlice::new(head), IoSlice::new(tail)];
        match sendmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            // A stream socket takes a byte or says EAGAIN; 0 would loop for ever.
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => {
                // A stream socket never claims more than it was given; if it did, the frame
                // is over rather than past its end.
                *sent = (*sent + n).min(total);
                *progress = true;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
