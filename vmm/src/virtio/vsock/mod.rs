//! virtio-vsock: the device ([`device`]), the wire constants and header ([`packet`]), one state
//! machine per connection with credit flow control ([`connection`]), and the host-side muxer to
//! Unix sockets ([`muxer`]).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::{VsockDevice, VsockStats};
pub use muxer::{Muxer, MuxerError};
