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
//! the program, `execve`, the job's own children) sees the image. Last, the job user's account
//! is added to the root's /etc/passwd and /etc/group where the image does not know its ids.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::protocol::{Account, Filesystems, RootImage, ShareTransport, SharedMount};

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
    #[error("malformed {file} entry for the job user: {line:?}")]
    BadAccount { file: String, line: String },
    #[error("adding the job user to {path}: {source}")]
    AccountFile {
        path: String,
        source: std::io::Error,
    },
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
            RootfsError::RelativeTarget(_) | RootfsError::BadAccount { .. } => libc::EINVAL,
            RootfsError::AccountFile { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
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

/// Field `index` (0-based) of a colon-separated passwd/group line.
fn field(line: &[u8], index: usize) -> Option<&[u8]> {
    line.split(|&b| b == b':').nth(index)
}

/// Appends those of `lines` to `path` whose name (field 0) and id (field 2) are both unknown
/// there. Each line must have `fields` fields and no newline.
fn append_missing(path: &Path, lines: &[Vec<u8>], fields: usize) -> Result<(), RootfsError> {
    let io = |source| RootfsError::AccountFile {
        path: path.display().to_string(),
        source,
    };
    let existing = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    let known = |i: usize, value: &[u8]| {
        existing
            .split(|&b| b == b'\n')
            .any(|l| field(l, i) == Some(value))
    };
    let mut add = Vec::new();
    for line in lines {
        let well_formed = !line.contains(&b'\n')
            && line.split(|&b| b == b':').count() == fields
            && field(line, 0).is_some_and(|n| !n.is_empty())
            && field(line, 2).is_some_and(|id| !id.is_empty() && id.iter().all(u8::is_ascii_digit));
        if !well_formed {
            return Err(RootfsError::BadAccount {
                file: path.display().to_string(),
                line: lossy(line),
            });
        }
        let (name, id) = (
            field(line, 0).unwrap_or_default(),
            field(line, 2).unwrap_or_default(),
        );
        if !known(0, name) && !known(2, id) {
            if !existing.is_empty() && !existing.ends_with(b"\n") && add.is_empty() {
                add.push(b'\n');
            }
            add.extend_from_slice(line);
            add.push(b'\n');
        }
    }
    if add.is_empty() {
        return Ok(());
    }
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&add))
        .map_err(io)
}

/// Makes the job user's name and groups resolve in the job's root.
fn add_account(account: &Account) -> Result<(), RootfsError> {
    append_missing(
        Path::new("/etc/passwd"),
        std::slice::from_ref(&account.passwd),
        7,
    )?;
    append_missing(Path::new("/etc/group"), &account.groups, 4)
}

/// Sets up the job's file systems: switches into the OS image (when given) with the shares
/// inside it, or mounts the shares in the initramfs; then adds the job user's account. Must run
/// as PID 1 in a guest, before the job starts.
pub fn enter(fs: &Filesystems) -> Result<(), RootfsError> {
    match &fs.root {
        None => mount_shares(Path::new("/"), &fs.mounts)?,
        Some(image) => {
            let new_root = assemble_root(image)?;
            mount_shares(&new_root, &fs.mounts)?;
            switch_root(&new_root)?;
        }
    }
    match &fs.account {
        Some(account) => add_account(account),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_user_is_added_once_and_known_ids_or_names_are_left_alone() {
        let dir = tempfile_dir();
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh").unwrap();
        let user = b"sgetest:x:1500:1500::/home/sgetest:/bin/bash".to_vec();
        append_missing(&passwd, std::slice::from_ref(&user), 7).unwrap();
        append_missing(&passwd, std::slice::from_ref(&user), 7).unwrap();
        // Same uid under another name, and same name with another uid: both already known.
        let clash = [
            b"other:x:1500:1500::/:/bin/sh".to_vec(),
            b"sgetest:x:7:7::/:/bin/sh".to_vec(),
        ];
        append_missing(&passwd, &clash, 7).unwrap();
        assert_eq!(
            std::fs::read_to_string(&passwd).unwrap(),
            "root:x:0:0:root:/root:/bin/sh\nsgetest:x:1500:1500::/home/sgetest:/bin/bash\n"
        );
        let group = dir.join("group");
        append_missing(&group, &[b"sgetest:x:1500:".to_vec()], 4).unwrap();
        assert_eq!(
            std::fs::read_to_string(&group).unwrap(),
            "sgetest:x:1500:\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_lines_are_refused() {
        let dir = tempfile_dir();
        let passwd = dir.join("passwd");
        for bad in [
            &b"a:x:1:1::/:/bin/sh\nroot2:x:0:0::/:/bin/sh"[..],
            b"a:x:1:1:/bin/sh",
            b"a:x:one:1::/:/bin/sh",
            b":x:1:1::/:/bin/sh",
        ] {
            assert!(matches!(
                append_missing(&passwd, &[bad.to_vec()], 7),
                Err(RootfsError::BadAccount { .. })
            ));
        }
        assert!(!passwd.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rootfs-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
