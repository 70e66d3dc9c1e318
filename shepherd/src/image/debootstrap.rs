//! Building an image from a Debian suite: `debootstrap` into a staging directory, then an ext4
//! file system made from that directory with `mkfs.ext4 -d` (no loop mount), checksummed and
//! moved into the store in one rename. Building an image that already exists from the same
//! suite, mirror and variant is a no-op.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ext4::{log_tail, make_ext4, program, run_logged};
use super::manifest::Manifest;
use super::store::ImageStore;
use super::verification::sha256_file;
use super::{ImageError, IMAGE_FILE, MANIFEST_FILE};

/// Debian's mirror, used when none is given.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// debootstrap's smallest variant: essential packages and apt.
pub const DEFAULT_VARIANT: &str = "minbase";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub name: String,
    pub suite: String,
    pub mirror: String,
    pub variant: String,
    /// Extra packages (`debootstrap --include`).
    pub include: Vec<String>,
}

/// What [`build`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutcome {
    Built,
    /// The image was already there, from the same suite, mirror and variant, and intact.
    AlreadyPresent,
}

fn debootstrap(req: &BuildRequest, root: &Path, log: &Path) -> Result<(), String> {
    let mut cmd = Command::new(program("debootstrap")?);
    cmd.arg(format!("--variant={}", req.variant));
    if !req.include.is_empty() {
        cmd.arg(format!("--include={}", req.include.join(",")));
    }
    cmd.arg(&req.suite).arg(root).arg(&req.mirror);
    run_logged(cmd, log, "debootstrap").map_err(|e| {
        // debootstrap keeps its detailed log inside the target.
        let inner = root.join("debootstrap/debootstrap.log");
        if inner.is_file() {
            format!("{e} | debootstrap.log: {}", log_tail(&inner, 4))
        } else {
            e
        }
    })
}

/// Decodes the octal escapes (`\040` for a space) of a /proc/self/mountinfo path.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Mount points at or below `dir` in `mountinfo`, deepest first.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// Detaches whatever debootstrap left mounted below `dir` (a killed debootstrap leaves /proc,
/// /sys and, in containers, bind mounts of host devices), so removing `dir` can never reach
/// into them. Errors when something stays mounted.
fn unmount_under(dir: &Path) -> Result<(), String> {
    let read = || std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in mounts_under(&read(), dir) {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
    match mounts_under(&read(), dir).first() {
        Some(left) => Err(format!(
            "{} is still mounted; not removing {}",
            left.display(),
            dir.display()
        )),
        None => Ok(()),
    }
}

/// Removes a staging directory, first detaching anything mounted below it.
fn remove_staging(dir: &Path) -> Result<(), String> {
    unmount_under(dir)?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", dir.display())),
    }
}

/// Removes what a job image does not need: downloaded packages and package lists.
fn trim(root: &Path) {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for entry in entries.filter_map(Result::ok) {
                if entry.path().is_file() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Builds image `req.name` in `store`, or finds it already built. Progress goes to the log.
pub fn build(
    store: &ImageStore,
    req: &BuildRequest,
) -> Result<(Manifest, BuildOutcome), ImageError> {
    let fail = |detail: String| ImageError::Build {
        name: req.name.clone(),
        detail,
    };
    let _lock = store.lock(&req.name)?;
    let final_dir = store.image_dir(&req.name)?;
    if final_dir.join(MANIFEST_FILE).is_file() {
        let existing = store.manifest(&req.name)?;
        if existing.suite == req.suite
            && existing.mirror == req.mirror
            && existing.variant == req.variant
        {
            store.verified(&req.name)?;
            return Ok((existing, BuildOutcome::AlreadyPresent));
        }
        return Err(ImageError::Exists {
            name: req.name.clone(),
            origin: existing.origin(),
        });
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            "debootstrap needs root (it chroots and creates device nodes)".into(),
        ));
    }
    // Leftovers of builds of this name that were killed (we hold the name's lock).
    let prefix = format!(".build-{}-", req.name);
    if let Ok(entries) = std::fs::read_dir(store.dir()) {
        for entry in entries.filter_map(Result::ok) {
            if super::store::is_staging_of(&entry.file_name(), &prefix) {
                remove_staging(&entry.path()).map_err(fail)?;
            }
        }
    }
    let staging = store.dir().join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(ImageError::io("creating", &staging))?;
    let result = build_in(req, &staging, &final_dir);
    if result.is_err() {
        if let Err(e) = remove_staging(&staging) {
            tracing::warn!("{e}");
        }
    }
    result.map(|m| (m, BuildOutcome::Built)).map_err(fail)
}

