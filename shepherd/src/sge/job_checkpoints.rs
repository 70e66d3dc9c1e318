//! The checkpoints of one running checkpointing job, as a state machine the signal relay
//! drives: periodic snapshots every `ckpt_interval`, a migration (execd's SIGTTOU: `qmod -s`
//! with `when` x, an execd shutdown with `s`) as a snapshot after which the VM stops, and what
//! the job's run leaves in `checkpointed` for execd (checkpoint(5), the stock shepherd's
//! `wait_my_child`):
//!
//! * a checkpoint in the arena (`1`): execd re-queues the job (failed 24) with
//!   `ckpt_restarted` 2, and its next run is restored from it;
//! * empty: re-queued to start over (a migration without a usable checkpoint: the job is
//!   killed, as the stock shepherd kills transparent and userdefined jobs on migration);
//! * removed: the job ended on its own or was killed for another reason (qdel, a limit).
//!
//! `checkpointed` holds `1` from the first checkpoint on (or from the restore), as the stock
//! shepherd writes it after each successful checkpoint command: a host that dies under the job
//! then leaves it to be restarted from its latest checkpoint.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::checkpoint::taker::AfterCheckpoint;
use crate::vmm_process::message::CheckpointOutcome;

/// How long a migration's snapshot may take before the job is killed instead (as the stock
/// shepherd kills it): a large guest on a slow disk takes a while, but execd's shutdown and the
/// job's slot wait for it.
pub const MIGRATION_PATIENCE: Duration = Duration::from_secs(180);

/// What the relay is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointStep {
    /// Ask the VMM process for a checkpoint.
    Take(AfterCheckpoint),
    /// A checkpoint is in the arena now: write `checkpointed` with `1`.
    MarkArena,
    /// The migration's snapshot failed or is late: mark the job migrated (with its earlier
    /// checkpoint, if it has one) and kill it.
    KillForMigration { in_arena: bool },
}

/// What `checkpointed` is left as when the job's run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaMark {
    /// Re-queue the job: from its checkpoint (`1`) or from the start (empty).
    Migrated { in_arena: bool },
    /// Remove it: the job is done with.
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Migration {
    None,
    /// Snapshot asked for; the job is killed if no outcome comes by `until`.
    Asked {
        until: Instant,
    },
    /// Snapshot taken: the VMM process stops the VM.
    Taken,
    /// The job was killed for the migration.
    Killed,
}

/// One job's checkpoints.
#[derive(Debug)]
pub struct JobCheckpoints {
    interval: Option<Duration>,
    next: Option<Instant>,
    in_arena: bool,
    /// Requests sent whose outcomes have not come yet, in order (the VMM process serves them
    /// one by one).
    outstanding: VecDeque<AfterCheckpoint>,
    migration: Migration,
    /// The latest checkpoint taken, for the trace.
    taken: u32,
}

impl JobCheckpoints {
    /// `restored`: the run started from a checkpoint, which stays in the arena.
    pub fn new(
        interval: Option<Duration>,
        restored: bool,
        now: Instant,
    ) -> (Self, Vec<CheckpointStep>) {
        let cp = JobCheckpoints {
            interval,
            next: interval.map(|i| now + i),
            in_arena: restored,
            outstanding: VecDeque::new(),
            migration: Migration::None,
            taken: 0,
        };
        let steps = if restored {
            vec![CheckpointStep::MarkArena]
        } else {
            Vec::new()
        };
        (cp, steps)
    }

    /// When [`Self::on_time`] has something to do next.
    pub fn deadline(&self) -> Option<Instant> {
        let migration = match self.migration {
            Migration::Asked { until } => Some(until),
            _ => None,
        };
        let periodic = if self.migration == Migration::None {
            self.next
        } else {
            None
        };
        [migration, periodic].into_iter().flatten().min()
    }

    /// Checkpoints taken in this run.
    pub fn taken(&self) -> u32 {
        self.taken
    }

