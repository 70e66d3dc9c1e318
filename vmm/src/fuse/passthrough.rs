//! The operations on the host: every request that touches the shared directory ends here, acting
//! on descriptors from the inode and handle tables, with the credentials of the calling thread.
//!
//! Confinement rests on three rules. Names are resolved one component at a time with
//! `openat(parent, name, O_PATH|O_NOFOLLOW)` (names containing '/' or being "." or ".." never get
//! here, see `request::check_name`), so a lookup cannot climb out of the share or follow a
//! symlink on the host. Inodes are reopened for I/O through `/proc/self/fd/<n>`, which names the
//! pinned inode itself rather than a path. And symlinks are never opened for I/O (ELOOP) and
//! never used as a directory (the host answers ENOTDIR).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, FallocateFlags, OFlag, RenameFlags};
use nix::sys::stat::{self, FchmodatFlags, FileStat, Mode, SFlag};
use nix::sys::statvfs::{self, Statvfs};
use nix::sys::time::TimeSpec;
use nix::sys::uio;
use nix::unistd::{self, AccessFlags, Gid, Uid, UnlinkatFlags, Whence};

use super::abi::{self, setattr_valid, ROOT_ID};
use super::descriptor_budget::DescriptorBudget;
use super::handle_table::{HandleKind, HandleTable};
use super::inode_table::InodeTable;
use super::kernel_fs::kernel_file_system_of;
use super::request::SetattrIn;
use super::session_state::{RestoreReport, SavedHandle, SavedInode};
use super::{FuseError, MAX_WRITE};

/// Open flags the guest may pass through to the host on OPEN and CREATE. Anything else
/// (O_CREAT, O_EXCL, O_NOFOLLOW, O_PATH, O_TMPFILE, O_NOCTTY, ...) is dropped: the server adds
/// the creation and no-follow flags itself where they belong.
const PASSED_OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

/// Largest READDIR reply the server builds.
const MAX_READDIR: usize = MAX_WRITE as usize;

/// The host side of the server: the share's inodes, the guest's open files, and a descriptor of
/// `/proc/self/fd` to reopen inodes by number.
#[derive(Debug)]
pub struct Passthrough {
    pub inodes: InodeTable,
    pub handles: HandleTable,
    proc_self_fd: OwnedFd,
}

/// Takes ownership of a descriptor a system call just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open call of this module and nothing else
    // holds it, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `openat` returning an owned descriptor (always close-on-exec).
fn open_at<P: ?Sized + nix::NixPath>(
    dir: RawFd,
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    fcntl::openat(Some(dir), path, flags | OFlag::O_CLOEXEC, mode).map(owned)
}

/// Opens `path` in `dir` as a regular file for I/O: never blocks and never opens anything else.
/// The open is non-blocking (a FIFO or a terminal would otherwise stall the VMM thread that
/// serves the guest, which the guest could do on purpose with a forged OPEN); anything but a
/// regular file is closed again and refused (EISDIR for a directory, ENXIO otherwise: the guest
/// kernel handles FIFOs, sockets and devices itself and never opens them through FUSE); the
/// descriptor is made blocking again unless `flags` asked for O_NONBLOCK.
fn open_regular_at<P: ?Sized + nix::NixPath>(
    dir: RawFd,
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let fd = open_at(dir, path, flags | OFlag::O_NONBLOCK, mode)?;
    let st = stat::fstat(fd.as_raw_fd())?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(Errno::EISDIR),
        _ => return Err(Errno::ENXIO),
    }
    if !flags.contains(OFlag::O_NONBLOCK) {
        let status = OFlag::from_bits_truncate(fcntl::fcntl(fd.as_raw_fd(), fcntl::F_GETFL)?);
        fcntl::fcntl(fd.as_raw_fd(), fcntl::F_SETFL(status & !OFlag::O_NONBLOCK))?;
    }
    Ok(fd)
}

/// What an inode is reopened for.
#[derive(Debug, Clone, Copy)]
enum Reopen {
    /// With the flags as given (directories).
    AsIs,
    /// File I/O: regular files only, never blocking ([`open_regular_at`]).
    RegularFile,
}

