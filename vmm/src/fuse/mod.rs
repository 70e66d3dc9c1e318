//! A FUSE passthrough server for one shared host directory: the file system behind the
//! virtio-fs device, spoken to by the guest kernel's FUSE client (and, in tests, by the host's
//! own through `/dev/fuse`).
//!
//! This module owns the protocol state (whether INIT happened and at which protocol version),
//! the dispatch of each request to its host operation, and the read-only policy. The wire format
//! is in `abi`, request parsing in `request`, reply building in `reply`, the host side in
//! `passthrough` with its `inode_table` and `handle_table`, and what a snapshot keeps of a
//! session in [`session_state`].
//!
//! The server acts with the credentials of the thread that calls [`FuseServer::handle`] (the
//! VMM switches that thread to the job user): the uid, gid and pid in each request header are
//! ignored, so the guest can do on the share exactly what the job user can do on the host.

mod abi;
mod descriptor_budget;
mod handle_table;
mod inode_table;
mod kernel_fs;
mod passthrough;
mod reply;
mod request;
pub mod session_state;

use std::path::{Path, PathBuf};

use nix::errno::Errno;

use abi::{init_flags, InitOut, OpenOut, IN_HEADER_SIZE};
use passthrough::Passthrough;
use request::{InHeader, Operation};

pub use descriptor_budget::DescriptorBudget;
pub use handle_table::HandleKind;
pub use kernel_fs::{kernel_file_system_at, kernel_file_system_of};
pub use session_state::{RestoreReport, SessionState};

/// Largest WRITE payload the server accepts (and offers in INIT): 32 pages, the kernel's
/// default `max_pages`, so a request fits in a descriptor chain of the virtio-fs queue.
pub const MAX_WRITE: u32 = 128 * 1024;

/// Largest request the server accepts: a WRITE of [`MAX_WRITE`] plus its headers.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// Largest reply the server builds: a READ or READDIR of [`MAX_WRITE`] bytes after the
/// `fuse_out_header` (every other reply is smaller), so a device can size its buffers.
pub const MAX_REPLY: usize = MAX_WRITE as usize + abi::OUT_HEADER_SIZE;

/// The INIT flags the server accepts when the kernel offers them. Not offered on purpose:
/// READDIRPLUS (plain READDIR is enough and cheaper), MAX_PAGES (requests must fit the
/// virtqueue's chains at the kernel's default of 32 pages), POSIX locks (not implemented),
/// EXPORT_SUPPORT (no NFS export of the guest's mount), writeback caching (the host may change
/// files under the guest).
const SUPPORTED_INIT_FLAGS: u32 =
    init_flags::ASYNC_READ | init_flags::ATOMIC_O_TRUNC | init_flags::BIG_WRITES;

/// Replaces `reply` with a reply to `request` that carries only `errno` (with the request's
/// `unique`, or 0 when it has no header): for a transport that cannot deliver the reply the
/// server built.
pub fn error_reply(request: &[u8], errno: i32, reply: &mut Vec<u8>) {
    let unique = InHeader::parse(request).map_or(0, |h| h.unique);
    reply::error(reply, unique, Errno::from_raw(errno));
}

/// Why a server could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The shared directory could not be opened.
    #[error("cannot open shared directory {path}: {source}")]
    OpenRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `/proc/self/fd`, through which the server reopens inodes, could not be opened.
    #[error("cannot open /proc/self/fd (is /proc mounted?): {source}")]
    OpenProcSelfFd { source: std::io::Error },
    /// The shared directory is on a kernel interface file system (procfs, sysfs, …).
    #[error("shared directory {path} is on {kind}, a kernel interface file system, which is never shared")]
    KernelFileSystem { path: PathBuf, kind: &'static str },
}

/// Whether a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// `reply` holds the whole reply (fuse_out_header + body).
    Reply,
    /// No reply is sent (FORGET, BATCH_FORGET, INTERRUPT, or a request too short to answer).
    NoReply,
}