fn build_in(req: &BuildRequest, staging: &Path, final_dir: &Path) -> Result<Manifest, String> {
    let root = staging.join("root");
    debootstrap(req, &root, &staging.join("debootstrap.log"))?;
    trim(&root);
    let os_version = std::fs::read_to_string(root.join("etc/debian_version"))
        .ok()
        .map(|v| v.trim().to_string());
    let image = staging.join(IMAGE_FILE);
    let size = make_ext4(&req.name, &root, &image, &staging.join("mkfs.log"))?;
    remove_staging(&root)?;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    let manifest = Manifest {
        name: req.name.clone(),
        suite: req.suite.clone(),
        mirror: req.mirror.clone(),
        variant: req.variant.clone(),
        file: IMAGE_FILE.into(),
        fstype: "ext4".into(),
        size,
        sha256: sha256_file(&image).map_err(|e| e.to_string())?,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        os_version,
        source: None,
    };
    manifest
        .save(&staging.join(MANIFEST_FILE))
        .map_err(|e| e.to_string())?;
    std::fs::rename(staging, final_dir)
        .map_err(|e| format!("moving {} into place: {e}", staging.display()))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_a_directory_are_found_deepest_first() {
        let mountinfo = "\
22 1 8:1 / / rw - ext4 /dev/vda rw
30 22 0:5 / /var/lib/img/.build-x-1/root/proc rw - proc proc rw
31 22 0:6 / /var/lib/img/.build-x-1/root/dev rw - tmpfs nodev rw
32 31 0:7 /null /var/lib/img/.build-x-1/root/dev/null rw - devtmpfs udev rw
33 22 0:8 / /var/lib/img/.build-x-10/root/proc rw - proc proc rw
34 22 0:9 / /mnt/with\\040space rw - tmpfs t rw";
        let found = mounts_under(mountinfo, Path::new("/var/lib/img/.build-x-1"));
        assert_eq!(found[0], Path::new("/var/lib/img/.build-x-1/root/dev/null"));
        assert_eq!(found.len(), 3);
        assert_eq!(
            mounts_under(mountinfo, Path::new("/mnt/with space")),
            [PathBuf::from("/mnt/with space")]
        );
    }

    #[test]
    fn an_existing_image_of_another_suite_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        let dir = store.image_dir("img").unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(IMAGE_FILE), b"x").unwrap();
        Manifest {
            name: "img".into(),
            suite: "bookworm".into(),
            mirror: DEFAULT_MIRROR.into(),
            variant: DEFAULT_VARIANT.into(),
            file: IMAGE_FILE.into(),
            fstype: "ext4".into(),
            size: 1,
            sha256: sha256_file(&dir.join(IMAGE_FILE)).unwrap(),
            created: String::new(),
            os_version: None,
            source: None,
        }
        .save(&dir.join(MANIFEST_FILE))
        .unwrap();
        let req = BuildRequest {
            name: "img".into(),
            suite: "bullseye".into(),
            mirror: DEFAULT_MIRROR.into(),
            variant: DEFAULT_VARIANT.into(),
            include: Vec::new(),
        };
        assert!(matches!(
            build(&store, &req),
            Err(ImageError::Exists { .. })
        ));
        let mut same = req.clone();
        same.suite = "bookworm".into();
        assert_eq!(
            build(&store, &same).unwrap().1,
            BuildOutcome::AlreadyPresent
        );
    }
}
