//! The shepherd ⇄ agent wire protocol.
//!
//! A connection carries frames in both directions. Each frame is
//!
//! ```text
//! u32 little-endian body length | u8 frame kind | payload (body length - 1 bytes)
//! ```
//!
//! Integers are little-endian; byte strings are a `u32` length followed by the bytes; lists are a
//! `u32` count followed by the items. A body longer than [`MAX_FRAME_LEN`] is refused before it is
//! read, so a hostile peer cannot make the reader allocate without bound. Unknown kinds, truncated
//! payloads and trailing bytes are errors, never panics.
//!
//! The conversation: the agent connects and sends [`Frame::Hello`]; the host answers with
//! [`Frame::Spawn`] (preceded by [`Frame::Filesystems`] when the job has an OS image or shared
//! directories, then by [`Frame::Network`], the guest's host name and network); the agent replies [`Frame::Started`] or [`Frame::SpawnFailed`]; then data,
//! [`Frame::Signal`] and [`Frame::Eof`] frames flow until the agent sends [`Frame::Exit`] (after
//! both output streams reached [`Frame::Eof`]) and the host confirms with [`Frame::Ack`]. Nothing is
//! left to socket half-close or to bytes surviving VM exit.
//!
//! Output is acknowledged as the host writes it ([`Frame::OutputAck`]); the agent keeps what is
//! not acknowledged yet (a bounded amount: beyond it the job's writes wait). When the connection
//! breaks while the job runs (a VM restored from a snapshot finds its vsock transport reset),
//! the agent connects again and says [`Frame::Reconnect`]; the host answers [`Frame::Resume`]
//! with the bytes of each stream it has, and the agent sends the rest, its Eofs and its Exit
//! again. Nothing is lost or sent twice.

mod codec;
mod frame;
mod stream;

pub use codec::{decode_body, encode, ProtocolError};
pub use frame::{
    Account, BootTimes, Filesystems, Frame, GuestMemoryReport, GuestNetwork, Ipv4Interface,
    ReconnectPoint, Rlimit, RootImage, Rusage, ShareTransport, SharedMount, Spawn, SpawnStage,
    StdinMode, Stream, RLIM_INFINITY,
};
pub use stream::{FrameReader, FrameWriter};

/// Version spoken by this build; carried in [`Frame::Hello`]. The host refuses other versions.
/// 2: the host may send [`Frame::Filesystems`] (OS image, shared directories) before Spawn.
/// 3: [`Frame::Filesystems`] carries the job user's account.
/// 4: the host may send [`Frame::Eof`] for stdout or stderr: it can no longer write that
///    stream's destination, and the agent closes the job's pipe.
/// 5: [`Frame::Exit`] carries the guest's memory size and OOM kills.
/// 6: the host sends [`Frame::Network`] (host name, eth0, resolvers) before Spawn.
/// 7: the host acknowledges written output ([`Frame::OutputAck`]); an agent that loses its
///    connection while the job runs reconnects ([`Frame::Reconnect`], [`Frame::Resume`]) and
///    sends again what the host does not have.
pub const PROTOCOL_VERSION: u16 = 7;

/// Largest frame body accepted (kind byte plus payload).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest payload a sender puts in one Stdin/Stdout/Stderr frame. Output is chunked to this so
/// signals and other frames are never stuck behind a huge write.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// The vsock port the agent connects to on the host (CID 2). With hybrid vsock the host side
/// listens on the Unix socket `<uds>_1024`.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;