/// A passthrough server exporting one host directory.
#[derive(Debug)]
pub struct FuseServer {
    fs: Passthrough,
    read_only: bool,
    /// The negotiated protocol minor version; None until INIT (and again after DESTROY).
    minor: Option<u32>,
}

impl FuseServer {
    /// Opens `root` (must be a directory). With `read_only`, modifying requests get EROFS.
    /// Its inodes and handles draw on a budget of their own (see [`Self::with_budget`]).
    pub fn new(root: &Path, read_only: bool) -> Result<Self, FuseError> {
        Self::with_budget(root, read_only, DescriptorBudget::for_this_process())
    }

    /// Like [`Self::new`], with the host descriptors the guest holds (inodes and open handles)
    /// drawn from `budget`, which the servers of one VM share.
    pub fn with_budget(
        root: &Path,
        read_only: bool,
        budget: DescriptorBudget,
    ) -> Result<Self, FuseError> {
        Ok(Self {
            fs: Passthrough::new(root, budget)?,
            read_only,
            minor: None,
        })
    }

    /// Forgets the session: every inode but the root and every open handle, and the protocol
    /// version, as DESTROY does. For a transport that the guest reset (its driver then sends
    /// INIT again).
    pub fn reset(&mut self) {
        self.fs.inodes.forget_all();
        self.fs.handles.clear();
        self.minor = None;
    }

    /// For a snapshot: the protocol version and every node id and handle the guest holds, by
    /// path (see [`session_state`]).
    pub fn save_session(&self) -> SessionState {
        let (inodes, handles) = self.fs.save_session();
        SessionState {
            minor: self.minor,
            next_nodeid: self.fs.inodes.next_id(),
            next_fh: self.fs.handles.next_fh(),
            inodes,
            handles,
        }
    }

    /// After a restore, on the thread that serves the guest (its identity opens the files):
    /// takes a session [`Self::save_session`] gave, replacing whatever this server held, and
    /// opens its files again by path; those that cannot be become vanished (EIO to the guest).
    pub fn restore_session(&mut self, state: &SessionState) -> RestoreReport {
        self.reset();
        self.minor = state.minor;
        let report = self.fs.restore_session(&state.inodes, &state.handles);
        self.fs.inodes.restore_next_id(state.next_nodeid);
        self.fs.handles.restore_next_fh(state.next_fh);
        report
    }

    /// How many inodes the guest holds (the root included); each holds a host descriptor.
    pub fn inode_count(&self) -> usize {
        self.fs.inodes.len()
    }

    /// How many files and directories the guest holds open.
    pub fn open_handle_count(&self) -> usize {
        self.fs.handles.len()
    }

    /// Lowers the inode and handle limits (tests of exhaustion).
    #[cfg(test)]
    fn set_limits(&mut self, inodes: usize, handles: usize) {
        self.fs.inodes.set_limit(inodes);
        self.fs.handles.set_limit(handles);
    }

    /// Handles one request (fuse_in_header + arguments); fills `reply` (cleared first).
    pub fn handle(&mut self, request: &[u8], reply: &mut Vec<u8>) -> Handled {
        reply.clear();
        let Some(header) = InHeader::parse(request) else {
            tracing::debug!(len = request.len(), "FUSE request too short for a header");
            return Handled::NoReply;
        };
        let well_formed = header.len as usize == request.len() && request.len() <= MAX_REQUEST;
        let body = &request[IN_HEADER_SIZE..];
        if matches!(
            header.opcode,
            abi::opcode::FORGET | abi::opcode::BATCH_FORGET | abi::opcode::INTERRUPT
        ) {
            // Never answered, even when malformed. INTERRUPT needs nothing: every request is
            // answered before the next is read.
            if well_formed {
                self.forget(&header, body);
            }
            return Handled::NoReply;
        }
        let result = if well_formed {
            self.dispatch(&header, body, reply)
        } else {
            Err(Errno::EINVAL)
        };
        match result {
            Ok(()) => reply::finish(reply),
            Err(errno) => {
                tracing::debug!(
                    opcode = header.opcode,
                    unique = header.unique,
                    nodeid = header.nodeid,
                    %errno,
                    "FUSE request failed"
                );
                reply::error(reply, header.unique, errno);
            }
        }
        Handled::Reply
    }

