//! Target `vsock_packets`: vsock traffic from a guest driver through the vsock device's queue
//! handling and the muxer, with real host peers on Unix sockets: a listener on port 1024 (as
//! the shepherd listens for the agent) that accepts, writes, reads and hangs up, and host
//! clients that connect through the muxer's `CONNECT <port>` line. Packet headers (addresses,
//! ports, type, operation, flags, credit, length fields that lie), one- and two-descriptor
//! layouts, RX buffers and the order of host and guest events all come from the input.
//! Properties: no panic; every packet the device delivers is host-to-guest (CID 2 to 3, stream
//! type) and fits the buffers the guest gave; the device never needs a reset for well-formed
//! rings.
//!
//! Input: a sequence of operations, each a selector byte and its arguments (see `run`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};

use super::devices::{DeviceKind, GUEST_CID};
use super::scratch::Scratch;
use crate::guest_driver::{Buffer, GuestDriver};
use crate::input::ByteCursor;

const RX: usize = 0;
const TX: usize = 1;
const HDR: u32 = 44;
const HOST_CID: u64 = 2;
/// The port the host listens on.
const LISTEN_PORT: u32 = 1024;
/// Most operations in one case.
const MAX_OPS: usize = 48;
/// Bytes of data room in each RX buffer the guest posts.
const RX_DATA: u32 = 4096;

/// What the harness remembers of an RX chain it posted.
struct RxChain {
    header: u64,
    room: u32,
}

#[allow(clippy::too_many_arguments)]
fn header(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HDR as usize);
    h.extend_from_slice(&src_cid.to_le_bytes());
    h.extend_from_slice(&dst_cid.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&type_.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&buf_alloc.to_le_bytes());
    h.extend_from_slice(&fwd_cnt.to_le_bytes());
    h
}

/// The guest sends one packet on the TX queue.
fn guest_send(d: &mut GuestDriver, input: &mut ByteCursor) {
    let sel = input.u8();
    let src_cid = if sel & 1 != 0 { input.u64() } else { GUEST_CID };
    let dst_cid = if sel & 2 != 0 { input.u64() } else { HOST_CID };
    let src_port = 1000 + u32::from(input.u8() % 4);
    let dst_port = match input.u8() % 4 {
        0 | 1 => LISTEN_PORT,
        2 => LISTEN_PORT + 1,
        _ => input.u32(),
    };
    let op = u16::from(input.u8() % 9);
    let type_ = if sel & 4 != 0 { input.u16() } else { 1 };
    let flags = u32::from(input.u8() % 4);
    let buf_alloc = if sel & 8 != 0 { input.u32() } else { 64 * 1024 };
    let fwd_cnt = if sel & 16 != 0 { input.u32() } else { 0 };
    let payload_len = usize::from(input.u16() % 2048);
    let payload = input.bytes(payload_len);
    let len = if sel & 32 != 0 {
        input.u32()
    } else {
        payload.len() as u32
    };
    let h = header(
        src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt,
    );
    let bufs = if sel & 64 != 0 || payload.is_empty() {
        // Header and data in one buffer.
        let whole = [h.as_slice(), payload].concat();
        vec![Buffer {
            addr: d.alloc(whole.len() as u32, &whole),
            len: whole.len() as u32,
            writable: false,
        }]
    } else {
        vec![
            Buffer {
                addr: d.alloc(HDR, &h),
                len: HDR,
                writable: false,
            },
            Buffer {
                addr: d.alloc(payload.len() as u32, payload),
                len: payload.len() as u32,
                writable: false,
            },
        ]
    };
    d.post(TX, &bufs);
    d.notify(TX);
    // TX chains come back unused (length 0); the driver reclaims their descriptors.
    for used in d.take_used(TX) {
        assert_eq!(used.len, 0, "a TX chain came back with a length");
    }
}

/// The guest posts `n` RX chains.
fn guest_post_rx(d: &mut GuestDriver, rx: &mut HashMap<u32, RxChain>, n: u8, split: bool) {
    for _ in 0..n {
        let (bufs, header) = if split {
            let h = d.alloc(HDR, &[]);
            let data = d.alloc(RX_DATA, &[]);
            let bufs = vec![
                Buffer {
                    addr: h,
                    len: HDR,
                    writable: true,
                },
                Buffer {
                    addr: data,
                    len: RX_DATA,
                    writable: true,
                },
            ];
            (bufs, h)
        } else {
            let h = d.alloc(HDR + RX_DATA, &[]);
            (
                vec![Buffer {
                    addr: h,
                    len: HDR + RX_DATA,
                    writable: true,
                }],
                h,
            )
        };
        if let Some(head) = d.post(RX, &bufs) {
            rx.insert(
                u32::from(head),
                RxChain {
                    header,
                    room: RX_DATA,
                },
            );
        }
    }
    d.notify(RX);
}

/// What a case reached, so tests can show the seeds get past the set-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockOutcome {
    /// Packets the device delivered to the guest.
    pub delivered: usize,
    /// Connections the host listener accepted.
    pub accepted: usize,
}

