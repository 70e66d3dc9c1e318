//! The device driven through real queues in guest memory, with one end of a socketpair standing
//! in for passt (and, where `passt` is installed, passt itself).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{NetDevice, QUEUE_SIZE, RX_QUEUE, TAG_MORE, TAG_STREAM, TX_QUEUE};
use super::passt_stream::{LEN_PREFIX, MAX_FRAME_LEN};
use super::rx::RX_HEADER;
use super::{NetError, VNET_HDR_LEN};
use crate::config::NetConfig;
use crate::devices::irq_trigger::IrqTrigger;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::virtio::device::VirtioDevice;
use crate::virtio::interrupt::{InterruptLine, INT_CONFIG_CHANGE, INT_USED_RING};
use vmm_sys_util::epoll::EventSet;

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Queue size the rig's driver sets.
const SIZE: u16 = 64;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MTU);
/// Where the tests put frame buffers: well above the rings.
const DATA: u64 = 2 * MIB;

/// Descriptor table, available ring and used ring of queue `q`.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 * (q as u64 + 1);
    (base, base + 0x4000, base + 0x8000)
}

/// A frame of `len` bytes whose content depends on `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn prefixed(f: &[u8]) -> Vec<u8> {
    let mut w = (f.len() as u32).to_be_bytes().to_vec();
    w.extend_from_slice(f);
    w
}

struct Rig {
    mem: Arc<GuestMemory>,
    dev: NetDevice,
    /// passt's end.
    peer: UnixStream,
    /// The device's end (only the device holds it: valid while the link is up).
    ours: RawFd,
    interrupt: Arc<InterruptLine>,
    avail: [u16; 2],
    used_seen: [u16; 2],
    next_desc: [u16; 2],
    /// Bytes the peer read and has not parsed into frames yet.
    wire: Vec<u8>,
}

impl Rig {
    fn new() -> Self {
        Self::with(FEATURES, None)
    }