    fn forget(&mut self, header: &InHeader, body: &[u8]) {
        let minor = self.minor.unwrap_or(0);
        match Operation::parse(header.opcode, body, minor) {
            Ok(Operation::Forget { nlookup }) => self.fs.inodes.forget(header.nodeid, nlookup),
            Ok(Operation::BatchForget { entries }) => {
                for (nodeid, nlookup) in entries {
                    self.fs.inodes.forget(nodeid, nlookup);
                }
            }
            _ => {}
        }
    }

    /// Performs one request, appending the reply body after a header begun here.
    fn dispatch(
        &mut self,
        header: &InHeader,
        body: &[u8],
        reply: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let op = Operation::parse(header.opcode, body, self.minor.unwrap_or(0))?;
        tracing::trace!(
            unique = header.unique,
            nodeid = header.nodeid,
            ?op,
            "FUSE request"
        );
        let Some(minor) = self.minor else {
            if let Operation::Init {
                major,
                minor,
                max_readahead,
                flags,
            } = op
            {
                return self.init(header.unique, major, minor, max_readahead, flags, reply);
            }
            // Nothing is served before the protocol version is known.
            return Err(Errno::EIO);
        };
        if self.read_only && op.modifies() {
            return Err(Errno::EROFS);
        }
        // Structures before 7.9 lack their last fields.
        let compat = minor < 9;
        let nodeid = header.nodeid;
        let fs = &mut self.fs;
        reply::begin(reply, header.unique);
        match op {
            Operation::Init { .. } => return Err(Errno::EIO),
            Operation::Destroy => {
                // The guest unmounted: drop everything it held; a new mount starts with INIT.
                self.reset();
            }
            Operation::Lookup { name } => {
                let (id, st) = fs.lookup(nodeid, name)?;
                reply::entry_out(id, &st).encode(reply, compat);
            }
            Operation::Forget { .. } | Operation::BatchForget { .. } | Operation::Interrupt => {
                // Answered in `handle` (never).
            }
            Operation::Getattr { fh } => {
                let st = fs.getattr(nodeid, fh)?;
                reply::attr_out(&st).encode(reply, compat);
            }
            Operation::Setattr(setattr) => {
                let st = fs.setattr(nodeid, &setattr)?;
                reply::attr_out(&st).encode(reply, compat);
            }
            Operation::Readlink => reply.extend_from_slice(&fs.readlink(nodeid)?),
            Operation::Symlink { name, target } => {
                let (id, st) = fs.symlink(nodeid, name, target)?;
                reply::entry_out(id, &st).encode(reply, compat);
            }
            Operation::Mknod {
                name, mode, umask, ..
            } => {
                let (id, st) = fs.mknod(nodeid, name, mode, umask)?;
                reply::entry_out(id, &st).encode(reply, compat);
            }
            Operation::Mkdir { name, mode, umask } => {
                let (id, st) = fs.mkdir(nodeid, name, mode, umask)?;
                reply::entry_out(id, &st).encode(reply, compat);
            }
            Operation::Unlink { name } => fs.unlink(nodeid, name, false)?,
            Operation::Rmdir { name } => fs.unlink(nodeid, name, true)?,
            Operation::Rename {
                newdir,
                flags,
                oldname,
                newname,
            } => fs.rename(nodeid, oldname, newdir, newname, flags)?,
            Operation::Link { oldnodeid, newname } => {
                let (id, st) = fs.link(oldnodeid, nodeid, newname)?;
                reply::entry_out(id, &st).encode(reply, compat);
            }
            Operation::Open { flags } => {
                let fh = fs.open(nodeid, flags)?;
                OpenOut { fh, open_flags: 0 }.encode(reply);
            }
            Operation::Read { fh, offset, size } => fs.read(fh, offset, size, reply)?,
            Operation::Write { fh, offset, data } => {
                let written = fs.write(fh, offset, data)?;
                // At most MAX_REQUEST bytes arrive, so the count fits.
                reply.extend_from_slice(&(written as u32).to_le_bytes());
                reply.extend_from_slice(&0u32.to_le_bytes());
            }
            Operation::Statfs => reply::statfs_out(&fs.statfs(nodeid)?).encode(reply),
            Operation::Release { fh } => fs.release(fh, HandleKind::File)?,
            Operation::Releasedir { fh } => fs.release(fh, HandleKind::Directory)?,
            Operation::Fsync { fh, datasync } => fs.fsync(fh, HandleKind::File, datasync)?,
            Operation::Fsyncdir { fh, datasync } => {
                fs.fsync(fh, HandleKind::Directory, datasync)?
            }
            Operation::Flush { fh } => {
                // Nothing is buffered in the server, and no locks are held to drop.
                fs.handles.fd(fh, HandleKind::File)?;
            }
            Operation::Opendir { .. } => {
                let fh = fs.opendir(nodeid)?;
                OpenOut { fh, open_flags: 0 }.encode(reply);
            }
            Operation::Readdir { fh, offset, size } => fs.readdir(fh, offset, size, reply)?,
            Operation::Access { mask } => fs.access(nodeid, mask)?,
            Operation::Create {
                name,
                flags,
                mode,
                umask,
            } => {
                let (id, st, fh) = fs.create(nodeid, name, flags, mode, umask)?;
                reply::entry_out(id, &st).encode(reply, compat);
                OpenOut { fh, open_flags: 0 }.encode(reply);
            }
            Operation::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => fs.fallocate(fh, mode, offset, length)?,
            Operation::Lseek { fh, offset, whence } => {
                let pos = fs.lseek(fh, offset, whence)?;
                reply.extend_from_slice(&pos.to_le_bytes());
            }
            Operation::Syncfs => fs.syncfs()?,
            Operation::ModifyingUnsupported | Operation::Unsupported(_) => {
                return Err(Errno::ENOSYS)
            }
        }
        Ok(())
    }

