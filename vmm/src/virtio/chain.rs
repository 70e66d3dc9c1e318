//! Validation of descriptor chains a (possibly hostile) guest posts: every buffer inside guest
//! RAM, no empty buffers, device-readable buffers before device-writable ones, a bounded length,
//! and a chain that ends properly (a bad `next` index or a loop truncates the walk, which is
//! caught here). A chain that fails is dropped by the device; nothing is read or written.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

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

impl ValidChain {
    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|&(_, len)| len as usize).sum()
    }

    /// Copies the device-readable buffers, in order, into `out` (cleared first). Refuses a
    /// chain whose readable part exceeds `max` bytes, before copying anything.
    pub fn gather_readable(
        &self,
        mem: &impl GuestMemory,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        out.clear();
        let total: usize = self.readable.iter().map(|&(_, len)| len as usize).sum();
        if total > max {
            return Err(TransferError::TooLong { len: total, max });
        }
        out.resize(total, 0);
        let mut at = 0;
        for &(addr, len) in &self.readable {
            let end = at + len as usize;
            mem.read_slice(&mut out[at..end], addr)
                .map_err(|e| TransferError::Memory(e.to_string()))?;
            at = end;
        }
        Ok(())
    }

    /// Copies `data` into the device-writable buffers, in order; returns the bytes written.
    /// Refuses data longer than the buffers, before copying anything.
    pub fn scatter_writable(
        &self,
        mem: &impl GuestMemory,
        data: &[u8],
    ) -> Result<u32, TransferError> {
        let room = self.writable_len();
        if data.len() > room {
            return Err(TransferError::TooLong {
                len: data.len(),
                max: room,
            });
        }
        let mut rest = data;
        for &(addr, len) in &self.writable {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(len as usize);
            mem.write_slice(&rest[..n], addr)
                .map_err(|e| TransferError::Memory(e.to_string()))?;
            rest = &rest[n..];
        }
        // The used ring's length is a u32; the buffers' total may not be.
        u32::try_from(data.len()).map_err(|_| TransferError::TooLong {
            len: data.len(),
            max: u32::MAX as usize,
        })
    }
}

/// Why bytes could not be moved between a chain's buffers and the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// More bytes than the buffers (or the caller's bound) allow.
    #[error("{len} bytes do not fit in {max}")]
    TooLong {
        /// Bytes to move.
        len: usize,
        /// Room available.
        max: usize,
    },
    /// Guest memory refused the access (checked at validation, so not expected).
    #[error("guest memory: {0}")]
    Memory(String),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, GuestMemory};
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// Writes descriptors (addr, len, flags, next) and publishes `head`; returns its chain's
    /// validation.
    fn check(
        descs: &[(u64, u32, u16, u16)],
        head: u16,
        size: u16,
    ) -> Result<ValidChain, ChainError> {
        let mem: GuestMemory = create_guest_memory(2).unwrap();
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let d = DESC + 16 * i as u64;
            mem.write_obj(*addr, GuestAddress(d)).unwrap();
            mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(*flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(*next, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        let chain = q.iter(&mem).unwrap().next().unwrap();
        validate_chain(chain, &mem)
    }

    #[test]
    fn a_header_and_a_writable_buffer_pass() {
        let v = check(&[(0x10000, 44, NEXT, 1), (0x20000, 4096, WRITE, 0)], 0, 8).unwrap();
        assert_eq!(v.readable, vec![(GuestAddress(0x10000), 44)]);
        assert_eq!(v.writable, vec![(GuestAddress(0x20000), 4096)]);
    }

    #[test]
    fn buffers_outside_guest_ram_are_refused() {
        let r = check(&[(0x1f_ff00, 0x200, 0, 0)], 0, 8);
        assert_eq!(
            r,
            Err(ChainError::OutOfBounds {
                addr: 0x1f_ff00,
                len: 0x200
            })
        );
        let r = check(&[(u64::MAX - 8, 44, 0, 0)], 0, 8);
        assert!(matches!(r, Err(ChainError::OutOfBounds { .. })));
    }

    #[test]
    fn loops_and_dangling_next_are_refused() {
        let looped = [(0x10000, 44, NEXT, 1), (0x10000, 44, NEXT, 0)];
        assert_eq!(check(&looped, 0, 8), Err(ChainError::Unterminated));
        let dangling = [(0x10000, 44, NEXT, 200)];
        assert_eq!(check(&dangling, 0, 8), Err(ChainError::Unterminated));
    }

    #[test]
    fn overlong_chains_are_refused() {
        let descs: Vec<_> = (0..100u16).map(|i| (0x10000, 8, NEXT, i + 1)).collect();
        assert_eq!(check(&descs, 0, 128), Err(ChainError::Unterminated));
    }

    #[test]
    fn empty_zero_length_and_misordered_chains_are_refused() {
        assert_eq!(check(&[(0x10000, 44, 0, 0)], 9, 8), Err(ChainError::Empty));
        assert_eq!(
            check(&[(0x10000, 0, 0, 0)], 0, 8),
            Err(ChainError::ZeroLength)
        );
        let misordered = [(0x10000, 44, WRITE | NEXT, 1), (0x20000, 44, 0, 0)];
        assert_eq!(
            check(&misordered, 0, 8),
            Err(ChainError::ReadableAfterWritable)
        );
    }
}
