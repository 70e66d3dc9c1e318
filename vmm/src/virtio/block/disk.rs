//! The host file behind a virtio-blk device: opened read-only or read-write, its size in
//! 512-byte sectors, positioned reads and writes (`pread`/`pwrite`, no shared file offset), and
//! flushing to stable storage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of a virtio-blk sector, whatever the backing file's block size.
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open disk image {path}: {source}")]
pub struct DiskError {
    /// The image.
    pub path: PathBuf,
    /// The error.
    pub source: std::io::Error,
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
}

impl Disk {
    /// Opens `path`; its capacity is its length rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let err = |source| DiskError {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        Ok(Self {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fills `buf` from byte `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at byte `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    /// Flushes written data to stable storage (nothing to do on a read-only disk).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rounds_down_and_read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![7u8; 3 * 512 + 100]).unwrap();
        let d = Disk::open(&path, true).unwrap();
        assert_eq!(d.sectors(), 3);
        let mut b = [0u8; 4];
        d.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [7; 4]);
        assert!(d.write_at(&[1], 0).is_err());
        assert!(d.flush().is_ok());
        let rw = Disk::open(&path, false).unwrap();
        rw.write_at(&[1, 2], 512).unwrap();
        rw.flush().unwrap();
        d.read_at(&mut b, 511).unwrap();
        assert_eq!(b, [7, 1, 2, 7]);
        assert!(Disk::open(&dir.path().join("missing"), true).is_err());
    }
}
