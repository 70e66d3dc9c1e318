//! Target `fuse_request`: a sequence of FUSE requests from the guest through
//! [`FuseServer::handle`], on a fresh share (files, a subdirectory, symlinks that point out of
//! it) next to a sentinel directory. Properties: no panic; every reply is well formed (its
//! header's length is the reply's, the request's `unique`, an errno in range and no body with
//! an error, at most [`MAX_REPLY`] bytes); only FORGET, BATCH_FORGET and INTERRUPT (or a request
//! shorter than a header) go unanswered; nothing outside the share changes; a reset leaves only
//! the root inode and no open handle.
//!
//! Input: one flags byte (bit 0 read-only share, bit 1 start with a valid INIT, bits 2.. the
//! protocol minor it offers), then requests, each `ctl: u8, opcode: u8, nodeid: u8 (or u64 when
//! ctl bit 2), body_len: u16, body`; ctl bits 0-1 make the header's length field right (0),
//! short, long, or arbitrary.

use vmm::fuse::{FuseServer, Handled, MAX_REPLY};

use super::scratch::Scratch;
use crate::input::ByteCursor;

/// Size of `fuse_in_header`.
const IN_HEADER_SIZE: usize = 40;
/// Size of `fuse_out_header`.
const OUT_HEADER_SIZE: usize = 16;
/// Most requests in one case.
const MAX_REQUESTS: usize = 64;

const FORGET: u32 = 2;
const INIT: u32 = 26;
const INTERRUPT: u32 = 36;
const BATCH_FORGET: u32 = 42;

/// The protocol minors a case may offer at INIT (the structures change at 7.9 and 7.12).
const MINORS: [u32; 6] = [31, 12, 11, 9, 8, 5];

