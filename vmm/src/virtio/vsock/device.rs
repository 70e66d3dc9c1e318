//! The virtio-vsock device (id 19): three queues (RX, TX, event), the guest CID in the
//! configuration space, and the packet path between the queues and the [`Muxer`]. Every chain is
//! validated ([`crate::virtio::chain`]) before the virtio-vsock crate parses it; a bad chain is
//! returned to the guest unused (length 0) and counted, a broken queue puts the device in
//! DEVICE_NEEDS_RESET.
//!
//! The event queue carries one event: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, sent once after a
//! restore from a snapshot (see [`super::state`]), in the first buffer the driver makes
//! available there.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use super::muxer::Muxer;
use super::packet::{PacketHeader, MAX_PKT_DATA};
use super::state::VsockState;
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::DeviceSnapshot;
use crate::virtio::chain::{validate_chain, ChainError};
use crate::virtio::device::{all_queue_states, read_config_bytes, DeviceFault, VirtioDevice};
use crate::virtio::interrupt::InterruptLine;

/// RX queue index.
pub const RX_QUEUE: usize = 0;
/// TX queue index.
pub const TX_QUEUE: usize = 1;
/// Event queue index.
pub const EVENT_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// `virtio_vsock_event.id` of a transport reset.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of a `virtio_vsock_event` (its `id`, little endian).
const EVENT_LEN: usize = 4;

/// Why a packet's chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain itself is invalid.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// More descriptors than a header and one data buffer.
    #[error("vsock packets use at most two descriptors")]
    TooManyDescriptors,
    /// The virtio-vsock crate refused the packet.
    #[error("bad vsock packet: {0:?}")]
    Parse(virtio_vsock::packet::Error),
}

/// Counters of the device, shared with the VM handle.
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Chains dropped as malformed.
    pub malformed_chains: AtomicU64,
    /// Packets taken from the TX queue.
    pub tx_packets: AtomicU64,
    /// Packets delivered on the RX queue.
    pub rx_packets: AtomicU64,
}

struct Active {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Arc<InterruptLine>,
}

/// The vsock device.
pub struct VsockDevice {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    stats: Arc<VsockStats>,
    scratch: Vec<u8>,
    /// The guest must be told that every connection is gone (after a restore).
    transport_reset_pending: bool,
}

/// Validates and parses a TX chain into a header and a copy of its data.
pub fn parse_tx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
) -> Result<(PacketHeader, Vec<u8>), PacketError>
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let valid = validate_chain(chain.clone(), mem)?;
    if !valid.writable.is_empty() {
        return Err(ChainError::WrongDirection.into());
    }
    if valid.readable.len() > 2 {
        return Err(PacketError::TooManyDescriptors);
    }
    let mut chain = chain;
    let pkt = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA)
        .map_err(PacketError::Parse)?;
    let hdr = PacketHeader {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    let mut data = Vec::new();
    if let Some(slice) = pkt.data_slice() {
        data.resize(slice.len(), 0);
        slice.copy_to(&mut data[..]);
    }
    Ok((hdr, data))
}

impl VsockDevice {
    /// A device for `guest_cid` backed by `muxer`.
    pub fn new(guest_cid: u64, muxer: Muxer) -> Self {
        Self {
            guest_cid,
            muxer,
            active: None,
            stats: Arc::new(VsockStats::default()),
            scratch: vec![0; MAX_PKT_DATA as usize],
            transport_reset_pending: false,
        }
    }