    /// A device on a fresh socketpair, activated with `features`; `sndbuf` shrinks the
    /// device's send buffer (to make passt's socket fill up quickly).
    fn with(features: u64, sndbuf: Option<usize>) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        if let Some(size) = sndbuf {
            nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SndBuf, &size).unwrap();
        }
        peer.set_nonblocking(true).unwrap();
        let raw = ours.as_raw_fd();
        let config = NetConfig {
            stream: Arc::new(OwnedFd::from(ours)),
            mac: MAC,
            mtu: 1500,
        };
        let dev = NetDevice::new(&config).unwrap();
        drop(config);
        let mem = Arc::new(create_guest_memory(RAM / MIB).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut rig = Self {
            mem,
            dev,
            peer,
            ours: raw,
            interrupt,
            avail: [0; 2],
            used_seen: [0; 2],
            next_desc: [0; 2],
            wire: Vec::new(),
        };
        rig.activate(features);
        rig
    }

    /// Activates the device with fresh queues (after a reset).
    fn activate(&mut self, features: u64) {
        let queues = (0..2)
            .map(|i| {
                let (desc, avail, used) = rings(i);
                self.mem
                    .write_slice(&[0u8; 0xc000], GuestAddress(desc))
                    .unwrap();
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_size(SIZE);
                q.set_desc_table_address(Some(desc as u32), Some(0));
                q.set_avail_ring_address(Some(avail as u32), Some(0));
                q.set_used_ring_address(Some(used as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        self.avail = [0; 2];
        self.used_seen = [0; 2];
        self.next_desc = [0; 2];
        self.dev
            .activate(self.mem.clone(), queues, self.interrupt.clone(), features)
            .unwrap();
    }

    /// Writes descriptors (addr, len, flags, next as an index into `descs`) at the next free
    /// table slots and makes the first one's chain available (no notification). Returns the
    /// head index.
    fn post_raw(&mut self, q: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let m = self.mem.as_ref();
        let (table, avail, _) = rings(q);
        let base = self.next_desc[q];
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = table + 16 * u64::from((base + i as u16) % SIZE);
            m.write_obj(addr, GuestAddress(d)).unwrap();
            m.write_obj(len, GuestAddress(d + 8)).unwrap();
            m.write_obj(flags, GuestAddress(d + 12)).unwrap();
            m.write_obj((base + next) % SIZE, GuestAddress(d + 14))
                .unwrap();
        }
        self.next_desc[q] = (base + descs.len() as u16) % SIZE;
        let slot = u64::from(self.avail[q] % SIZE);
        m.write_obj(base, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        m.write_obj(self.avail[q], GuestAddress(avail + 2)).unwrap();
        base
    }

    /// Posts descriptors (addr, len, flags) chained in order.
    fn post(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len();
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let f = if i + 1 < n { f | NEXT } else { f };
                (a, l, f, i as u16 + 1)
            })
            .collect();
        self.post_raw(q, &raw)
    }

    /// Puts header + frame at `addr` and posts it as a one-descriptor TX chain.
    fn post_tx(&mut self, addr: u64, f: &[u8]) -> u16 {
        self.mem
            .write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(f, GuestAddress(addr + VNET_HDR_LEN as u64))
            .unwrap();
        self.post(TX_QUEUE, &[(addr, (VNET_HDR_LEN + f.len()) as u32, 0)])
    }

    fn kick(&mut self, q: usize) {
        self.dev.queue_notified(q).unwrap();
    }

    fn backend(&mut self) {
        self.dev.backend_ready().unwrap();
    }

    /// New used entries of queue `q`: (head, len).
    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let m = self.mem.as_ref();
        let (_, _, used) = rings(q);
        let idx: u16 = m.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = used + 4 + 8 * u64::from(self.used_seen[q] % SIZE);
            out.push((
                m.read_obj(GuestAddress(e)).unwrap(),
                m.read_obj(GuestAddress(e + 4)).unwrap(),
            ));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Reads what the peer can now; returns the complete frames.
    fn peer_frames(&mut self) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.wire.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("peer read: {e}"),
            }
        }
        let mut frames = Vec::new();
        while self.wire.len() >= LEN_PREFIX {
            let len = u32::from_be_bytes(self.wire[..4].try_into().unwrap()) as usize;
            if self.wire.len() < LEN_PREFIX + len {
                break;
            }
            frames.push(self.wire[LEN_PREFIX..LEN_PREFIX + len].to_vec());
            self.wire.drain(..LEN_PREFIX + len);
        }
        frames
    }

    fn peer_send(&mut self, bytes: &[u8]) {
        self.peer.set_nonblocking(false).unwrap();
        self.peer.write_all(bytes).unwrap();
        self.peer.set_nonblocking(true).unwrap();
    }

    /// Bytes waiting in the device's socket, not read by it.
    fn unread_by_device(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on an fd the device holds open (the link is up) writes one c_int
        // through a valid pointer.
        let rc = unsafe { libc::ioctl(self.ours, libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        self.dev.read_config(0, &mut c);
        c
    }

    /// Runs the device's backend whenever its epoll set is ready, reading the peer side, until
    /// `want` frames arrived (or a deadline passes); returns them.
    fn pump_tx(&mut self, want: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "only {} of {want} frames",
                got.len()
            );
            got.extend(self.peer_frames());
            if !self.dev.ready_tags().is_empty() {
                self.backend();
            }
        }
        got
    }
}

