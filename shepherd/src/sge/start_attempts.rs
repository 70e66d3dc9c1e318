//! How many times a job's VM came up on this host without its guest agent ever connecting.
//! Such a start is re-queued (`noresources`: the host may just be short of something now), but
//! a job whose guest never connects would otherwise be re-queued for ever; after
//! [`MAX_NEVER_CONNECTED`] such starts on this host the job is failed instead.
//!
//! Grid Engine gives the shepherd no re-queue count (`RESTARTED` is about checkpoints), so the
//! count is kept here: one small file per job task, named by job id, task id and submission
//! time (unique even when job ids wrap), in a directory only root can write
//! ([`DEFAULT_DIR`], or [`DIR_ENV`]). A read-modify-write holds an exclusive `flock` on the
//! file, so concurrent shepherds cannot lose a count. The file goes away when the job's agent
//! connects here; files older than [`STALE_AFTER`] (jobs that went on elsewhere) are pruned.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::config::JobConfig;

/// Where the counts are kept.
pub const DEFAULT_DIR: &str = "/var/lib/sge_virtualizer/start-attempts";
/// Overrides [`DEFAULT_DIR`] (tests; hosts with another state directory).
pub const DIR_ENV: &str = "SGE_VIRTUALIZER_START_ATTEMPTS";
/// Starts without a connecting agent, on one host, after which the job fails.
pub const MAX_NEVER_CONNECTED: u32 = 3;
/// Counts not touched for this long belong to jobs that ran elsewhere or were deleted.
const STALE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the counts cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum StartAttemptsError {
    #[error("start-attempt directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "start-attempt directory {0} is not a directory owned by this user and closed to others"
    )]
    Unsafe(String),
    #[error("the job's config lacks a numeric {0}")]
    JobKey(&'static str),
}

/// The counts of one host.
#[derive(Debug)]
pub struct StartAttempts {
    dir: PathBuf,
}

/// The file name of one job task's count.
fn key(config: &JobConfig) -> Result<String, StartAttemptsError> {
    let number = |name: &'static str| {
        config
            .get(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(StartAttemptsError::JobKey(name))
    };
    Ok(format!(
        "{}.{}.{}",
        number("job_id")?,
        number("ja_task_id")?,
        number("submission_time")?
    ))
}

impl StartAttempts {
    /// The configured directory ([`DIR_ENV`] or [`DEFAULT_DIR`]); made (and checked) when a
    /// count is first recorded.
    pub fn configured() -> Self {
        let dir = std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        StartAttempts { dir }
    }

    /// Uses `dir`, creating and checking it now ([`Self::checked_dir`]).
    pub fn at(dir: &Path) -> Result<Self, StartAttemptsError> {
        let attempts = StartAttempts {
            dir: dir.to_path_buf(),
        };
        attempts.checked_dir()?;
        Ok(attempts)
    }

    /// Creates the directory (mode 0700) if needed. It must be a real directory owned by this
    /// process's user and writable by nobody else: the shepherd is root, and the count decides
    /// whether a job is failed.
    fn checked_dir(&self) -> Result<(), StartAttemptsError> {
        let dir = &self.dir;
        let io = |source| StartAttemptsError::Io {
            path: dir.display().to_string(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let meta = std::fs::symlink_metadata(dir).map_err(io)?;
        if !meta.is_dir()
            || meta.uid() != nix::unistd::geteuid().as_raw()
            || meta.mode() & 0o022 != 0
        {
            return Err(StartAttemptsError::Unsafe(dir.display().to_string()));
        }
        Ok(())
    }

    fn open(&self, name: &str) -> Result<Flock<File>, StartAttemptsError> {
        let path = self.dir.join(name);
        let io = |source| StartAttemptsError::Io {
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
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io(errno.into()))
    }

    /// Counts one more start of the job without a connecting agent; returns the count so far.
    pub fn record_never_connected(&self, config: &JobConfig) -> Result<u32, StartAttemptsError> {
        let name = key(config)?;
        self.checked_dir()?;
        self.prune_stale(&name);
        let mut file = self.open(&name)?;
        let io = |source| StartAttemptsError::Io {
            path: self.dir.join(&name).display().to_string(),
            source,
        };
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        // An unreadable count (it is only ever written here) starts again from 0.
        let count = text.trim().parse::<u32>().unwrap_or(0).saturating_add(1);
        file.rewind().map_err(io)?;
        file.set_len(0).map_err(io)?;
        file.write_all(format!("{count}\n").as_bytes())
            .map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(count)
    }

    /// Forgets the job's count: its agent connected here. (`unlink` follows no symlink.)
    pub fn clear(&self, config: &JobConfig) {
        if let Ok(name) = key(config) {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Removes counts not touched for [`STALE_AFTER`], except `keep`.
    fn prune_stale(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > STALE_AFTER)
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

    fn job(id: u32, task: u32) -> JobConfig {
        JobConfig::parse(&format!(
            "job_id={id}\nja_task_id={task}\nsubmission_time=1700000000\n"
        ))
    }

    #[test]
    fn counts_per_job_task_and_clears() {
        let tmp = tempfile::tempdir().unwrap();
        let attempts = StartAttempts::at(&tmp.path().join("attempts")).unwrap();
        let mode = std::fs::metadata(tmp.path().join("attempts"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(attempts.record_never_connected(&job(7, 0)).unwrap(), 1);
        assert_eq!(attempts.record_never_connected(&job(7, 0)).unwrap(), 2);
        assert_eq!(attempts.record_never_connected(&job(7, 1)).unwrap(), 1);
        attempts.clear(&job(7, 0));
        assert_eq!(attempts.record_never_connected(&job(7, 0)).unwrap(), 1);
    }

    #[test]
    fn concurrent_shepherds_lose_no_count() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("attempts");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let attempts = StartAttempts::at(&dir).unwrap();
                    for _ in 0..10 {
                        attempts.record_never_connected(&job(9, 0)).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let attempts = StartAttempts::at(&dir).unwrap();
        assert_eq!(attempts.record_never_connected(&job(9, 0)).unwrap(), 81);
    }

    #[test]
    fn an_open_or_linked_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            StartAttempts::at(&open),
            Err(StartAttemptsError::Unsafe(_))
        ));
        let link = tmp.path().join("link");
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            StartAttempts::at(&link),
            Err(StartAttemptsError::Unsafe(_))
        ));
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let attempts = StartAttempts::at(&tmp.path().join("attempts")).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("attempts/7.0.1700000000")).unwrap();
        assert!(attempts.record_never_connected(&job(7, 0)).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn a_config_without_a_numeric_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let attempts = StartAttempts::at(&tmp.path().join("a")).unwrap();
        let bad = JobConfig::parse("job_id=../../etc/x\nja_task_id=0\nsubmission_time=1\n");
        assert!(matches!(
            attempts.record_never_connected(&bad),
            Err(StartAttemptsError::JobKey("job_id"))
        ));
    }
}
