//! PLACEHOLDER API (being implemented): a FUSE passthrough server for one shared host directory.

use std::path::{Path, PathBuf};

/// Largest WRITE payload the server accepts (and offers in INIT): 32 pages, the kernel's
/// default `max_pages`, so a request fits in a descriptor chain of the virtio-fs queue.
pub const MAX_WRITE: u32 = 128 * 1024;

/// Largest request the server accepts: a WRITE of [`MAX_WRITE`] plus its headers.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// Why a server could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The shared directory could not be opened.
    #[error("cannot open shared directory {path}: {source}")]
    OpenRoot {
        path: PathBuf,
        source: std::io::Error,
    },
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
pub struct FuseServer {
    _root: PathBuf,
    _read_only: bool,
}

impl FuseServer {
    /// Opens `root` (must be a directory). With `read_only`, modifying requests get EROFS.
    pub fn new(root: &Path, read_only: bool) -> Result<Self, FuseError> {
        Ok(Self {
            _root: root.to_path_buf(),
            _read_only: read_only,
        })
    }

    /// Handles one request (fuse_in_header + arguments); fills `reply` (cleared first).
    pub fn handle(&mut self, request: &[u8], reply: &mut Vec<u8>) -> Handled {
        reply.clear();
        if request.len() < 40 {
            return Handled::NoReply;
        }
        let unique = &request[8..16];
        reply.extend_from_slice(&16u32.to_le_bytes());
        reply.extend_from_slice(&(-libc::ENOSYS).to_le_bytes());
        reply.extend_from_slice(unique);
        Handled::Reply
    }
}