#[test]
fn identity_features_and_config_space() {
    let rig = Rig::new();
    assert_eq!(rig.dev.device_type(), 1);
    assert_eq!(rig.dev.features(), FEATURES);
    assert_eq!(rig.dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    assert!(rig.dev.backend_fd().is_some());
    let c = rig.config();
    assert_eq!(c[..6], MAC);
    assert_eq!(c[6..8], [1, 0], "LINK_UP");
    assert_eq!(c[8..10], [1, 0], "max_virtqueue_pairs");
    assert_eq!(c[10..12], 1500u16.to_le_bytes(), "mtu");
    let mut past = [0xffu8; 4];
    rig.dev.read_config(12, &mut past);
    assert_eq!(past, [0; 4]);
    rig.dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    assert!(rig.dev.state().link_up);
    assert_eq!(rig.dev.state().acked_features, FEATURES);
}

#[test]
fn unusable_configurations_are_refused() {
    let config = |mac: [u8; 6], mtu: u16| {
        let (a, _b) = UnixStream::pair().unwrap();
        NetConfig {
            stream: Arc::new(OwnedFd::from(a)),
            mac,
            mtu,
        }
    };
    for (mac, mtu) in [
        ([0; 6], 1500),
        ([0x01, 0, 0x5e, 0, 0, 1], 1500),
        (MAC, 67),
        (MAC, 65_522),
    ] {
        assert!(
            matches!(NetDevice::new(&config(mac, mtu)), Err(NetError::Config(_))),
            "{mac:?} {mtu}"
        );
    }
    assert!(NetDevice::new(&config(MAC, 68)).is_ok());
    assert!(NetDevice::new(&config(MAC, 65_521)).is_ok());
    let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let dgram = NetConfig {
        stream: Arc::new(OwnedFd::from(d)),
        mac: MAC,
        mtu: 1500,
    };
    assert!(matches!(NetDevice::new(&dgram), Err(NetError::Config(_))));
}

#[test]
fn a_tx_frame_arrives_length_prefixed_and_byte_identical() {
    let mut rig = Rig::new();
    let f = frame(60, 1);
    // The header split over two descriptors, the frame over two more.
    rig.mem
        .write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    rig.mem
        .write_slice(&f[..20], GuestAddress(DATA + 0x1000 + 4))
        .unwrap();
    rig.mem
        .write_slice(&[0xee; 4], GuestAddress(DATA + 0x1000))
        .unwrap();
    rig.mem
        .write_slice(&f[20..], GuestAddress(DATA + 0x2000))
        .unwrap();
    // 8 bytes of header, then 4 more and 20 of the frame, then its other 40.
    let head = rig.post(
        TX_QUEUE,
        &[(DATA, 8, 0), (DATA + 0x1000, 24, 0), (DATA + 0x2000, 40, 0)],
    );
    rig.kick(TX_QUEUE);
    assert_eq!(rig.used(TX_QUEUE), vec![(u32::from(head), 0)]);
    assert_ne!(rig.interrupt.status() & INT_USED_RING, 0);
    let mut wire = vec![0u8; LEN_PREFIX + 60];
    rig.peer.set_nonblocking(false).unwrap();
    rig.peer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    rig.peer.read_exact(&mut wire).unwrap();
    assert_eq!(wire[..4], [0, 0, 0, 60]);
    assert_eq!(wire[4..], f[..]);
    // The smallest and the largest frame.
    let small = frame(14, 2);
    let large = frame(MAX_FRAME_LEN, 3);
    rig.post_tx(DATA, &small);
    rig.post_tx(DATA + 0x10_0000, &large);
    rig.kick(TX_QUEUE);
    rig.peer.set_nonblocking(true).unwrap();
    assert_eq!(rig.pump_tx(2), vec![small, large]);
    let s = rig.dev.state();
    assert_eq!(
        (s.tx_frames, s.tx_bytes),
        (3, 60 + 14 + MAX_FRAME_LEN as u64)
    );
    assert_eq!(rig.used(TX_QUEUE).len(), 2);
}

#[test]
fn an_rx_frame_arrives_in_a_chain_after_a_zeroed_header() {
    let mut rig = Rig::new();
    // Linux's layout: the header in its own buffer, then the frame's.
    let head = rig.post(
        RX_QUEUE,
        &[
            (DATA, VNET_HDR_LEN as u32, WRITE),
            (DATA + 0x1000, 1518, WRITE),
        ],
    );
    rig.mem
        .write_slice(&[0xaa; 0x2000], GuestAddress(DATA))
        .unwrap();
    rig.kick(RX_QUEUE);
    assert_eq!(
        rig.dev.watched(),
        EventSet::IN,
        "a buffer: the socket is read"
    );
    let f = frame(1514, 7);
    let wire = prefixed(&f);
    // The prefix in two parts, then the rest.
    rig.peer_send(&wire[..2]);
    assert_eq!(rig.dev.ready_tags(), vec![TAG_STREAM]);
    rig.backend();
    assert!(rig.used(RX_QUEUE).is_empty());
    rig.peer_send(&wire[2..]);
    rig.backend();
    assert_eq!(
        rig.used(RX_QUEUE),
        vec![(u32::from(head), (VNET_HDR_LEN + f.len()) as u32)]
    );
    assert_eq!(rig.read(DATA, VNET_HDR_LEN), RX_HEADER);
    assert_eq!(rig.read(DATA, 10), [0; 10], "zeroed but num_buffers");
    assert_eq!(
        rig.read(DATA + 10, 2),
        [1, 0],
        "num_buffers 1, little endian"
    );
    assert_eq!(rig.read(DATA + 0x1000, f.len()), f);
    assert_eq!(rig.read(DATA + 0x1000 + f.len() as u64, 4), [0xaa; 4]);
    assert_ne!(rig.interrupt.status() & INT_USED_RING, 0);
    let s = rig.dev.state();
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 1514));
    // No buffer left: the socket is no longer watched.
    assert_eq!(rig.dev.watched(), EventSet::empty());
    // Header and frame in one buffer, the header split from the frame mid-way too.
    let head = rig.post(
        RX_QUEUE,
        &[(DATA + 0x4000, 5, WRITE), (DATA + 0x5000, 100, WRITE)],
    );
    let f = frame(60, 9);
    rig.peer_send(&prefixed(&f));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(head), 72)]);
    let mut got = rig.read(DATA + 0x4000, 5);
    got.extend(rig.read(DATA + 0x5000, 67));
    assert_eq!(got[..VNET_HDR_LEN], RX_HEADER);
    assert_eq!(got[VNET_HDR_LEN..], f[..]);
}

