//! A directory of small count files that this host's shepherds share: the start attempts of
//! each job ([`super::start_attempts`]) and the shortage streak of each queue
//! ([`super::shortage_streak`]). Both decide whether a job or a queue is failed, so the
//! directory must be root's alone: a real directory (not a link) owned by this process's user,
//! mode 0700, checked each time. Each read-modify-write holds an exclusive `flock` on its file,
//! so concurrent shepherds lose no count; files are opened with `O_NOFOLLOW`.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// Why a count cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum CounterDirError {
    #[error("state directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state directory {0} is not a directory owned by this user and closed to others")]
    Unsafe(String),
}

/// One such directory.
#[derive(Debug, Clone)]
pub struct CounterDir {
    dir: PathBuf,
}

impl CounterDir {
    /// The directory at `dir`; made and checked when a count is first updated.
    pub fn new(dir: PathBuf) -> Self {
        CounterDir { dir }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700) if needed and checks that it is safe to trust.
    pub fn checked(&self) -> Result<(), CounterDirError> {
        let dir = &self.dir;
        let io = |source| CounterDirError::Io {
            path: dir.display().to_string(),
            source,
        };
        // Missing parents get the usual 0755: they may be shared (the image store lives beside
        // these directories in /var/lib/sge_virtualizer, and job users must reach it).
        if let Some(parent) = dir.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io)?;
        }
        match DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(e)),
            _ => {}
        }
        let meta = std::fs::symlink_metadata(dir).map_err(io)?;
        if !meta.is_dir()
            || meta.uid() != nix::unistd::geteuid().as_raw()
            || meta.mode() & 0o022 != 0
        {
            return Err(CounterDirError::Unsafe(dir.display().to_string()));
        }
        Ok(())
    }

    /// Replaces the text of file `name` (empty when new) with `change(text)`, under the file's
    /// lock; returns the new text. `name` must be a plain file name the caller built.
    pub fn update(
        &self,
        name: &str,
        change: impl FnOnce(&str) -> String,
    ) -> Result<String, CounterDirError> {
        self.checked()?;
        let path = self.dir.join(name);
        let io = |source| CounterDirError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        let mut file =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io(errno.into()))?;
        let mut text = String::new();
        // A file that is not text (it is only ever written here) reads as empty.
        if file.read_to_string(&mut text).is_err() {
            text.clear();
        }
        let new = change(&text);
        file.rewind().map_err(io)?;
        file.set_len(0).map_err(io)?;
        file.write_all(new.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(new)
    }

    /// Removes file `name` (`unlink` follows no symlink).
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    /// Removes files not touched for `older_than`, except `keep`.
    pub fn prune_stale(&self, keep: &str, older_than: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > older_than)
                .unwrap_or(false);
            if stale && entry.file_name() != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn updates_under_a_lock_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CounterDir::new(tmp.path().join("counts"));
        assert_eq!(dir.update("a", |t| format!("{t}x")).unwrap(), "x");
        assert_eq!(dir.update("a", |t| format!("{t}x")).unwrap(), "xx");
        let mode = std::fs::metadata(dir.path()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
        dir.remove("a");
        assert_eq!(dir.update("a", |t| format!("{t}y")).unwrap(), "y");
    }

    /// The parents it makes stay open to others (the image store sits beside it, and job
    /// users must reach that); only the directory itself is closed.
    #[test]
    fn missing_parents_are_made_reachable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CounterDir::new(tmp.path().join("lib/state/counts"));
        dir.checked().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        // (with the usual umask 022)
        assert_eq!(mode(&tmp.path().join("lib")), 0o755);
        assert_eq!(mode(&tmp.path().join("lib/state")), 0o755);
        assert_eq!(mode(dir.path()), 0o700);
    }

    #[test]
    fn an_open_or_linked_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            CounterDir::new(open).checked(),
            Err(CounterDirError::Unsafe(_))
        ));
        let link = tmp.path().join("link");
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            CounterDir::new(link).checked(),
            Err(CounterDirError::Unsafe(_))
        ));
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CounterDir::new(tmp.path().join("counts"));
        dir.checked().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("n")).unwrap();
        assert!(dir.update("n", |_| "1".into()).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
