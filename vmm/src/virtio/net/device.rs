//! The virtio-net device (id 1): an RX and a TX queue, a configuration space of MAC, link
//! status and MTU, and the frame path between the queues and passt ([`super::passt_stream`]).
//!
//! TX: each chain's frame goes out length-prefixed, whole and in order. When passt's socket is
//! full, the frame on its way stays in the device ([`super::tx::OutFrame`], the only copy kept)
//! and its chain is not returned; the chains behind it stay in the guest's ring, so the guest
//! runs out of TX buffers and stops (backpressure), and the device resumes when the socket is
//! writable. A bad chain or a frame length outside `ETH_HLEN..=MAX_FRAME_LEN` is returned
//! unused and counted; nothing is sent for it.
//!
//! RX: the device reads from passt only while the guest has an RX buffer available, into one
//! fixed reassembly buffer ([`super::passt_stream::FrameDecoder`]); with no buffer it stops
//! watching the socket, so passt's writes block (backpressure), and it resumes on the guest's
//! RX notification. A frame that does not fit the guest's buffer is dropped (counted) and the
//! buffer kept for the next one; a bad chain is returned unused (counted) and the frame goes to
//! the next.
//!
//! The socket is watched through the device's own epoll set (the event loop watches only that),
//! for reading while the guest has RX buffers and for writing while a frame is on its way;
//! never otherwise, so a socket the device is not serving cannot keep the event loop busy. An
//! eventfd in the same set brings the device back when one call stopped at its budget (one
//! queue's worth of frames each way) with work left, so that the other devices on the VMM
//! thread get their turn.
//!
//! passt's end going away (end of stream, a socket error, or a frame length passt never sends)
//! takes the link down for good: the socket is closed, the status loses LINK_UP and the driver
//! gets a configuration change interrupt, TX chains are returned unsent (counted), nothing more
//! is received. The VM runs on.
//!
//! A driver reset (on a vCPU thread: only `epoll_ctl`) drops the queues; what was read from
//! passt stays for the next activation, and a frame partly sent still goes out in full (its
//! chain forgotten), so the stream stays framed across resets.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::passt_stream::{Fill, FrameDecoder, PasstStream, ETH_HLEN, MAX_FRAME_LEN};
use super::rx::{validate_rx_chain, write_rx_frame};
use super::tx::{read_tx_chain, OutFrame};
use super::NetError;
use crate::config::NetConfig;
use crate::memory::GuestMemory;
use crate::virtio::device::{read_config_bytes, DeviceFault, VirtioDevice};
use crate::virtio::interrupt::InterruptLine;

/// RX queue index.
pub const RX_QUEUE: usize = 0;
/// TX queue index.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// The MTU announced when the caller does not choose: Ethernet's, which Linux's small RX
/// buffers (1518 bytes of frame) hold without mergeable buffers.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU accepted: an Ethernet header and this must fit passt's largest frame.
pub const MAX_MTU: u16 = (MAX_FRAME_LEN - ETH_HLEN) as u16;

/// Configuration space: `mac`, `status`, `max_virtqueue_pairs`, `mtu`.
const CONFIG_MAC: usize = 0;
const CONFIG_STATUS: usize = 6;
const CONFIG_MAX_VQ_PAIRS: usize = 8;
const CONFIG_MTU: usize = 10;
const CONFIG_SIZE: usize = 12;

/// Epoll data of the socket and of the "more work" eventfd in the device's set.
pub(super) const TAG_STREAM: u64 = 0;
pub(super) const TAG_MORE: u64 = 1;

/// The device's state: what the driver acked, the link, and counters. A plain value to copy
/// out, and later to save and restore with a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// Features the driver acked at the last activation (0 while not active).
    pub acked_features: u64,
    /// Whether passt's end is there (LINK_UP in the status).
    pub link_up: bool,
    /// Why the link went down, once it did.
    pub link_down_reason: Option<String>,
    /// Frames sent to passt, and their bytes (without prefix or header).
    pub tx_frames: u64,
    /// Bytes of [`Self::tx_frames`].
    pub tx_bytes: u64,
    /// TX chains refused: an invalid chain, one shorter than the header, or a frame shorter
    /// than an Ethernet header or longer than passt takes. Returned unused; nothing sent.
    pub tx_malformed: u64,
    /// Well-formed frames not sent: the link was down, or a reset forgot the frame before any
    /// of it went out.
    pub tx_dropped: u64,
    /// Frames delivered to the guest, and their bytes.
    pub rx_frames: u64,
    /// Bytes of [`Self::rx_frames`].
    pub rx_bytes: u64,
    /// RX chains refused (invalid, or with device-readable buffers), returned unused.
    pub rx_malformed: u64,
    /// Frames from passt not delivered: too long for the guest's buffer, or shorter than an
    /// Ethernet header.
    pub rx_dropped: u64,
}