#[test]
fn without_rx_buffers_nothing_is_read_and_nothing_is_lost() {
    let mut rig = Rig::new();
    let frames: Vec<Vec<u8>> = (0..100).map(|i| frame(1000 + i * 5, i as u8)).collect();
    let total: usize = frames.iter().map(|f| LEN_PREFIX + f.len()).sum();
    let wire: Vec<u8> = frames.iter().flat_map(|f| prefixed(f)).collect();
    // passt writes from its own thread, through a small send buffer.
    let mut writer = rig.peer.try_clone().unwrap();
    nix::sys::socket::setsockopt(&writer, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
    writer.set_nonblocking(false).unwrap();
    let writer = std::thread::spawn(move || writer.write_all(&wire).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    rig.kick(RX_QUEUE);
    rig.backend(); // even a spurious wake-up reads nothing
    assert_eq!(rig.dev.rx_buffered(), 0);
    assert_eq!(rig.dev.watched(), EventSet::empty());
    assert!(rig.dev.ready_tags().is_empty(), "nothing to spin on");
    assert!(rig.unread_by_device() > 0);
    assert!(!writer.is_finished(), "passt is held back");
    // Buffers come, a few at a time; every frame arrives once, in order.
    let mut addr_of = std::collections::HashMap::new();
    let mut posted = 0u64;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < frames.len() {
        assert!(Instant::now() < deadline, "{} frames", got.len());
        let outstanding = rig.avail[RX_QUEUE].wrapping_sub(rig.used_seen[RX_QUEUE]);
        for _ in outstanding..7 {
            let addr = DATA + (posted % 256) * 0x1000;
            posted += 1;
            addr_of.insert(rig.post(RX_QUEUE, &[(addr, 2048, WRITE)]), addr);
        }
        rig.kick(RX_QUEUE);
        if rig.dev.ready_tags().is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        } else {
            rig.backend();
        }
        // What is read is bounded by the reassembly buffer.
        assert!(rig.dev.rx_buffered() <= LEN_PREFIX + MAX_FRAME_LEN);
        for (head, len) in rig.used(RX_QUEUE) {
            let data = rig.read(addr_of[&(head as u16)], len as usize);
            assert_eq!(data[..VNET_HDR_LEN], RX_HEADER);
            got.push(data[VNET_HDR_LEN..].to_vec());
        }
    }
    writer.join().unwrap();
    assert_eq!(got, frames);
    let s = rig.dev.state();
    assert_eq!((s.rx_frames, s.rx_dropped, s.rx_malformed), (100, 0, 0));
    assert_eq!(s.rx_bytes as usize, total - 100 * LEN_PREFIX);
}

#[test]
fn a_peer_not_reading_keeps_tx_chains_pending_and_loses_none() {
    let mut rig = Rig::with(FEATURES, Some(4096));
    let frames: Vec<Vec<u8>> = (0..40).map(|i| frame(1500, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        rig.post_tx(DATA + i as u64 * 0x1000, f);
    }
    rig.kick(TX_QUEUE);
    let used = rig.used(TX_QUEUE).len();
    assert!(used < 40, "the socket took everything ({used})");
    let (in_flight, held) = rig.dev.tx_in_flight();
    assert!(in_flight);
    assert!(held <= LEN_PREFIX + MAX_FRAME_LEN, "{held}");
    assert_eq!(rig.dev.watched(), EventSet::OUT);
    // More kicks while blocked change nothing.
    rig.kick(TX_QUEUE);
    rig.backend();
    assert!(rig.used(TX_QUEUE).is_empty());
    let got = rig.pump_tx(40);
    assert_eq!(got, frames);
    assert_eq!(rig.used(TX_QUEUE).len(), 40 - used);
    assert_eq!(rig.dev.state().tx_frames, 40);
    assert!(!rig.dev.tx_in_flight().0);
    assert_eq!(rig.dev.watched(), EventSet::empty());
    assert!(rig.dev.ready_tags().is_empty());
}

#[test]
fn a_partly_sent_frame_goes_out_whole_across_a_reset() {
    let mut rig = Rig::with(FEATURES, Some(4096));
    let big = frame(MAX_FRAME_LEN, 5);
    rig.post_tx(DATA, &big);
    rig.kick(TX_QUEUE);
    assert!(rig.used(TX_QUEUE).is_empty());
    assert!(rig.dev.tx_in_flight().0);
    rig.dev.reset();
    assert_eq!(rig.dev.state().acked_features, 0);
    assert_eq!(rig.dev.watched(), EventSet::OUT, "the rest still goes out");
    assert_eq!(rig.pump_tx(1), vec![big]);
    rig.activate(FEATURES);
    let f = frame(100, 6);
    rig.post_tx(DATA, &f);
    rig.kick(TX_QUEUE);
    assert_eq!(rig.pump_tx(1), vec![f]);
    assert_eq!(rig.used(TX_QUEUE).len(), 1);
    assert_eq!(rig.dev.state().tx_frames, 2);
}

#[test]
fn hostile_tx_chains_are_returned_unsent_and_counted() {
    let mut rig = Rig::new();
    rig.mem
        .write_slice(&frame(0x3000, 1), GuestAddress(DATA))
        .unwrap();
    let chains: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        // Shorter than the header; only the header; a frame shorter than an Ethernet header.
        vec![(DATA, 8, 0, 0)],
        vec![(DATA, VNET_HDR_LEN as u32, 0, 0)],
        vec![(DATA, VNET_HDR_LEN as u32 + 13, 0, 0)],
        // One byte over the largest frame, over two descriptors; a 1 MiB buffer.
        vec![
            (DATA, VNET_HDR_LEN as u32, NEXT, 1),
            (DATA + 0x10_0000, MAX_FRAME_LEN as u32 + 1, 0, 0),
        ],
        vec![(DATA, MIB as u32, 0, 0)],
        // A device-writable buffer; a loop; a buffer outside RAM; an empty buffer.
        vec![(DATA, 100, WRITE, 0)],
        vec![(DATA, 100, NEXT, 1), (DATA, 100, NEXT, 0)],
        vec![(RAM - 50, 100, 0, 0)],
        vec![(DATA, 0, 0, 0)],
        // A chain through every descriptor of the table back to its start.
        (0..SIZE).map(|i| (DATA, 100, NEXT, i + 1)).collect(),
    ];
    let n = chains.len();
    for c in &chains {
        // One at a time: the last chain takes every slot of the descriptor table.
        let head = rig.post_raw(TX_QUEUE, c);
        rig.kick(TX_QUEUE);
        assert_eq!(rig.used(TX_QUEUE), vec![(u32::from(head), 0)], "{c:?}");
    }
    let s = rig.dev.state().clone();
    assert_eq!(
        (s.tx_malformed, s.tx_frames, s.tx_dropped),
        (n as u64, 0, 0)
    );
    assert!(
        rig.peer_frames().is_empty() && rig.wire.is_empty(),
        "nothing sent"
    );
    assert!(s.link_up);
    // The stream is still framed: a good frame is the first thing on it.
    let f = frame(64, 9);
    rig.post_tx(DATA, &f);
    rig.kick(TX_QUEUE);
    assert_eq!(rig.pump_tx(1), vec![f]);
}

#[test]
fn hostile_rx_chains_cost_buffers_or_frames_never_the_stream() {
    let mut rig = Rig::new();
    let (f1, f2, f3, f4) = (frame(100, 1), frame(1400, 2), frame(60, 3), frame(200, 4));
    // A runt (shorter than an Ethernet header) is dropped without taking a buffer.
    let runt = frame(5, 0);
    rig.peer_send(&[prefixed(&runt), prefixed(&f1), prefixed(&f2), prefixed(&f3)].concat());
    let c1 = rig.post_raw(RX_QUEUE, &[(DATA, 2048, 0, 0)]); // read-only
    let c2 = rig.post_raw(
        RX_QUEUE,
        &[(DATA, 2048, WRITE | NEXT, 1), (DATA, 2048, WRITE | NEXT, 0)],
    ); // a loop
    let c3 = rig.post_raw(RX_QUEUE, &[(DATA + 0x1000, 80, WRITE, 0)]); // small
    rig.kick(RX_QUEUE);
    let used = rig.used(RX_QUEUE);
    assert_eq!(
        used,
        vec![
            (u32::from(c1), 0),
            (u32::from(c2), 0),
            (u32::from(c3), (VNET_HDR_LEN + f3.len()) as u32)
        ],
        "f1 and f2 do not fit c3 and are dropped; f3 does"
    );
    assert_eq!(rig.read(DATA + 0x1000 + VNET_HDR_LEN as u64, f3.len()), f3);
    let s = rig.dev.state();
    assert_eq!((s.rx_malformed, s.rx_dropped, s.rx_frames), (2, 3, 1));
    // The stream is intact: the next frame arrives whole.
    let c4 = rig.post(RX_QUEUE, &[(DATA + 0x2000, 2048, WRITE)]);
    rig.peer_send(&prefixed(&f4));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(c4), 212)]);
    assert_eq!(rig.read(DATA + 0x2000 + VNET_HDR_LEN as u64, 200), f4);
    assert!(rig.dev.state().link_up);
}

