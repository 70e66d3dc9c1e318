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

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::JobConfig;
use super::counter_dir::{CounterDir, CounterDirError};

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
    #[error("start-attempt counts: {0}")]
    Dir(#[from] CounterDirError),
    #[error("the job's config lacks a numeric {0}")]
    JobKey(&'static str),
}

/// The counts of one host.
#[derive(Debug)]
pub struct StartAttempts {
    dir: CounterDir,
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
        StartAttempts {
            dir: CounterDir::new(dir),
        }
    }

    /// Uses `dir`, creating and checking it now.
    pub fn at(dir: &Path) -> Result<Self, StartAttemptsError> {
        let dir = CounterDir::new(dir.to_path_buf());
        dir.checked()?;
        Ok(StartAttempts { dir })
    }

    /// Counts one more start of the job without a connecting agent; returns the count so far.
    pub fn record_never_connected(&self, config: &JobConfig) -> Result<u32, StartAttemptsError> {
        let name = key(config)?;
        self.dir.checked()?;
        self.dir.prune_stale(&name, STALE_AFTER);
        // An unreadable count (it is only ever written here) starts again from 0.
        let text = self.dir.update(&name, |old| {
            let count = old.trim().parse::<u32>().unwrap_or(0).saturating_add(1);
            format!("{count}\n")
        })?;
        Ok(text.trim().parse().unwrap_or(u32::MAX))
    }

    /// Forgets the job's count: its agent connected here.
    pub fn clear(&self, config: &JobConfig) {
        if let Ok(name) = key(config) {
            self.dir.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
