//! One VM's allowance of host descriptors for what its guest holds open through its shares.
//!
//! Each inode the guest looks up and each file it opens pins a host descriptor, and every share
//! of a VM (and the VMM, its vsock connections and, while the VMM runs inside the shepherd, the
//! shepherd's own files) draws on one process limit, `RLIMIT_NOFILE`. The shares of a VM
//! therefore share one budget, sized below that limit with [`HEADROOM`] kept for everything
//! else: a guest that opens without end gets ENFILE from its shares, and the host side never
//! reaches EMFILE.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::errno::Errno;

/// Descriptors kept out of the shares' budget: the VMM's own (KVM, eventfds, disks, the epoll
/// sets), the vsock muxer's connections (at most `MAX_CONNECTIONS` + `MAX_PENDING_HOST_STREAMS`,
/// 1087) and the shepherd's files, with room to spare.
pub const HEADROOM: usize = 2048;

/// A count of descriptors the guest may still take, shared by the servers of one VM.
#[derive(Debug, Clone)]
pub struct DescriptorBudget {
    left: Arc<AtomicUsize>,
}

/// One descriptor taken from a budget; dropping it gives it back.
#[derive(Debug)]
pub struct Charge {
    left: Arc<AtomicUsize>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.left.fetch_add(1, Ordering::Relaxed);
    }
}

impl DescriptorBudget {
    /// A budget of `total` descriptors.
    pub fn new(total: usize) -> Self {
        Self {
            left: Arc::new(AtomicUsize::new(total)),
        }
    }

    /// The budget for one VM of this process: the open-files limit (raised to its hard limit
    /// first) less the descriptors open now and [`HEADROOM`].
    pub fn for_this_process() -> Self {
        raise_open_file_limit();
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let open_now = std::fs::read_dir("/proc/self/fd").map_or(HEADROOM, |d| d.count());
        Self::new(budget_under_limit(soft, open_now))
    }

    /// How many descriptors are left.
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }

    /// Takes one descriptor; ENFILE when none is left.
    pub fn charge(&self) -> Result<Charge, Errno> {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .map(|_| Charge {
                left: Arc::clone(&self.left),
            })
            .map_err(|_| Errno::ENFILE)
    }
}

/// What the shares of a VM may hold under an open-files limit of `soft` with `open_now`
/// descriptors already open.
fn budget_under_limit(soft: u64, open_now: usize) -> usize {
    usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(open_now)
        .saturating_sub(HEADROOM)
}

/// Raises this process's soft limit on open files to the hard limit: the usual soft limit of
/// 1024 would leave the shares almost no budget. Failure is not fatal (the budget is smaller).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_shared_by_clones_and_given_back_on_drop() {
        let budget = DescriptorBudget::new(2);
        let other_share = budget.clone();
        let a = budget.charge().unwrap();
        let _b = other_share.charge().unwrap();
        assert_eq!(budget.charge().unwrap_err(), Errno::ENFILE);
        assert_eq!(other_share.left(), 0);
        drop(a);
        assert_eq!(other_share.left(), 1);
        assert!(other_share.charge().is_ok());
    }

    #[test]
    fn the_budget_stays_below_the_process_limit() {
        assert_eq!(budget_under_limit(1024, 30), 0);
        assert_eq!(budget_under_limit(1 << 20, 100), (1 << 20) - 100 - HEADROOM);
        assert_eq!(budget_under_limit(u64::MAX, 10), usize::MAX - 10 - HEADROOM);
        let here = DescriptorBudget::for_this_process();
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!((here.left() as u64) < soft.saturating_sub(HEADROOM as u64).max(1));
    }
}