/// Checks every RX chain the device used since the last call; returns how many held a packet.
fn check_rx(d: &mut GuestDriver, rx: &mut HashMap<u32, RxChain>) -> usize {
    let mut delivered = 0;
    for used in d.take_used(RX) {
        let Some(chain) = rx.remove(&used.head) else {
            panic!("the device used RX chain {} that was not posted", used.head);
        };
        if used.len == 0 {
            continue;
        }
        delivered += 1;
        assert!(
            used.len >= HDR && used.len - HDR <= chain.room,
            "RX used length {}",
            used.len
        );
        let h = d.read(chain.header, HDR as usize);
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(u64_at(0), HOST_CID, "RX packet not from the host");
        assert_eq!(u64_at(8), GUEST_CID, "RX packet not to the guest");
        assert_eq!(
            u32_at(24),
            used.len - HDR,
            "RX header length differs from the used length"
        );
        assert_eq!(
            u16::from_le_bytes([h[28], h[29]]),
            1,
            "RX packet not of stream type"
        );
    }
    delivered
}

/// One case.
pub fn run(data: &[u8]) {
    play(data);
}

/// One case, with what it reached.
pub fn play(data: &[u8]) -> VsockOutcome {
    let mut outcome = VsockOutcome::default();
    let mut input = ByteCursor::new(data);
    let scratch = Scratch::new();
    let listener = UnixListener::bind(scratch.path(&format!("v.sock_{LISTEN_PORT}")))
        .expect("the host listener");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let mut d = GuestDriver::new(DeviceKind::Vsock.create(&scratch, false));
    assert!(d.start(&[64, 64, 8]), "the vsock device did not start");
    let mut rx = HashMap::new();
    guest_post_rx(&mut d, &mut rx, 4, false);
    let mut streams: Vec<UnixStream> = Vec::new();

    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0 | 1 => guest_send(&mut d, &mut input),
            2 => {
                let n = input.u8() % 4 + 1;
                let split = input.u8() & 1 != 0;
                guest_post_rx(&mut d, &mut rx, n, split);
            }
            3 => {
                if let Ok((s, _)) = listener.accept() {
                    outcome.accepted += 1;
                    s.set_nonblocking(true).expect("a non-blocking stream");
                    streams.push(s);
                }
            }
            4 => {
                let i = usize::from(input.u8());
                let len = usize::from(input.u8()) * 16;
                let payload = input.bytes(len).to_vec();
                let count = streams.len().max(1);
                if let Some(s) = streams.get_mut(i % count) {
                    let _ = s.write(&payload);
                }
                d.transport().backend_ready();
            }
            5 => {
                let i = usize::from(input.u8());
                if !streams.is_empty() {
                    let s = streams.remove(i % streams.len());
                    if i & 0x80 != 0 {
                        let _ = s.shutdown(Shutdown::Write);
                        streams.push(s);
                    }
                }
                d.transport().backend_ready();
            }
            6 => {
                // A host client connects through the muxer's CONNECT line.
                if let Ok(mut s) = UnixStream::connect(scratch.path("v.sock")) {
                    let line = if input.u8() & 1 == 0 {
                        format!("CONNECT {}\n", input.u16()).into_bytes()
                    } else {
                        let n = usize::from(input.u8() % 32);
                        input.bytes(n).to_vec()
                    };
                    let _ = s.write(&line);
                    s.set_nonblocking(true).expect("a non-blocking stream");
                    streams.push(s);
                }
                d.transport().backend_ready();
            }
            _ => {
                let mut buf = [0u8; 4096];
                for s in &mut streams {
                    let _ = s.read(&mut buf);
                }
                d.transport().backend_ready();
            }
        }
        outcome.delivered += check_rx(&mut d, &mut rx);
    }
    assert!(
        !d.needs_reset(),
        "the device needs a reset after well-formed rings"
    );
    outcome
}

fn send_op(op: u8, dst: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![0, 0, 0, dst, op, 0];
    r.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// A guest connecting to the listener, the host accepting, data both ways, credit updates,
/// shutdown and reset; a refused connection; a host-initiated connection.
pub fn seeds() -> Vec<Vec<u8>> {
    let session = [
        send_op(1, 0, b""),      // REQUEST to 1024
        vec![3],                 // host accepts
        send_op(5, 0, b"hello"), // RW
        vec![4, 0, 1],           // host writes 16 bytes
        vec![2, 2, 1],           // more RX buffers, split
        send_op(6, 0, b""),      // CREDIT_UPDATE
        send_op(7, 0, b""),      // CREDIT_REQUEST
        vec![7],                 // host reads
        send_op(4, 0, b""),      // SHUTDOWN
        vec![5, 0x80],           // host shuts down its side
        send_op(3, 0, b""),      // RST
    ]
    .concat();
    vec![
        session,
        [send_op(1, 2, b""), vec![6]].concat(),
        vec![6, 0, 0x00, 0x04, 2, 3, 1],
    ]
}
