//! The job's file systems in the guest: switching root into its OS image and mounting the
//! shared host directories. Only PID 1 of a guest does this, once, before the job starts.
//!
//! The image is a read-only block device. It is mounted read-only under a writable overlay
//! whose upper layer is a tmpfs, so the job may write anywhere in its root and nothing reaches
//! the image. The kernel-provided file systems (/dev, /proc, /sys, /tmp, /run) that
//! [`super::pid1::mount_basics`] mounted in the initramfs are moved into the new root, the
//! shared directories are mounted inside it, and the agent then switches root the way
//! `switch_root` does: move the new root onto `/` and `chroot` into it (`pivot_root` cannot
//! leave an initramfs). The agent keeps running from memory; everything after this (resolving
//! the program, `execve`, the job's own children) sees the image.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::protocol::{RootImage, ShareTransport, SharedMount};

/// Where the pieces of the new root are mounted in the initramfs.
const IMAGE_DIR: &str = "/.sge/image";
const SCRATCH_DIR: &str = "/.sge/scratch";
const NEW_ROOT: &str = "/.sge/root";

/// Mounts that move from the initramfs into the image, parents before children.
const MOVED_MOUNTS: [&str; 5] = ["/dev", "/proc", "/sys", "/tmp", "/run"];

/// How long the image's block device may take to appear.
const DEVICE_PATIENCE: Duration = Duration::from_secs(5);

/// 9P mount options: 9P2000.L for POSIX semantics, `cache=mmap` so programs and shared
/// mappings on the share work, permissions checked in the guest against the host's modes and
/// owners (the file server on the host also runs as the job user).
const NINE_P_OPTIONS: &str = "trans=virtio,version=9p2000.L,cache=mmap,msize=262144";

/// Why the job's file systems could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the OS image device {0} did not appear within {DEVICE_PATIENCE:?}")]
    DeviceMissing(String),
    #[error("mount {what} on {target}: {errno}")]
    Mount {
        what: String,
        target: String,
        errno: Errno,
    },
    #[error("create {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("switch root into {NEW_ROOT}: {step}: {errno}")]
    SwitchRoot { step: &'static str, errno: Errno },
    #[error("shared directory target {0:?} is not an absolute path")]
    RelativeTarget(String),
    #[error("an OS image or shared directories need the agent to run as PID 1 in a guest")]
    NotPid1,
}

impl RootfsError {
    /// The errno reported to the host with the failure.
    pub fn errno(&self) -> i32 {
        match self {
            RootfsError::DeviceMissing(_) => libc::ENODEV,
            RootfsError::Mount { errno, .. } | RootfsError::SwitchRoot { errno, .. } => {
                *errno as i32
            }
            RootfsError::CreateDir { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            RootfsError::RelativeTarget(_) => libc::EINVAL,
            RootfsError::NotPid1 => libc::EPERM,
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn create_dir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(|source| RootfsError::CreateDir {
        path: path.display().to_string(),
        source,
    })
}

fn mount_at(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
    what: impl FnOnce() -> String,
) -> Result<(), RootfsError> {
    mount(Some(source), target, fstype, flags, data).map_err(|errno| RootfsError::Mount {
        what: what(),
        target: target.display().to_string(),
        errno,
    })
}

fn wait_for_device(device: &Path) -> Result<(), RootfsError> {
    let start = Instant::now();
    while !device.exists() {
        if start.elapsed() > DEVICE_PATIENCE {
            return Err(RootfsError::DeviceMissing(device.display().to_string()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `root` joined with the absolute path `target`.
fn under(root: &Path, target: &[u8]) -> Result<PathBuf, RootfsError> {
    let target = Path::new(OsStr::from_bytes(target));
    let relative = target
        .strip_prefix("/")
        .map_err(|_| RootfsError::RelativeTarget(target.display().to_string()))?;
    Ok(root.join(relative))
}

/// Mounts each shared directory at its target below `root`.
fn mount_shares(root: &Path, mounts: &[SharedMount]) -> Result<(), RootfsError> {
    for share in mounts {
        let target = under(root, &share.target)?;
        create_dir(&target)?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if share.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let tag = lossy(&share.tag);
        let (fstype, data) = match share.transport {
            ShareTransport::NineP => ("9p", Some(NINE_P_OPTIONS)),
            ShareTransport::VirtioFs => ("virtiofs", None),
        };
        mount_at(&tag, &target, Some(fstype), flags, data, || {
            format!("{fstype} share {tag:?}")
        })?;
    }
    Ok(())
}

/// Mounts the image read-only with a tmpfs overlay at [`NEW_ROOT`].
fn assemble_root(image: &RootImage) -> Result<PathBuf, RootfsError> {
    let device = PathBuf::from(OsStr::from_bytes(&image.device));
    let fstype = lossy(&image.fstype);
    wait_for_device(&device)?;
    let (lower, scratch, new_root) = (
        Path::new(IMAGE_DIR),
        Path::new(SCRATCH_DIR),
        PathBuf::from(NEW_ROOT),
    );
    for dir in [lower, scratch, &new_root] {
        create_dir(dir)?;
    }
    let device_name = device.display().to_string();
    mount_at(
        &device_name,
        lower,
        Some(&fstype),
        MsFlags::MS_RDONLY,
        None,
        || format!("OS image {device_name} ({fstype}, read-only)"),
    )?;
    mount_at(
        "tmpfs",
        scratch,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
        || "tmpfs for the image's writable layer".into(),
    )?;
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    create_dir(&upper)?;
    create_dir(&work)?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount_at(
        "overlay",
        &new_root,
        Some("overlay"),
        MsFlags::empty(),
        Some(&options),
        || "overlay of the OS image".into(),
    )?;
    for moved in MOVED_MOUNTS {
        let target = under(&new_root, moved.as_bytes())?;
        create_dir(&target)?;
        mount_at(moved, &target, None, MsFlags::MS_MOVE, None, || {
            format!("{moved} (move)")
        })?;
    }
    Ok(new_root)
}

/// Makes `new_root` the root of the agent (and of everything it starts afterwards).
fn switch_root(new_root: &Path) -> Result<(), RootfsError> {
    let step = |step: &'static str| move |errno| RootfsError::SwitchRoot { step, errno };
    nix::unistd::chdir(new_root).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move onto /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Sets up the job's file systems: switches into `root` (when given) with `mounts` inside it,
/// or mounts `mounts` in the initramfs. Must run as PID 1 in a guest, before the job starts.
pub fn enter(root: Option<&RootImage>, mounts: &[SharedMount]) -> Result<(), RootfsError> {
    match root {
        None => mount_shares(Path::new("/"), mounts),
        Some(image) => {
            let new_root = assemble_root(image)?;
            mount_shares(&new_root, mounts)?;
            switch_root(&new_root)
        }
    }
}
