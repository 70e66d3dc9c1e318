//! Where the guest kernel and initramfs are.
//!
//! Order: an explicit path (command line or the virtualizer's settings file), then
//! `SGE_VIRTUALIZER_KERNEL` / `SGE_VIRTUALIZER_INITRD`, then `build/guest/` of the source tree
//! the executable was built in (found by walking up from the executable), then the installed
//! location `/usr/lib/sge_virtualizer/`.

use std::path::{Path, PathBuf};

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initramfs.cpio";
pub const INSTALLED_DIR: &str = "/usr/lib/sge_virtualizer";

/// The guest kernel and initramfs to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The directory holding the image files by default.
pub fn default_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .skip(1)
            .map(|d| d.join("build/guest"))
            .find(|d| d.join(KERNEL_FILE).is_file())
    });
    from_exe.unwrap_or_else(|| PathBuf::from(INSTALLED_DIR))
}

/// Resolves the image from explicit paths, the environment and the defaults.
pub fn locate(kernel: Option<&Path>, initrd: Option<&Path>) -> GuestImage {
    let dir = default_dir();
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
