//! A FUSE session as a snapshot keeps it ([`SessionState`]): the negotiated protocol version and,
//! for every node id and file handle the guest holds, the file's path inside the share. The
//! descriptors themselves do not outlive the VMM process, so a restored server opens each file
//! again by its path ([`super::FuseServer::restore_session`]), one component at a time with
//! `O_NOFOLLOW` from the share's root as lookups do, with the identity of the thread that
//! serves the guest. A file that cannot be found again (deleted, moved out of the share, or no
//! longer the job user's to open) becomes *vanished*: the guest's uses of it are EIO, its
//! mount and every other file go on. Part of the snapshot format: the build id hashes this file
//! (see [`crate::snapshot::format`]).

use serde::{Deserialize, Serialize};

use super::handle_table::HandleKind;

/// A FUSE session's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The negotiated protocol minor version; `None` before INIT.
    pub minor: Option<u32>,
    /// The node id the next new inode gets.
    pub next_nodeid: u64,
    /// The number the next file handle gets.
    pub next_fh: u64,
    /// Every node id the guest holds but the root's.
    pub inodes: Vec<SavedInode>,
    /// Every file handle the guest holds.
    pub handles: Vec<SavedHandle>,
}

/// A node id the guest holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInode {
    /// The node id.
    pub nodeid: u64,
    /// The kernel's lookup count of it.
    pub lookups: u64,
    /// The file type bits of its mode (`S_IFMT`).
    pub file_type: u32,
    /// Its path relative to the share's root (bytes, '/'-separated); `None` for a file that was
    /// already gone when the snapshot was taken.
    pub path: Option<Vec<u8>>,
}

/// A file handle the guest holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHandle {
    /// The handle.
    pub fh: u64,
    /// File or directory.
    pub kind: HandleKind,
    /// The open flags of the host descriptor (access mode, O_APPEND, ...); O_TRUNC is never
    /// applied again.
    pub flags: i32,
    /// The file's path relative to the share's root; `None` for a file already gone.
    pub path: Option<Vec<u8>>,
}

/// What [`super::FuseServer::restore_session`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Node ids whose files were found again.
    pub inodes: usize,
    /// Handles opened again.
    pub handles: usize,
    /// Node ids that became vanished.
    pub vanished_inodes: usize,
    /// Handles that became vanished.
    pub vanished_handles: usize,
}
