//! Target `net_frames`: the guest's frame path. A guest driver sends frames through the
//! virtio-net device's TX queue (the `virtio_net_hdr_v1` and the frame over one to three
//! descriptors, with chains that lie about the header's length, hold a device-writable buffer
//! or a zero-length one) and posts RX buffers (small, split after the header, with a readable
//! buffer among them); a socketpair stands in for passt, which sends frames (and now and then
//! a length prefix passt never sends, which takes the link down), reads what the device sent,
//! or stays silent; every frame the guest sends, and arbitrary bytes besides, also goes through
//! the allow-list filter ([`EgressPolicy::judge`]).
//!
//! Properties: no panic, every guest-memory access through vm-memory; TX chains come back with
//! length 0; every RX chain used with a frame fits the buffers, starts with the zeroed header
//! (`num_buffers` 1), and carries a frame passt sent, in passt's order (frames the device
//! drops are skipped, none is invented or changed); every frame passt reads is one a TX chain
//! carried, in the guest's order; the device never needs a reset for well-formed rings; every
//! refusal the filter makes is a well-formed frame back to the sender (an RST with the right
//! ports and acknowledgement, or an ICMP port unreachable quoting the datagram), its
//! checksums recomputed here.
//!
//! Input: a sequence of operations, each a selector byte and its arguments (see `play`).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmm::config::NetConfig;
use vmm::virtio::net::egress_filter::{AllowRule, EgressPolicy, Protocol, Verdict};
use vmm::virtio::net::rx::RX_HEADER;
use vmm::virtio::net::{NetDevice, VNET_HDR_LEN};

use crate::guest_driver::{Buffer, GuestDriver};
use crate::input::ByteCursor;

const RX: usize = 0;
const TX: usize = 1;
/// Most operations in one case.
const MAX_OPS: usize = 48;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Addresses a frame's source or destination is picked from (the last slot: any address).
const ADDRESSES: [Ipv4Addr; 7] = [
    GUEST_IP,
    Ipv4Addr::new(192, 0, 2, 10),
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(203, 0, 113, 5),
    Ipv4Addr::UNSPECIFIED,
    Ipv4Addr::BROADCAST,
    Ipv4Addr::new(224, 0, 0, 251),
];
/// Destination ports picked from (the last slot: any port).
const PORTS: [u16; 7] = [1500, 2001, 53, 67, 443, 27000, 0];

/// The filter every case judges with: a TCP range in a /24, one UDP port, one host wholly.
fn policy() -> EgressPolicy {
    EgressPolicy::new(vec![
        AllowRule {
            net: Ipv4Addr::new(192, 0, 2, 0),
            prefix_len: 24,
            ports: 1000..=2000,
            protocol: Protocol::Tcp,
        },
        AllowRule {
            net: Ipv4Addr::new(198, 51, 100, 7),
            prefix_len: 32,
            ports: 53..=53,
            protocol: Protocol::Udp,
        },
        AllowRule {
            net: Ipv4Addr::new(203, 0, 113, 5),
            prefix_len: 32,
            ports: 0..=u16::MAX,
            protocol: Protocol::Any,
        },
    ])
}

/// What a case reached, so tests can show the seeds get past the set-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetOutcome {
    /// Frames passt read from the device.
    pub to_passt: usize,
    /// Frames the device delivered into RX buffers.
    pub to_guest: usize,
    /// Frames the filter refused with a reply (all checked).
    pub refusals: usize,
    /// Frames the filter let through.
    pub passed: usize,
}

/// The Internet checksum over `parts` is right (their folded sum is all ones).
fn checksum_ok(parts: &[&[u8]]) -> bool {
    let bytes = parts.concat();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| (u64::from(w[0]) << 8) | w.get(1).copied().map_or(0, u64::from))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Panics unless `reply` is a well-formed refusal of `orig` addressed back to its sender.
