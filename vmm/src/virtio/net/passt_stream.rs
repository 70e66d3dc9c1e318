//! The wire to passt in its "qemu" mode: a connected stream socket carrying Ethernet frames, each
//! preceded by its length as a 4-byte big-endian integer (no virtio-net header on the wire).
//!
//! This module owns the framing — [`encode_len`] for frames going out, [`FrameDecoder`] to
//! reassemble incoming frames in one buffer of fixed size (a length prefix plus the largest
//! frame), so that nothing passt sends can make the VMM allocate — and the socket I/O
//! ([`PasstStream`]: `send`/`recv` with `MSG_DONTWAIT`, `send` with `MSG_NOSIGNAL`, so the fd
//! needs no `O_NONBLOCK` of its own and a closed peer is an `EPIPE`, never a `SIGPIPE`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, recv, send, sockopt, MsgFlags, SockType};

use super::NetError;

/// Bytes of the length prefix before each frame.
pub const LEN_PREFIX: usize = 4;
/// Largest frame on the wire in either direction: passt's own bound (`ETH_MAX_MTU`, 65535);
/// it never sends a longer one, and drops longer ones from the guest.
pub const MAX_FRAME_LEN: usize = 65_535;
/// An Ethernet header (destination, source, type): the shortest frame the guest may send.
pub const ETH_HLEN: usize = 14;

/// The length prefix of a frame of `len` bytes; `None` outside `1..=MAX_FRAME_LEN`.
pub fn encode_len(len: usize) -> Option<[u8; LEN_PREFIX]> {
    if len == 0 || len > MAX_FRAME_LEN {
        return None;
    }
    u32::try_from(len).ok().map(u32::to_be_bytes)
}

/// What [`FrameDecoder::fill`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// This many bytes.
    Read(usize),
    /// The end of the stream.
    Eof,
    /// No room: a complete frame is waiting to be consumed (nothing was read).
    Full,
}

/// Reassembles frames from a byte stream in one buffer of `LEN_PREFIX + MAX_FRAME_LEN` bytes,
/// allocated once. A frame whose prefix arrived always fits (the prefix is checked as soon as
/// its 4 bytes are there), so the buffer never needs to grow.
pub struct FrameDecoder {
    buf: Box<[u8]>,
    /// First byte not yet consumed.
    start: usize,
    /// End of the bytes read.
    end: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            buf: vec![0; LEN_PREFIX + MAX_FRAME_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The buffer's fixed size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes read and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next complete frame, if all of it is buffered. Err when passt announced a length
    /// it never sends (0 or more than [`MAX_FRAME_LEN`]): the stream cannot be trusted after
    /// that, and nothing is allocated for it.
    pub fn peek_frame(&self) -> Result<Option<&[u8]>, NetError> {
        let pending = &self.buf[self.start..self.end];
        let Some(prefix) = pending.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let announced = u32::from_be_bytes(*prefix);
        let len = announced as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(NetError::PeerFrameLength { len: announced });
        }
        Ok(pending.get(LEN_PREFIX..LEN_PREFIX + len))
    }

