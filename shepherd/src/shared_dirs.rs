//! Host directories shared into the job's VM, each at the same path as on the host.
//!
//! The file server (QEMU's 9p server for the QEMU backend; the VMM's own virtio-fs device for the
//! embedded backend) runs with the job user's identity, so
//! host permissions apply to everything the job does there: files it creates belong to the job
//! user, and what the job user cannot read on the host the job cannot read either.

use std::path::{Component, Path, PathBuf};

/// One shared host directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    /// Absolute, normalised host path; the guest mounts it at the same path.
    pub path: PathBuf,
    pub read_only: bool,
}

/// Why a directory cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum SharedDirError {
    #[error("shared directory {0}: not an absolute path")]
    Relative(PathBuf),
    #[error("shared directory {0}: '..' is not allowed")]
    ParentComponent(PathBuf),
    #[error("shared directory {0}: the host's root cannot be shared")]
    Root(PathBuf),
    #[error("shared directory {path}: {source}")]
    Inaccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shared directory {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("shared directory {path}: {kind} is a kernel interface file system and is never shared into a VM")]
    KernelFileSystem { path: PathBuf, kind: &'static str },
    #[error("shared directory {path}: uid {uid} cannot reach it: {source}")]
    Unreachable {
        path: PathBuf,
        uid: u32,
        source: std::io::Error,
    },
}

impl SharedDir {
    /// A read-write share of `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SharedDir {
            path: path.into(),
            read_only: false,
        }
    }
}

/// Where a Grid Engine job's files are on the host.
#[derive(Debug, Clone, Copy)]
pub struct JobPaths<'a> {
    /// The job's working directory.
    pub cwd: &'a Path,
    /// `$HOME` of the job user.
    pub home: Option<&'a Path>,
    /// `$TMPDIR` (execd's per-job temporary directory).
    pub tmpdir: Option<&'a Path>,
    /// The job script.
    pub script: Option<&'a Path>,
    /// The administrator's shared paths (settings).
    pub configured: &'a [SharedDir],
}

/// The directories a Grid Engine job sees from the host: its working directory, `$HOME` and
/// `$TMPDIR` read-write, the directory holding its script read-only, and the configured paths.
/// `$HOME`, `$TMPDIR` and the script's directory are left out when they do not exist on this
/// host or are `/`; the working directory and configured paths are checked by [`prepare`].
pub fn job_shares(paths: &JobPaths) -> Vec<SharedDir> {
    let usable = |p: &Path| p.is_absolute() && p != Path::new("/") && p.is_dir();
    let mut shares = vec![SharedDir::new(paths.cwd)];
    for dir in [paths.home, paths.tmpdir].into_iter().flatten() {
        if usable(dir) {
            shares.push(SharedDir::new(dir));
        }
    }
    if let Some(dir) = paths.script.and_then(Path::parent) {
        if usable(dir) {
            shares.push(SharedDir {
                path: dir.to_path_buf(),
                read_only: true,
            });
        }
    }
    shares.extend_from_slice(paths.configured);
    shares
}

/// `path` without `.` components and repeated separators; refuses relative paths, `..` and `/`.
pub fn normalise(path: &Path) -> Result<PathBuf, SharedDirError> {
    if !path.is_absolute() {
        return Err(SharedDirError::Relative(path.to_path_buf()));
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(SharedDirError::ParentComponent(path.to_path_buf()))
            }
        }
    }
    if out == Path::new("/") {
        return Err(SharedDirError::Root(path.to_path_buf()));
    }
    Ok(out)
}

