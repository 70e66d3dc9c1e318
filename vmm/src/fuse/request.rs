//! Bounded parsing of one request: the `fuse_in_header` and the typed arguments of each opcode
//! this server implements. Everything here treats the bytes as hostile: every read is bounds
//! checked, names must be NUL terminated inside the request, and a short or malformed body is
//! EINVAL — never a panic.

use std::ffi::CStr;

use nix::errno::Errno;

use super::abi::{opcode, IN_HEADER_SIZE};

/// `fuse_in_header`. `uid`, `gid` and `pid` are deliberately not kept: the server acts with the
/// credentials of the thread that calls it, never with identities the guest claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    /// Decodes the header, or None when `request` is too short to carry one.
    pub fn parse(request: &[u8]) -> Option<Self> {
        let mut r = Reader::new(request.get(..IN_HEADER_SIZE)?);
        Some(Self {
            len: r.u32().ok()?,
            opcode: r.u32().ok()?,
            unique: r.u64().ok()?,
            nodeid: r.u64().ok()?,
        })
    }
}

/// A cursor over a request body that fails with EINVAL instead of reading past the end.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if self.bytes.len() < n {
            return Err(Errno::EINVAL);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Errno> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u32(&mut self) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Skips `n` bytes (padding, fields the server does not use).
    pub fn skip(&mut self, n: usize) -> Result<(), Errno> {
        self.take(n).map(drop)
    }

    /// A NUL-terminated string, which must end inside the body.
    pub fn c_str(&mut self) -> Result<&'a CStr, Errno> {
        let cstr = CStr::from_bytes_until_nul(self.bytes).map_err(|_| Errno::EINVAL)?;
        self.take(cstr.to_bytes_with_nul().len())?;
        Ok(cstr)
    }

    /// A NUL-terminated directory entry name, checked with [`check_name`].
    pub fn name(&mut self) -> Result<&'a CStr, Errno> {
        let name = self.c_str()?;
        check_name(name)?;
        Ok(name)
    }

    /// The `umask` and a padding or `open_flags` word that `fuse_mknod_in` and
    /// `fuse_create_in` gained at protocol 7.12; 0 (the kernel applied the umask) before.
    fn umask_since_7_12(&mut self, minor: u32) -> Result<u32, Errno> {
        if minor < 12 {
            return Ok(0);
        }
        let umask = self.u32()?;
        self.skip(4)?;
        Ok(umask)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }
}