fn check_refusal(orig: &[u8], reply: &[u8]) {
    let fail = |what: &str| -> ! { panic!("refusal: {what}: {reply:02x?} for {orig:02x?}") };
    if reply.len() < 54 || orig.len() < 34 {
        fail("too short");
    }
    if reply[..6] != orig[6..12] || reply[6..12] != orig[..6] || reply[12..14] != [8, 0] {
        fail("Ethernet header");
    }
    let (ip, oip) = (&reply[14..], &orig[14..]);
    let ohlen = usize::from(oip[0] & 0x0f) * 4;
    let ototal = be16(oip, 2);
    if ip[0] != 0x45 || be16(ip, 2) != ip.len() || ip[8] != 64 || be16(ip, 6) & 0x3fff != 0 {
        fail("IP header fields");
    }
    if !checksum_ok(&[&ip[..20]]) {
        fail("IP checksum");
    }
    if ip[12..16] != oip[16..20] || ip[16..20] != oip[12..16] {
        fail("IP addresses");
    }
    if oip[0] >> 4 != 4 || ohlen < 20 || ototal < ohlen || ototal > oip.len() {
        fail("a refusal of a malformed packet");
    }
    if be16(oip, 6) & 0x3fff != 0 {
        fail("a refusal of a fragment");
    }
    let (l4, ol4) = (&ip[20..], &oip[ohlen..ototal]);
    match (ip[9], oip[9]) {
        (6, 6) => {
            let oflags = ol4[13];
            if oflags & 0x02 == 0 || oflags & 0x14 != 0 {
                fail("an RST for a segment that opens nothing");
            }
            let odata = ol4.len() - usize::from(ol4[12] >> 4) * 4;
            let oseq = u32::from_be_bytes([ol4[4], ol4[5], ol4[6], ol4[7]]);
            let ack = oseq
                .wrapping_add(1 + u32::from(oflags & 1))
                .wrapping_add(odata as u32);
            if l4.len() != 20
                || l4[..2] != ol4[2..4]
                || l4[2..4] != ol4[..2]
                || l4[4..8] != [0; 4]
                || l4[8..12] != ack.to_be_bytes()
                || l4[12] != 0x50
                || l4[13] != 0x14
            {
                fail("TCP header");
            }
            let pseudo = [&ip[12..20], &[0, 6, 0, 20][..]].concat();
            if !checksum_ok(&[&pseudo, l4]) {
                fail("TCP checksum");
            }
        }
        (1, 17) => {
            let quote = ohlen + (ototal - ohlen).min(8);
            if l4[..2] != [3, 3] || l4[4..8] != [0; 4] || l4[8..] != oip[..quote] {
                fail("ICMP message");
            }
            if !checksum_ok(&[l4]) {
                fail("ICMP checksum");
            }
        }
        _ => fail("protocol"),
    }
}

/// A frame from the guest: raw bytes, or Ethernet/IPv4/TCP, UDP or ICMP with fields from the
/// input, then a few bytes changed or the end cut off.
fn guest_frame(input: &mut ByteCursor) -> Vec<u8> {
    let kind = input.u8();
    if kind % 4 == 0 {
        let len = usize::from(input.u16() % 1600);
        return input.bytes(len).to_vec();
    }
    let pick_ip = |b: u8, input: &mut ByteCursor| match usize::from(b) % (ADDRESSES.len() + 1) {
        i if i < ADDRESSES.len() => ADDRESSES[i],
        _ => Ipv4Addr::from(input.u32()),
    };
    let dst_mac = match kind >> 6 {
        0 | 1 => GW_MAC,
        2 => [0xff; 6],
        _ => [0x01, 0, 0x5e, 0, 0, 0xfb],
    };
    let src = if kind & 0x10 != 0 {
        let b = input.u8();
        pick_ip(b, input)
    } else {
        GUEST_IP
    };
    let dst = {
        let b = input.u8();
        pick_ip(b, input)
    };
    let dport = match usize::from(input.u8()) % PORTS.len() {
        i if i + 1 < PORTS.len() => PORTS[i],
        _ => input.u16(),
    };
    let sport: u16 = if kind & 0x20 != 0 { 68 } else { 40_000 };
    let data_len = usize::from(input.u8());
    let data = input.bytes(data_len).to_vec();
    let (protocol, l4) = match kind % 4 {
        1 => {
            let flags = input.u8();
            let seq = input.u32();
            let mut t = Vec::with_capacity(20 + data.len());
            t.extend_from_slice(&sport.to_be_bytes());
            t.extend_from_slice(&dport.to_be_bytes());
            t.extend_from_slice(&seq.to_be_bytes());
            t.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            t.extend_from_slice(&data);
            (6u8, t)
        }
        2 => {
            let mut u = Vec::with_capacity(8 + data.len());
            u.extend_from_slice(&sport.to_be_bytes());
            u.extend_from_slice(&dport.to_be_bytes());
            u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend_from_slice(&data);
            (17u8, u)
        }
        _ => (
            1u8,
            [&[input.u8() % 16, 0, 0, 0, 0, 1, 0, 1][..], &data].concat(),
        ),
    };
    let options = usize::from(input.u8() % 11) * 4;
    let hlen = 20 + options;
    let mut frame = Vec::with_capacity(14 + hlen + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[8, 0, 0x40 | (hlen / 4) as u8, 0]);
    frame.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.resize(14 + hlen, 1);
    frame.extend_from_slice(&l4);
    // Changes: a few bytes anywhere, then perhaps the end cut off.
    for _ in 0..input.u8() % 4 {
        let at = usize::from(input.u16()) % frame.len();
        frame[at] = input.u8();
    }
    if input.u8() % 8 == 0 {
        let keep = usize::from(input.u16()) % (frame.len() + 1);
        frame.truncate(keep);
    }
    frame
}

