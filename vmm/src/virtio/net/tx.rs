//! The guest-to-passt direction's pieces: [`read_tx_chain`] turns a TX chain (a
//! `virtio_net_hdr_v1`, then the frame, over any number of device-readable descriptors, the
//! header possibly split too) into one length-prefixed frame, refusing a bad chain or frame
//! length before copying anything; [`OutFrame`] is the one frame on its way to passt, which a
//! stream socket may take in parts.
//!
//! The header's fields are not used: no offload was offered, so there is no checksum to finish
//! and no segmentation to do (a guest that fills them in anyway has its frame sent as it is).

use std::io;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes};

use super::passt_stream::{encode_len, PasstStream, ETH_HLEN, LEN_PREFIX};
use super::{NetError, VNET_HDR_LEN};
use crate::memory::GuestMemory;
use crate::virtio::chain::{validate_chain, ChainError};

/// Validates `chain` and copies its frame, after the header, into `out` behind the frame's
/// length prefix (`out` is cleared first and holds at most `LEN_PREFIX +` [`super::passt_stream::MAX_FRAME_LEN`] bytes).
/// Returns the frame's length.
pub fn read_tx_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    out: &mut Vec<u8>,
) -> Result<usize, NetError>
where
    M: Deref<Target = GuestMemory>,
{
    let valid = validate_chain(chain, mem)?;
    if !valid.writable.is_empty() {
        return Err(ChainError::WrongDirection.into());
    }
    // At most MAX_CHAIN_DESCRIPTORS u32 lengths: no overflow in a usize.
    let total: usize = valid.readable.iter().map(|&(_, len)| len as usize).sum();
    let len = total
        .checked_sub(VNET_HDR_LEN)
        .ok_or(NetError::HeaderTooShort { len: total })?;
    if len < ETH_HLEN {
        return Err(NetError::FrameLength { len });
    }
    let prefix = encode_len(len).ok_or(NetError::FrameLength { len })?;
    out.clear();
    out.extend_from_slice(&prefix);
    out.resize(LEN_PREFIX + len, 0);
    let mut skip = VNET_HDR_LEN;
    let mut at = LEN_PREFIX;
    for &(addr, desc_len) in &valid.readable {
        let desc_len = desc_len as usize;
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        let from = addr
            .checked_add(skip as u64)
            .ok_or_else(|| NetError::Memory(format!("{addr:?} + {skip} overflows")))?;
        let n = desc_len - skip;
        skip = 0;
        let dst = out
            .get_mut(at..at + n)
            .ok_or_else(|| NetError::Memory("descriptor lengths changed".into()))?;
        mem.read_slice(dst, from)
            .map_err(|e| NetError::Memory(e.to_string()))?;
        at += n;
    }
    Ok(len)
}

/// A frame (length prefix included) on its way to passt, and how much of it the socket took.
#[derive(Debug, Default)]
pub struct OutFrame {
    bytes: Vec<u8>,
    sent: usize,
}

impl OutFrame {
    /// An empty frame (nothing to send).
    pub fn new() -> Self {
        Self::default()
    }

    /// The buffer to load the next frame into with [`read_tx_chain`]; the previous frame must
    /// be fully sent (or dropped before any of it was).
    pub fn load(&mut self) -> &mut Vec<u8> {
        self.sent = 0;
        &mut self.bytes
    }

    /// Whether any of the frame went out (then all of it must, or passt loses the framing).
    pub fn started(&self) -> bool {
        self.sent > 0
    }

    /// The frame's length, without its prefix.
    pub fn frame_len(&self) -> usize {
        self.bytes.len().saturating_sub(LEN_PREFIX)
    }

    /// Bytes held (at most `LEN_PREFIX + MAX_FRAME_LEN`, whatever the guest sends).
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Sends the rest of the frame. `Ok(true)`: all of it is out; `Ok(false)`: the socket is
    /// full (the rest waits for it to be writable).
    pub fn flush(&mut self, stream: &PasstStream) -> io::Result<bool> {
        while let Some(rest) = self.bytes.get(self.sent..).filter(|r| !r.is_empty()) {
            match stream.send(rest) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => self.sent += n.min(rest.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}
