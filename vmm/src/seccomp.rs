//! Seccomp allow-lists (compiled with seccompiler), one per thread kind:
//!
//! * vCPU threads: `KVM_RUN` and what device emulation on a vCPU thread needs (eventfd writes,
//!   console file writes, locks, memory allocation, kicking other vCPUs, closing host streams
//!   on a virtio device reset, thread exit), and the read-only `KVM_GET_*` vCPU ioctls with
//!   which a parked vCPU captures its own state for a snapshot (`snapshot_ioctls`). Device
//!   activation and queue processing never run there: the transport hands them to the VMM
//!   thread through the queue eventfds.
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

/// The vCPU ioctls a parked vCPU thread makes to capture its state for a snapshot
/// ([`crate::snapshot::vcpu_state::capture`]): only `KVM_GET_*` reads of its own vCPU, never a
/// `SET`, a VM-level or a `/dev/kvm` ioctl (those run on the thread that builds or snapshots
/// the VM). Numbers as in `<linux/kvm.h>`.
mod snapshot_ioctls {
    use kvm_bindings::{
        kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
        kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };

    const KVMIO: u32 = 0xae;
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

    /// All of them.
    pub(super) fn all() -> [u64; 12] {
        [
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_XSAVE2(),
        ]
        .map(u64::from)
    }
}

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
    // KVM_RUN, and the reads with which a parked vCPU captures its state for a snapshot (it
    // also completes pending I/O with a KVM_RUN before them).
    let mut ioctls = vec![eq(1, KVM_RUN)?];
    for request in snapshot_ioctls::all() {
        ioctls.push(eq(1, request)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
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
    fn snapshot_ioctl_numbers_are_the_kernels() {
        // From <linux/kvm.h> on x86_64.
        let known = [
            0x8090_ae81u64, // KVM_GET_REGS
            0x8138_ae83,    // KVM_GET_SREGS
            0xc008_ae88,    // KVM_GET_MSRS
            0x81a0_ae8c,    // KVM_GET_FPU
            0x8400_ae8e,    // KVM_GET_LAPIC
            0x8004_ae98,    // KVM_GET_MP_STATE
            0x8040_ae9f,    // KVM_GET_VCPU_EVENTS
            0x8080_aea1,    // KVM_GET_DEBUGREGS
            0xaea3,         // KVM_GET_TSC_KHZ
            0x9000_aea4,    // KVM_GET_XSAVE
            0x8188_aea6,    // KVM_GET_XCRS
            0x9000_aecf,    // KVM_GET_XSAVE2
        ];
        assert_eq!(snapshot_ioctls::all(), known);
    }

    #[test]
    fn filters_compile() {
        assert!(!vcpu_filter().unwrap().is_empty());
        let plain = vmm_thread_filter(false).unwrap();
        assert!(plain.len() > vcpu_filter().unwrap().len());
        assert!(vmm_thread_filter(true).unwrap().len() > plain.len());
    }
}
