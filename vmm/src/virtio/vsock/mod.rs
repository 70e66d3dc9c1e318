//! virtio-vsock: the device ([`device`]), the wire constants and header ([`packet`]), one state
//! machine per connection with credit flow control ([`connection`]), the host-side muxer to
//! Unix sockets ([`muxer`]), and what a snapshot keeps of the device ([`state`]).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod state;

pub use device::{VsockDevice, VsockStats};
pub use muxer::{Muxer, MuxerError};
pub use state::VsockState;
