//! The node ids the guest knows: each is an `O_PATH|O_NOFOLLOW` descriptor of a host inode inside
//! the share, keyed by (st_dev, st_ino) so that one host inode has one node id however it was
//! reached (hard links, repeated lookups). Holding the descriptor pins the inode, so its number
//! cannot be reused for another file while the guest still refers to it. Node id 1 is the share's
//! root and is never forgotten.
//!
//! After a restore from a snapshot, a node id whose file could not be found again by its path is
//! kept as *vanished*: the guest still holds it, and every use of it is EIO until it forgets it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::abi::ROOT_ID;
use super::descriptor_budget::{Charge, DescriptorBudget};

/// How many inodes the guest may hold at once (each costs a host descriptor).
pub const MAX_INODES: usize = 65536;

/// One host inode the guest holds.
#[derive(Debug)]
pub struct Inode {
    /// `O_PATH|O_NOFOLLOW` descriptor of the inode.
    pub fd: OwnedFd,
    /// The file type bits of `st_mode` (`S_IFMT`), fixed for the inode's life.
    pub file_type: u32,
    key: (u64, u64),
    /// The kernel's lookup count; the entry goes when FORGET brings it to zero.
    lookups: u64,
    /// The descriptor's share of the VM's budget (none for the root, opened before the guest
    /// ran), given back when the entry goes.
    _charge: Option<Charge>,
}

impl Inode {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The host device the inode is on (`st_dev`).
    pub fn dev(&self) -> u64 {
        self.key.0
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type == libc::S_IFMT & libc::S_IFLNK
    }
}

/// Node id → inode, and (st_dev, st_ino) → node id.
#[derive(Debug)]
pub struct InodeTable {
    by_id: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    /// Node ids of a restored session whose files are gone, with the kernel's lookup counts.
    vanished: HashMap<u64, u64>,
    next_id: u64,
    limit: usize,
    budget: DescriptorBudget,
}

impl InodeTable {
    /// A table holding only the root, `root_fd` with host identity `key`.
    /// New inodes draw on `budget`.
    pub fn new(root_fd: OwnedFd, key: (u64, u64), budget: DescriptorBudget) -> Self {
        let mut table = Self {
            by_id: HashMap::new(),
            by_key: HashMap::new(),
            vanished: HashMap::new(),
            next_id: ROOT_ID + 1,
            limit: MAX_INODES,
            budget,
        };
        table.by_key.insert(key, ROOT_ID);
        table.by_id.insert(
            ROOT_ID,
            Inode {
                fd: root_fd,
                file_type: libc::S_IFDIR,
                key,
                lookups: 1,
                _charge: None,
            },
        );
        table
    }

    /// Lowers the inode limit (tests).
    #[cfg(test)]
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    pub fn get(&self, nodeid: u64) -> Result<&Inode, Errno> {
        // EBADF rather than ENOENT: an unknown node id is a protocol error of the peer, not a
        // missing file. A vanished one is an I/O error of a file the guest had.
        self.by_id.get(&nodeid).ok_or_else(|| {
            if self.vanished.contains_key(&nodeid) {
                Errno::EIO
            } else {
                Errno::EBADF
            }
        })
    }

