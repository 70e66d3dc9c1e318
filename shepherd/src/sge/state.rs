//! Shepherd states: the numbers written as the first line of `exit_status`, which execd turns
//! into the job's `failed` value and the queue/host/job consequences (`execution_states.h`).

/// A shepherd state (failure code) as execd understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ShepherdState {
    /// Everything went through (the job's own exit code goes into `usage`).
    NoFailure = 0,
    /// Before the prolog: config/setup failures. Puts the whole host in error.
    BeforeProlog = 7,
    PrologFailed = 8,
    BeforePeStart = 9,
    PeStartFailed = 10,
    /// Before the job was started (user, limits): queue error, or job error when the job caused it.
    BeforeJob = 11,
    BeforePeStop = 12,
    PeStopFailed = 13,
    BeforeEpilog = 14,
    EpilogFailed = 15,
    /// Re-queue the job (exit 99, or no VM resources now); no queue error.
    Again = 25,
    /// The job's stdout/stderr/stdin could not be opened: job error.
    OpenOutput = 26,
    /// No shell / exec failed.
    NoShell = 27,
    /// The job's working directory is missing: job error.
    NoCwd = 28,
    /// Exit 100: the job asked to be put in error state.
    AppError = 30,
    /// Adding the job's group id failed.
    AddGrpId = 38,
    /// A failure after the job ran; not a reason to re-run it.
    AfterJob = 100,
}

impl ShepherdState {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Whom execd may charge with this state (its `general_failure`, `reaper`): where execd
    /// decides from the job (11, 27), the worse case counts, as the shepherd cannot know.
    pub fn charged_to(self) -> Charge {
        use ShepherdState::*;
        match self {
            NoFailure | Again | AfterJob | BeforePeStop | BeforeEpilog => Charge::Nobody,
            OpenOutput | NoCwd | AppError | AddGrpId => Charge::Job,
            PrologFailed | BeforePeStart | PeStartFailed | BeforeJob | PeStopFailed
            | EpilogFailed | NoShell => Charge::Queue,
            BeforeProlog => Charge::Host,
        }
    }
}

/// Who pays for a failure state (execd's `general_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Nothing is halted (the job is finished or re-queued).
    Nobody,
    /// The job goes to error (Eqw); the queues are left alone.
    Job,
    /// The queue instance goes to error.
    Queue,
    /// Every queue on the host goes to error.
    Host,
}

/// Which failure a script's (prolog, pe_start, pe_stop, epilog) outcome is, following the
/// stock shepherd: could not be started → `before`; exit 99 → [`ShepherdState::Again`],
/// exit 100 → [`ShepherdState::AppError`], other non-zero → `failed`; exit 0 → none.
pub fn script_result_state(
    exit_code: Option<i32>,
    before: ShepherdState,
    failed: ShepherdState,
) -> Option<ShepherdState> {
    match exit_code {
        None => Some(before),
        Some(0) => None,
        Some(99) => Some(ShepherdState::Again),
        Some(100) => Some(ShepherdState::AppError),
        Some(_) => Some(failed),
    }
}

/// The state for the job's own exit code: 99 → re-queue, 100 → error, unless forbidden.
pub fn job_exit_state(
    exit_code: i32,
    forbid_reschedule: bool,
    forbid_apperror: bool,
) -> ShepherdState {
    match exit_code {
        99 if !forbid_reschedule => ShepherdState::Again,
        100 if !forbid_apperror => ShepherdState::AppError,
        _ => ShepherdState::NoFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_outcomes() {
        use ShepherdState::*;
        assert_eq!(
            script_result_state(None, BeforeProlog, PrologFailed),
            Some(BeforeProlog)
        );
        assert_eq!(
            script_result_state(Some(0), BeforeProlog, PrologFailed),
            None
        );
        assert_eq!(
            script_result_state(Some(99), BeforeEpilog, EpilogFailed),
            Some(Again)
        );
        assert_eq!(
            script_result_state(Some(100), BeforeEpilog, EpilogFailed),
            Some(AppError)
        );
        assert_eq!(
            script_result_state(Some(1), BeforePeStop, PeStopFailed),
            Some(PeStopFailed)
        );
    }

    #[test]
    fn job_exit_codes() {
        assert_eq!(job_exit_state(99, false, false), ShepherdState::Again);
        assert_eq!(job_exit_state(100, false, false), ShepherdState::AppError);
        assert_eq!(job_exit_state(99, true, false), ShepherdState::NoFailure);
        assert_eq!(job_exit_state(100, false, true), ShepherdState::NoFailure);
        assert_eq!(job_exit_state(1, false, false), ShepherdState::NoFailure);
        assert_eq!(ShepherdState::Again.code(), 25);
        assert_eq!(ShepherdState::AfterJob.code(), 100);
    }
}
