//! The FUSE wire protocol (Linux `include/uapi/linux/fuse.h`, protocol 7.31): opcodes, flags and
//! the fixed-size structures of requests and replies, with their little-endian encodings.
//!
//! Only the subset this server speaks is defined. Requests are decoded field by field from byte
//! slices (see `request.rs`), replies are encoded field by field here, so no structure is ever
//! reinterpreted from untrusted memory.

/// The protocol major version this server speaks.
pub const KERNEL_VERSION: u32 = 7;
/// The highest protocol minor version this server speaks.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The node id of the shared directory.
pub const ROOT_ID: u64 = 1;

/// Size of `fuse_in_header`.
pub const IN_HEADER_SIZE: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_SIZE: usize = 16;

/// Request opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const SYNCFS: u32 = 50;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` bits.
pub mod init_flags {
    /// Reads may be sent concurrently and out of order.
    pub const ASYNC_READ: u32 = 1 << 0;
    /// OPEN may carry O_TRUNC (the server truncates), instead of a separate SETATTR.
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    /// Writes larger than a page.
    pub const BIG_WRITES: u32 = 1 << 5;
}

/// `fuse_setattr_in.valid` bits.
pub mod setattr_valid {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1 << 0;
/// `fuse_fsync_in.fsync_flags`: sync data only.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;

/// `fuse_attr` (88 bytes; the first 80 before protocol 7.9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    /// Appends the encoding; `compat` (protocol < 7.9) omits `blksize` and the padding.
    pub fn encode(&self, out: &mut Vec<u8>, compat: bool) {
        for v in [
            self.ino,
            self.size,
            self.blocks,
            self.atime,
            self.mtime,
            self.ctime,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.atimensec,
            self.mtimensec,
            self.ctimensec,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        if !compat {
            out.extend_from_slice(&self.blksize.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // flags
        }
    }
}

/// `fuse_entry_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

impl EntryOut {
    pub fn encode(&self, out: &mut Vec<u8>, compat: bool) {
        for v in [
            self.nodeid,
            self.generation,
            self.entry_valid,
            self.attr_valid,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.entry_valid_nsec.to_le_bytes());
        out.extend_from_slice(&self.attr_valid_nsec.to_le_bytes());
        self.attr.encode(out, compat);
    }
}

/// `fuse_attr_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

impl AttrOut {
    pub fn encode(&self, out: &mut Vec<u8>, compat: bool) {
        out.extend_from_slice(&self.attr_valid.to_le_bytes());
        out.extend_from_slice(&self.attr_valid_nsec.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // dummy
        self.attr.encode(out, compat);
    }
}

/// `fuse_open_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
}

impl OpenOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fh.to_le_bytes());
        out.extend_from_slice(&self.open_flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // padding
    }
}

/// `fuse_init_out` (64 bytes at 7.23 and later; 24 bytes before 7.23; 8 before 7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
}

impl InitOut {
    /// Appends the encoding, sized for the peer's protocol minor version.
    pub fn encode(&self, out: &mut Vec<u8>, peer_minor: u32) {
        let start = out.len();
        out.extend_from_slice(&self.major.to_le_bytes());
        out.extend_from_slice(&self.minor.to_le_bytes());
        out.extend_from_slice(&self.max_readahead.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.max_background.to_le_bytes());
        out.extend_from_slice(&self.congestion_threshold.to_le_bytes());
        out.extend_from_slice(&self.max_write.to_le_bytes());
        out.extend_from_slice(&self.time_gran.to_le_bytes());
        // max_pages (0: the kernel keeps its default, as FUSE_MAX_PAGES is not offered),
        // map_alignment, flags2, unused[7].
        out.resize(start + INIT_OUT_SIZE, 0);
        out.truncate(start + init_out_size(peer_minor));
    }
}

/// Size of the full `fuse_init_out`.
pub const INIT_OUT_SIZE: usize = 64;

/// How much of `fuse_init_out` a peer of protocol minor `minor` expects.
pub fn init_out_size(minor: u32) -> usize {
    match minor {
        0..=4 => 8,   // FUSE_COMPAT_INIT_OUT_SIZE
        5..=22 => 24, // FUSE_COMPAT_22_INIT_OUT_SIZE
        _ => INIT_OUT_SIZE,
    }
}

/// `fuse_kstatfs` inside `fuse_statfs_out` (80 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl StatfsOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.blocks, self.bfree, self.bavail, self.files, self.ffree] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.bsize, self.namelen, self.frsize] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        // padding, spare[6]
        out.extend_from_slice(&[0u8; 4 * 7]);
    }
}

/// Size of a `fuse_dirent` header (ino, off, namelen, type) before the name.
pub const DIRENT_HEADER_SIZE: usize = 24;

/// Size of a `fuse_dirent` with a name of `name_len` bytes, padded to 8 bytes.
pub fn dirent_size(name_len: usize) -> usize {
    (DIRENT_HEADER_SIZE + name_len + 7) & !7
}

/// Appends a `fuse_dirent` with its name and padding.
pub fn encode_dirent(out: &mut Vec<u8>, ino: u64, off: u64, kind: u32, name: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    out.resize(start + dirent_size(name.len()), 0);
}
