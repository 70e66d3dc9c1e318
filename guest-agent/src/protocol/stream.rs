//! Reading and writing whole frames on a byte stream (vsock, Unix socket, pipe).

use std::io::{self, Read, Write};

use super::codec::{decode_body, encode, ProtocolError};
use super::frame::Frame;
use super::MAX_FRAME_LEN;

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// Reads the next frame. `Ok(None)` means the peer closed the stream cleanly between frames.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut len_buf = [0u8; 4];
        let mut got = 0;
        while got < len_buf.len() {
            match self.inner.read(&mut len_buf[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ProtocolError::UnexpectedEof),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len_buf) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(len));
        }
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        let mut body = vec![0u8; len];
        self.inner
            .read_exact(&mut body)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ProtocolError::UnexpectedEof,
                _ => ProtocolError::Io(e),
            })?;
        decode_body(&body).map(Some)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Writes frames to a byte stream, one `write_all` per frame so frames never interleave when
/// the writer is shared behind a lock.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    pub fn write_frame(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        let bytes = encode(frame)?;
        self.inner.write_all(&bytes)?;
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}
