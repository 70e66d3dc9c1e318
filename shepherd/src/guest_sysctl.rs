//! Kernel settings the guest takes from its host, so that a job sees the limits it would see as
//! a host process. Today `kernel.pid_max`: Debian 12's systemd raises it to 2^22 on 64-bit
//! hosts, while a freshly booted kernel has 2^15, and a job that runs more threads and
//! processes than that would fail in the guest where it runs on the host. The settings go on
//! the guest's kernel command line as `sysctl.` words, which the kernel applies before init, so
//! they hold from the agent's first instruction whatever backend boots the guest.

use std::path::Path;

/// The host's `kernel.pid_max`.
const PID_MAX: &str = "/proc/sys/kernel/pid_max";

/// The command-line words for the host settings that could be read under `proc_sys_root`
/// (normally `/`); a setting that cannot be read is left to the guest kernel's default.
pub fn host_sysctl_words(proc_sys_root: &Path) -> Vec<String> {
    let path = proc_sys_root.join(PID_MAX.trim_start_matches('/'));
    match std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        Some(pid_max) => vec![format!("sysctl.kernel.pid_max={pid_max}")],
        None => {
            tracing::debug!(
                "cannot read {}: the guest keeps its pid_max",
                path.display()
            );
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_max_is_taken_from_the_host_when_it_can_be_read() {
        let root = tempfile::tempdir().unwrap();
        assert!(host_sysctl_words(root.path()).is_empty());
        let dir = root.path().join("proc/sys/kernel");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pid_max"), "4194304\n").unwrap();
        assert_eq!(
            host_sysctl_words(root.path()),
            ["sysctl.kernel.pid_max=4194304"]
        );
        std::fs::write(dir.join("pid_max"), "lots\n").unwrap();
        assert!(host_sysctl_words(root.path()).is_empty());
    }
}