    /// execd asked for a migration.
    pub fn on_migrate(&mut self, now: Instant) -> Vec<CheckpointStep> {
        if self.migration != Migration::None {
            return Vec::new();
        }
        self.migration = Migration::Asked {
            until: now + MIGRATION_PATIENCE,
        };
        self.outstanding.push_back(AfterCheckpoint::StayPaused);
        vec![CheckpointStep::Take(AfterCheckpoint::StayPaused)]
    }

    /// Periodic checkpoints and the migration's deadline.
    pub fn on_time(&mut self, now: Instant) -> Vec<CheckpointStep> {
        match self.migration {
            Migration::Asked { until } if now >= until => {
                self.migration = Migration::Killed;
                return vec![CheckpointStep::KillForMigration {
                    in_arena: self.in_arena,
                }];
            }
            Migration::None => {}
            _ => return Vec::new(),
        }
        match (self.next, self.interval) {
            (Some(at), Some(interval)) if now >= at => {
                self.next = Some(now + interval);
                // One at a time: a periodic checkpoint still being taken is not asked again.
                if self.outstanding.is_empty() {
                    self.outstanding.push_back(AfterCheckpoint::Resume);
                    vec![CheckpointStep::Take(AfterCheckpoint::Resume)]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// The VMM process reported on the oldest outstanding request.
    pub fn on_outcome(&mut self, outcome: &CheckpointOutcome) -> Vec<CheckpointStep> {
        let Some(asked) = self.outstanding.pop_front() else {
            return Vec::new();
        };
        let mut steps = Vec::new();
        if let CheckpointOutcome::Taken(_) = outcome {
            self.taken += 1;
            if !self.in_arena {
                self.in_arena = true;
                steps.push(CheckpointStep::MarkArena);
            }
        }
        if asked == AfterCheckpoint::StayPaused {
            if let Migration::Asked { .. } = self.migration {
                match outcome {
                    CheckpointOutcome::Taken(_) => self.migration = Migration::Taken,
                    CheckpointOutcome::NotNow(_) | CheckpointOutcome::Failed(_) => {
                        self.migration = Migration::Killed;
                        steps.push(CheckpointStep::KillForMigration {
                            in_arena: self.in_arena,
                        });
                    }
                }
            }
        }
        steps
    }

    /// What `checkpointed` becomes when the run ends. `migrated`: the job's VM was stopped
    /// after its migration snapshot (the job's end says so).
    pub fn end(&self, migrated: bool) -> ArenaMark {
        match self.migration {
            _ if migrated => ArenaMark::Migrated { in_arena: true },
            Migration::Killed => ArenaMark::Migrated {
                in_arena: self.in_arena,
            },
            // Asked, but the job ended on its own first; or no migration at all.
            _ => ArenaMark::Remove,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::taker::CheckpointReport;

    fn taken(generation: u64) -> CheckpointOutcome {
        CheckpointOutcome::Taken(CheckpointReport {
            generation,
            snapshot_bytes: 1,
            memory_bytes_stored: 1,
            paused_ms: 1.0,
        })
    }

    #[test]
    fn periodic_checkpoints_put_one_in_the_arena_and_a_plain_end_removes_it() {
        let t0 = Instant::now();
        let (mut cp, steps) = JobCheckpoints::new(Some(Duration::from_secs(60)), false, t0);
        assert!(steps.is_empty());
        assert_eq!(cp.deadline(), Some(t0 + Duration::from_secs(60)));
        assert!(cp.on_time(t0 + Duration::from_secs(59)).is_empty());
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            cp.on_time(t1),
            vec![CheckpointStep::Take(AfterCheckpoint::Resume)]
        );
        // the next one is due while the first is still being taken: not asked twice
        assert!(cp.on_time(t1 + Duration::from_secs(60)).is_empty());
        assert_eq!(cp.on_outcome(&taken(1)), vec![CheckpointStep::MarkArena]);
        assert_eq!(
            cp.on_time(t1 + Duration::from_secs(120)),
            vec![CheckpointStep::Take(AfterCheckpoint::Resume)]
        );
        assert!(cp.on_outcome(&taken(2)).is_empty(), "already in the arena");
        assert_eq!(cp.taken(), 2);
        assert_eq!(cp.end(false), ArenaMark::Remove);
    }

    #[test]
    fn a_migration_snapshot_stops_the_job_with_its_checkpoint_in_the_arena() {
        let t0 = Instant::now();
        let (mut cp, _) = JobCheckpoints::new(None, false, t0);
        assert_eq!(cp.deadline(), None);
        assert_eq!(
            cp.on_migrate(t0),
            vec![CheckpointStep::Take(AfterCheckpoint::StayPaused)]
        );
        assert!(
            cp.on_migrate(t0).is_empty(),
            "a second TTOU asks nothing more"
        );
        assert_eq!(cp.on_outcome(&taken(1)), vec![CheckpointStep::MarkArena]);
        assert_eq!(cp.end(true), ArenaMark::Migrated { in_arena: true });
    }

    #[test]
    fn a_failed_migration_kills_the_job_and_keeps_an_earlier_checkpoint() {
        let t0 = Instant::now();
        let (mut cp, steps) = JobCheckpoints::new(Some(Duration::from_secs(10)), true, t0);
        assert_eq!(
            steps,
            vec![CheckpointStep::MarkArena],
            "restored: in the arena"
        );
        cp.on_migrate(t0);
        assert!(
            cp.on_time(t0 + Duration::from_secs(20)).is_empty(),
            "no periodic checkpoint during a migration"
        );
        assert_eq!(
            cp.on_outcome(&CheckpointOutcome::Failed("disk full".into())),
            vec![CheckpointStep::KillForMigration { in_arena: true }]
        );
        assert_eq!(cp.end(false), ArenaMark::Migrated { in_arena: true });

        // no checkpoint before: re-queued to start over
        let (mut cp, _) = JobCheckpoints::new(None, false, t0);
        cp.on_migrate(t0);
        assert_eq!(
            cp.on_outcome(&CheckpointOutcome::NotNow("booting".into())),
            vec![CheckpointStep::KillForMigration { in_arena: false }]
        );
        assert_eq!(cp.end(false), ArenaMark::Migrated { in_arena: false });
    }

    #[test]
    fn a_migration_snapshot_that_never_answers_ends_in_a_kill_at_its_deadline() {
        let t0 = Instant::now();
        let (mut cp, _) = JobCheckpoints::new(None, false, t0);
        cp.on_migrate(t0);
        assert_eq!(cp.deadline(), Some(t0 + MIGRATION_PATIENCE));
        assert!(cp.on_time(t0 + MIGRATION_PATIENCE / 2).is_empty());
        assert_eq!(
            cp.on_time(t0 + MIGRATION_PATIENCE),
            vec![CheckpointStep::KillForMigration { in_arena: false }]
        );
        assert_eq!(cp.end(false), ArenaMark::Migrated { in_arena: false });
        // a late snapshot is still a checkpoint (the VM stopped after it)
        assert!(cp
            .on_outcome(&taken(1))
            .contains(&CheckpointStep::MarkArena));
        assert_eq!(cp.end(false), ArenaMark::Migrated { in_arena: true });
    }

    #[test]
    fn outcomes_are_matched_to_requests_in_order() {
        let t0 = Instant::now();
        let (mut cp, _) = JobCheckpoints::new(Some(Duration::from_secs(1)), false, t0);
        cp.on_time(t0 + Duration::from_secs(1));
        cp.on_migrate(t0 + Duration::from_secs(1));
        // the periodic one's failure is not the migration's
        assert!(cp
            .on_outcome(&CheckpointOutcome::Failed("periodic".into()))
            .is_empty());
        assert_eq!(cp.on_outcome(&taken(1)), vec![CheckpointStep::MarkArena]);
        assert_eq!(cp.end(true), ArenaMark::Migrated { in_arena: true });
    }

    #[test]
    fn a_job_that_ends_before_its_migration_snapshot_is_done_with() {
        let t0 = Instant::now();
        let (mut cp, _) = JobCheckpoints::new(None, false, t0);
        cp.on_migrate(t0);
        assert_eq!(cp.end(false), ArenaMark::Remove);
    }
}
