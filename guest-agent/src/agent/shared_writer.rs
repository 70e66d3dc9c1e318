//! The agent's sending half of the connection, shared by the output pumps and the main loop.

use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::protocol::{Frame, FrameWriter, ProtocolError};

/// A cloneable handle that writes whole frames atomically with respect to each other.
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<FrameWriter<File>>>);

impl SharedWriter {
    pub fn new(conn: File) -> Self {
        SharedWriter(Arc::new(Mutex::new(FrameWriter::new(conn))))
    }

    pub fn send(&self, frame: &Frame) -> Result<(), ProtocolError> {
        // A poisoned lock only means another sender panicked mid-frame; the stream is then
        // unusable, which the caller learns from the next write error.
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.write_frame(frame)
    }

    /// Closes the connection in both directions (for every clone of the socket), telling the
    /// host that the agent is done and has nothing more to say.
    pub fn close(&self) {
        let w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(w.get_ref()),
            nix::sys::socket::Shutdown::Both,
        );
    }
}