/// Checks and orders shares for mounting: paths normalised and existing directories; exact
/// duplicates merged (read-write wins); a directory inside another share dropped when that
/// share already gives it (same or more access: host mounts below a share are reached through
/// it); parents before their children, so a remaining nested share (read-write inside
/// read-only) is mounted on top of its parent's.
pub fn prepare(dirs: &[SharedDir]) -> Result<Vec<SharedDir>, SharedDirError> {
    let mut out: Vec<SharedDir> = Vec::new();
    for dir in dirs {
        let path = normalise(&dir.path)?;
        let meta = std::fs::metadata(&path).map_err(|source| SharedDirError::Inaccessible {
            path: path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SharedDirError::NotADirectory(path));
        }
        match vmm::fuse::kernel_file_system_at(&path) {
            Ok(None) => {}
            Ok(Some(kind)) => return Err(SharedDirError::KernelFileSystem { path, kind }),
            Err(errno) => {
                return Err(SharedDirError::Inaccessible {
                    path,
                    source: errno.into(),
                })
            }
        }
        match out.iter_mut().find(|d| d.path == path) {
            Some(existing) => existing.read_only &= dir.read_only,
            None => out.push(SharedDir {
                path,
                read_only: dir.read_only,
            }),
        }
    }
    out.sort_by(|a, b| {
        a.path
            .components()
            .count()
            .cmp(&b.path.components().count())
            .then_with(|| a.path.cmp(&b.path))
    });
    let mut kept: Vec<SharedDir> = Vec::with_capacity(out.len());
    for dir in out {
        let covered = kept
            .iter()
            .any(|p| dir.path.starts_with(&p.path) && (!p.read_only || dir.read_only));
        if !covered {
            kept.push(dir);
        }
    }
    Ok(kept)
}

