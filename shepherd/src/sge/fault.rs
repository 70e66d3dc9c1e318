//! Whose fault a failure is, and so which shepherd state execd gets: the one place that decides
//! it for failures before the job runs. Execd charges some states to the host or the queue
//! (error state, every job re-queued elsewhere) and others to the job (`Eqw`); a cause the
//! job's owner controls must never take a queue or a host out of service.
//!
//! * the job's owner (working directory, paths, script, requested image, limits, environment)
//!   → a job error, with the state the stock shepherd writes for that cause;
//! * the administrator's configuration of one queue, or what it boots (guest kernel, initramfs,
//!   the queue's OS image, a backend) → the queue's error, the reason in `error`;
//! * what every queue of this host shares (the settings file) → the host's error;
//! * a shortage that may pass (the VM cannot be started now) → re-queued without error
//!   (`noresources`), a bounded number of times in a row ([`super::shortage_streak`]), then
//!   the queue's error.
//!
//! The prolog, pe_start, pe_stop and epilog keep the stock shepherd's own states
//! ([`super::procedure::ProcedureKind::states`]); their working directory is the job owner's.

use super::state::ShepherdState;

/// Who owns the cause of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The job's owner: the job goes into error (`Eqw`).
    Job(JobCause),
    /// The administrator's configuration or this host: the job's queue goes into error and the
    /// job is re-queued.
    Queue,
    /// What every queue of this host depends on: every queue of the host goes into error and
    /// the job is re-queued.
    Host,
    /// A shortage that may pass: the job is re-queued, no queue goes into error.
    Shortage,
}

/// What of the job owner's failed, for the state the stock shepherd writes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobCause {
    /// The working directory cannot be entered as the job owner (`SSTATE_NO_CWD`).
    Cwd,
    /// An output, error or input file cannot be opened as the job owner (`SSTATE_OPEN_OUTPUT`).
    File,
    /// Something else the job asked for and cannot have: an OS image it may not use, arguments
    /// or an environment too large for the guest. The stock shepherd has no state of its own
    /// for these; 30 is one execd always charges to the job.
    Request,
}

impl Fault {
    /// The state to write as the first line of `exit_status`.
    pub fn state(self) -> ShepherdState {
        match self {
            Fault::Job(JobCause::Cwd) => ShepherdState::NoCwd,
            Fault::Job(JobCause::File) => ShepherdState::OpenOutput,
            Fault::Job(JobCause::Request) => ShepherdState::AppError,
            Fault::Queue => ShepherdState::BeforeJob,
            Fault::Host => ShepherdState::BeforeProlog,
            Fault::Shortage => ShepherdState::Again,
        }
    }

    /// Whether the `noresources` file must be written (execd re-queues without error).
    pub fn no_resources(self) -> bool {
        self == Fault::Shortage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// execd's `general_failure` for the states these faults write (`execution_states.c` and
    /// `reaper_execd.c`, see sge-shepherd-contract.md 5.1): 26, 28 and 30 are always the job's;
    /// 11 is the queue's when the shepherd names no job cause; 7 the host's; 25 a re-queue.
    #[test]
    fn each_owner_gets_a_state_execd_charges_to_it() {
        for cause in [JobCause::Cwd, JobCause::File, JobCause::Request] {
            let state = Fault::Job(cause).state().code();
            assert!([26, 28, 30].contains(&state), "{cause:?}: {state}");
            assert!(!Fault::Job(cause).no_resources());
        }
        assert_eq!(Fault::Job(JobCause::Cwd).state().code(), 28);
        assert_eq!(Fault::Job(JobCause::File).state().code(), 26);
        assert_eq!(Fault::Queue.state().code(), 11);
        assert!(!Fault::Queue.no_resources());
        assert_eq!(Fault::Shortage.state().code(), 25);
        assert!(Fault::Shortage.no_resources());
        assert_eq!(Fault::Host.state().code(), 7);
        assert!(!Fault::Host.no_resources());
        // only the host's fault writes 7, which puts every queue of the host in error
        for f in [
            Fault::Job(JobCause::Cwd),
            Fault::Job(JobCause::File),
            Fault::Job(JobCause::Request),
            Fault::Queue,
            Fault::Shortage,
        ] {
            assert_ne!(f.state(), ShepherdState::BeforeProlog);
        }
    }
}
