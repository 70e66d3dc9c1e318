//! Open files and directories of the guest: FUSE file handles (`fh`) mapped to host descriptors
//! opened by OPEN, OPENDIR and CREATE and closed by RELEASE and RELEASEDIR. Bounded, so a guest
//! cannot exhaust the host's descriptors by opening without releasing.
//!
//! After a restore from a snapshot, a handle whose file could not be opened again is kept as
//! *vanished*: every use of it is EIO until the guest releases it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::descriptor_budget::{Charge, DescriptorBudget};

/// How many files and directories the guest may hold open at once.
pub const MAX_HANDLES: usize = 65536;

/// What a handle refers to; a file handle used as a directory's (or back) is EBADF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HandleKind {
    File,
    Directory,
}

/// One open host file or directory.
#[derive(Debug)]
pub struct Handle {
    pub fd: OwnedFd,
    pub kind: HandleKind,
    /// The descriptor's share of the VM's budget, given back on close.
    _charge: Charge,
}

/// `fh` → open descriptor.
#[derive(Debug)]
pub struct HandleTable {
    handles: HashMap<u64, Handle>,
    /// Handles of a restored session whose files are gone.
    vanished: HashMap<u64, HandleKind>,
    next_fh: u64,
    limit: usize,
    budget: DescriptorBudget,
}

impl HandleTable {
    /// An empty table whose handles draw on `budget`.
    pub fn new(budget: DescriptorBudget) -> Self {
        Self {
            handles: HashMap::new(),
            vanished: HashMap::new(),
            next_fh: 1,
            limit: MAX_HANDLES,
            budget,
        }
    }

    /// Lowers the limit (tests).
    #[cfg(test)]
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Whether another handle can be opened (checked before creating anything on the host).
    pub fn check_room(&self) -> Result<(), Errno> {
        if self.handles.len() >= self.limit || self.budget.left() == 0 {
            return Err(Errno::ENFILE);
        }
        Ok(())
    }

    /// Keeps `fd` open as a new handle.
    pub fn insert(&mut self, fd: OwnedFd, kind: HandleKind) -> Result<u64, Errno> {
        if self.handles.len() >= self.limit {
            return Err(Errno::ENFILE);
        }
        let fh = self.next_fh;
        let next = self.next_fh.checked_add(1).ok_or(Errno::ENFILE)?;
        self.put(fh, fd, kind)?;
        self.next_fh = next;
        Ok(fh)
    }

    /// Charges the budget for `fd` and keeps it as handle `fh`.
    fn put(&mut self, fh: u64, fd: OwnedFd, kind: HandleKind) -> Result<(), Errno> {
        let charge = self.budget.charge()?;
        self.handles.insert(
            fh,
            Handle {
                fd,
                kind,
                _charge: charge,
            },
        );
        Ok(())
    }

    /// The descriptor of handle `fh`, which must be of `kind`.
    pub fn get(&self, fh: u64, kind: HandleKind) -> Result<&OwnedFd, Errno> {
        match self.handles.get(&fh) {
            Some(handle) if handle.kind == kind => Ok(&handle.fd),
            None if self.vanished.get(&fh) == Some(&kind) => Err(Errno::EIO),
            _ => Err(Errno::EBADF),
        }
    }

    /// The raw descriptor of handle `fh`, which must be of `kind`.
    pub fn fd(&self, fh: u64, kind: HandleKind) -> Result<RawFd, Errno> {
        self.get(fh, kind).map(AsRawFd::as_raw_fd)
    }

    /// Closes handle `fh` of `kind`.
    pub fn remove(&mut self, fh: u64, kind: HandleKind) -> Result<(), Errno> {
        if self.vanished.get(&fh) == Some(&kind) {
            self.vanished.remove(&fh);
            return Ok(());
        }
        self.fd(fh, kind)?;
        self.handles.remove(&fh);
        Ok(())
    }

    /// Closes every handle (DESTROY).
    pub fn clear(&mut self) {
        self.handles.clear();
        self.vanished.clear();
    }

    /// Every open handle with its number (for a snapshot).
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Handle)> {
        self.handles.iter().map(|(&fh, h)| (fh, h))
    }

    /// The vanished handles (for a snapshot).
    pub fn vanished(&self) -> impl Iterator<Item = (u64, HandleKind)> + '_ {
        self.vanished.iter().map(|(&fh, &kind)| (fh, kind))
    }

    /// The number the next handle gets.
    pub fn next_fh(&self) -> u64 {
        self.next_fh
    }

    /// Restore: handle `fh` (not yet open) is `fd`.
    pub fn restore(&mut self, fh: u64, fd: OwnedFd, kind: HandleKind) -> Result<(), Errno> {
        self.check_restorable(fh)?;
        self.put(fh, fd, kind)?;
        self.next_fh = self.next_fh.max(fh.saturating_add(1));
        Ok(())
    }

    /// Restore: handle `fh` refers to a file that is gone.
    pub fn restore_vanished(&mut self, fh: u64, kind: HandleKind) -> Result<(), Errno> {
        self.check_restorable(fh)?;
        self.vanished.insert(fh, kind);
        self.next_fh = self.next_fh.max(fh.saturating_add(1));
        Ok(())
    }

    /// Restore: new handles start at `next_fh` (never below one already given).
    pub fn restore_next_fh(&mut self, next_fh: u64) {
        self.next_fh = self.next_fh.max(next_fh);
    }

    fn check_restorable(&self, fh: u64) -> Result<(), Errno> {
        if fh == 0
            || self.handles.contains_key(&fh)
            || self.vanished.contains_key(&fh)
            || self.handles.len() + self.vanished.len() >= self.limit
        {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/").expect("open /"))
    }

    #[test]
    fn handles_are_typed_and_bounded() {
        let mut table = HandleTable::new(DescriptorBudget::new(1 << 20));
        table.set_limit(2);
        let file = table.insert(some_fd(), HandleKind::File).unwrap();
        let dir = table.insert(some_fd(), HandleKind::Directory).unwrap();
        assert_eq!(
            table.insert(some_fd(), HandleKind::File),
            Err(Errno::ENFILE)
        );
        assert_eq!(table.fd(file, HandleKind::Directory), Err(Errno::EBADF));
        assert_eq!(table.remove(dir, HandleKind::File), Err(Errno::EBADF));
        table.remove(dir, HandleKind::Directory).unwrap();
        assert_eq!(table.fd(dir, HandleKind::Directory), Err(Errno::EBADF));
        assert!(table.insert(some_fd(), HandleKind::File).is_ok());
        assert_eq!(table.fd(12345, HandleKind::File), Err(Errno::EBADF));
    }
}
