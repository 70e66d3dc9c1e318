//! Where the guest kernel and initramfs are, and whether root may boot them.
//!
//! Order: an explicit path (command line or the virtualizer's settings file), then
//! `SGE_VIRTUALIZER_KERNEL` / `SGE_VIRTUALIZER_INITRD` (the administrator's environment: execd's
//! for the shepherd), then the default directory. The default is the installed location
//! `/usr/lib/sge_virtualizer/` for the Grid Engine shepherd ([`Search::Installed`]); the
//! developers' `run` command first looks for `build/guest/` of the source tree the executable was
//! built in, walking up from it ([`Search::BuildTreeFirst`]).
//!
//! Every job's guest is booted from these files, and the guest serves as the job's boundary
//! (its shares are served to it), so a root process boots only files that nobody but root can
//! change: [`check_trusted`].

use std::path::{Path, PathBuf};

use crate::path_trust::{self, UntrustedPath};

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initramfs.cpio";
pub const INSTALLED_DIR: &str = "/usr/lib/sge_virtualizer";

/// The guest kernel and initramfs to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where to look when neither a path nor the environment names the image files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Only the installed location (the Grid Engine shepherd).
    Installed,
    /// The source tree's `build/guest/` above the executable, then the installed location
    /// (the `run` command, for developers).
    BuildTreeFirst,
}

/// A guest image file root will not boot.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest {what} {path} is not trusted: {reason} (the guest kernel, the initramfs and every \
     directory above them must be owned by root and writable only by root)"
)]
pub struct UntrustedGuestImage {
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: UntrustedPath,
}

/// The directory holding the image files by default.
pub fn default_dir(search: Search) -> PathBuf {
    let exe = match search {
        Search::Installed => None,
        Search::BuildTreeFirst => std::env::current_exe().ok(),
    };
    exe.and_then(|exe| build_tree_dir(&exe))
        .unwrap_or_else(|| PathBuf::from(INSTALLED_DIR))
}

/// `build/guest` in the nearest ancestor of `exe` that has one with a kernel in it.
fn build_tree_dir(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .map(|d| d.join("build/guest"))
        .find(|d| d.join(KERNEL_FILE).is_file())
}

/// Resolves the image from explicit paths, the environment and the default directory.
pub fn locate(kernel: Option<&Path>, initrd: Option<&Path>, search: Search) -> GuestImage {
    let dir = default_dir(search);
    let pick = |explicit: Option<&Path>, var: &str, file: &str| {
        explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(var).map(PathBuf::from))
            .unwrap_or_else(|| dir.join(file))
    };
    GuestImage {
        kernel: pick(kernel, "SGE_VIRTUALIZER_KERNEL", KERNEL_FILE),
        initrd: pick(initrd, "SGE_VIRTUALIZER_INITRD", INITRD_FILE),
    }
}

/// When this process runs as root: refuses a kernel or initramfs that someone other than root
/// owns or could change (the file, or a directory above it, writable by group or others), so no
/// user can give every job a guest of their own. An unprivileged caller boots with its own
/// rights only, and is not checked.
pub fn check_trusted(kernel: &Path, initrd: &Path) -> Result<(), UntrustedGuestImage> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    for (what, path) in [("kernel", kernel), ("initramfs", initrd)] {
        path_trust::check_file(path, 0).map_err(|reason| UntrustedGuestImage {
            what,
            path: path.to_path_buf(),
            reason,
        })?;
    }
    Ok(())
}

/// The first bytes of `path`, enough to tell its format.
pub fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(0x210);
    std::fs::File::open(path)?
        .take(0x210)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// An uncompressed ELF `vmlinux` or a bzImage (`HdrS` at 0x202).
pub fn is_kernel(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS")
}

/// A newc cpio archive, or one compressed as the kernel can unpack it.
pub fn is_initramfs(head: &[u8]) -> bool {
    const MAGICS: [&[u8]; 6] = [
        b"070701",
        b"070702",
        b"\x1f\x8b",
        b"\x28\xb5\x2f\xfd",
        b"\xfd7zXZ",
        b"\x02\x21\x4c\x18",
    ];
    MAGICS.iter().any(|m| head.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_initramfs_formats_are_recognised() {
        assert!(is_kernel(b"\x7fELF\x02\x01"));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_kernel(&bz));
        assert!(!is_kernel(b"not a kernel\n"));
        assert!(is_initramfs(b"070701000000"));
        assert!(is_initramfs(b"\x1f\x8b\x08"));
        assert!(!is_initramfs(b"\x7fELF"));
    }

    use std::os::unix::fs::PermissionsExt;

    /// A source tree with a built guest above the executable, as a writable ancestor of an
    /// installed shepherd could be made to look.
    fn tree_with_a_guest() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let guest = tmp.path().join("build/guest");
        std::fs::create_dir_all(&guest).unwrap();
        std::fs::write(guest.join(KERNEL_FILE), b"k").unwrap();
        let exe = tmp.path().join("target/release/sge_virtualizer");
        (tmp, exe)
    }

    #[test]
    fn the_shepherd_never_takes_a_guest_from_above_its_executable() {
        let (tmp, exe) = tree_with_a_guest();
        assert_eq!(build_tree_dir(&exe), Some(tmp.path().join("build/guest")));
        assert_eq!(default_dir(Search::Installed), PathBuf::from(INSTALLED_DIR));
        if std::env::var_os("SGE_VIRTUALIZER_KERNEL").is_none() {
            let image = locate(None, None, Search::Installed);
            assert_eq!(image.kernel, Path::new(INSTALLED_DIR).join(KERNEL_FILE));
            assert_eq!(image.initrd, Path::new(INSTALLED_DIR).join(INITRD_FILE));
        }
        let explicit = locate(
            Some(Path::new("/k")),
            Some(Path::new("/i")),
            Search::Installed,
        );
        assert_eq!(explicit.kernel, PathBuf::from("/k"));
    }

    #[test]
    fn root_refuses_a_guest_someone_else_can_change() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: guest image trust test: the check applies to root only");
            return;
        }
        let (tmp, _) = tree_with_a_guest();
        let guest = tmp.path().join("build/guest");
        let (kernel, initrd) = (guest.join(KERNEL_FILE), guest.join(INITRD_FILE));
        std::fs::write(&initrd, b"i").unwrap();
        for f in [&kernel, &initrd] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_trusted(&kernel, &initrd).unwrap();

        // A directory above it that another user could write.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_trusted(&kernel, &initrd).unwrap_err();
        assert_eq!(err.what, "kernel");
        assert!(err.to_string().contains("owned by root"), "{err}");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

        // An initramfs owned by a user.
        std::os::unix::fs::chown(&initrd, Some(65534), Some(65534)).unwrap();
        let err = check_trusted(&kernel, &initrd).unwrap_err();
        assert_eq!(err.what, "initramfs");
        assert!(matches!(
            err.reason,
            UntrustedPath::Owner { uid: 65534, .. }
        ));
    }
}