/// Checks that the job user can reach, open and list every directory, as the file server will
/// have to: the check runs on a short-lived thread that takes the job
/// user's identity, so a root caller's answer does not stand in for the job user's. A directory
/// the job user cannot reach is the job's error, found here before any VM starts.
pub fn check_reachable_as(
    dirs: &[SharedDir],
    user: &vmm::ThreadCredentials,
) -> Result<(), SharedDirError> {
    let unreachable = |path: &Path, source| SharedDirError::Unreachable {
        path: path.to_path_buf(),
        uid: user.uid,
        source,
    };
    user.run_on_own_thread(|| {
        for dir in dirs {
            // Search and read: the file servers open the directory itself and list it.
            // access(2) answers for the real ids, which this thread has just set.
            nix::unistd::access(
                &dir.path,
                nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::X_OK,
            )
            .map_err(|errno| unreachable(&dir.path, errno.into()))?;
        }
        Ok(())
    })
    .map_err(|e| unreachable(Path::new("/"), std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_drops_dots_and_refuses_escapes() {
        assert_eq!(
            normalise(Path::new("/a/./b//c/")).unwrap(),
            Path::new("/a/b/c")
        );
        assert!(matches!(
            normalise(Path::new("a/b")),
            Err(SharedDirError::Relative(_))
        ));
        assert!(matches!(
            normalise(Path::new("/a/../etc")),
            Err(SharedDirError::ParentComponent(_))
        ));
        assert!(matches!(
            normalise(Path::new("/.")),
            Err(SharedDirError::Root(_))
        ));
    }

    #[test]
    fn parents_come_first_and_duplicates_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().to_path_buf();
        let child = parent.join("child");
        std::fs::create_dir(&child).unwrap();
        let ro = |p: &Path| SharedDir {
            path: p.to_path_buf(),
            read_only: true,
        };
        let got = prepare(&[ro(&child), ro(&parent), SharedDir::new(&child)]).unwrap();
        assert_eq!(
            got,
            [
                ro(&parent),
                SharedDir {
                    path: child,
                    read_only: false
                }
            ]
        );
    }

    #[test]
    fn directories_inside_a_share_that_gives_them_are_not_shared_again() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().to_path_buf();
        let child = parent.join("child");
        std::fs::create_dir(&child).unwrap();
        let sibling = PathBuf::from(format!("{}-sibling", parent.display()));
        std::fs::create_dir_all(&sibling).unwrap();
        let got = prepare(&[
            SharedDir::new(&child),
            SharedDir::new(&parent),
            SharedDir::new(&sibling),
        ])
        .unwrap();
        std::fs::remove_dir(&sibling).unwrap();
        // A name sharing the parent's prefix is not inside it.
        assert_eq!(got, [SharedDir::new(&parent), SharedDir::new(&sibling)]);
        let ro_child = SharedDir {
            path: child.clone(),
            read_only: true,
        };
        assert_eq!(
            prepare(&[ro_child, SharedDir::new(&parent)]).unwrap(),
            [SharedDir::new(&parent)]
        );
    }

    #[test]
    fn a_jobs_shares_are_its_cwd_home_tmpdir_script_dir_and_configured_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let [cwd, home, tmpdir, scripts, data] =
            ["cwd", "home", "tmp", "job_scripts", "data"].map(|d| tmp.path().join(d));
        for d in [&cwd, &home, &tmpdir, &scripts, &data] {
            std::fs::create_dir(d).unwrap();
        }
        let configured = [SharedDir::new(&data)];
        let script = scripts.join("42");
        let shares = job_shares(&JobPaths {
            cwd: &cwd,
            home: Some(&home),
            tmpdir: Some(&tmpdir),
            script: Some(&script),
            configured: &configured,
        });
        assert_eq!(
            shares,
            [
                SharedDir::new(&cwd),
                SharedDir::new(&home),
                SharedDir::new(&tmpdir),
                SharedDir {
                    path: scripts,
                    read_only: true
                },
                SharedDir::new(&data),
            ]
        );
        let missing = tmp.path().join("no-home");
        let shares = job_shares(&JobPaths {
            cwd: &cwd,
            home: Some(&missing),
            tmpdir: Some(Path::new("/")),
            script: None,
            configured: &[],
        });
        assert_eq!(shares, [SharedDir::new(&cwd)]);
    }

    #[test]
    fn missing_directories_and_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            prepare(&[SharedDir::new(tmp.path().join("missing"))]),
            Err(SharedDirError::Inaccessible { .. })
        ));
        assert!(matches!(
            prepare(&[SharedDir::new(&file)]),
            Err(SharedDirError::NotADirectory(_))
        ));
    }

    #[test]
    fn kernel_interface_file_systems_are_never_shared() {
        for (dir, kind) in [
            ("/proc", "proc"),
            ("/proc/self", "proc"),
            ("/proc/./1/", "proc"),
            ("/sys", "sysfs"),
        ] {
            let err = prepare(&[SharedDir::new(dir)]).unwrap_err();
            assert!(
                matches!(&err, SharedDirError::KernelFileSystem { kind: k, .. } if *k == kind),
                "{dir}: {err}"
            );
            assert!(err.to_string().contains("never shared"), "{err}");
        }
        let tmp = tempfile::tempdir().unwrap();
        assert!(prepare(&[SharedDir::new(tmp.path())]).is_ok());
    }

    #[test]
    fn a_directory_the_job_user_cannot_reach_is_refused_with_the_reason() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED shared_dirs reachability: needs root to take another uid");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let open = tmp.path().join("open");
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&open).unwrap();
        std::fs::create_dir_all(closed.join("inside")).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = vmm::ThreadCredentials {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        assert!(check_reachable_as(&[SharedDir::new(&open)], &nobody).is_ok());
        for unreachable in [closed.clone(), closed.join("inside")] {
            let err = check_reachable_as(
                &[SharedDir::new(&open), SharedDir::new(&unreachable)],
                &nobody,
            )
            .unwrap_err();
            assert!(
                matches!(&err, SharedDirError::Unreachable { uid: 65534, source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied),
                "{err}"
            );
        }
        // Root itself reaches it: the answer is the job user's, not the caller's.
        assert!(prepare(&[SharedDir::new(closed.join("inside"))]).is_ok());
    }
}
