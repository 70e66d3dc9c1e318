//! Target `block_request`: virtio-blk requests from a guest driver through the block device's
//! queue handling ([`vmm::virtio::block`]: chain validation, request parsing, execution on a
//! disk image). Request types (known and unknown), sectors in and past the disk, header and
//! status buffers of the right and wrong sizes, data buffers of any number, length and
//! direction, all from the input. Properties: no panic; a used length never exceeds the chain's
//! device-writable bytes; the disk image never changes size; a read-only disk never changes; a
//! read that succeeds returns the disk's bytes.
//!
//! Input: one flags byte (bit 0 read-only disk, bits 1-2 queue size), then requests, each
//! `type: u8, sector: u8 (or u64 when bit 7), header: u8, data count: u8, per buffer u16,
//! status: u8, notify: u8`.

use std::collections::HashMap;

use super::devices::{DeviceKind, DISK_SECTORS};
use super::scratch::{disk_pattern, Scratch};
use crate::guest_driver::{Buffer, GuestDriver};
use crate::input::ByteCursor;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const SECTOR: u32 = 512;
/// Most requests in one case: few enough that their buffers never wrap around the buffer area
/// (16 × (4 × 8 KiB + header and status) is well under 1.75 MiB), so no two overlap.
const MAX_REQUESTS: usize = 16;
const QUEUE_SIZES: [u16; 4] = [256, 16, 8, 2];

/// What the harness remembers of a posted request, to check the device's answer.
struct Posted {
    writable_len: u64,
    status: Option<u64>,
    /// For a read: its sector and its data buffers.
    read: Option<(u64, Vec<Buffer>)>,
}

/// What a case reached, so tests can show the seeds get past the set-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockOutcome {
    /// Requests answered VIRTIO_BLK_S_OK.
    pub ok: usize,
    /// Successful reads whose bytes were checked against the disk.
    pub verified_reads: usize,
}

/// One case.
pub fn run(data: &[u8]) {
    play(data);
}

/// One case, with what it reached.
pub fn play(data: &[u8]) -> BlockOutcome {
    let mut outcome = BlockOutcome::default();
    let mut input = ByteCursor::new(data);
    let flags = input.u8();
    let read_only = flags & 1 != 0;
    let scratch = Scratch::new();
    let mut d = GuestDriver::new(DeviceKind::Block.create(&scratch, read_only));
    assert!(
        d.start(&[QUEUE_SIZES[usize::from(flags >> 1) % 4]]),
        "the block device did not start"
    );
    let mut posted: HashMap<u32, Posted> = HashMap::new();
    let mut used = Vec::new();

    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        let kind = match input.u8() % 5 {
            0 => T_IN,
            1 => T_OUT,
            2 => T_FLUSH,
            3 => T_GET_ID,
            _ => input.u32(),
        };
        let sector_sel = input.u8();
        let sector = if sector_sel & 0x80 != 0 {
            input.u64()
        } else {
            u64::from(sector_sel)
        };
        let header_sel = input.u8();
        let header_len = if header_sel < 240 {
            16
        } else {
            u32::from(header_sel % 32)
        };
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        let mut bufs = vec![Buffer {
            addr: d.alloc(header_len.max(1), &header),
            len: header_len,
            writable: false,
        }];
        let device_writes = matches!(kind, T_IN | T_GET_ID);
        for _ in 0..input.u8() % 5 {
            let sel = input.u16();
            let len = if sel & 0x8000 != 0 {
                u32::from(sel & 0x1fff)
            } else {
                (u32::from(sel) % 8 + 1) * SECTOR
            };
            let writable = device_writes != (sel & 0x4000 != 0 && sel & 0x8000 != 0);
            bufs.push(Buffer {
                addr: d.alloc(len.max(1), &[]),
                len,
                writable,
            });
        }
        let status_sel = input.u8();
        let status_len = if status_sel < 240 {
            1
        } else {
            u32::from(status_sel % 4)
        };
        let status = Buffer {
            addr: d.alloc(status_len.max(1), &[0xff]),
            len: status_len,
            writable: status_sel != 255,
        };
        bufs.push(status);
        let writable_len = bufs
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum();
        let data_bufs = bufs[1..bufs.len() - 1].to_vec();
        if let Some(head) = d.post(0, &bufs) {
            posted.insert(
                u32::from(head),
                Posted {
                    writable_len,
                    status: (status_len == 1 && status.writable).then_some(status.addr),
                    read: (kind == T_IN && header_len == 16).then_some((sector, data_bufs)),
                },
            );
        }
        if input.u8() & 1 == 0 {
            d.notify(0);
            used.extend(
                d.take_used(0)
                    .into_iter()
                    .filter_map(|u| posted.remove(&u.head).map(|p| (u, p))),
            );
        }
    }
    d.notify(0);
    used.extend(
        d.take_used(0)
            .into_iter()
            .filter_map(|u| posted.remove(&u.head).map(|p| (u, p))),
    );

    let disk = std::fs::read(scratch.path("disk.img")).expect("the disk image");
    let pattern = disk_pattern(DISK_SECTORS);
    assert_eq!(disk.len(), pattern.len(), "the disk image changed size");
    if read_only {
        assert!(disk == pattern, "a read-only disk was written");
    }
    for (u, p) in &used {
        assert!(
            u64::from(u.len) <= p.writable_len,
            "used length {} over {} writable bytes",
            u.len,
            p.writable_len
        );
        let Some(status) = p.status else {
            continue;
        };
        let ok = d.read(status, 1)[0] == STATUS_OK;
        outcome.ok += usize::from(ok);
        // Only reads of an unwritten disk have known contents.
        let Some((sector, bufs)) = &p.read else {
            continue;
        };
        if !read_only || !ok {
            continue;
        }
        outcome.verified_reads += 1;
        let mut at = (*sector * u64::from(SECTOR)) as usize;
        for b in bufs {
            let got = d.read(b.addr, b.len as usize);
            assert_eq!(
                &got[..],
                &pattern[at..at + b.len as usize],
                "a read returned other bytes than the disk's"
            );
            at += b.len as usize;
        }
    }
    outcome
}

fn request(kind: u8, sector: u8, data: &[u16]) -> Vec<u8> {
    let mut r = vec![kind, sector, 0, data.len() as u8];
    for len in data {
        r.extend_from_slice(&len.to_le_bytes());
    }
    r.extend_from_slice(&[0, 0]);
    r
}

/// A read, a write, a flush and GET_ID, on a writable and a read-only disk; a read at the end
/// of the disk.
pub fn seeds() -> Vec<Vec<u8>> {
    let session = [
        request(0, 0, &[0]),
        request(1, 2, &[1]),
        request(2, 0, &[]),
        request(3, 0, &[0x8000 | 20]),
        request(0, 63, &[0]),
    ]
    .concat();
    vec![
        [&[0u8][..], &session].concat(),
        [&[1u8][..], &session].concat(),
        [&[2u8][..], &request(0, 60, &[3, 0])].concat(),
    ]
}
