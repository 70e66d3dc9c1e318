//! Kernel interface file systems that are never served to a guest.
//!
//! procfs, sysfs, cgroupfs, debugfs and the like are views of the host kernel and of the
//! processes reading them, not files: served by the VMM (whose threads belong to the shepherd's
//! process) they would show the guest `/proc/self/…` of the shepherd — its memory maps, its
//! descriptors, its environment — and the host's kernel tunables. They are recognised by the
//! file system magic `statfs(2)` reports, once for the share and again for every lookup that
//! crosses into another mount below it.

use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::statfs::{fstatfs, statfs, FsType};

/// File system magics (`linux/magic.h`) of the kernel's interface file systems, with their
/// names for error messages. Not here: tmpfs and hugetlbfs (ordinary files), fuse (users' own
/// file systems; the server never blocks on them for long, see the passthrough's open rules).
const KERNEL_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4341_5d53, "smackfs"),
    (0xcafe_4a11, "bpf"),
    (0x1cd1, "devpts"),
    (0x6165_676c, "pstore"),
    (0xde5e_81e4, "efivarfs"),
    (0x6265_6570, "configfs"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6573_5543, "fusectl"),
    (0x1980_0202, "mqueue"),
    (0x6e73_6673, "nsfs"),
];

/// The name of the kernel interface file system of magic `fs_type`, if it is one.
fn kernel_file_system(fs_type: FsType) -> Option<&'static str> {
    // f_type is a signed or unsigned word depending on the libc; the magics fit in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    let magic = fs_type.0 as i64 & 0xffff_ffff;
    KERNEL_FILE_SYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// The kernel interface file system `fd` is on, if it is on one.
pub fn kernel_file_system_of<Fd: AsFd>(fd: Fd) -> Result<Option<&'static str>, Errno> {
    Ok(kernel_file_system(fstatfs(fd)?.filesystem_type()))
}

/// The kernel interface file system `path` is on, if it is on one (`path` is followed).
pub fn kernel_file_system_at(path: &Path) -> Result<Option<&'static str>, Errno> {
    Ok(kernel_file_system(statfs(path)?.filesystem_type()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mount of this host, as the kernel names its type in /proc/self/mounts, is
    /// recognised by its magic exactly when the type is one of ours.
    #[test]
    fn the_kernels_own_names_for_mounted_file_systems_agree_with_the_magics() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mut seen = Vec::new();
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dir, fstype) = (fields[1], fields[2]);
            if dir.contains('\\') {
                continue; // an escaped mount point (a space in the name)
            }
            let Ok(got) = kernel_file_system_at(Path::new(dir)) else {
                continue; // not reachable from here (another user's FUSE mount, say)
            };
            let ours = KERNEL_FILE_SYSTEMS.iter().any(|(_, n)| *n == fstype);
            match got {
                Some(name) => {
                    assert!(ours && name == fstype, "{dir}: {fstype} read as {name}")
                }
                None => assert!(!ours, "{dir}: {fstype} not recognised"),
            }
            seen.push(fstype.to_string());
        }
        for needed in ["proc", "sysfs"] {
            assert!(
                seen.iter().any(|t| t == needed),
                "no {needed} mount: {seen:?}"
            );
        }
    }

    #[test]
    fn proc_and_sys_are_kernel_file_systems_and_a_temporary_directory_is_not() {
        assert_eq!(kernel_file_system_at(Path::new("/proc")), Ok(Some("proc")));
        assert_eq!(
            kernel_file_system_at(Path::new("/proc/self/fd")),
            Ok(Some("proc"))
        );
        assert_eq!(kernel_file_system_at(Path::new("/sys")), Ok(Some("sysfs")));
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(kernel_file_system_at(tmp.path()), Ok(None));
        let file = std::fs::File::open(tmp.path()).unwrap();
        assert_eq!(kernel_file_system_of(&file), Ok(None));
    }
}