/// A request as the guest kernel frames it.
fn frame(header_len: u32, opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(IN_HEADER_SIZE + body.len());
    r.extend_from_slice(&header_len.to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    // uid, gid, pid (ignored by the server), padding.
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What a case reached, so tests can show the seeds get past INIT.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FuseOutcome {
    /// Requests answered.
    pub replies: usize,
    /// Requests answered with success.
    pub successes: usize,
}

/// Sends one request and checks what comes back; returns its errno (0 for success), or None
/// when it went unanswered.
fn send(server: &mut FuseServer, request: &[u8], reply: &mut Vec<u8>) -> Option<i32> {
    let handled = server.handle(request, reply);
    if request.len() < IN_HEADER_SIZE {
        assert_eq!(
            handled,
            Handled::NoReply,
            "a request without a header was answered"
        );
        return None;
    }
    let opcode = u32_at(request, 4);
    if matches!(opcode, FORGET | BATCH_FORGET | INTERRUPT) {
        assert_eq!(handled, Handled::NoReply, "opcode {opcode} was answered");
        return None;
    }
    assert_eq!(handled, Handled::Reply, "opcode {opcode} went unanswered");
    assert!(
        reply.len() >= OUT_HEADER_SIZE && reply.len() <= MAX_REPLY,
        "reply of {} bytes",
        reply.len()
    );
    assert_eq!(u32_at(reply, 0) as usize, reply.len(), "reply length field");
    assert_eq!(u64_at(reply, 8), u64_at(request, 8), "reply unique");
    let error = u32_at(reply, 4) as i32;
    assert!((-4095..=0).contains(&error), "errno {error} out of range");
    if error != 0 {
        assert_eq!(
            reply.len(),
            OUT_HEADER_SIZE,
            "an error reply carries a body"
        );
    }
    Some(error)
}

/// One case.
pub fn run(data: &[u8]) {
    play(data);
}

/// One case, with what it reached.
pub fn play(data: &[u8]) -> FuseOutcome {
    let mut outcome = FuseOutcome::default();
    let mut count = |errno: Option<i32>| {
        if let Some(e) = errno {
            outcome.replies += 1;
            outcome.successes += usize::from(e == 0);
        }
    };
    let mut input = ByteCursor::new(data);
    let flags = input.u8();
    let scratch = Scratch::new();
    let share = scratch.share();
    let mut server = FuseServer::new(&share, flags & 1 != 0).expect("a FUSE server on the share");
    let mut reply = Vec::new();
    let mut unique = 0u64;
    if flags & 2 != 0 {
        let minor = MINORS[usize::from(flags >> 2) % MINORS.len()];
        let mut body = Vec::new();
        for word in [7u32, minor, 65536, u32::MAX] {
            body.extend_from_slice(&word.to_le_bytes());
        }
        let request = frame((IN_HEADER_SIZE + body.len()) as u32, INIT, unique, 0, &body);
        assert_eq!(
            send(&mut server, &request, &mut reply),
            Some(0),
            "a valid INIT failed"
        );
    }
    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        unique += 1;
        let ctl = input.u8();
        let opcode = u32::from(input.u8());
        let nodeid = if ctl & 4 != 0 {
            input.u64()
        } else {
            u64::from(input.u8())
        };
        let body_len = usize::from(input.u16());
        let body = input.bytes(body_len);
        let right = (IN_HEADER_SIZE + body.len()) as u32;
        let header_len = match ctl & 3 {
            0 => right,
            1 => right.saturating_sub(u32::from(ctl >> 3) + 1),
            2 => right + u32::from(ctl >> 3) + 1,
            _ => input.u32(),
        };
        let request = frame(header_len, opcode, unique, nodeid, body);
        count(send(&mut server, &request, &mut reply));
        // Requests cut short, as a guest's chain may be.
        if ctl & 0xc0 == 0xc0 {
            let cut = request.len().min(usize::from(ctl & 0x3f));
            count(send(&mut server, &request[..cut], &mut reply));
        }
    }
    scratch.assert_outside_unchanged();
    server.reset();
    assert_eq!(server.inode_count(), 1, "inodes left after a reset");
    assert_eq!(server.open_handle_count(), 0, "handles left after a reset");
    outcome
}

/// A request in the case format (correct header length).
fn op(opcode: u8, nodeid: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![0, opcode, nodeid];
    r.extend_from_slice(&(body.len() as u16).to_le_bytes());
    r.extend_from_slice(body);
    r
}

fn le(words: &[u64], widths: &[usize]) -> Vec<u8> {
    words
        .iter()
        .zip(widths)
        .flat_map(|(w, n)| w.to_le_bytes()[..*n].to_vec())
        .collect()
}

/// Sessions a guest kernel sends: look up, stat, open, read, write, list, create, rename,
/// symlink and unlink, on a writable and a read-only share.
pub fn seeds() -> Vec<Vec<u8>> {
    let lookup = |parent: u8, name: &[u8]| op(1, parent, &[name, b"\0"].concat());
    let read_in = le(&[1, 0, 4096, 0, 0, 0], &[8, 8, 4, 4, 8, 4]);
    let session = [
        lookup(1, b"file"),                                   // node 2
        op(3, 2, &[0u8; 16]),                                 // GETATTR
        op(14, 2, &le(&[2, 0], &[4, 4])),                     // OPEN O_RDWR -> fh 1
        op(15, 2, &[read_in.as_slice(), &[0u8; 4]].concat()), // READ fh 1
        op(
            16,
            2,
            &[
                le(&[1, 4, 3, 0, 0, 0], &[8, 8, 4, 4, 8, 8]),
                b"abc".to_vec(),
            ]
            .concat(),
        ), // WRITE
        op(18, 2, &le(&[1, 0, 0, 0], &[8, 4, 4, 8])),         // RELEASE
        op(27, 1, &le(&[0, 0], &[4, 4])),                     // OPENDIR root -> fh 2
        op(28, 1, &le(&[2, 0, 4096, 0, 0, 0], &[8, 8, 4, 4, 8, 4])), // READDIR
        op(29, 1, &le(&[2, 0, 0, 0], &[8, 4, 4, 8])),         // RELEASEDIR
        op(
            35,
            1,
            &[
                le(&[0o101, 0o644, 0o22, 0], &[4, 4, 4, 4]),
                b"new\0".to_vec(),
            ]
            .concat(),
        ), // CREATE
        op(
            12,
            1,
            &[le(&[1], &[8]), b"new\0renamed\0".to_vec()].concat(),
        ), // RENAME
        op(6, 1, &b"link\0../outside/secret\0"[..]),          // SYMLINK
        op(5, 4, &[]),                                        // READLINK
        lookup(1, b"out"),
        lookup(1, b"abs"),
        op(10, 1, &b"renamed\0"[..]), // UNLINK
        op(
            9,
            1,
            &[le(&[0o755, 0o22], &[4, 4]), b"sub\0".to_vec()].concat(),
        ), // MKDIR
        op(4, 2, &le(&[8, 0, 0, 3], &[4, 4, 8, 8])), // SETATTR size (truncated body)
        op(17, 1, &[]),               // STATFS
        op(2, 2, &le(&[1], &[8])),    // FORGET
        op(38, 0, &[]),               // DESTROY
    ];
    let all: Vec<u8> = session.concat();
    vec![
        [&[2u8][..], &all].concat(),
        [&[3u8][..], &all].concat(),
        [&[2u8 | (2 << 2)][..], &all].concat(),
        [&[0u8][..], &session[..3].concat()].concat(),
        [
            &[2u8][..],
            &lookup(1, b"dir"),
            &lookup(2, b"inner"),
            &lookup(1, b"up"),
        ]
        .concat(),
    ]
}