    /// Drops the frame [`Self::peek_frame`] returned (a no-op without a complete frame).
    pub fn consume_frame(&mut self) {
        let len = match self.peek_frame() {
            Ok(Some(frame)) => frame.len(),
            _ => return,
        };
        self.start += LEN_PREFIX + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once with `read` into the free part of the buffer (moving the unconsumed bytes to
    /// its start first). Never reads while a complete frame is waiting.
    pub fn fill(
        &mut self,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<Fill> {
        if matches!(self.peek_frame(), Ok(Some(_))) {
            return Ok(Fill::Full);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let free = &mut self.buf[self.end..];
        if free.is_empty() {
            // Not reached: without a complete frame, what is buffered is shorter than a
            // prefix and the largest frame.
            return Ok(Fill::Full);
        }
        let cap = free.len();
        match read(free)? {
            0 => Ok(Fill::Eof),
            n => {
                // A reader claiming more than it was given cannot move `end` past the buffer.
                self.end += n.min(cap);
                Ok(Fill::Read(n.min(cap)))
            }
        }
    }

    /// Forgets everything buffered (the stream is gone).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// The connected stream socket to passt. Shares the caller's fd (closed when the last holder
/// drops it).
#[derive(Debug)]
pub struct PasstStream {
    fd: Arc<OwnedFd>,
}

impl PasstStream {
    /// Takes `fd`, which must be a stream socket (`SOCK_STREAM`); it is used as it is
    /// (blocking or not: every call asks for non-blocking behaviour itself).
    pub fn new(fd: Arc<OwnedFd>) -> Result<Self, NetError> {
        match getsockopt(&fd.as_fd(), sockopt::SockType) {
            Ok(SockType::Stream) => Ok(Self { fd }),
            Ok(other) => Err(NetError::Config(format!(
                "the stream to passt must be a SOCK_STREAM socket, not {other:?}"
            ))),
            Err(e) => Err(NetError::Config(format!(
                "the stream to passt is not a socket: {e}"
            ))),
        }
    }

    /// Sends what the socket takes now of `buf`; `WouldBlock` when it takes nothing.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match send(
                self.fd.as_raw_fd(),
                buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    /// Receives what is there, up to `buf.len()`; `Ok(0)` at the end of the stream,
    /// `WouldBlock` when nothing is there.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }
}

impl AsRawFd for PasstStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn encode(frame: &[u8]) -> Vec<u8> {
        let mut out = encode_len(frame.len()).unwrap().to_vec();
        out.extend_from_slice(frame);
        out
    }

    /// Feeds `wire` to a decoder in chunks of the given sizes (cycled); returns the frames, or
    /// the error that stopped it.
    fn decode(wire: &[u8], chunks: &[usize]) -> Result<Vec<Vec<u8>>, String> {
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut at = 0;
        let mut i = 0;
        loop {
            while let Some(f) = d.peek_frame().map_err(|e| e.to_string())? {
                frames.push(f.to_vec());
                d.consume_frame();
            }
            assert!(d.buffered() <= d.capacity());
            let step = chunks[i % chunks.len()].max(1);
            i += 1;
            let fill = d
                .fill(|buf| {
                    let n = step.min(buf.len()).min(wire.len() - at);
                    buf[..n].copy_from_slice(&wire[at..at + n]);
                    at += n;
                    Ok(n)
                })
                .unwrap();
            match fill {
                Fill::Eof => return Ok(frames),
                Fill::Read(_) => {}
                Fill::Full => panic!("full without a complete frame"),
            }
        }
    }

    #[test]
    fn lengths_outside_the_bounds_have_no_prefix() {
        assert_eq!(encode_len(0), None);
        assert_eq!(encode_len(MAX_FRAME_LEN + 1), None);
        assert_eq!(encode_len(1), Some([0, 0, 0, 1]));
        assert_eq!(encode_len(MAX_FRAME_LEN), Some([0, 0, 0xff, 0xff]));
    }

    #[test]
    fn a_zero_or_huge_announced_length_is_refused_without_allocating() {
        for len in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let mut d = FrameDecoder::new();
            let cap = d.capacity();
            let mut wire = len.to_be_bytes().to_vec();
            wire.extend_from_slice(&[0xaa; 64]);
            d.fill(|b| {
                b[..wire.len()].copy_from_slice(&wire);
                Ok(wire.len())
            })
            .unwrap();
            assert!(
                matches!(d.peek_frame(), Err(NetError::PeerFrameLength { len: l }) if l == len),
                "{len}"
            );
            assert_eq!(d.capacity(), cap);
        }
    }

    #[test]
    fn the_largest_frame_fits_and_a_full_buffer_reads_nothing() {
        let frame = vec![0x5a; MAX_FRAME_LEN];
        let wire = [encode(&frame), encode(&[1, 2, 3])].concat();
        let mut d = FrameDecoder::new();
        let mut at = 0;
        while d.peek_frame().unwrap().is_none() {
            d.fill(|b| {
                let n = b.len().min(wire.len() - at);
                b[..n].copy_from_slice(&wire[at..at + n]);
                at += n;
                Ok(n)
            })
            .unwrap();
        }
        assert_eq!(d.peek_frame().unwrap().unwrap(), &frame[..]);
        assert_eq!(d.buffered(), d.capacity());
        assert_eq!(d.fill(|_| panic!("read while full")).unwrap(), Fill::Full);
        d.consume_frame();
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_stream_needs_a_stream_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(PasstStream::new(Arc::new(OwnedFd::from(a))).is_ok());
        let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(
            PasstStream::new(Arc::new(OwnedFd::from(d))),
            Err(NetError::Config(_))
        ));
        let file = tempfile::tempfile().unwrap();
        assert!(matches!(
            PasstStream::new(Arc::new(OwnedFd::from(file))),
            Err(NetError::Config(_))
        ));
    }

    #[test]
    fn io_never_blocks_and_a_closed_peer_is_an_error_not_a_signal() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let s = PasstStream::new(Arc::new(OwnedFd::from(a))).unwrap();
        let mut buf = [0u8; 8];
        let e = s.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        b.write_all(b"hi").unwrap();
        assert_eq!(s.recv(&mut buf).unwrap(), 2);
        drop(b);
        assert_eq!(s.recv(&mut buf).unwrap(), 0, "end of stream");
        let e = s.send(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }

    proptest! {
        #[test]
        fn any_frames_in_any_chunking_come_back_identical(
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..3000), 0..12),
            chunks in prop::collection::vec(1usize..5000, 1..8),
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
            prop_assert_eq!(decode(&wire, &chunks), Ok(frames));
        }

        #[test]
        fn any_bytes_end_in_frames_or_a_refused_length_never_a_panic(
            wire in prop::collection::vec(any::<u8>(), 0..20_000),
            chunks in prop::collection::vec(1usize..70_000, 1..4),
        ) {
            match decode(&wire, &chunks) {
                Ok(frames) => {
                    prop_assert!(frames.iter().all(|f| !f.is_empty() && f.len() <= MAX_FRAME_LEN));
                    let used: usize = frames.iter().map(|f| LEN_PREFIX + f.len()).sum();
                    prop_assert!(used <= wire.len());
                }
                Err(e) => prop_assert!(e.contains("passt announced"), "{}", e),
            }
        }
    }
}
