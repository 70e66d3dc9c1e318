//! Parsing a virtio-blk request from a validated descriptor chain: a 16-byte device-readable
//! header (type, reserved, sector) in the first descriptor, the data buffers (device-writable for
//! IN and GET_ID, device-readable for OUT, none for FLUSH), and a 1-byte device-writable status
//! buffer last. A chain without a usable status byte cannot be answered and is dropped; every
//! other fault is answered with VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};

use super::disk::SECTOR_SIZE;
use crate::memory::GuestMemory;
use crate::virtio::chain::{ChainError, ValidChain};

/// Size of the request header.
pub const HEADER_SIZE: u32 = 16;
/// Most data bytes one request may move.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// Why a chain cannot be answered at all (it is returned unused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedRequest {
    /// The chain itself is invalid.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// No 1-byte device-writable status buffer at the end.
    #[error("no 1-byte device-writable status buffer at the end of the chain")]
    NoStatus,
}

/// Why a request with a usable status byte is refused (answered with an error status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The first descriptor is not a 16-byte device-readable header.
    #[error("the first descriptor is not a 16-byte device-readable header")]
    Header,
    /// Data buffers of the wrong direction, or missing, for the request type.
    #[error("data buffers of the wrong direction for the request")]
    Direction,
    /// Data not a whole number of sectors, or more than [`MAX_REQUEST_BYTES`].
    #[error("data length {0} is not a bounded whole number of sectors")]
    Length(u64),
    /// The sectors lie (partly) past the end of the disk.
    #[error("sectors {sector}+{count} are past the end of the disk")]
    Range {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
    },
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the (device-writable) data buffers.
    In,
    /// Write the (device-readable) data buffers to sectors.
    Out,
    /// Flush written data to stable storage.
    Flush,
    /// Write the device serial into the (device-writable) data buffers.
    GetId,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: RequestKind,
    /// First sector (IN and OUT).
    pub sector: u64,
    /// The data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
}

/// A chain that can be answered: where its status byte goes and the request or why it is bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    /// Address of the status byte.
    pub status: GuestAddress,
    /// The request, or why it is refused.
    pub request: Result<Request, BadRequest>,
}

fn total_len(bufs: &[(GuestAddress, u32)]) -> u64 {
    bufs.iter().map(|(_, l)| u64::from(*l)).sum()
}

/// Parses `chain` (already validated) of a disk of `disk_sectors` sectors.
pub fn parse_request(
    mem: &GuestMemory,
    chain: &ValidChain,
    disk_sectors: u64,
) -> Result<ParsedChain, MalformedRequest> {
    let status = match chain.writable.last() {
        Some(&(addr, 1)) => addr,
        _ => return Err(MalformedRequest::NoStatus),
    };
    let writable_data = &chain.writable[..chain.writable.len() - 1];
    let request = parse_body(mem, chain, writable_data, disk_sectors);
    Ok(ParsedChain { status, request })
}

