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
}