/// One case's state: the driver, passt's end, and what each side is owed.
struct Case {
    d: GuestDriver,
    peer: UnixStream,
    policy: EgressPolicy,
    /// What the TX chains carried after the header, in order: what passt may read.
    guest_sent: VecDeque<Vec<u8>>,
    /// Frames passt sent, in order: what the guest may receive.
    passt_sent: VecDeque<Vec<u8>>,
    /// Whether passt's stream stopped being one we can follow (a partial write).
    passt_stream_lost: bool,
    /// Bytes passt read and has not parsed yet.
    wire: Vec<u8>,
    /// The buffers of each RX chain posted, by head.
    rx_chains: HashMap<u32, Vec<Buffer>>,
    outcome: NetOutcome,
}

impl Case {
    fn judge(&mut self, frame: &[u8]) {
        match self.policy.judge(frame) {
            Verdict::Refuse(reply) => {
                check_refusal(frame, reply.as_bytes());
                self.outcome.refusals += 1;
            }
            Verdict::Pass => self.outcome.passed += 1,
            Verdict::Drop(_) => {}
        }
    }

    /// The guest sends a frame in a TX chain (which the filter also judges).
    fn guest_send(&mut self, input: &mut ByteCursor) {
        let frame = guest_frame(input);
        self.judge(&frame);
        let layout = input.u8();
        // A header of the right length, or one that lies.
        let hdr_len = if layout & 0x80 != 0 {
            usize::from(input.u8() % 16)
        } else {
            VNET_HDR_LEN
        };
        let mut bytes = vec![0u8; hdr_len];
        bytes.extend_from_slice(&frame);
        // One to three descriptors, cut at input-chosen points (a zero-length one too).
        let pieces = usize::from(layout % 3) + 1;
        let mut cuts: Vec<usize> = (1..pieces)
            .map(|_| usize::from(input.u16()) % (bytes.len() + 1))
            .collect();
        cuts.sort_unstable();
        let mut bufs = Vec::new();
        let mut at = 0;
        for end in cuts.into_iter().chain([bytes.len()]) {
            let piece = &bytes[at..end];
            bufs.push(Buffer {
                addr: self.d.alloc(piece.len() as u32, piece),
                len: piece.len() as u32,
                writable: false,
            });
            at = end;
        }
        if layout & 0x40 != 0 {
            // A device-writable buffer in a TX chain.
            let addr = self.d.alloc(64, &[]);
            bufs.push(Buffer {
                addr,
                len: 64,
                writable: true,
            });
        }
        if bytes.len() >= VNET_HDR_LEN {
            self.guest_sent.push_back(bytes[VNET_HDR_LEN..].to_vec());
        }
        self.d.post(TX, &bufs);
        self.d.notify(TX);
    }