fn parse_body(
    mem: &GuestMemory,
    chain: &ValidChain,
    writable_data: &[(GuestAddress, u32)],
    disk_sectors: u64,
) -> Result<Request, BadRequest> {
    let (hdr_addr, readable_data) = match chain.readable.split_first() {
        Some((&(addr, HEADER_SIZE), rest)) => (addr, rest),
        _ => return Err(BadRequest::Header),
    };
    let mut hdr = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut hdr, hdr_addr)
        .map_err(|_| BadRequest::Header)?;
    let type_ = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let (kind, data) = match type_ {
        VIRTIO_BLK_T_IN if readable_data.is_empty() && !writable_data.is_empty() => {
            (RequestKind::In, writable_data)
        }
        VIRTIO_BLK_T_OUT if writable_data.is_empty() && !readable_data.is_empty() => {
            (RequestKind::Out, readable_data)
        }
        VIRTIO_BLK_T_FLUSH if readable_data.is_empty() && writable_data.is_empty() => {
            (RequestKind::Flush, writable_data)
        }
        VIRTIO_BLK_T_GET_ID if readable_data.is_empty() && !writable_data.is_empty() => {
            (RequestKind::GetId, writable_data)
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID => {
            return Err(BadRequest::Direction)
        }
        other => return Err(BadRequest::Unsupported(other)),
    };
    if matches!(kind, RequestKind::In | RequestKind::Out) {
        let len = total_len(data);
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return Err(BadRequest::Length(len));
        }
        let count = len / SECTOR_SIZE;
        if sector
            .checked_add(count)
            .is_none_or(|end| end > disk_sectors)
        {
            return Err(BadRequest::Range { sector, count });
        }
    }
    Ok(Request {
        kind,
        sector,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    const HDR: GuestAddress = GuestAddress(0x1000);
    const DATA: GuestAddress = GuestAddress(0x2000);
    const STATUS: GuestAddress = GuestAddress(0x3000);

    fn mem_with_header(type_: u32, sector: u64) -> GuestMemory {
        let mem = create_guest_memory(2).unwrap();
        mem.write_obj(type_, HDR).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR.0 + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR.0 + 8)).unwrap();
        mem
    }

    fn chain(readable: &[(GuestAddress, u32)], writable: &[(GuestAddress, u32)]) -> ValidChain {
        ValidChain {
            head: 0,
            readable: readable.to_vec(),
            writable: writable.to_vec(),
        }
    }

    fn parse(
        type_: u32,
        sector: u64,
        readable: &[(GuestAddress, u32)],
        writable: &[(GuestAddress, u32)],
    ) -> Result<ParsedChain, MalformedRequest> {
        parse_request(
            &mem_with_header(type_, sector),
            &chain(readable, writable),
            8,
        )
    }

    #[test]
    fn good_requests_parse() {
        let r = parse(
            VIRTIO_BLK_T_IN,
            6,
            &[(HDR, 16)],
            &[(DATA, 1024), (STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.status, STATUS);
        assert_eq!(
            r.request,
            Ok(Request {
                kind: RequestKind::In,
                sector: 6,
                data: vec![(DATA, 1024)]
            })
        );
        let r = parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[(HDR, 16), (DATA, 512)],
            &[(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.request.unwrap().kind, RequestKind::Out);
        let r = parse(VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16)], &[(STATUS, 1)]).unwrap();
        assert_eq!(r.request.unwrap().kind, RequestKind::Flush);
        let r = parse(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16)],
            &[(DATA, 20), (STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.request.unwrap().kind, RequestKind::GetId);
    }

    #[test]
    fn sectors_past_the_end_are_refused() {
        let r = parse(
            VIRTIO_BLK_T_IN,
            7,
            &[(HDR, 16)],
            &[(DATA, 1024), (STATUS, 1)],
        )
        .unwrap();
        assert_eq!(
            r.request,
            Err(BadRequest::Range {
                sector: 7,
                count: 2
            })
        );
        let r = parse(
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[(HDR, 16)],
            &[(DATA, 512), (STATUS, 1)],
        );
        assert!(matches!(r.unwrap().request, Err(BadRequest::Range { .. })));
        let r = parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[(HDR, 16), (DATA, 100)],
            &[(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.request, Err(BadRequest::Length(100)));
    }

    #[test]
    fn chains_without_a_status_byte_are_malformed() {
        let r = parse(VIRTIO_BLK_T_IN, 0, &[(HDR, 16)], &[(DATA, 512)]);
        assert_eq!(r, Err(MalformedRequest::NoStatus));
        let r = parse(VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16)], &[]);
        assert_eq!(r, Err(MalformedRequest::NoStatus));
    }

    #[test]
    fn wrong_directions_and_bad_headers_are_refused() {
        // IN with a device-readable data buffer.
        let r = parse(
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16), (DATA, 512)],
            &[(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.request, Err(BadRequest::Direction));
        // OUT with a device-writable data buffer.
        let r = parse(
            VIRTIO_BLK_T_OUT,
            0,
            &[(HDR, 16)],
            &[(DATA, 512), (STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.request, Err(BadRequest::Direction));
        // Header too short, or missing.
        let r = parse(VIRTIO_BLK_T_IN, 0, &[(HDR, 8)], &[(DATA, 512), (STATUS, 1)]).unwrap();
        assert_eq!(r.request, Err(BadRequest::Header));
        let r = parse(VIRTIO_BLK_T_IN, 0, &[], &[(DATA, 512), (STATUS, 1)]).unwrap();
        assert_eq!(r.request, Err(BadRequest::Header));
        let r = parse(99, 0, &[(HDR, 16)], &[(STATUS, 1)]).unwrap();
        assert_eq!(r.request, Err(BadRequest::Unsupported(99)));
    }
}
