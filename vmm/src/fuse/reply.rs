//! Building replies: the `fuse_out_header` (whose `len` must equal the reply's length), error
//! replies, and the conversion of host `stat`/`statvfs` results into the wire attributes.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::stat::FileStat;
use nix::sys::statvfs::Statvfs;

use super::abi::{Attr, AttrOut, EntryOut, StatfsOut, OUT_HEADER_SIZE};

/// How long the guest may cache entries and attributes. Short, because the host (the job's other
/// processes, or the shepherd) may change the shared files under the guest, and the server sends
/// no invalidations.
pub const ATTR_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts a reply to request `unique`: clears `reply` and writes a header whose length
/// [`finish`] fills in.
pub fn begin(reply: &mut Vec<u8>, unique: u64) {
    reply.clear();
    reply.extend_from_slice(&0u32.to_le_bytes());
    reply.extend_from_slice(&0i32.to_le_bytes());
    reply.extend_from_slice(&unique.to_le_bytes());
}

/// Completes the reply begun by [`begin`] with its body appended: sets `len`.
pub fn finish(reply: &mut [u8]) {
    let len = reply.len() as u32;
    if let Some(field) = reply.get_mut(..4) {
        field.copy_from_slice(&len.to_le_bytes());
    }
}

/// Replaces the reply with an error reply (a header only) for `errno`.
pub fn error(reply: &mut Vec<u8>, unique: u64, errno: Errno) {
    begin(reply, unique);
    // Errno::UnknownErrno is 0, which would claim success with no body: send EIO instead.
    let code = match errno as i32 {
        0 => libc::EIO,
        e => e,
    };
    reply[4..8].copy_from_slice(&(-code).to_le_bytes());
    finish(reply);
    debug_assert_eq!(reply.len(), OUT_HEADER_SIZE);
}

/// The wire attributes of a host file.
pub fn attr_from_stat(st: &FileStat) -> Attr {
    // The kernel ABI carries times as unsigned seconds; times before 1970 wrap, as in every
    // FUSE server that passes them through.
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: encode_rdev(st.st_rdev),
        blksize: st.st_blksize as u32,
    }
}

/// The 32-bit device number the FUSE ABI carries (the kernel decodes it with
/// `new_decode_dev`: minor's low 8 bits, major's 12 bits, minor's high 12 bits).
fn encode_rdev(rdev: u64) -> u32 {
    let major = libc::major(rdev);
    let minor = libc::minor(rdev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The wire entry for node `nodeid` with attributes `st`.
pub fn entry_out(nodeid: u64, st: &FileStat) -> EntryOut {
    EntryOut {
        nodeid,
        generation: 0,
        entry_valid: ATTR_TIMEOUT.as_secs(),
        attr_valid: ATTR_TIMEOUT.as_secs(),
        entry_valid_nsec: ATTR_TIMEOUT.subsec_nanos(),
        attr_valid_nsec: ATTR_TIMEOUT.subsec_nanos(),
        attr: attr_from_stat(st),
    }
}

/// The wire `fuse_attr_out` for attributes `st`.
pub fn attr_out(st: &FileStat) -> AttrOut {
    AttrOut {
        attr_valid: ATTR_TIMEOUT.as_secs(),
        attr_valid_nsec: ATTR_TIMEOUT.subsec_nanos(),
        attr: attr_from_stat(st),
    }
}

/// The wire `fuse_statfs_out` for a host `statvfs`.
pub fn statfs_out(st: &Statvfs) -> StatfsOut {
    StatfsOut {
        blocks: st.blocks(),
        bfree: st.blocks_free(),
        bavail: st.blocks_available(),
        files: st.files(),
        ffree: st.files_free(),
        bsize: st.block_size() as u32,
        namelen: st.name_max() as u32,
        frsize: st.fragment_size() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reply_is_a_header_with_the_negated_errno() {
        let mut reply = vec![1, 2, 3];
        error(&mut reply, 0x1122_3344_5566_7788, Errno::ENOENT);
        assert_eq!(reply.len(), 16);
        assert_eq!(&reply[..4], &16u32.to_le_bytes());
        assert_eq!(&reply[4..8], &(-libc::ENOENT).to_le_bytes());
        assert_eq!(&reply[8..], &0x1122_3344_5566_7788u64.to_le_bytes());
    }

    #[test]
    fn device_numbers_use_the_kernels_32_bit_encoding() {
        // /dev/null is 1:3, /dev/sdq is 65:0 , a large minor 259:0x12345 keeps its bits.
        assert_eq!(encode_rdev(libc::makedev(1, 3)), 0x103);
        assert_eq!(encode_rdev(libc::makedev(259, 0x12345)), 0x12310345);
    }
}