#[test]
fn hostile_peer_lengths_take_the_link_down_without_allocating() {
    for len in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut rig = Rig::new();
        rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
        rig.kick(RX_QUEUE);
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0x55; 256]);
        rig.peer_send(&wire);
        rig.backend();
        let s = rig.dev.state().clone();
        assert!(!s.link_up, "{len}");
        assert!(
            s.link_down_reason.as_deref().unwrap().contains("announced"),
            "{s:?}"
        );
        assert!(rig.used(RX_QUEUE).is_empty(), "nothing delivered");
        assert_eq!(rig.config()[6..8], [0, 0], "LINK_UP cleared");
        assert_ne!(rig.interrupt.status() & INT_CONFIG_CHANGE, 0);
        assert_eq!(rig.dev.rx_buffered(), 0);
        assert!(rig.dev.ready_tags().is_empty());
        // passt sees the end of the stream.
        rig.peer.set_nonblocking(false).unwrap();
        rig.peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(rig.peer.read(&mut b).unwrap(), 0);
        // The guest's TX goes on being answered, unsent.
        rig.post_tx(DATA + 0x1000, &frame(60, 1));
        rig.kick(TX_QUEUE);
        assert_eq!(rig.used(TX_QUEUE).len(), 1);
        assert_eq!(rig.dev.state().tx_dropped, 1);
        rig.backend();
    }
}