    /// Tells the driver of a pending transport reset, in the first buffer available on the
    /// event queue; without one it stays pending until the driver adds one. A chain without
    /// room for the event is used with length 0 and counted as malformed.
    fn process_events(&mut self) -> Result<(), DeviceFault> {
        if !self.transport_reset_pending {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[EVENT_QUEUE];
        if !queue.ready() {
            return Ok(());
        }
        while let Some(chain) = queue.iter(mem.as_ref())?.next() {
            let head = chain.head_index();
            let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
            let written = validate_chain(chain, mem.as_ref())
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    if v.writable_len() < EVENT_LEN {
                        Err("no room for an event".to_string())
                    } else {
                        v.scatter_writable(mem.as_ref(), &event)
                            .map_err(|e| e.to_string())
                    }
                });
            let used_len = match written {
                Ok(n) => n,
                Err(e) => {
                    self.stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("vsock: dropping event chain {head}: {e}");
                    0
                }
            };
            queue.add_used(mem.as_ref(), head, used_len)?;
            if queue.needs_notification(mem.as_ref())? {
                active.interrupt.signal_used_queue();
            }
            if used_len != 0 {
                self.transport_reset_pending = false;
                tracing::debug!("vsock: told the guest of the transport reset");
                break;
            }
        }
        Ok(())
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }

    fn process_tx(&mut self) -> Result<(), DeviceFault> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[TX_QUEUE];
        let chains: Vec<_> = queue.iter(mem.as_ref())?.collect();
        if chains.is_empty() {
            return Ok(());
        }
        for chain in chains {
            let head = chain.head_index();
            match parse_tx_chain(mem.as_ref(), chain) {
                Ok((hdr, data)) => {
                    self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.muxer.send_pkt(&hdr, &data);
                }
                Err(e) => {
                    self.stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("vsock: dropping TX chain {head}: {e}");
                }
            }
            queue.add_used(mem.as_ref(), head, 0)?;
        }
        if queue.needs_notification(mem.as_ref())? {
            active.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn process_rx(&mut self) -> Result<(), DeviceFault> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[RX_QUEUE];
        let mut used_any = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = queue.iter(mem.as_ref())?.next() else {
                break;
            };
            let head = chain.head_index();
            let valid = validate_chain(chain.clone(), mem.as_ref())
                .map_err(PacketError::from)
                .and_then(|v| {
                    if !v.readable.is_empty() {
                        Err(ChainError::WrongDirection.into())
                    } else if v.writable.len() > 2 {
                        Err(PacketError::TooManyDescriptors)
                    } else {
                        Ok(v)
                    }
                });
            let mut chain = chain;
            let parsed = valid.and_then(|_| {
                VsockPacket::from_rx_virtq_chain(mem.as_ref(), &mut chain, MAX_PKT_DATA)
                    .map_err(PacketError::Parse)
            });
            let used_len = match parsed {
                Ok(mut pkt) => {
                    let cap = pkt
                        .data_slice()
                        .map(|s| s.len())
                        .unwrap_or(0)
                        .min(self.scratch.len());
                    let Some(hdr) = self.muxer.recv_pkt(&mut self.scratch[..cap]) else {
                        // Nothing to deliver after all: give the buffer back.
                        queue.go_to_previous_position();
                        break;
                    };
                    let n = (hdr.len as usize).min(cap);
                    if let Some(slice) = pkt.data_slice() {
                        slice.copy_from(&self.scratch[..n]);
                    }
                    pkt.set_src_cid(hdr.src_cid)
                        .set_dst_cid(hdr.dst_cid)
                        .set_src_port(hdr.src_port)
                        .set_dst_port(hdr.dst_port)
                        .set_len(n as u32)
                        .set_type(hdr.type_)
                        .set_op(hdr.op)
                        .set_flags(hdr.flags)
                        .set_buf_alloc(hdr.buf_alloc)
                        .set_fwd_cnt(hdr.fwd_cnt);
                    self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                    (PKT_HEADER_SIZE + n) as u32
                }
                Err(e) => {
                    self.stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("vsock: dropping RX chain {head}: {e}");
                    0
                }
            };
            queue.add_used(mem.as_ref(), head, used_len)?;
            used_any = true;
        }
        if used_any && queue.needs_notification(mem.as_ref())? {
            active.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        _acked_features: u64,
    ) -> Result<(), DeviceFault> {
        if queues.len() != QUEUE_SIZES.len()
            || !queues[RX_QUEUE].ready()
            || !queues[TX_QUEUE].ready()
        {
            return Err(DeviceFault("the RX and TX queues must be set up".into()));
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => {
                self.process_tx()?;
                self.process_rx()
            }
            EVENT_QUEUE => self.process_events(),
            _ => Ok(()),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn backend_ready(&mut self) -> Result<(), DeviceFault> {
        self.muxer.process_events();
        self.process_rx()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        // A reset driver has no connections left to be told about.
        self.transport_reset_pending = false;
    }

    fn save_state(&self) -> Option<DeviceSnapshot> {
        Some(DeviceSnapshot::Vsock(VsockState {
            guest_cid: self.guest_cid,
            transport_reset_pending: self.transport_reset_pending,
        }))
    }

    fn running_queues(&self) -> Vec<Option<QueueState>> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, |a| all_queue_states(&a.queues))
    }

    /// The connections of the snapshot's VMM are gone: the guest is told so once the device
    /// runs again. The CID stays the configured one (the driver reads it on the reset).
    fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), String> {
        match state {
            DeviceSnapshot::Vsock(_) => {
                self.transport_reset_pending = true;
                Ok(())
            }
            other => Err(format!(
                "a virtio-vsock device cannot take the state of device type {}",
                other.device_type()
            )),
        }
    }
}
