//! The VMM process's process-wide seccomp filter: system calls a VMM (ours, QEMU or the vsock
//! daemon) never needs and that widen the kernel's attack surface for a compromised one fail
//! with EPERM. Installed before the process starts any thread or helper, so every thread and
//! helper inherits it; the embedded VMM's threads then add their own allow-lists on top.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Refused: debugging and reading other processes, namespaces and mounts, kernel keyrings,
/// eBPF and perf, userfaultfd and io_uring (callers fall back to other mechanisms), modules,
/// kexec and other administration.
const REFUSED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_quotactl,
    libc::SYS_fanotify_init,
];

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter of the VMM process: {0}")]
pub struct FilterError(String);

fn program() -> Result<BpfProgram, FilterError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        REFUSED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| FilterError(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| FilterError(e.to_string()))
}

/// Installs the filter on the calling thread (and so on every thread and process it starts
/// later). Needs no-new-privs first.
pub fn install() -> Result<(), FilterError> {
    seccompiler::apply_filter(&program()?).map_err(|e| FilterError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_calls_fail_with_eperm_and_others_work() {
        let outcome = std::thread::spawn(|| {
            // SAFETY: prctl with integer arguments only; this thread only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            install().unwrap();
            // SAFETY: unshare with no flags changes nothing; it only exercises the filter.
            let unshare = unsafe { libc::unshare(0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            (unshare, errno, std::fs::read("/proc/self/status").is_ok())
        })
        .join()
        .unwrap();
        assert_eq!(outcome, (-1, Some(libc::EPERM), true));
    }
}