    /// The guest posts `n` RX chains of the input's layout.
    fn guest_post_rx(&mut self, input: &mut ByteCursor) {
        let n = input.u8() % 4 + 1;
        let layout = input.u8();
        for i in 0..n {
            let room = match layout % 4 {
                0 => 1526,
                1 => 64,
                2 => u32::from(input.u16() % 2048) + 1,
                _ => 2048,
            };
            let mut bufs = if layout & 0x10 != 0 {
                // Linux's layout: the header in a buffer of its own.
                let h = VNET_HDR_LEN as u32;
                vec![
                    Buffer {
                        addr: self.d.alloc(h, &[]),
                        len: h,
                        writable: true,
                    },
                    Buffer {
                        addr: self.d.alloc(room, &[]),
                        len: room,
                        writable: true,
                    },
                ]
            } else {
                vec![Buffer {
                    addr: self.d.alloc(room, &[]),
                    len: room,
                    writable: true,
                }]
            };
            if layout & 0x20 != 0 && i == 0 {
                // A device-readable buffer first: the chain is refused.
                bufs.insert(
                    0,
                    Buffer {
                        addr: self.d.alloc(16, &[]),
                        len: 16,
                        writable: false,
                    },
                );
            }
            if let Some(head) = self.d.post(RX, &bufs) {
                self.rx_chains.insert(u32::from(head), bufs);
            }
        }
        self.d.notify(RX);
    }

    /// passt sends a frame (or a length it never sends), then the device is told.
    fn passt_send(&mut self, input: &mut ByteCursor) {
        let sel = input.u8();
        let wire = if sel % 16 == 0 {
            // A length passt never announces: the link goes down.
            let len: u32 = if sel & 0x10 != 0 { 0 } else { 65_536 };
            let mut w = len.to_be_bytes().to_vec();
            w.extend_from_slice(&[0x55; 32]);
            w
        } else {
            let len = usize::from(input.u16() % 1600) + 1;
            let mut frame = input.bytes(len).to_vec();
            if frame.is_empty() {
                frame.push(sel);
            }
            let mut w = (frame.len() as u32).to_be_bytes().to_vec();
            w.extend_from_slice(&frame);
            if !self.passt_stream_lost {
                self.passt_sent.push_back(frame);
            }
            w
        };
        match self.peer.write(&wire) {
            Ok(n) if n == wire.len() => {}
            // The device stopped reading (no buffers, or the link is down): what follows
            // cannot be matched any more.
            _ => self.passt_stream_lost = true,
        }
        self.d.transport().backend_ready();
    }

    /// passt reads what the device sent; each frame must be the next one a TX chain carried
    /// (chains the device refused are skipped).
    fn passt_read(&mut self) {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.wire.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The device closed its end with passt's bytes unread (the link went down).
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("passt's read: {e}"),
            }
        }
        while self.wire.len() >= 4 {
            let len = u32::from_be_bytes([self.wire[0], self.wire[1], self.wire[2], self.wire[3]])
                as usize;
            if self.wire.len() < 4 + len {
                break;
            }
            let frame: Vec<u8> = self.wire.drain(..4 + len).skip(4).collect();
            loop {
                match self.guest_sent.pop_front() {
                    Some(f) if f == frame => break,
                    Some(_) => {}
                    None => panic!("passt got a frame no TX chain carried: {frame:02x?}"),
                }
            }
            self.outcome.to_passt += 1;
        }
        self.d.transport().backend_ready();
    }

    /// Checks the chains the device used since the last call.
    fn check_used(&mut self) {
        for used in self.d.take_used(TX) {
            assert_eq!(used.len, 0, "a TX chain came back with a length");
        }
        for used in self.d.take_used(RX) {
            let Some(bufs) = self.rx_chains.remove(&used.head) else {
                panic!("the device used RX chain {} that was not posted", used.head);
            };
            if used.len == 0 {
                continue;
            }
            let room: u32 = bufs.iter().filter(|b| b.writable).map(|b| b.len).sum();
            assert!(
                bufs.iter().all(|b| b.writable),
                "a frame in a chain with a readable buffer"
            );
            assert!(
                used.len <= room,
                "used length {} for {room} bytes",
                used.len
            );
            let mut bytes = Vec::new();
            for b in &bufs {
                bytes.extend(self.d.read(b.addr, b.len as usize));
            }
            bytes.truncate(used.len as usize);
            assert!(bytes.len() > VNET_HDR_LEN, "RX used length {}", used.len);
            assert_eq!(bytes[..VNET_HDR_LEN], RX_HEADER, "RX header");
            let frame = &bytes[VNET_HDR_LEN..];
            if self.passt_stream_lost {
                continue;
            }
            loop {
                match self.passt_sent.pop_front() {
                    Some(f) if f == frame => break,
                    Some(_) => {}
                    None => panic!("the guest got a frame passt never sent: {frame:02x?}"),
                }
            }
            self.outcome.to_guest += 1;
        }
    }
}

