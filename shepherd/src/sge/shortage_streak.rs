//! Consecutive shortages of one queue on this host. A shortage that may pass (guest RAM that
//! cannot be reserved now, a VM that could not be started for want of something) re-queues the
//! job (`noresources`), but a host that keeps failing that way would take every job the
//! scheduler sends and re-queue it for ever, with nothing in `qstat -f` to say so. So the
//! shortages of each queue are counted here; after [`ShortagePolicy::limit`] of them within
//! [`ShortagePolicy::window`], the next one becomes the queue's error, with the reason, and the
//! count starts again (the administrator clears the queue once the host is fixed). A job whose
//! VM starts ends the streak.
//!
//! The counts live in a root-only directory ([`DEFAULT_DIR`], or [`DIR_ENV`]), one file per
//! queue holding `<count> <first shortage, Unix seconds>`, updated under its lock.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::counter_dir::{CounterDir, CounterDirError};

/// Where the counts are kept.
pub const DEFAULT_DIR: &str = "/var/lib/sge_virtualizer/shortages";
/// Overrides [`DEFAULT_DIR`] (tests; hosts with another state directory).
pub const DIR_ENV: &str = "SGE_VIRTUALIZER_SHORTAGES";
/// Shortages in a row a queue may have before the next one is its error.
pub const DEFAULT_LIMIT: u32 = 3;
/// How long a streak lasts from its first shortage.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// How many shortages a queue may have, and within how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortagePolicy {
    pub limit: u32,
    pub window: Duration,
}

impl Default for ShortagePolicy {
    fn default() -> Self {
        ShortagePolicy {
            limit: DEFAULT_LIMIT,
            window: DEFAULT_WINDOW,
        }
    }
}

/// What one more shortage means for its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortageVerdict {
    /// Re-queue the job: this is shortage `count` of the allowed `limit`.
    Requeue { count: u32, limit: u32 },
    /// The limit is spent: the queue goes into error (the streak starts again).
    QueueError { count: u32 },
}

/// The streaks of this host's queues.
#[derive(Debug, Clone)]
pub struct ShortageStreak {
    dir: CounterDir,
    policy: ShortagePolicy,
}

/// The file name for `queue`: Grid Engine's queue names are plain words, but the name comes
/// from a file, so anything else is spelled out in hex rather than trusted as a path.
fn file_name(queue: &str) -> String {
    let plain = !queue.is_empty()
        && !queue.starts_with('.')
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if plain {
        queue.to_string()
    } else {
        let hex: String = queue.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ShortageStreak {
    /// The configured directory ([`DIR_ENV`] or [`DEFAULT_DIR`]) with `policy`.
    pub fn configured(policy: ShortagePolicy) -> Self {
        let dir = std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Self::at(dir, policy)
    }

    /// The streaks kept in `dir`.
    pub fn at(dir: PathBuf, policy: ShortagePolicy) -> Self {
        ShortageStreak {
            dir: CounterDir::new(dir),
            policy,
        }
    }

    /// Counts one more shortage of `queue`, now.
    pub fn record(&self, queue: &str) -> Result<ShortageVerdict, CounterDirError> {
        self.record_at(queue, unix_now())
    }

    fn record_at(&self, queue: &str, now: u64) -> Result<ShortageVerdict, CounterDirError> {
        let policy = self.policy;
        let mut verdict = ShortageVerdict::QueueError { count: 0 };
        self.dir.update(&file_name(queue), |old| {
            let mut fields = old.split_whitespace().map(|f| f.parse::<u64>().ok());
            let (count, first) = match (fields.next().flatten(), fields.next().flatten()) {
                (Some(c), Some(f)) if now.saturating_sub(f) <= policy.window.as_secs() => {
                    (u32::try_from(c).unwrap_or(u32::MAX).saturating_add(1), f)
                }
                // no streak, an expired one, or an unreadable file: this shortage starts one
                _ => (1, now),
            };
            if count > policy.limit {
                verdict = ShortageVerdict::QueueError { count };
                String::new()
            } else {
                verdict = ShortageVerdict::Requeue {
                    count,
                    limit: policy.limit,
                };
                format!("{count} {first}\n")
            }
        })?;
        Ok(verdict)
    }

    /// Ends `queue`'s streak: a VM started there.
    pub fn clear(&self, queue: &str) {
        self.dir.remove(&file_name(queue));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streak(limit: u32, window_s: u64) -> (tempfile::TempDir, ShortageStreak) {
        let tmp = tempfile::tempdir().unwrap();
        let s = ShortageStreak::at(
            tmp.path().join("shortages"),
            ShortagePolicy {
                limit,
                window: Duration::from_secs(window_s),
            },
        );
        (tmp, s)
    }

    #[test]
    fn the_shortage_after_the_limit_is_the_queues_error_and_starts_again() {
        let (_tmp, s) = streak(3, 600);
        for count in 1..=3 {
            assert_eq!(
                s.record_at("all.q", 1000).unwrap(),
                ShortageVerdict::Requeue { count, limit: 3 }
            );
        }
        assert_eq!(
            s.record_at("all.q", 1000).unwrap(),
            ShortageVerdict::QueueError { count: 4 }
        );
        assert_eq!(
            s.record_at("all.q", 1000).unwrap(),
            ShortageVerdict::Requeue { count: 1, limit: 3 }
        );
    }

    #[test]
    fn queues_count_apart_and_a_started_vm_ends_the_streak() {
        let (_tmp, s) = streak(1, 600);
        assert!(matches!(
            s.record_at("a.q", 10).unwrap(),
            ShortageVerdict::Requeue { count: 1, .. }
        ));
        assert!(matches!(
            s.record_at("b.q", 10).unwrap(),
            ShortageVerdict::Requeue { count: 1, .. }
        ));
        s.clear("a.q");
        assert!(matches!(
            s.record_at("a.q", 10).unwrap(),
            ShortageVerdict::Requeue { count: 1, .. }
        ));
        assert!(matches!(
            s.record_at("b.q", 10).unwrap(),
            ShortageVerdict::QueueError { count: 2 }
        ));
    }

    #[test]
    fn a_streak_older_than_the_window_starts_again() {
        let (_tmp, s) = streak(2, 60);
        s.record_at("q", 100).unwrap();
        s.record_at("q", 150).unwrap();
        assert_eq!(
            s.record_at("q", 161).unwrap(),
            ShortageVerdict::Requeue { count: 1, limit: 2 }
        );
    }

    #[test]
    fn a_limit_of_zero_makes_every_shortage_the_queues_error() {
        let (_tmp, s) = streak(0, 60);
        assert_eq!(
            s.record_at("q", 1).unwrap(),
            ShortageVerdict::QueueError { count: 1 }
        );
    }

    #[test]
    fn queue_names_never_become_paths() {
        assert_eq!(file_name("all.q"), "all.q");
        assert_eq!(file_name("../etc"), "x-2e2e2f657463");
        assert_eq!(file_name(""), "x-");
        let (tmp, s) = streak(3, 60);
        s.record_at("../../escape", 1).unwrap();
        assert!(!tmp.path().join("escape").exists());
    }

    #[test]
    fn concurrent_shepherds_lose_no_shortage() {
        let (_tmp, s) = streak(1000, 600);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        s.record_at("q", 5).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(
            s.record_at("q", 5).unwrap(),
            ShortageVerdict::Requeue {
                count: 81,
                limit: 1000
            }
        );
    }
}