#[test]
fn the_end_of_passts_stream_takes_the_link_down_and_the_device_runs_on() {
    let mut rig = Rig::new();
    let f = frame(80, 1);
    let c1 = rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
    rig.post(RX_QUEUE, &[(DATA + 0x1000, 2048, WRITE)]);
    // A whole frame, half of the next, then passt goes away.
    let half = prefixed(&frame(200, 2));
    rig.peer_send(&[prefixed(&f), half[..100].to_vec()].concat());
    rig.interrupt.ack(INT_USED_RING | INT_CONFIG_CHANGE);
    drop(std::mem::replace(
        &mut rig.peer,
        UnixStream::pair().unwrap().0,
    ));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(c1), 92)]);
    let s = rig.dev.state().clone();
    assert!(!s.link_up);
    assert_eq!(
        s.link_down_reason.as_deref(),
        Some("passt closed the stream")
    );
    assert_eq!(rig.config()[6..8], [0, 0]);
    assert_ne!(rig.interrupt.status() & INT_CONFIG_CHANGE, 0);
    assert_eq!(rig.dev.watched(), EventSet::empty());
    rig.post_tx(DATA + 0x2000, &frame(60, 3));
    rig.kick(TX_QUEUE);
    assert_eq!(rig.used(TX_QUEUE).len(), 1);
    assert!(rig.used(RX_QUEUE).is_empty());
    assert_eq!(rig.dev.state().tx_dropped, 1);
}

