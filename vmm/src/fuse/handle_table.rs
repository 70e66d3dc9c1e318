//! Open files and directories of the guest: FUSE file handles (`fh`) mapped to host descriptors
//! opened by OPEN, OPENDIR and CREATE and closed by RELEASE and RELEASEDIR. Bounded, so a guest
//! cannot exhaust the host's descriptors by opening without releasing.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::descriptor_budget::{Charge, DescriptorBudget};

/// How many files and directories the guest may hold open at once.
pub const MAX_HANDLES: usize = 65536;

/// What a handle refers to; a file handle used as a directory's (or back) is EBADF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    next_fh: u64,
    limit: usize,
    budget: DescriptorBudget,
}

impl HandleTable {
    /// An empty table whose handles draw on `budget`.
    pub fn new(budget: DescriptorBudget) -> Self {
        Self {
            handles: HashMap::new(),
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
        let charge = self.budget.charge()?;
        let fh = self.next_fh;
        self.next_fh = self.next_fh.checked_add(1).ok_or(Errno::ENFILE)?;
        self.handles.insert(
            fh,
            Handle {
                fd,
                kind,
                _charge: charge,
            },
        );
        Ok(fh)
    }

    /// The descriptor of handle `fh`, which must be of `kind`.
    pub fn get(&self, fh: u64, kind: HandleKind) -> Result<&OwnedFd, Errno> {
        match self.handles.get(&fh) {
            Some(handle) if handle.kind == kind => Ok(&handle.fd),
            _ => Err(Errno::EBADF),
        }
    }

    /// The raw descriptor of handle `fh`, which must be of `kind`.
    pub fn fd(&self, fh: u64, kind: HandleKind) -> Result<RawFd, Errno> {
        self.get(fh, kind).map(AsRawFd::as_raw_fd)
    }

    /// Closes handle `fh` of `kind`.
    pub fn remove(&mut self, fh: u64, kind: HandleKind) -> Result<(), Errno> {
        self.fd(fh, kind)?;
        self.handles.remove(&fh);
        Ok(())
    }

    /// Closes every handle (DESTROY).
    pub fn clear(&mut self) {
        self.handles.clear();
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
