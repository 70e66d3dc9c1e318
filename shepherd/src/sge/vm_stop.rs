//! The deadlines that end a killed job whatever its VM does: after the job's SIGKILL it has
//! [`KILL_GRACE`] to end; then its VM is told to stop; a VM that has still not stopped
//! [`STOP_PATIENCE`] later (its VMM wedged, or stalled by the guest) is given up on, and the
//! shepherd writes the job's result and exits, which ends the VMM with it.

use std::time::{Duration, Instant};

/// How long a job may take to end after its SIGKILL before its VM is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long a VM may take to stop once told to before the shepherd stops waiting for it.
pub const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// Where a job's forced end stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStop {
    /// Not killed.
    Running,
    /// SIGKILL sent to the job; its VM is stopped at `stop_vm_at` if it is still running.
    Killed { stop_vm_at: Instant },
    /// The VM was told to stop; at `give_up_at` the shepherd stops waiting for it.
    Stopping { give_up_at: Instant },
}

/// What is due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStopStep {
    /// Tell the VM to stop.
    StopVm,
    /// Stop waiting: report the job as killed and let the shepherd's exit end the VMM.
    GiveUp,
}

impl VmStop {
    /// The job was sent SIGKILL at `now` (repeated kills keep the first deadline).
    pub fn job_killed(&mut self, now: Instant) {
        if *self == VmStop::Running {
            *self = VmStop::Killed {
                stop_vm_at: now + KILL_GRACE,
            };
        }
    }

    /// The next deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            VmStop::Running => None,
            VmStop::Killed { stop_vm_at } => Some(stop_vm_at),
            VmStop::Stopping { give_up_at } => Some(give_up_at),
        }
    }

    /// The step due at `now`, moving on to the next state.
    pub fn due(&mut self, now: Instant) -> Option<VmStopStep> {
        match *self {
            VmStop::Killed { stop_vm_at } if now >= stop_vm_at => {
                *self = VmStop::Stopping {
                    give_up_at: now + STOP_PATIENCE,
                };
                Some(VmStopStep::StopVm)
            }
            VmStop::Stopping { give_up_at } if now >= give_up_at => Some(VmStopStep::GiveUp),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_job_whose_vm_never_stops_is_given_up_on_after_both_deadlines() {
        let t0 = Instant::now();
        let mut stop = VmStop::Running;
        assert_eq!(stop.due(t0 + Duration::from_secs(3600)), None);
        stop.job_killed(t0);
        // A second qdel does not push the deadline back.
        stop.job_killed(t0 + Duration::from_secs(1));
        assert_eq!(stop.deadline(), Some(t0 + KILL_GRACE));
        assert_eq!(stop.due(t0 + KILL_GRACE - Duration::from_millis(1)), None);
        let told = t0 + KILL_GRACE;
        assert_eq!(stop.due(told), Some(VmStopStep::StopVm));
        assert_eq!(stop.deadline(), Some(told + STOP_PATIENCE));
        assert_eq!(stop.due(told + Duration::from_secs(1)), None);
        assert_eq!(stop.due(told + STOP_PATIENCE), Some(VmStopStep::GiveUp));
        // Stays due: whoever polls late still gives up.
        assert_eq!(stop.due(told + 2 * STOP_PATIENCE), Some(VmStopStep::GiveUp));
    }
}