#[test]
fn a_driver_without_status_gets_no_config_interrupt() {
    let mut rig = Rig::with(FEATURES & !(1 << VIRTIO_NET_F_STATUS), None);
    rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
    rig.kick(RX_QUEUE);
    drop(std::mem::replace(
        &mut rig.peer,
        UnixStream::pair().unwrap().0,
    ));
    rig.backend();
    assert!(!rig.dev.state().link_up);
    assert_eq!(rig.interrupt.status() & INT_CONFIG_CHANGE, 0);
}

#[test]
fn sending_to_a_closed_peer_takes_the_link_down() {
    let mut rig = Rig::new();
    drop(std::mem::replace(
        &mut rig.peer,
        UnixStream::pair().unwrap().0,
    ));
    rig.post_tx(DATA, &frame(60, 1));
    rig.kick(TX_QUEUE);
    assert_eq!(rig.used(TX_QUEUE), vec![(0, 0)]);
    let s = rig.dev.state();
    assert!(!s.link_up);
    assert_eq!(s.tx_dropped, 1);
    assert!(s.link_down_reason.as_deref().unwrap().contains("sending"));
}

#[test]
fn work_beyond_one_calls_budget_wakes_the_device_again() {
    let mut rig = Rig::new();
    // More runts than a call handles, then a frame.
    let f = frame(60, 1);
    let mut wire: Vec<u8> = (0..100).flat_map(|_| prefixed(&[1, 2, 3])).collect();
    wire.extend(prefixed(&f));
    rig.peer_send(&wire);
    let head = rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
    rig.kick(RX_QUEUE);
    assert!(rig.used(RX_QUEUE).is_empty());
    assert!(rig.dev.ready_tags().contains(&TAG_MORE));
    rig.backend();
    assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(head), 72)]);
    assert_eq!(rig.dev.state().rx_dropped, 100);
    assert!(rig.dev.ready_tags().is_empty());
}

