//! Whether a path can be trusted: that nobody but root (or one trusted user) can change what
//! it names. The shepherd runs as root for other users' jobs; a file it boots or writes must not
//! be replaceable by any of them.
//!
//! A path is trusted when the file and every directory above it are owned by root or the
//! trusted user and writable by neither group nor others. A directory others may write is
//! accepted above the file only with the sticky bit (as `/tmp`), where nobody can rename or
//! remove an entry they do not own. Both the path as written and the path its symlinks resolve
//! to are checked, so neither a symlink in a writable directory nor a directory behind a
//! symlink can be changed by someone else.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedPath {
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is owned by uid {uid}, not by root")]
    Owner { path: PathBuf, uid: u32 },
    #[error("{path} can be changed by users other than its owner (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
}

const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> UntrustedPath + '_ {
    move |source| UntrustedPath::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `meta` (of `path`) is owned by root or `trusted_uid` and that group and
/// others cannot write it.
pub fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    trusted_uid: u32,
) -> Result<(), UntrustedPath> {
    check_owner(path, meta, trusted_uid)?;
    let mode = meta.permissions().mode();
    if mode & GROUP_OR_OTHER_WRITE != 0 {
        return Err(UntrustedPath::Writable {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

fn check_owner(
    path: &Path,
    meta: &std::fs::Metadata,
    trusted_uid: u32,
) -> Result<(), UntrustedPath> {
    if meta.uid() != 0 && meta.uid() != trusted_uid {
        return Err(UntrustedPath::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Checks `dir` and every directory above it, as written and as resolved.
pub fn check_directories(dir: &Path, trusted_uid: u32) -> Result<(), UntrustedPath> {
    let absolute = std::path::absolute(dir).map_err(unreadable(dir))?;
    let resolved = std::fs::canonicalize(dir).map_err(unreadable(dir))?;
    for path in [absolute, resolved] {
        for ancestor in path.ancestors() {
            let meta = std::fs::metadata(ancestor).map_err(unreadable(ancestor))?;
            check_owner(ancestor, &meta, trusted_uid)?;
            let mode = meta.permissions().mode();
            if mode & GROUP_OR_OTHER_WRITE != 0 && mode & STICKY == 0 {
                return Err(UntrustedPath::Writable {
                    path: ancestor.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
        }
    }
    Ok(())
}

/// Checks the file `path` (owned by root or `trusted_uid`, not writable by group or others)
/// and every directory above it.
pub fn check_file(path: &Path, trusted_uid: u32) -> Result<(), UntrustedPath> {
    let meta = std::fs::metadata(path).map_err(unreadable(path))?;
    check_private(path, &meta, trusted_uid)?;
    let absolute = std::path::absolute(path).map_err(unreadable(path))?;
    match absolute.parent() {
        Some(parent) => check_directories(parent, trusted_uid),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_tree_is_trusted_and_a_writable_file_or_directory_is_not() {
        let me = nix::unistd::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("guest");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let file = dir.join("vmlinux");
        std::fs::write(&file, b"k").unwrap();
        chmod(&file, 0o644);
        check_file(&file, me).unwrap();

        chmod(&file, 0o664);
        assert!(matches!(
            check_file(&file, me),
            Err(UntrustedPath::Writable { .. })
        ));
        chmod(&file, 0o644);
        chmod(&dir, 0o777);
        let err = check_file(&file, me).unwrap_err();
        assert!(
            matches!(&err, UntrustedPath::Writable { path, .. } if path == &dir),
            "{err}"
        );
        // Sticky, as /tmp: others cannot replace what is in it.
        chmod(&dir, 0o1777);
        check_file(&file, me).unwrap();
        // Through a symlink that sits in a writable directory.
        chmod(&dir, 0o755);
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = open.join("vmlinux");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(check_file(&link, me).is_err());
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: path_trust owner test: needs root to chown");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("initramfs.cpio");
        std::fs::write(&file, b"i").unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let err = check_file(&file, 0).unwrap_err();
        assert!(
            matches!(err, UntrustedPath::Owner { uid: 65534, .. }),
            "{err}"
        );
    }
}