    /// Records one more lookup of the host inode `key` (file type `file_type`) whose descriptor
    /// is `fd`: reuses the node id the inode already has (and closes `fd`), or gives it a new one.
    pub fn insert_lookup(
        &mut self,
        fd: OwnedFd,
        key: (u64, u64),
        file_type: u32,
    ) -> Result<u64, Errno> {
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(inode) = self.by_id.get_mut(&id) {
                inode.lookups = inode.lookups.saturating_add(1);
                return Ok(id);
            }
        }
        if self.by_id.len() >= self.limit {
            return Err(Errno::ENFILE);
        }
        let charge = self.budget.charge()?;
        let id = self.next_id;
        // 2^64 lookups cannot happen within a VM's life; wrapping onto the root is still refused.
        self.next_id = self.next_id.checked_add(1).ok_or(Errno::ENFILE)?;
        self.by_key.insert(key, id);
        self.by_id.insert(
            id,
            Inode {
                fd,
                file_type,
                key,
                lookups: 1,
                _charge: Some(charge),
            },
        );
        Ok(id)
    }

    /// Whether a new inode could be added now.
    pub fn is_full(&self) -> bool {
        self.by_id.len() >= self.limit || self.budget.left() == 0
    }

    /// The kernel forgets `nlookup` lookups of `nodeid`; unknown ids and the root are ignored.
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) {
        if nodeid == ROOT_ID {
            return;
        }
        if let Some(lookups) = self.vanished.get_mut(&nodeid) {
            *lookups = lookups.saturating_sub(nlookup);
            if *lookups == 0 {
                self.vanished.remove(&nodeid);
            }
            return;
        }
        let Some(inode) = self.by_id.get_mut(&nodeid) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(nlookup);
        if inode.lookups == 0 {
            let key = inode.key;
            self.by_id.remove(&nodeid);
            self.by_key.remove(&key);
        }
    }

    /// Forgets every inode but the root (DESTROY: the guest's mount is gone).
    pub fn forget_all(&mut self) {
        self.vanished.clear();
        self.by_id.retain(|&id, _| id == ROOT_ID);
        let root_key = self.by_id.get(&ROOT_ID).map(|inode| inode.key);
        self.by_key.retain(|key, _| Some(*key) == root_key);
    }

    /// How many inodes are held, the root included.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every held inode but the root, with its node id and lookup count (for a snapshot).
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Inode, u64)> {
        self.by_id
            .iter()
            .filter(|(&id, _)| id != ROOT_ID)
            .map(|(&id, inode)| (id, inode, inode.lookups))
    }

    /// The vanished node ids and their lookup counts (for a snapshot).
    pub fn vanished(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.vanished.iter().map(|(&id, &lookups)| (id, lookups))
    }

    /// The node id the next new inode gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Restore: node id `nodeid` (not the root, not yet held) is the inode of `fd`, looked up
    /// `lookups` times. A host inode already held under another node id (two names of one
    /// file) keeps its first node id for new lookups.
    pub fn restore(
        &mut self,
        nodeid: u64,
        fd: OwnedFd,
        key: (u64, u64),
        file_type: u32,
        lookups: u64,
    ) -> Result<(), Errno> {
        self.check_restorable(nodeid)?;
        let charge = self.budget.charge()?;
        self.by_key.entry(key).or_insert(nodeid);
        self.by_id.insert(
            nodeid,
            Inode {
                fd,
                file_type,
                key,
                lookups,
                _charge: Some(charge),
            },
        );
        self.next_id = self.next_id.max(nodeid.saturating_add(1));
        Ok(())
    }

    /// Restore: node id `nodeid`, looked up `lookups` times, names a file that is gone.
    pub fn restore_vanished(&mut self, nodeid: u64, lookups: u64) -> Result<(), Errno> {
        self.check_restorable(nodeid)?;
        self.vanished.insert(nodeid, lookups);
        self.next_id = self.next_id.max(nodeid.saturating_add(1));
        Ok(())
    }

    /// Restore: new node ids start at `next_id` (never below one already given).
    pub fn restore_next_id(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    /// A restored node id must be new, not the root, and within the table's bound.
    fn check_restorable(&self, nodeid: u64) -> Result<(), Errno> {
        if nodeid <= ROOT_ID
            || self.by_id.contains_key(&nodeid)
            || self.vanished.contains_key(&nodeid)
            || self.by_id.len() + self.vanished.len() >= self.limit
        {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/").expect("open /"))
    }

    #[test]
    fn one_host_inode_has_one_node_id_until_forgotten() {
        let mut table = InodeTable::new(some_fd(), (1, 2), DescriptorBudget::new(1 << 20));
        let a = table
            .insert_lookup(some_fd(), (1, 10), libc::S_IFREG)
            .unwrap();
        let again = table
            .insert_lookup(some_fd(), (1, 10), libc::S_IFREG)
            .unwrap();
        assert_eq!(a, again);
        assert_eq!(table.len(), 2);
        table.forget(a, 1);
        assert!(table.get(a).is_ok(), "one lookup is still held");
        table.forget(a, 1);
        assert_eq!(table.get(a).err(), Some(Errno::EBADF));
        let b = table
            .insert_lookup(some_fd(), (1, 10), libc::S_IFREG)
            .unwrap();
        assert_ne!(a, b, "node ids are not reused");
    }

    #[test]
    fn the_root_is_never_forgotten() {
        let mut table = InodeTable::new(some_fd(), (1, 2), DescriptorBudget::new(1 << 20));
        table.forget(ROOT_ID, u64::MAX);
        table.forget_all();
        assert!(table.get(ROOT_ID).is_ok());
        // Looking up the root's own inode (e.g. through a bind mount) gives node id 1.
        assert_eq!(
            table.insert_lookup(some_fd(), (1, 2), libc::S_IFDIR),
            Ok(ROOT_ID)
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = InodeTable::new(some_fd(), (1, 2), DescriptorBudget::new(1 << 20));
        table.set_limit(3);
        table
            .insert_lookup(some_fd(), (1, 3), libc::S_IFREG)
            .unwrap();
        table
            .insert_lookup(some_fd(), (1, 4), libc::S_IFREG)
            .unwrap();
        assert_eq!(
            table.insert_lookup(some_fd(), (1, 5), libc::S_IFREG),
            Err(Errno::ENFILE)
        );
        // An inode already held is still found.
        assert!(table
            .insert_lookup(some_fd(), (1, 4), libc::S_IFREG)
            .is_ok());
    }
}