#[test]
fn a_reset_keeps_the_link_and_the_bytes_read() {
    let mut rig = Rig::new();
    rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
    rig.kick(RX_QUEUE);
    let (f1, f2) = (frame(70, 1), frame(90, 2));
    rig.peer_send(&[prefixed(&f1), prefixed(&f2)].concat());
    rig.backend();
    assert_eq!(rig.used(RX_QUEUE).len(), 1);
    assert!(rig.dev.rx_buffered() > 0, "f2 read, waiting for a buffer");
    rig.dev.reset();
    assert_eq!(rig.dev.watched(), EventSet::empty());
    assert!(rig.dev.state().link_up);
    rig.activate(FEATURES);
    let head = rig.post(RX_QUEUE, &[(DATA + 0x1000, 2048, WRITE)]);
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(head), 102)]);
    assert_eq!(rig.read(DATA + 0x1000 + VNET_HDR_LEN as u64, 90), f2);
}

#[test]
fn the_shared_state_follows_the_device() {
    let mut rig = Rig::new();
    let shared = rig.dev.shared_state();
    rig.post_tx(DATA, &frame(60, 1));
    rig.kick(TX_QUEUE);
    assert_eq!(rig.pump_tx(1).len(), 1);
    assert_eq!(&*shared.lock().unwrap(), rig.dev.state());
    assert_eq!(shared.lock().unwrap().tx_frames, 1);
}

/// With passt installed: the device's TX carries an ARP request to a real passt (2023 CLI:
/// `passt -f -F FD`, qemu mode on an inherited connected socket) and its RX brings the reply.
#[test]
fn passt_answers_an_arp_request_through_the_device() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    // passt's end must survive exec.
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut child = match std::process::Command::new("passt")
        .args(["-f", "-q", "-F", &theirs.as_raw_fd().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: passt_answers_an_arp_request_through_the_device: passt: {e}");
            return;
        }
    };
    drop(theirs);
    let mut rig = Rig::new();
    let raw = ours.as_raw_fd();
    rig.dev = NetDevice::new(&NetConfig {
        stream: Arc::new(OwnedFd::from(ours)),
        mac: MAC,
        mtu: 1500,
    })
    .unwrap();
    rig.ours = raw;
    rig.activate(FEATURES);
    // who-has 198.51.100.7, from 0.0.0.0 (passt answers for any address but the guest's).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&[0, 0, 0, 0]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[198, 51, 100, 7]);
    let head = rig.post(RX_QUEUE, &[(DATA, 2048, WRITE)]);
    rig.post_tx(DATA + 0x1000, &arp);
    rig.kick(TX_QUEUE);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        if let Some((h, len)) = rig.used(RX_QUEUE).first().copied() {
            assert_eq!(h, u32::from(head));
            break rig.read(DATA, len as usize);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            eprintln!(
                "SKIPPED: passt_answers_an_arp_request_through_the_device: passt exited \
                 ({status}): {err}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "no reply from passt");
        if !rig.dev.ready_tags().is_empty() {
            rig.backend();
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    assert_eq!(rig.dev.state().tx_frames, 1);
    assert_eq!(reply[..VNET_HDR_LEN], RX_HEADER);
    let eth = &reply[VNET_HDR_LEN..];
    assert_eq!(eth[..6], MAC, "to us");
    assert_eq!(eth[12..14], [0x08, 0x06], "ARP");
    assert_eq!(eth[20..22], [0, 2], "a reply");
    assert_eq!(eth[28..32], [198, 51, 100, 7], "for the address asked");
    assert_eq!(eth[32..38], MAC);
    // Our end closing ends passt (it serves one connection in --fd mode).
    drop(rig);
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("passt did not end with its stream");
    }
}