    /// Negotiates the protocol version: the lower of the kernel's minor and ours, and the reply
    /// sized for what the kernel's minor expects.
    fn init(
        &mut self,
        unique: u64,
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
        reply: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        if major < abi::KERNEL_VERSION {
            return Err(Errno::EPROTO);
        }
        reply::begin(reply, unique);
        if major > abi::KERNEL_VERSION {
            // The protocol's answer to a newer kernel: state our major only; the kernel then
            // sends INIT again with ours.
            let ours = InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                max_readahead: 0,
                flags: 0,
                max_background: 0,
                congestion_threshold: 0,
                max_write: 0,
                time_gran: 0,
            };
            ours.encode(reply, abi::KERNEL_MINOR_VERSION);
            return Ok(());
        }
        let negotiated = minor.min(abi::KERNEL_MINOR_VERSION);
        InitOut {
            major: abi::KERNEL_VERSION,
            minor: negotiated,
            max_readahead,
            flags: flags & SUPPORTED_INIT_FLAGS,
            // 0: the kernel keeps its defaults.
            max_background: 0,
            congestion_threshold: 0,
            max_write: MAX_WRITE,
            // Host timestamps have nanosecond resolution.
            time_gran: 1,
        }
        .encode(reply, minor);
        tracing::debug!(kernel_minor = minor, negotiated, flags, "FUSE INIT");
        self.minor = Some(negotiated);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
