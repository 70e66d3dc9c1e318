//! The passt-to-guest direction's pieces: [`validate_rx_chain`] checks that an RX chain is a
//! valid chain of device-writable buffers only, and [`write_rx_frame`] writes a
//! `virtio_net_hdr_v1` and a frame into it. The header is all zero (no checksum or GSO
//! information: none was offered) except `num_buffers`, 1 (no MRG_RXBUF: one chain per frame).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes};

use super::{NetError, VNET_HDR_LEN};
use crate::memory::GuestMemory;
use crate::virtio::chain::{validate_chain, ChainError, ValidChain};

/// The header written before every received frame: zeroed, `num_buffers` (the last field,
/// little endian) 1.
pub const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// Validates an RX chain: device-writable buffers only.
pub fn validate_rx_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
) -> Result<ValidChain, NetError>
where
    M: Deref<Target = GuestMemory>,
{
    let valid = validate_chain(chain, mem)?;
    if !valid.readable.is_empty() {
        return Err(ChainError::WrongDirection.into());
    }
    Ok(valid)
}

/// Writes [`RX_HEADER`] and `frame` into the chain's buffers, in order; returns the used
/// length. Refuses, before writing anything, a chain without room for both.
pub fn write_rx_frame(
    chain: &ValidChain,
    mem: &GuestMemory,
    frame: &[u8],
) -> Result<u32, NetError> {
    let need = VNET_HDR_LEN + frame.len();
    let room = chain.writable_len();
    if need > room {
        return Err(NetError::RxBufferTooSmall { need, room });
    }
    let mut parts = [&RX_HEADER[..], frame];
    let mut part = 0;
    for &(addr, len) in &chain.writable {
        let mut addr = addr;
        let mut left = len as usize;
        while left > 0 {
            let Some(src) = parts.get_mut(part) else {
                break;
            };
            if src.is_empty() {
                part += 1;
                continue;
            }
            let n = src.len().min(left);
            mem.write_slice(&src[..n], addr)
                .map_err(|e| NetError::Memory(e.to_string()))?;
            *src = &src[n..];
            left -= n;
            addr = addr
                .checked_add(n as u64)
                .ok_or_else(|| NetError::Memory(format!("{addr:?} + {n} overflows")))?;
        }
    }
    u32::try_from(need).map_err(|_| NetError::RxBufferTooSmall {
        need,
        room: u32::MAX as usize,
    })
}
