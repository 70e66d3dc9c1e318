//! Seccomp allow-lists (compiled with seccompiler), one per thread kind:
//!
//! * vCPU threads: `KVM_RUN` and what device emulation on a vCPU thread needs (eventfd writes,
//!   console file writes, locks, memory allocation, kicking other vCPUs, closing host streams
//!   on a virtio device reset, thread exit). Device activation and queue processing never run
//!   there: the transport hands them to the VMM thread through the queue eventfds.
//! * the VMM thread (the event loop of the virtio devices): epoll, Unix-socket I/O for the vsock
//!   muxer (`socket` limited to `AF_UNIX`) and for virtio-net's stream to passt (`sendto`,
//!   `recvfrom`), positioned file I/O and `fdatasync` for the
//!   virtio-blk disks, eventfds, locks, allocation (whose `madvise` also lets the balloon
//!   device drop the guest pages it is told are free), thread exit; where the VM has shared
//!   directories, the file system calls of their servers (`FILE_SERVER`).
//!
//! Each thread installs its filter itself before it runs guest code or handles guest-driven
//! events. Anything else kills the process (`SECCOMP_RET_KILL_PROCESS`): a VMM thread making an
//! unexpected system call is treated as compromised.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `KVM_RUN` ioctl request number.
const KVM_RUN: u64 = 0xae80;
/// `FIONBIO` ioctl request number (std's `set_nonblocking`).
const FIONBIO: u64 = 0x5421;

/// Errors while building a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler rejected a rule or the filter.
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
}

/// Syscalls every VMM thread needs: memory allocation, locks, signals, time, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect, // glibc grows a thread's malloc arena with mprotect
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Additional syscalls of the VMM (event loop) thread.
const VMM_THREAD: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_fcntl,
    libc::SYS_getrandom,
    libc::SYS_timerfd_settime,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
];

/// Additional syscalls of a VMM thread that serves shared directories ([`crate::fuse`]): file
/// system calls relative to the server's own descriptors (the `*at` family), file I/O, and
/// metadata. Never `open` by absolute path, `chroot`, `mount` or credential changes.
const FILE_SERVER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fstatfs,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_syncfs,
    libc::SYS_dup,
];

fn eq(arg: u8, value: u64) -> Result<SeccompRule, SeccompError> {
    Ok(SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])?)
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// The allow-list of a vCPU thread.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|s| (*s, vec![])).collect();
    rules.insert(libc::SYS_ioctl, vec![eq(1, KVM_RUN)?]);
    // A driver's device reset (a register write, handled on the vCPU thread) drops the vsock
    // connections, taking their host streams out of the muxer's epoll set, and makes
    // virtio-net stop (or change) watching its stream to passt.
    rules.insert(libc::SYS_epoll_ctl, vec![]);
    // std checks in debug builds that an fd is open before closing it (F_GETFD).
    rules.insert(libc::SYS_fcntl, vec![eq(1, libc::F_GETFD as u64)?]);
    compile(rules)
}

/// The allow-list of the VMM (event loop) thread; with `file_server`, also what serving shared
/// directories needs (`FILE_SERVER`).
pub fn vmm_thread_filter(file_server: bool) -> Result<BpfProgram, SeccompError> {
    let extra: &[i64] = if file_server { FILE_SERVER } else { &[] };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(VMM_THREAD)
        .chain(extra)
        .map(|s| (*s, vec![]))
        .collect();
    rules.insert(libc::SYS_socket, vec![eq(0, libc::AF_UNIX as u64)?]);
    rules.insert(libc::SYS_ioctl, vec![eq(1, FIONBIO)?]);
    compile(rules)
}

/// The allow-list of the allow-list filter's relay thread
/// ([`crate::virtio::net::filtering_relay`]): what the relay itself calls, and what every
/// thread needs to start, allocate and exit. No socket creation, no file system, no ioctl.
pub fn net_relay_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .copied()
        .chain(
            crate::virtio::net::filtering_relay::RELAY_SYSCALLS
                .iter()
                .copied(),
        )
        .map(|s| (s, vec![]))
        .collect();
    compile(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!vcpu_filter().unwrap().is_empty());
        let plain = vmm_thread_filter(false).unwrap();
        assert!(plain.len() > vcpu_filter().unwrap().len());
        assert!(vmm_thread_filter(true).unwrap().len() > plain.len());
    }
}