/// One case.
pub fn run(data: &[u8]) {
    play(data);
}

/// One case, with what it reached.
pub fn play(data: &[u8]) -> NetOutcome {
    let mut input = ByteCursor::new(data);
    let (ours, peer) = UnixStream::pair().expect("a socketpair for passt");
    peer.set_nonblocking(true)
        .expect("a non-blocking passt end");
    let config = NetConfig {
        stream: Arc::new(OwnedFd::from(ours)),
        mac: MAC,
        mtu: 1500,
    };
    let device = NetDevice::new(&config).expect("a virtio-net device");
    drop(config);
    let mut d = GuestDriver::new(Box::new(device));
    assert!(d.start(&[64, 64]), "the virtio-net device did not start");
    let mut case = Case {
        d,
        peer,
        policy: policy(),
        guest_sent: VecDeque::new(),
        passt_sent: VecDeque::new(),
        passt_stream_lost: false,
        wire: Vec::new(),
        rx_chains: HashMap::new(),
        outcome: NetOutcome::default(),
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 7 {
            0 | 1 => case.guest_send(&mut input),
            2 => case.guest_post_rx(&mut input),
            3 => case.passt_send(&mut input),
            4 => case.passt_read(),
            5 => case.d.transport().backend_ready(),
            _ => {
                let len = usize::from(input.u8()) * 2;
                let bytes = input.bytes(len).to_vec();
                case.judge(&bytes);
            }
        }
        case.check_used();
    }
    assert!(
        !case.d.needs_reset(),
        "the device needs a reset after well-formed rings"
    );
    case.outcome
}

/// Operation bytes of a TX frame built by `guest_frame`: `kind`, destination and port
/// indices, data, TCP flags and sequence; no options, no changes, no cut.
fn send_op(kind: u8, dst: u8, port: u8, data: &[u8], flags: u8) -> Vec<u8> {
    let mut op = vec![0, kind, dst, port, data.len() as u8];
    op.extend_from_slice(data);
    if kind % 4 == 1 {
        op.push(flags);
        op.extend_from_slice(&1000u32.to_le_bytes());
    } else if kind % 4 == 3 {
        op.push(8);
    }
    // Options, changes, cut; layout (one descriptor, the right header).
    op.extend_from_slice(&[0, 0, 1, 0]);
    op
}

/// passt sending a frame of `len` bytes of `fill`.
fn passt_op(len: u16, fill: u8) -> Vec<u8> {
    let mut op = vec![3, 1];
    op.extend_from_slice(&(len - 1).to_le_bytes());
    op.extend(std::iter::repeat_n(fill, usize::from(len)));
    op
}

/// A session: RX buffers, a SYN through the filter's allowed range and one it refuses, a UDP
/// datagram it refuses, a ping; passt answering, reading, and the guest receiving; a split RX
/// layout; and a case where passt breaks the framing.
pub fn seeds() -> Vec<Vec<u8>> {
    let session = [
        vec![2, 3, 0x10],                    // four RX chains, Linux's layout
        send_op(1, 1, 0, b"", 0x02),         // SYN to 192.0.2.10:1500 (allowed)
        send_op(1, 2, 4, b"", 0x02),         // SYN to 198.51.100.7:443 (refused: RST)
        send_op(2, 2, 3, b"dhcp?", 0),       // UDP to port 67 from 40000 (refused)
        send_op(2, 2, 2, b"query", 0),       // UDP to 198.51.100.7:53 (allowed)
        send_op(3, 3, 0, b"ping", 0),        // echo request to 203.0.113.5
        vec![4],                             // passt reads
        passt_op(60, 0xa1),                  // passt sends
        passt_op(1514, 0xa2),                //
        vec![5],                             // backend
        vec![2, 1, 0x01],                    // two small chains (64 bytes)
        passt_op(1000, 0xa3),                // too large for them
        passt_op(40, 0xa4),                  // fits
        send_op(0x21, 1, 0, &[1; 40], 0x02), // SYN with data, from port 68
        vec![4],
        vec![6, 30], // judge 60 raw bytes
    ]
    .concat();
    vec![
        session,
        [
            vec![2, 0, 0],
            passt_op(100, 1),
            vec![3, 0x10],
            passt_op(50, 2),
        ]
        .concat(),
        [send_op(1, 6, 5, &[9; 20], 0x03), vec![4]].concat(),
    ]
}