struct Active {
    mem: Arc<GuestMemory>,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<InterruptLine>,
}

/// The in-flight TX frame's chain: `None` once a reset forgot it.
struct InFlight {
    head: Option<u16>,
}

/// The virtio-net device.
pub struct NetDevice {
    mac: [u8; 6],
    mtu: u16,
    /// `None` once the link is down.
    stream: Option<PasstStream>,
    epoll: Epoll,
    /// What the epoll set watches on the socket (empty: the socket is not in the set).
    watched: EventSet,
    /// Written when a call stopped at its budget with work left.
    more: EventFd,
    more_work: bool,
    active: Option<Active>,
    state: NetState,
    shared: Arc<Mutex<NetState>>,
    decoder: FrameDecoder,
    out: OutFrame,
    in_flight: Option<InFlight>,
}

fn setup_err(e: std::io::Error) -> NetError {
    NetError::Setup(e)
}

impl NetDevice {
    /// A device on `config`'s stream. Creates the device's epoll set and eventfd, so create it
    /// before the VMM thread's seccomp filter.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let mac = config.mac;
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return Err(NetError::Config(format!(
                "MAC {} is not a unicast address",
                format_mac(&mac)
            )));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(NetError::Config(format!(
                "MTU {} is outside {MIN_MTU}..={MAX_MTU}",
                config.mtu
            )));
        }
        let stream = PasstStream::new(config.stream.clone())?;
        let epoll = Epoll::new().map_err(setup_err)?;
        let more = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(setup_err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                more.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TAG_MORE),
            )
            .map_err(setup_err)?;
        let state = NetState {
            link_up: true,
            ..NetState::default()
        };
        Ok(Self {
            mac,
            mtu: config.mtu,
            stream: Some(stream),
            epoll,
            watched: EventSet::empty(),
            more,
            more_work: false,
            active: None,
            shared: Arc::new(Mutex::new(state.clone())),
            state,
            decoder: FrameDecoder::new(),
            out: OutFrame::new(),
            in_flight: None,
        })
    }

    /// The device's state.
    pub fn state(&self) -> &NetState {
        &self.state
    }

    /// A copy of the state, updated after every event, for the VM handle.
    pub fn shared_state(&self) -> Arc<Mutex<NetState>> {
        self.shared.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[CONFIG_MAC..CONFIG_STATUS].copy_from_slice(&self.mac);
        let status = if self.stream.is_some() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[CONFIG_STATUS..CONFIG_MAX_VQ_PAIRS].copy_from_slice(&status.to_le_bytes());
        c[CONFIG_MAX_VQ_PAIRS..CONFIG_MTU].copy_from_slice(&1u16.to_le_bytes());
        c[CONFIG_MTU..].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Runs `work`, then watches the socket for what the device now waits for (nothing after a
    /// fault: the transport stops calling the device until the driver resets it), wakes
    /// itself if the work stopped at its budget, and publishes the state.
    fn run(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<(), DeviceFault>,
    ) -> Result<(), DeviceFault> {
        self.more_work = false;
        let result = work(self);
        match result {
            Ok(()) => {
                let wanted = self.wanted_events();
                self.watch(wanted);
                if self.more_work {
                    if let Err(e) = self.more.write(1) {
                        tracing::warn!("virtio-net: cannot wake the device for more work: {e}");
                    }
                }
            }
            Err(_) => self.watch(EventSet::empty()),
        }
        self.publish();
        result
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if *shared != self.state {
            *shared = self.state.clone();
        }
    }

    /// Readable while the guest has an RX buffer; writable while a frame is on its way.
    fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.stream.is_none() {
            return set;
        }
        if self.in_flight.is_some() {
            set |= EventSet::OUT;
        }
        if let Some(a) = &self.active {
            if rx_buffer_available(&a.rx, &a.mem).unwrap_or(false) {
                set |= EventSet::IN;
            }
        }
        set
    }

    /// Makes the epoll set watch `wanted` on the socket (and nothing when it is empty). A set
    /// that cannot watch the socket would stall the network silently, so that takes the link
    /// down.
    fn watch(&mut self, wanted: EventSet) {
        let Some(stream) = &self.stream else {
            return;
        };
        if wanted == self.watched {
            return;
        }
        let fd = stream.as_raw_fd();
        let (op, event) = match (self.watched.is_empty(), wanted.is_empty()) {
            (_, true) => (ControlOperation::Delete, EpollEvent::default()),
            (true, false) => (ControlOperation::Add, EpollEvent::new(wanted, TAG_STREAM)),
            (false, false) => (
                ControlOperation::Modify,
                EpollEvent::new(wanted, TAG_STREAM),
            ),
        };
        match self.epoll.ctl(op, fd, event) {
            Ok(()) => self.watched = wanted,
            Err(e) => self.link_down(format!("cannot watch the stream to passt: {e}")),
        }
    }

    /// Takes the link down for good: out of the epoll set, the socket closed (this device's
    /// reference), the buffered bytes dropped, LINK_UP cleared and the driver told.
    fn link_down(&mut self, reason: String) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if !self.watched.is_empty() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.watched = EventSet::empty();
        }
        drop(stream);
        self.decoder.clear();
        tracing::warn!("virtio-net: link down: {reason}; the VM runs on without network");
        self.state.link_up = false;
        self.state.link_down_reason = Some(reason);
        if let Some(a) = &self.active {
            if self.state.acked_features & (1 << VIRTIO_NET_F_STATUS) != 0 {
                a.interrupt.signal_config_change();
            }
        }
    }

    /// Delivers frames from passt into the guest's RX buffers while both have some.
    fn process_rx(&mut self) -> Result<(), DeviceFault> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = active.mem.clone();
        let budget = usize::from(active.rx.size()).max(1);
        let mut handled = 0;
        let mut used_any = false;
        let mut down = None;
        while let Some(stream) = &self.stream {
            if handled >= budget {
                self.more_work = true;
                break;
            }
            let frame = match self.decoder.peek_frame() {
                Ok(f) => f,
                Err(e) => {
                    down = Some(e.to_string());
                    break;
                }
            };
            if let Some(frame) = frame {
                handled += 1;
                if frame.len() < ETH_HLEN {
                    self.state.rx_dropped += 1;
                    self.decoder.consume_frame();
                    continue;
                }
                let Some(chain) = active.rx.iter(mem.as_ref())?.next() else {
                    // No buffer: the frame waits, and nothing more is read.
                    break;
                };
                let head = chain.head_index();
                let written = validate_rx_chain(chain, &mem)
                    .and_then(|valid| write_rx_frame(&valid, &mem, frame));
                match written {
                    Ok(len) => {
                        self.state.rx_frames += 1;
                        self.state.rx_bytes += frame.len() as u64;
                        active.rx.add_used(mem.as_ref(), head, len)?;
                        used_any = true;
                    }
                    Err(NetError::RxBufferTooSmall { need, room }) => {
                        // The frame is dropped; the buffer stays for the next one.
                        tracing::debug!(
                            "virtio-net: dropping a {need}-byte frame for a {room}-byte RX buffer"
                        );
                        self.state.rx_dropped += 1;
                        active.rx.go_to_previous_position();
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net: refusing RX chain {head}: {e}");
                        self.state.rx_malformed += 1;
                        active.rx.add_used(mem.as_ref(), head, 0)?;
                        used_any = true;
                        // The frame goes to the next chain.
                        continue;
                    }
                }
                self.decoder.consume_frame();
                continue;
            }
            // More bytes are needed; read them only for a guest that has a buffer for them.
            if !rx_buffer_available(&active.rx, &mem)? {
                break;
            }
            match self.decoder.fill(|buf| stream.recv(buf)) {
                Ok(Fill::Read(_)) => {}
                Ok(Fill::Full) => break,
                Ok(Fill::Eof) => {
                    down = Some("passt closed the stream".to_string());
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    down = Some(format!("reading from passt: {e}"));
                    break;
                }
            }
        }
        if used_any && active.rx.needs_notification(mem.as_ref())? {
            active.interrupt.signal_used_queue();
        }
        if let Some(reason) = down {
            self.link_down(reason);
        }
        Ok(())
    }

    /// Sends the frame on its way, then the guest's TX chains, in order, until the socket is
    /// full or the guest has none left.
    fn process_tx(&mut self) -> Result<(), DeviceFault> {
        let budget = self
            .active
            .as_ref()
            .map_or(0, |a| usize::from(a.tx.size()).max(1));
        let mut taken = 0;
        let mut used_any = false;
        loop {
            if self.in_flight.is_some() {
                let flushed = match &self.stream {
                    Some(stream) => self.out.flush(stream),
                    None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
                };
                match flushed {
                    Ok(false) => break,
                    Ok(true) => {
                        self.state.tx_frames += 1;
                        self.state.tx_bytes += self.out.frame_len() as u64;
                    }
                    Err(e) => {
                        self.state.tx_dropped += 1;
                        if self.stream.is_some() {
                            self.link_down(format!("sending to passt: {e}"));
                        }
                    }
                }
                let done = self.in_flight.take().and_then(|f| f.head);
                if let (Some(head), Some(a)) = (done, self.active.as_mut()) {
                    a.tx.add_used(a.mem.as_ref(), head, 0)?;
                    used_any = true;
                }
            }
            let Some(a) = self.active.as_mut() else {
                break;
            };
            if taken >= budget {
                self.more_work = true;
                break;
            }
            let mem = a.mem.clone();
            let Some(chain) = a.tx.iter(mem.as_ref())?.next() else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            match read_tx_chain(chain, &mem, self.out.load()) {
                Ok(_) if self.stream.is_some() => {
                    self.in_flight = Some(InFlight { head: Some(head) });
                }
                Ok(_) => {
                    self.state.tx_dropped += 1;
                    a.tx.add_used(mem.as_ref(), head, 0)?;
                    used_any = true;
                }
                Err(e) => {
                    tracing::debug!("virtio-net: refusing TX chain {head}: {e}");
                    self.state.tx_malformed += 1;
                    a.tx.add_used(mem.as_ref(), head, 0)?;
                    used_any = true;
                }
            }
        }
        if used_any {
            if let Some(a) = self.active.as_mut() {
                if a.tx.needs_notification(a.mem.as_ref())? {
                    a.interrupt.signal_used_queue();
                }
            }
        }
        Ok(())
    }

    /// Both directions: RX first (a link it takes down lets TX return its chains at once).
    fn process(&mut self) -> Result<(), DeviceFault> {
        self.process_rx()?;
        self.process_tx()
    }

    /// What the device's epoll set reports now (tags `TAG_STREAM`, `TAG_MORE`).
    #[cfg(test)]
    pub(super) fn ready_tags(&self) -> Vec<u64> {
        let mut events = vec![EpollEvent::default(); 4];
        let n = self.epoll.wait(0, &mut events).unwrap();
        events[..n].iter().map(EpollEvent::data).collect()
    }

    /// What the socket is watched for.
    #[cfg(test)]
    pub(super) fn watched(&self) -> EventSet {
        self.watched
    }

    /// Whether a frame is on its way to passt, and the bytes its buffer holds.
    #[cfg(test)]
    pub(super) fn tx_in_flight(&self) -> (bool, usize) {
        (self.in_flight.is_some(), self.out.capacity())
    }

    /// Bytes read from passt and not yet delivered.
    #[cfg(test)]
    pub(super) fn rx_buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

