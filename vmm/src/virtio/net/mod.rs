//! virtio-net (device id 1) whose Ethernet frames go to and from `passt` in its "qemu" mode: one
//! connected stream socket on which every frame is preceded by its length, 4 bytes big-endian.
//!
//! * [`passt_stream`] owns the wire to passt: the length-prefix framing (encoding, and reassembly
//!   of frames from reads in one bounded buffer) and the non-blocking socket I/O.
//! * [`tx`] owns the guest-to-passt direction's pieces: reading a TX chain (a
//!   `virtio_net_hdr_v1`, then the frame, over any number of descriptors) into one
//!   length-prefixed frame, and pushing the frame on its way to passt through a socket that may
//!   take it in parts.
//! * [`rx`] owns the passt-to-guest direction's pieces: checking an RX chain and writing a
//!   zeroed header and a frame into it.
//! * [`device`] owns the device: queues, features, configuration space (MAC, link status, MTU),
//!   the order of the work, backpressure in both directions, the link going down when passt's
//!   end goes away, and the device's plain state ([`NetState`]).
//! * [`egress_filter`] owns the allow-list policy of outsiders' jobs: its rules, and the verdict
//!   on each frame the guest sends (pass, drop, or refuse with a TCP RST or an ICMP port
//!   unreachable for the guest).
//! * [`filtering_relay`] owns the loop that enforces it between the device's stream and
//!   passt's, on a thread of its own under the caller's seccomp filter
//!   ([`filtering_relay::RELAY_SYSCALLS`]): two streams in passt's framing, each direction
//!   with backpressure and bounded memory.
//!
//! # Features
//!
//! VERSION_1, MAC, STATUS and MTU; no offloads. passt segments and checksums on its side, so a
//! guest sending MTU-sized frames with complete checksums costs passt nothing; offering
//! CSUM/GUEST_CSUM would let the guest hand over partial checksums that passt would have to
//! finish (and that our TX path would have to pass on faithfully), and TSO/GSO would need
//! mergeable or big RX buffers. Both are possible later (passt accepts frames up to 64 KiB);
//! without MRG_RXBUF, each frame must fit one RX chain, and Linux sizes those from the MTU we
//! announce.
//!
//! # Why the stream is an fd
//!
//! [`crate::config::NetConfig::stream`] is an already-connected socket the caller hands over
//! (the shepherd starts passt as the job user with `--fd`, or connects to its `--socket`), not a
//! path to connect to: the VMM's threads run as the job user under seccomp, the fd needs neither
//! a path the job user can reach nor a `connect` at a time the VMM chooses, and a socketpair
//! leaves no socket file behind.

pub mod device;
pub mod egress_filter;
pub mod filtering_relay;
pub mod passt_stream;
pub mod rx;
pub mod tx;

#[cfg(test)]
mod tests;

pub use device::{NetDevice, NetState};

use crate::virtio::chain::ChainError;
use passt_stream::{ETH_HLEN, MAX_FRAME_LEN};

/// Size of `struct virtio_net_hdr_v1` (VERSION_1: `num_buffers` is always there), which
/// precedes every frame on both queues.
pub const VNET_HDR_LEN: usize = 12;

/// What went wrong in the virtio-net device: a refused configuration, a guest's chain that is
/// dropped (counted, never fatal), or passt breaking the framing (the link goes down).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration cannot be used (bad MAC, MTU out of range).
    #[error("virtio-net: {0}")]
    Config(String),
    /// The stream to passt, or the device's epoll set, cannot be set up.
    #[error("virtio-net: cannot set up the stream to passt: {0}")]
    Setup(std::io::Error),
    /// The descriptor chain itself is invalid.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A TX chain shorter than the virtio-net header.
    #[error("TX chain of {len} bytes is shorter than the {VNET_HDR_LEN}-byte virtio-net header")]
    HeaderTooShort {
        /// The chain's readable length.
        len: usize,
    },
    /// A frame the guest sent is shorter than an Ethernet header or longer than passt takes.
    #[error("frame of {len} bytes is outside {ETH_HLEN}..={MAX_FRAME_LEN}")]
    FrameLength {
        /// The frame's length.
        len: usize,
    },
    /// passt announced a frame of a length it never sends (0, or more than it takes itself).
    #[error("passt announced a frame of {len} bytes (frames are 1..={MAX_FRAME_LEN})")]
    PeerFrameLength {
        /// The announced length.
        len: u32,
    },
    /// An RX chain has no room for the header and the frame.
    #[error("RX buffers of {room} bytes cannot take {need}")]
    RxBufferTooSmall {
        /// Header and frame.
        need: usize,
        /// The chain's writable length.
        room: usize,
    },
    /// Guest memory refused an access (checked at validation, so not expected).
    #[error("guest memory: {0}")]
    Memory(String),
}
