//! Validation of descriptor chains a (possibly hostile) guest posts: every buffer inside guest
//! RAM, no empty buffers, device-readable buffers before device-writable ones, a bounded length,
//! and a chain that ends properly (a bad `next` index or a loop truncates the walk, which is
//! caught here). A chain that fails is dropped by the device; nothing is read or written.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// Most descriptors a chain may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Why a chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No descriptor could be read (e.g. the head index is out of range).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain continued past a descriptor that could not be followed: an out-of-range
    /// `next`, a loop, or too many descriptors.
    #[error("descriptor chain is truncated, loops, or is too long")]
    Unterminated,
    /// A buffer lies (partly) outside guest RAM.
    #[error("descriptor buffer {addr:#x}+{len} is outside guest RAM")]
    OutOfBounds {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A zero-length buffer.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The wrong kind of buffer for the queue.
    #[error("descriptor direction not allowed on this queue")]
    WrongDirection,
}

/// A validated chain: its head and its buffers, split by direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChain {
    /// Head index (for the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Device-writable buffers, in order.
    pub writable: Vec<(GuestAddress, u32)>,
}

/// Walks and checks `chain` (consuming it; pass a clone to parse it again afterwards).
pub fn validate_chain<M>(
    chain: DescriptorChain<M>,
    mem: &impl GuestMemory,
) -> Result<ValidChain, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut readable = Vec::new();
    let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
    let mut last_has_next = false;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::Unterminated);
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let perm = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, perm) {
            return Err(ChainError::OutOfBounds { addr: addr.0, len });
        }
        if desc.is_write_only() {
            writable.push((addr, len));
        } else {
            if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            readable.push((addr, len));
        }
        last_has_next = desc.has_next();
    }
    if readable.is_empty() && writable.is_empty() {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    Ok(ValidChain {
        head,
        readable,
        writable,
    })
}