/// The attributes of the inode `fd` refers to, without following it if it is a symlink.
fn stat_fd(fd: RawFd) -> Result<FileStat, Errno> {
    stat::fstatat(
        Some(fd),
        "",
        AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// The name of descriptor `fd` in `/proc/self/fd`.
fn proc_name(fd: RawFd) -> String {
    fd.to_string()
}

/// The host's identity of an inode, the key of the inode table.
fn inode_key(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// A u64 offset from the wire as a host file offset.
fn file_offset(offset: u64) -> Result<libc::off_t, Errno> {
    libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)
}

impl Passthrough {
    /// Opens the share `root` and `/proc/self/fd`.
    pub fn new(root: &Path, budget: DescriptorBudget) -> Result<Self, FuseError> {
        let open_root = || -> Result<(OwnedFd, FileStat), Errno> {
            let fd = fcntl::open(
                root,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map(owned)?;
            let st = stat_fd(fd.as_raw_fd())?;
            Ok((fd, st))
        };
        let (root_fd, root_st) = open_root().map_err(|e| FuseError::OpenRoot {
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        match kernel_file_system_of(&root_fd) {
            Ok(None) => {}
            Ok(Some(kind)) => {
                return Err(FuseError::KernelFileSystem {
                    path: root.to_path_buf(),
                    kind,
                })
            }
            Err(e) => {
                return Err(FuseError::OpenRoot {
                    path: root.to_path_buf(),
                    source: e.into(),
                })
            }
        }
        let proc_self_fd = fcntl::open(
            "/proc/self/fd",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(owned)
        .map_err(|e| FuseError::OpenProcSelfFd { source: e.into() })?;
        Ok(Self {
            inodes: InodeTable::new(root_fd, inode_key(&root_st), budget.clone()),
            handles: HandleTable::new(budget),
            proc_self_fd,
        })
    }

    fn inode_fd(&self, nodeid: u64) -> Result<RawFd, Errno> {
        Ok(self.inodes.get(nodeid)?.raw_fd())
    }

    /// Opens inode `nodeid` anew with `flags`, through `/proc/self/fd` (the inode, not a path);
    /// symlinks are never reopened.
    fn reopen(&self, nodeid: u64, flags: OFlag, how: Reopen) -> Result<OwnedFd, Errno> {
        let inode = self.inodes.get(nodeid)?;
        if inode.is_symlink() {
            return Err(Errno::ELOOP);
        }
        let open = match how {
            Reopen::AsIs => open_at::<str>,
            Reopen::RegularFile => open_regular_at::<str>,
        };
        open(
            self.proc_self_fd.as_raw_fd(),
            proc_name(inode.raw_fd()).as_str(),
            flags,
            Mode::empty(),
        )
    }

    /// The path of the inode behind `fd` inside the share, '/'-separated, empty for the root
    /// (`root` is the root's host path), as `/proc/self/fd` names it now; `None` when it has no
    /// name left (deleted) or no longer lies inside the share.
    fn path_in_share(&self, fd: RawFd, root: &[u8]) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStringExt;
        if stat_fd(fd).ok()?.st_nlink == 0 {
            return None;
        }
        let path = fcntl::readlinkat(Some(self.proc_self_fd.as_raw_fd()), proc_name(fd).as_str())
            .ok()?
            .into_vec();
        if path == root {
            return Some(Vec::new());
        }
        let below = if root == b"/" {
            path.strip_prefix(b"/")?
        } else {
            path.strip_prefix(root)?.strip_prefix(b"/")?
        };
        Some(below.to_vec())
    }

    /// For a snapshot: every inode the guest holds (but the root) and every open handle, with
    /// the path of its file inside the share.
    pub fn save_session(&self) -> (Vec<SavedInode>, Vec<SavedHandle>) {
        use std::os::unix::ffi::OsStringExt;
        let root = self
            .inodes
            .get(ROOT_ID)
            .ok()
            .and_then(|r| {
                fcntl::readlinkat(
                    Some(self.proc_self_fd.as_raw_fd()),
                    proc_name(r.raw_fd()).as_str(),
                )
                .ok()
            })
            .map(OsStringExt::into_vec)
            .unwrap_or_default();
        let mut inodes: Vec<SavedInode> = self
            .inodes
            .entries()
            .map(|(nodeid, inode, lookups)| SavedInode {
                nodeid,
                lookups,
                file_type: inode.file_type,
                path: self.path_in_share(inode.raw_fd(), &root),
            })
            .collect();
        inodes.extend(self.inodes.vanished().map(|(nodeid, lookups)| SavedInode {
            nodeid,
            lookups,
            file_type: 0,
            path: None,
        }));
        inodes.sort_by_key(|i| i.nodeid);
        let mut handles: Vec<SavedHandle> = self
            .handles
            .entries()
            .map(|(fh, handle)| SavedHandle {
                fh,
                kind: handle.kind,
                flags: fcntl::fcntl(handle.fd.as_raw_fd(), fcntl::F_GETFL).unwrap_or(0),
                path: self.path_in_share(handle.fd.as_raw_fd(), &root),
            })
            .collect();
        handles.extend(self.handles.vanished().map(|(fh, kind)| SavedHandle {
            fh,
            kind,
            flags: 0,
            path: None,
        }));
        handles.sort_by_key(|h| h.fh);
        (inodes, handles)
    }

    /// Opens `path` (inside the share, as [`Self::save_session`] recorded it) as an `O_PATH`
    /// descriptor: one component at a time from the root with `O_NOFOLLOW`, as lookups resolve
    /// names, so it neither follows a symlink nor leaves the share, and a kernel file system
    /// mounted below the share is refused as in a lookup.
    fn open_share_path(&self, path: &[u8]) -> Result<OwnedFd, Errno> {
        let root = self.inodes.get(ROOT_ID)?;
        let mut current = open_at(
            self.proc_self_fd.as_raw_fd(),
            proc_name(root.raw_fd()).as_str(),
            OFlag::O_PATH,
            Mode::empty(),
        )?;
        if path.is_empty() {
            return Ok(current);
        }
        for name in path.split(|b| *b == b'/') {
            if name.is_empty() || name == b"." || name == b".." {
                return Err(Errno::EINVAL);
            }
            let name = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
            let parent_dev = stat_fd(current.as_raw_fd())?.st_dev;
            let next = open_at(
                current.as_raw_fd(),
                name.as_c_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )?;
            if stat_fd(next.as_raw_fd())?.st_dev != parent_dev
                && kernel_file_system_of(&next)?.is_some()
            {
                return Err(Errno::EACCES);
            }
            current = next;
        }
        Ok(current)
    }

    /// After a restore: opens every inode and handle of `inodes` and `handles` again by its
    /// path, with this thread's identity. One that cannot be opened (or whose file type
    /// changed) becomes vanished; one the tables refuse (a node id or handle given twice, or
    /// beyond the tables' bounds: a crafted snapshot) is left out.
    pub fn restore_session(
        &mut self,
        inodes: &[SavedInode],
        handles: &[SavedHandle],
    ) -> RestoreReport {
        let mut report = RestoreReport::default();
        for saved in inodes {
            let found = saved.path.as_deref().and_then(|path| {
                let fd = self.open_share_path(path).ok()?;
                let st = stat_fd(fd.as_raw_fd()).ok()?;
                (st.st_mode & libc::S_IFMT == saved.file_type).then_some((fd, st))
            });
            let restored = match found {
                Some((fd, st)) => self
                    .inodes
                    .restore(
                        saved.nodeid,
                        fd,
                        inode_key(&st),
                        saved.file_type,
                        saved.lookups,
                    )
                    .map(|()| report.inodes += 1),
                None => self
                    .inodes
                    .restore_vanished(saved.nodeid, saved.lookups)
                    .map(|()| report.vanished_inodes += 1),
            };
            if let Err(e) = restored {
                tracing::warn!(nodeid = saved.nodeid, %e, "FUSE restore: node id left out");
            }
        }
        for saved in handles {
            let opened = saved.path.as_deref().and_then(|path| {
                let fd = self.open_share_path(path).ok()?;
                let name = proc_name(fd.as_raw_fd());
                match saved.kind {
                    HandleKind::Directory => open_at(
                        self.proc_self_fd.as_raw_fd(),
                        name.as_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                        Mode::empty(),
                    )
                    .ok(),
                    HandleKind::File => open_regular_at(
                        self.proc_self_fd.as_raw_fd(),
                        name.as_str(),
                        OFlag::from_bits_truncate(saved.flags & PASSED_OPEN_FLAGS & !libc::O_TRUNC),
                        Mode::empty(),
                    )
                    .ok(),
                }
            });
            let restored = match opened {
                Some(fd) => self
                    .handles
                    .restore(saved.fh, fd, saved.kind)
                    .map(|()| report.handles += 1),
                None => self
                    .handles
                    .restore_vanished(saved.fh, saved.kind)
                    .map(|()| report.vanished_handles += 1),
            };
            if let Err(e) = restored {
                tracing::warn!(fh = saved.fh, %e, "FUSE restore: handle left out");
            }
        }
        report
    }

    /// Looks `name` up in directory `parent`; on success the kernel holds one more lookup of the
    /// returned node id.
    pub fn lookup(&mut self, parent: u64, name: &CStr) -> Result<(u64, FileStat), Errno> {
        let parent = self.inodes.get(parent)?;
        let fd = open_at(
            parent.raw_fd(),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        let st = stat_fd(fd.as_raw_fd())?;
        // A mount below the share: procfs or the like mounted there is refused like a share of it.
        if st.st_dev != parent.dev() && kernel_file_system_of(&fd)?.is_some() {
            return Err(Errno::EACCES);
        }
        self.register_stat(fd, st)
    }

    /// Enters the inode of `fd` (an O_PATH descriptor) in the inode table.
    fn register(&mut self, fd: OwnedFd) -> Result<(u64, FileStat), Errno> {
        let st = stat_fd(fd.as_raw_fd())?;
        self.register_stat(fd, st)
    }

    /// [`Self::register`] for a descriptor already stat'ed as `st`.
    fn register_stat(&mut self, fd: OwnedFd, st: FileStat) -> Result<(u64, FileStat), Errno> {
        let id = self
            .inodes
            .insert_lookup(fd, inode_key(&st), st.st_mode & libc::S_IFMT)?;
        Ok((id, st))
    }

    pub fn getattr(&self, nodeid: u64, fh: Option<u64>) -> Result<FileStat, Errno> {
        match fh {
            Some(fh) => {
                let fd = self.handles.fd(fh, HandleKind::File)?;
                stat::fstat(fd)
            }
            None => stat_fd(self.inode_fd(nodeid)?),
        }
    }

    pub fn setattr(&self, nodeid: u64, s: &SetattrIn) -> Result<FileStat, Errno> {
        let inode = self.inodes.get(nodeid)?;
        let fd = inode.raw_fd();
        let proc_fd = self.proc_self_fd.as_raw_fd();
        let name = proc_name(fd);
        if s.valid & setattr_valid::MODE != 0 {
            if inode.is_symlink() {
                // Linux has no symlink permissions to change.
                return Err(Errno::EOPNOTSUPP);
            }
            stat::fchmodat(
                Some(proc_fd),
                name.as_str(),
                Mode::from_bits_truncate(s.mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )?;
        }
        if s.valid & (setattr_valid::UID | setattr_valid::GID) != 0 {
            // The guest's requested owner, applied with the thread's credentials: a job user
            // can only give a file to a group of theirs, as on the host.
            let uid = (s.valid & setattr_valid::UID != 0).then(|| Uid::from_raw(s.uid));
            let gid = (s.valid & setattr_valid::GID != 0).then(|| Gid::from_raw(s.gid));
            unistd::fchownat(
                Some(fd),
                "",
                uid,
                gid,
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        if s.valid & setattr_valid::SIZE != 0 {
            let size = file_offset(s.size)?;
            let handle = if s.valid & setattr_valid::FH != 0 {
                self.handles.get(s.fh, HandleKind::File).ok()
            } else {
                None
            };
            match handle {
                Some(fd) => unistd::ftruncate(fd, size)?,
                None => {
                    let file = self.reopen(nodeid, OFlag::O_WRONLY, Reopen::RegularFile)?;
                    unistd::ftruncate(&file, size)?;
                }
            }
        }
        if s.valid & (setattr_valid::ATIME | setattr_valid::MTIME) != 0 {
            let time = |set: u32, now: u32, secs: u64, nsecs: u32| {
                if s.valid & now != 0 {
                    Ok(TimeSpec::UTIME_NOW)
                } else if s.valid & set != 0 {
                    let secs = libc::time_t::try_from(secs).map_err(|_| Errno::EINVAL)?;
                    if nsecs >= 1_000_000_000 {
                        return Err(Errno::EINVAL);
                    }
                    Ok(TimeSpec::new(secs, nsecs.into()))
                } else {
                    Ok(TimeSpec::UTIME_OMIT)
                }
            };
            let atime = time(
                setattr_valid::ATIME,
                setattr_valid::ATIME_NOW,
                s.atime,
                s.atimensec,
            )?;
            let mtime = time(
                setattr_valid::MTIME,
                setattr_valid::MTIME_NOW,
                s.mtime,
                s.mtimensec,
            )?;
            if inode.is_symlink() {
                set_times_of_symlink(fd, &atime, &mtime)?;
            } else {
                stat::utimensat(
                    Some(proc_fd),
                    name.as_str(),
                    &atime,
                    &mtime,
                    stat::UtimensatFlags::FollowSymlink,
                )?;
            }
        }
        stat_fd(fd)
    }

    pub fn readlink(&self, nodeid: u64) -> Result<Vec<u8>, Errno> {
        use std::os::unix::ffi::OsStringExt;
        let target = fcntl::readlinkat(Some(self.inode_fd(nodeid)?), "")?;
        Ok(target.into_vec())
    }

    /// Gives a node the guest just created the permission bits it asked for: the host process's
    /// umask (process-wide, so not changed per request) may have removed some that the guest's
    /// own umask, already applied to `want`, kept.
    fn restore_mode(&self, nodeid: u64, st: FileStat, want: u32) -> Result<FileStat, Errno> {
        let want = want & 0o777;
        if st.st_mode & 0o777 == want || st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(st);
        }
        let fd = self.inode_fd(nodeid)?;
        let mode = (st.st_mode & 0o7000) | want;
        stat::fchmodat(
            Some(self.proc_self_fd.as_raw_fd()),
            proc_name(fd).as_str(),
            Mode::from_bits_truncate(mode),
            FchmodatFlags::FollowSymlink,
        )?;
        stat_fd(fd)
    }

    /// Makes a node `name` in `parent` with `make(parent_fd, mode)` and looks it up, giving it
    /// the guest's `mode` less the guest's `umask`.
    fn make_node(
        &mut self,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        make: impl FnOnce(RawFd, Mode) -> Result<(), Errno>,
    ) -> Result<(u64, FileStat), Errno> {
        // Refused before anything is made on the host.
        self.check_room_for_inode()?;
        let want = mode & !umask & 0o7777;
        make(self.inode_fd(parent)?, Mode::from_bits_truncate(want))?;
        let (id, st) = self.lookup(parent, name)?;
        Ok((id, self.restore_mode(id, st, want)?))
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> Result<(u64, FileStat), Errno> {
        self.make_node(parent, name, mode, umask, |dir, mode| {
            stat::mkdirat(Some(dir), name, mode)
        })
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> Result<(u64, FileStat), Errno> {
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => SFlag::S_IFREG,
            libc::S_IFIFO => SFlag::S_IFIFO,
            libc::S_IFSOCK => SFlag::S_IFSOCK,
            // Device nodes are refused even when the server runs as root: a guest-made node
            // with guest-chosen permissions would open host devices to host users.
            libc::S_IFCHR | libc::S_IFBLK => return Err(Errno::EPERM),
            _ => return Err(Errno::EINVAL),
        };
        self.make_node(parent, name, mode, umask, |dir, mode| {
            stat::mknodat(Some(dir), name, kind, mode, 0)
        })
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &CStr,
        target: &CStr,
    ) -> Result<(u64, FileStat), Errno> {
        // The target is stored, never followed by the server: any text is harmless. (Symlinks
        // have no mode of their own.)
        self.make_node(parent, name, 0o777, 0, |dir, _| {
            unistd::symlinkat(target, Some(dir), name)
        })
    }

    pub fn link(
        &mut self,
        nodeid: u64,
        newparent: u64,
        newname: &CStr,
    ) -> Result<(u64, FileStat), Errno> {
        let inode = self.inodes.get(nodeid)?;
        let newparent_fd = self.inode_fd(newparent)?;
        if inode.is_symlink() {
            // A magic link would resolve to the symlink's target; AT_EMPTY_PATH links the
            // symlink itself (it needs CAP_DAC_READ_SEARCH on hosts before Linux 6.10).
            unistd::linkat(
                Some(inode.raw_fd()),
                &b""[..],
                Some(newparent_fd),
                newname.to_bytes(),
                AtFlags::AT_EMPTY_PATH,
            )?;
        } else {
            let name = proc_name(inode.raw_fd());
            unistd::linkat(
                Some(self.proc_self_fd.as_raw_fd()),
                name.as_bytes(),
                Some(newparent_fd),
                newname.to_bytes(),
                AtFlags::AT_SYMLINK_FOLLOW,
            )?;
        }
        self.lookup(newparent, newname)
    }

    pub fn unlink(&self, parent: u64, name: &CStr, dir: bool) -> Result<(), Errno> {
        let flags = if dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        unistd::unlinkat(Some(self.inode_fd(parent)?), name, flags)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &CStr,
        newparent: u64,
        newname: &CStr,
        flags: u32,
    ) -> Result<(), Errno> {
        // RENAME_WHITEOUT is for overlay filesystems and needs CAP_MKNOD; not offered.
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(Errno::EINVAL);
        }
        fcntl::renameat2(
            Some(self.inode_fd(parent)?),
            name,
            Some(self.inode_fd(newparent)?),
            newname,
            RenameFlags::from_bits_truncate(flags),
        )
    }

    pub fn open(&mut self, nodeid: u64, flags: u32) -> Result<u64, Errno> {
        self.handles.check_room()?;
        let flags = OFlag::from_bits_truncate(flags as i32 & PASSED_OPEN_FLAGS);
        let fd = self.reopen(nodeid, flags, Reopen::RegularFile)?;
        self.handles.insert(fd, HandleKind::File)
    }

    pub fn opendir(&mut self, nodeid: u64) -> Result<u64, Errno> {
        self.handles.check_room()?;
        let fd = self.reopen(nodeid, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Reopen::AsIs)?;
        self.handles.insert(fd, HandleKind::Directory)
    }

    /// Creates (or, without O_EXCL, opens) `name` in `parent` and opens it.
    pub fn create(
        &mut self,
        parent: u64,
        name: &CStr,
        flags: u32,
        mode: u32,
        umask: u32,
    ) -> Result<(u64, FileStat, u64), Errno> {
        self.handles.check_room()?;
        self.check_room_for_inode()?;
        let parent_fd = self.inode_fd(parent)?;
        let want = mode & !umask & 0o7777;
        let base = OFlag::from_bits_truncate(flags as i32 & PASSED_OPEN_FLAGS) | OFlag::O_NOFOLLOW;
        let exclusive = flags as i32 & libc::O_EXCL != 0;
        // Create exclusively first, to know whether the file is new (only a new file gets the
        // guest's mode); without O_EXCL from the guest, an existing file is then just opened.
        // O_NOFOLLOW: an existing symlink named `name` is not followed on the host (ELOOP).
        let mut attempt = 0;
        let (file, created) = loop {
            attempt += 1;
            match open_regular_at(
                parent_fd,
                name,
                base | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::from_bits_truncate(want),
            ) {
                Ok(fd) => break (fd, true),
                Err(Errno::EEXIST) if !exclusive => {}
                Err(e) => return Err(e),
            }
            match open_regular_at(parent_fd, name, base, Mode::empty()) {
                Ok(fd) => break (fd, false),
                // Removed in between: try creating again, a bounded number of times.
                Err(Errno::ENOENT) if attempt < 3 => {}
                Err(e) => return Err(e),
            }
        };
        if created {
            let st = stat::fstat(file.as_raw_fd())?;
            if st.st_mode & 0o777 != want & 0o777 {
                stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(want))?;
            }
        }
        // The inode of the open file itself (not the name, which may change meanwhile).
        let path_fd = open_at(
            self.proc_self_fd.as_raw_fd(),
            proc_name(file.as_raw_fd()).as_str(),
            OFlag::O_PATH,
            Mode::empty(),
        )?;
        let (id, st) = self.register(path_fd)?;
        match self.handles.insert(file, HandleKind::File) {
            Ok(fh) => Ok((id, st, fh)),
            Err(e) => {
                self.inodes.forget(id, 1);
                Err(e)
            }
        }
    }

    fn check_room_for_inode(&self) -> Result<(), Errno> {
        if self.inodes.is_full() {
            return Err(Errno::ENFILE);
        }
        Ok(())
    }

    /// Reads up to `size` bytes (capped at [`MAX_WRITE`]) at `offset`, appending them to `out`.
    pub fn read(&self, fh: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno> {
        let fd = self.handles.get(fh, HandleKind::File)?;
        let offset = file_offset(offset)?;
        let size = size.min(MAX_WRITE) as usize;
        let start = out.len();
        out.resize(start + size, 0);
        match uio::pread(fd, &mut out[start..], offset) {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let fd = self.handles.get(fh, HandleKind::File)?;
        uio::pwrite(fd, data, file_offset(offset)?)
    }

    pub fn statfs(&self, nodeid: u64) -> Result<Statvfs, Errno> {
        statvfs::fstatvfs(&self.inodes.get(nodeid)?.fd)
    }

    pub fn release(&mut self, fh: u64, kind: HandleKind) -> Result<(), Errno> {
        self.handles.remove(fh, kind)
    }

    pub fn fsync(&self, fh: u64, kind: HandleKind, datasync: bool) -> Result<(), Errno> {
        let fd = self.handles.fd(fh, kind)?;
        if datasync {
            unistd::fdatasync(fd)
        } else {
            unistd::fsync(fd)
        }
    }

    /// Whether the calling thread's credentials grant `mask` (R_OK/W_OK/X_OK, or F_OK) on
    /// inode `nodeid`.
    pub fn access(&self, nodeid: u64, mask: u32) -> Result<(), Errno> {
        let inode = self.inodes.get(nodeid)?;
        let mask = AccessFlags::from_bits_truncate(mask as i32);
        if inode.is_symlink() {
            // Through /proc the check would land on the target; a symlink is always accessible.
            return stat_fd(inode.raw_fd()).map(drop);
        }
        // AT_EACCESS: the effective ids decide, as for every other operation of the server.
        unistd::faccessat(
            Some(self.proc_self_fd.as_raw_fd()),
            proc_name(inode.raw_fd()).as_str(),
            mask,
            AtFlags::AT_EACCESS,
        )
    }

    pub fn fallocate(&self, fh: u64, mode: u32, offset: u64, length: u64) -> Result<(), Errno> {
        let fd = self.handles.fd(fh, HandleKind::File)?;
        fcntl::fallocate(
            fd,
            FallocateFlags::from_bits_truncate(mode as i32),
            file_offset(offset)?,
            file_offset(length)?,
        )
    }

    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        let fd = self.handles.fd(fh, HandleKind::File)?;
        let whence = match whence as i32 {
            libc::SEEK_SET => Whence::SeekSet,
            libc::SEEK_CUR => Whence::SeekCur,
            libc::SEEK_END => Whence::SeekEnd,
            libc::SEEK_DATA => Whence::SeekData,
            libc::SEEK_HOLE => Whence::SeekHole,
            _ => return Err(Errno::EINVAL),
        };
        // The offset is a signed value on the wire's u64 (SEEK_CUR/SEEK_END may go back).
        let pos = unistd::lseek(fd, offset as i64, whence)?;
        Ok(pos as u64)
    }

    pub fn syncfs(&self) -> Result<(), Errno> {
        let dir = self.reopen(ROOT_ID, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Reopen::AsIs)?;
        unistd::syncfs(dir.as_raw_fd())
    }

    /// Appends to `out` the entries of directory handle `fh` from host position `offset`, as
    /// `fuse_dirent`s whose `off` is the host's position after each entry, at most `size`
    /// bytes (capped).
    pub fn readdir(&self, fh: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno> {
        let fd = self.handles.fd(fh, HandleKind::Directory)?;
        unistd::lseek(fd, file_offset(offset)?, Whence::SeekSet)?;
        let budget = (size as usize).min(MAX_READDIR);
        let start = out.len();
        // At least one whole host entry must fit in the buffer (names are up to 255 bytes).
        let mut buf = vec![0u8; budget.max(1024)];
        loop {
            let n = getdents64(fd, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut entries = &buf[..n];
            while let Some((entry, rest)) = HostDirent::parse(entries) {
                entries = rest;
                let used = out.len() - start;
                if used + abi::dirent_size(entry.name.len()) > budget {
                    if used == 0 {
                        // Not even one entry fits: an empty reply would read as the end.
                        return Err(Errno::EINVAL);
                    }
                    return Ok(());
                }
                abi::encode_dirent(out, entry.ino, entry.off, entry.kind, entry.name);
            }
        }
    }
}

/// Reads host directory entries (`struct linux_dirent64`) into `buf`; returns the byte count,
/// 0 at the end.
fn getdents64(fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, a live exclusive slice.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    Errno::result(n).map(|n| n as usize)
}

/// One `linux_dirent64` from the host.
struct HostDirent<'a> {
    ino: u64,
    off: u64,
    kind: u32,
    name: &'a [u8],
}

impl<'a> HostDirent<'a> {
    /// Header: d_ino (8), d_off (8), d_reclen (2), d_type (1), then the NUL-terminated name.
    const HEADER: usize = 19;

    /// Splits the first entry off `bytes` (None at the end or on a malformed record).
    fn parse(bytes: &'a [u8]) -> Option<(Self, &'a [u8])> {
        let header = bytes.get(..Self::HEADER)?;
        let ino = u64::from_ne_bytes(header[0..8].try_into().ok()?);
        let off = u64::from_ne_bytes(header[8..16].try_into().ok()?);
        let reclen = u16::from_ne_bytes(header[16..18].try_into().ok()?) as usize;
        let kind = u32::from(header[18]);
        let record = bytes.get(Self::HEADER..reclen)?;
        let name_len = record.iter().position(|&b| b == 0)?;
        Some((
            Self {
                ino,
                off,
                kind,
                name: &record[..name_len],
            },
            bytes.get(reclen..)?,
        ))
    }
}

/// Changes the times of the symlink `fd` itself (a `/proc/self/fd` path would reach its target).
fn set_times_of_symlink(fd: RawFd, atime: &TimeSpec, mtime: &TimeSpec) -> Result<(), Errno> {
    let times = [*atime.as_ref(), *mtime.as_ref()];
    // SAFETY: a NUL-terminated empty path and a two-element timespec array, both live for the
    // call; AT_EMPTY_PATH makes the call act on `fd` itself.
    let rc = unsafe { libc::utimensat(fd, c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) };
    Errno::result(rc).map(drop)
}