/// Whether the guest made an RX chain available that the device has not taken yet.
fn rx_buffer_available(queue: &Queue, mem: &GuestMemory) -> Result<bool, DeviceFault> {
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    Ok(avail != Wrapping(queue.next_avail()))
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// Nothing is writable (the MAC is the host's under VERSION_1).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        acked_features: u64,
    ) -> Result<(), DeviceFault> {
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (
            queues.next().filter(QueueT::ready),
            queues.next().filter(QueueT::ready),
        ) else {
            return Err(DeviceFault("the RX and TX queues must be set up".into()));
        };
        self.state.acked_features = acked_features;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        self.publish();
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
        match index {
            RX_QUEUE | TX_QUEUE => self.run(Self::process),
            _ => Ok(()),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn backend_ready(&mut self) -> Result<(), DeviceFault> {
        let _ = self.more.read();
        self.run(Self::process)
    }

    /// Drops the queues and what the driver acked. Bytes read from passt stay for the next
    /// activation; a frame partly sent still goes out (its chain forgotten), one not started is
    /// dropped. Runs on a vCPU thread: the only system call is `epoll_ctl`.
    fn reset(&mut self) {
        self.active = None;
        self.state.acked_features = 0;
        if let Some(f) = self.in_flight.as_mut() {
            f.head = None;
            if !self.out.started() {
                self.in_flight = None;
                self.state.tx_dropped += 1;
            }
        }
        let wanted = self.wanted_events();
        self.watch(wanted);
        self.publish();
    }
}