/// Refuses names that could leave the directory they are looked up in or that name no entry:
/// empty, ".", "..", or containing '/'. (A NUL cannot occur inside a `CStr`.)
pub fn check_name(name: &CStr) -> Result<(), Errno> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// `fuse_setattr_in`, reduced to what the server applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The arguments of one request, by opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Destroy,
    Lookup {
        name: &'a CStr,
    },
    Forget {
        nlookup: u64,
    },
    /// (nodeid, nlookup) pairs; a truncated list is cut at the last whole pair.
    BatchForget {
        entries: Vec<(u64, u64)>,
    },
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a CStr,
        target: &'a CStr,
    },
    Mknod {
        name: &'a CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a CStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a CStr,
    },
    Rmdir {
        name: &'a CStr,
    },
    Rename {
        newdir: u64,
        flags: u32,
        oldname: &'a CStr,
        newname: &'a CStr,
    },
    Link {
        oldnodeid: u64,
        newname: &'a CStr,
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Flush {
        fh: u64,
    },
    Opendir {
        flags: u32,
    },
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir {
        fh: u64,
        datasync: bool,
    },
    Access {
        mask: u32,
    },
    Create {
        name: &'a CStr,
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Interrupt,
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    Syncfs,
    /// SETXATTR and REMOVEXATTR: not implemented, but modifying (EROFS on a read-only share).
    ModifyingUnsupported,
    /// Any other opcode: ENOSYS.
    Unsupported(u32),
}

impl<'a> Operation<'a> {
    /// Parses the body of a request with opcode `op`, for a peer of protocol minor `minor`
    /// (0 before INIT; structures changed size at 7.9 and 7.12).
    pub fn parse(op: u32, body: &'a [u8], minor: u32) -> Result<Self, Errno> {
        let mut r = Reader::new(body);
        let fh_only = |r: &mut Reader| r.u64();
        Ok(match op {
            opcode::INIT => Operation::Init {
                major: r.u32()?,
                minor: r.u32()?,
                max_readahead: r.u32()?,
                flags: r.u32()?,
            },
            opcode::DESTROY => Operation::Destroy,
            opcode::LOOKUP => Operation::Lookup { name: r.name()? },
            opcode::FORGET => Operation::Forget { nlookup: r.u64()? },
            opcode::BATCH_FORGET => {
                let count = r.u32()? as usize;
                r.skip(4)?;
                let whole = (r.remaining() / 16).min(count);
                let mut entries = Vec::with_capacity(whole);
                for _ in 0..whole {
                    entries.push((r.u64()?, r.u64()?));
                }
                Operation::BatchForget { entries }
            }
            opcode::GETATTR => {
                // Before 7.9 GETATTR had no body.
                if r.remaining() == 0 {
                    Operation::Getattr { fh: None }
                } else {
                    let flags = r.u32()?;
                    r.skip(4)?;
                    let fh = r.u64()?;
                    Operation::Getattr {
                        fh: (flags & super::abi::GETATTR_FH != 0).then_some(fh),
                    }
                }
            }
            opcode::SETATTR => {
                let valid = r.u32()?;
                r.skip(4)?;
                let fh = r.u64()?;
                let size = r.u64()?;
                r.skip(8)?; // lock_owner
                let atime = r.u64()?;
                let mtime = r.u64()?;
                r.skip(8)?; // ctime
                let atimensec = r.u32()?;
                let mtimensec = r.u32()?;
                r.skip(4)?; // ctimensec
                let mode = r.u32()?;
                r.skip(4)?;
                let uid = r.u32()?;
                let gid = r.u32()?;
                Operation::Setattr(SetattrIn {
                    valid,
                    fh,
                    size,
                    atime,
                    mtime,
                    atimensec,
                    mtimensec,
                    mode,
                    uid,
                    gid,
                })
            }
            opcode::READLINK => Operation::Readlink,
            opcode::SYMLINK => Operation::Symlink {
                name: r.name()?,
                target: r.c_str()?,
            },
            opcode::MKNOD => {
                let mode = r.u32()?;
                let rdev = r.u32()?;
                let umask = r.umask_since_7_12(minor)?;
                Operation::Mknod {
                    mode,
                    rdev,
                    umask,
                    name: r.name()?,
                }
            }
            opcode::MKDIR => {
                let mode = r.u32()?;
                let umask = r.u32()?;
                Operation::Mkdir {
                    mode,
                    umask,
                    name: r.name()?,
                }
            }
            opcode::UNLINK => Operation::Unlink { name: r.name()? },
            opcode::RMDIR => Operation::Rmdir { name: r.name()? },
            opcode::RENAME | opcode::RENAME2 => {
                let newdir = r.u64()?;
                let flags = if op == opcode::RENAME2 {
                    let flags = r.u32()?;
                    r.skip(4)?;
                    flags
                } else {
                    0
                };
                Operation::Rename {
                    newdir,
                    flags,
                    oldname: r.name()?,
                    newname: r.name()?,
                }
            }
            opcode::LINK => Operation::Link {
                oldnodeid: r.u64()?,
                newname: r.name()?,
            },
            opcode::OPEN | opcode::OPENDIR => {
                let flags = r.u32()?;
                if op == opcode::OPEN {
                    Operation::Open { flags }
                } else {
                    Operation::Opendir { flags }
                }
            }
            opcode::READ | opcode::READDIR => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()?;
                if op == opcode::READ {
                    Operation::Read { fh, offset, size }
                } else {
                    Operation::Readdir { fh, offset, size }
                }
            }
            opcode::WRITE => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()? as usize;
                // fuse_write_in is 24 bytes before 7.9, 40 since.
                r.skip(if minor >= 9 { 20 } else { 4 })?;
                let data = r.rest();
                // The payload must be exactly what the header announces.
                if data.len() != size {
                    return Err(Errno::EINVAL);
                }
                Operation::Write { fh, offset, data }
            }
            opcode::STATFS => Operation::Statfs,
            opcode::RELEASE => Operation::Release {
                fh: fh_only(&mut r)?,
            },
            opcode::RELEASEDIR => Operation::Releasedir {
                fh: fh_only(&mut r)?,
            },
            opcode::FLUSH => Operation::Flush {
                fh: fh_only(&mut r)?,
            },
            opcode::FSYNC | opcode::FSYNCDIR => {
                let fh = r.u64()?;
                let datasync = r.u32()? & super::abi::FSYNC_FDATASYNC != 0;
                if op == opcode::FSYNC {
                    Operation::Fsync { fh, datasync }
                } else {
                    Operation::Fsyncdir { fh, datasync }
                }
            }
            opcode::ACCESS => Operation::Access { mask: r.u32()? },
            opcode::CREATE => {
                let flags = r.u32()?;
                let mode = r.u32()?;
                let umask = r.umask_since_7_12(minor)?;
                Operation::Create {
                    flags,
                    mode,
                    umask,
                    name: r.name()?,
                }
            }
            opcode::INTERRUPT => Operation::Interrupt,
            opcode::FALLOCATE => Operation::Fallocate {
                fh: r.u64()?,
                offset: r.u64()?,
                length: r.u64()?,
                mode: r.u32()?,
            },
            opcode::LSEEK => Operation::Lseek {
                fh: r.u64()?,
                offset: r.u64()?,
                whence: r.u32()?,
            },
            opcode::SYNCFS => Operation::Syncfs,
            opcode::SETXATTR | opcode::REMOVEXATTR => Operation::ModifyingUnsupported,
            other => Operation::Unsupported(other),
        })
    }

    /// Whether the operation changes the shared directory (refused with EROFS when read-only).
    pub fn modifies(&self) -> bool {
        const ACCESS_MODE: u32 = libc::O_ACCMODE as u32;
        match self {
            Operation::Setattr(_)
            | Operation::Symlink { .. }
            | Operation::Mknod { .. }
            | Operation::Mkdir { .. }
            | Operation::Unlink { .. }
            | Operation::Rmdir { .. }
            | Operation::Rename { .. }
            | Operation::Link { .. }
            | Operation::Write { .. }
            | Operation::Create { .. }
            | Operation::Fallocate { .. }
            | Operation::ModifyingUnsupported => true,
            Operation::Open { flags } => {
                flags & ACCESS_MODE != libc::O_RDONLY as u32 || flags & libc::O_TRUNC as u32 != 0
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        for bad in [&b"\0"[..], b".\0", b"..\0", b"a/b\0", b"/\0", b"a/../..\0"] {
            let mut r = Reader::new(bad);
            assert_eq!(r.name(), Err(Errno::EINVAL), "{bad:?}");
        }
        let mut r = Reader::new(b"...\0");
        assert_eq!(r.name().map(CStr::to_bytes), Ok(&b"..."[..]));
    }

    #[test]
    fn unterminated_names_and_short_bodies_are_einval() {
        assert_eq!(
            Operation::parse(opcode::LOOKUP, b"abc", 31),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            Operation::parse(opcode::READ, &[0u8; 19], 31),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            Operation::parse(opcode::RENAME, b"\x02\0\0\0\0\0\0\0a\0b", 31),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn a_write_whose_size_disagrees_with_its_payload_is_einval() {
        let mut body = Vec::new();
        body.extend_from_slice(&7u64.to_le_bytes()); // fh
        body.extend_from_slice(&0u64.to_le_bytes()); // offset
        body.extend_from_slice(&10u32.to_le_bytes()); // size
        body.extend_from_slice(&[0u8; 20]);
        body.extend_from_slice(b"short");
        assert_eq!(
            Operation::parse(opcode::WRITE, &body, 31),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn a_batch_forget_with_a_forged_count_reads_only_whole_entries() {
        let mut body = Vec::new();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&[0u8; 9]);
        assert_eq!(
            Operation::parse(opcode::BATCH_FORGET, &body, 31),
            Ok(Operation::BatchForget {
                entries: vec![(5, 1)]
            })
        );
    }

    #[test]
    fn open_for_writing_or_truncation_modifies() {
        let open = |flags: i32| Operation::Open {
            flags: flags as u32,
        };
        assert!(!open(libc::O_RDONLY).modifies());
        assert!(open(libc::O_WRONLY).modifies());
        assert!(open(libc::O_RDWR).modifies());
        assert!(open(libc::O_RDONLY | libc::O_TRUNC).modifies());
    }
}
