//! The root parent's side of the VMM process: an explicit state machine with a deadline on
//! every phase. Whatever the child does — report, hang, die of SIGKILL, SIGSEGV or SIGSYS —
//! [`VmmProcess::wait`] returns the job's result or the job's error with the reason, and the
//! child is reaped (or, if even SIGKILL does not end it in time, given up on: it dies with the
//! shepherd through its parent-death signal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::message::{Channel, CheckpointOutcome, FromVmm, Received, StartFailure, ToVmm};
use crate::agent_session::JobError;
use crate::checkpoint::taker::AfterCheckpoint;
use crate::launch::JobOutcome;

/// How long the backend may take to start the VM (QEMU and its vsock daemon, or the embedded
/// VMM loading the kernel).
pub const START_PATIENCE: Duration = Duration::from_secs(60);
/// How long a started VM may take until the job runs: the child's own deadlines (the agent's
/// connection, its Hello, the spawn) end it sooner; this is the backstop if the child wedges.
pub const BOOT_PATIENCE: Duration = Duration::from_secs(200);
/// How long the child may take to report after being told to stop the VM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the child may take to exit after its report (or after SIGKILL).
pub const REAP_PATIENCE: Duration = Duration::from_secs(5);
/// How often the parent looks at the child when no message comes.
const TICK: Duration = Duration::from_millis(50);

/// Where the child stands, as the parent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forked; the backend is starting the VM.
    Starting { until: Instant },
    /// The VM runs; the job has not started yet.
    Booting { until: Instant },
    /// The job runs. Bounded by whoever stops it: execd's qdel and h_rt reach
    /// [`VmmControl::stop_vm`], which moves to [`Phase::Stopping`].
    Running,
    /// The child was told to stop the VM and must report by `until`.
    Stopping { until: Instant },
    /// The child reported, closed the channel or was killed; it must be gone by `until`.
    Reaping { until: Instant, killed: bool },
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match *self {
            Phase::Starting { until }
            | Phase::Booting { until }
            | Phase::Stopping { until }
            | Phase::Reaping { until, .. } => Some(until),
            Phase::Running => None,
        }
    }
}

/// The parent's handle for signals and stop requests, shared with every job controller.
pub struct VmmControl {
    pid: Pid,
    channel: Mutex<Channel>,
    stop_requested: AtomicBool,
    /// What came of checkpoint requests, in order, until taken by
    /// [`VmmControl::take_checkpoint_outcomes`].
    checkpoint_outcomes: Mutex<Vec<CheckpointOutcome>>,
}

impl VmmControl {
    /// Delivers `signo` to the job in the guest (queued by the child until the job runs).
    pub fn signal(&self, signo: i32) {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        // A child that is gone cannot take it; its end is reported by `wait`.
        let _ = channel.send(&ToVmm::Signal(signo));
    }

    /// Asks the child to stop the VM; [`VmmProcess::wait`] kills it if it has not reported
    /// within [`STOP_GRACE`].
    pub fn stop_vm(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let _ = channel.send(&ToVmm::StopVm);
    }

    /// Asks the child to pause (`true`) or resume the VM's vCPUs (see [`ToVmm::Suspend`]).
    pub fn suspend_vm(&self, suspend: bool) {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let _ = channel.send(&ToVmm::Suspend(suspend));
    }

    /// Asks the child to take a checkpoint (see [`ToVmm::Checkpoint`]).
    pub fn checkpoint(&self, then: AfterCheckpoint) {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let _ = channel.send(&ToVmm::Checkpoint(then));
    }

    /// The outcomes of checkpoint requests reported since the last call, oldest first.
    pub fn take_checkpoint_outcomes(&self) -> Vec<CheckpointOutcome> {
        std::mem::take(
            &mut *self
                .checkpoint_outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// A control whose requests arrive on the returned channel end instead of at a child (for
    /// tests of the code that drives a [`crate::launch::JobController`]).
    #[cfg(test)]
    pub(crate) fn detached() -> (Arc<VmmControl>, Channel) {
        let (ours, theirs) = Channel::pair().expect("socketpair");
        let control = Arc::new(VmmControl {
            pid: Pid::from_raw(0),
            channel: Mutex::new(ours),
            stop_requested: AtomicBool::new(false),
            checkpoint_outcomes: Mutex::default(),
        });
        (control, theirs)
    }
}

/// What the start phase ended in.
pub enum Start {
    /// The VM runs.
    Started {
        vm_created_ms: Option<f64>,
        first_instruction_ms: Option<f64>,
        /// The checkpoint the VM was restored from, when it was not booted.
        restored: Option<u64>,
    },
    /// The backend could not start it (the child exits).
    Failed(StartFailure),
    /// The child ended before it said either; [`VmmProcess::wait`] tells why.
    Ended,
}

/// The VMM process, from the parent's side.
pub struct VmmProcess {
    pid: Pid,
    channel: Channel,
    control: Arc<VmmControl>,
    phase: Phase,
    /// What the child reported as the job's end.
    report: Option<Result<JobOutcome, JobError>>,
    /// Why the parent killed the child, if it did.
    kill_reason: Option<String>,
    /// The child's wait status, once reaped.
    reaped: Option<WaitStatus>,
}

impl VmmProcess {
    /// `channel` and `control_end` are two handles on the parent's end.
    pub(super) fn new(pid: Pid, channel: Channel, control_end: Channel) -> VmmProcess {
        let control = Arc::new(VmmControl {
            pid,
            channel: Mutex::new(control_end),
            stop_requested: AtomicBool::new(false),
            checkpoint_outcomes: Mutex::default(),
        });
        VmmProcess {
            pid,
            channel,
            control,
            phase: Phase::Starting {
                until: Instant::now() + START_PATIENCE,
            },
            report: None,
            kill_reason: None,
            reaped: None,
        }
    }

    pub fn control(&self) -> Arc<VmmControl> {
        self.control.clone()
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Waits for the VM's start (or its failure, or the child's end), within the phase's
    /// deadline.
    pub fn await_start(&mut self) -> Start {
        loop {
            let message = match self.reaped {
                // Its last messages may still be queued behind its exit.
                Some(_) => match self.queued() {
                    Some(m) => m,
                    None => return Start::Ended,
                },
                None => match self.step() {
                    Some(m) => m,
                    None => continue,
                },
            };
            if let Some(start) = self.handle(message) {
                if let Start::Failed(_) = start {
                    // The child exits after saying so; reap it within the deadline.
                    while self.reaped.is_none() && !self.reap_due() {
                        let _ = self.step();
                    }
                }
                return start;
            }
            if !matches!(self.phase, Phase::Starting { .. }) {
                return Start::Ended;
            }
        }
    }

    /// Waits for the job's end and the child's, and returns the job's result: the child's
    /// report, or the job's error when it died or hung without one.
    pub fn wait(mut self) -> Result<JobOutcome, JobError> {
        loop {
            if let Some(status) = self.reaped {
                while let Some(m) = self.queued() {
                    self.handle(m);
                }
                return self.result(status);
            }
            if self.reap_due() {
                let why = format!(
                    "the job's VMM process (pid {}) did not end within {REAP_PATIENCE:?} of \
                     SIGKILL; it ends with the shepherd",
                    self.pid
                );
                return self.report.take().unwrap_or(Err(JobError::Vm(why)));
            }
            if let Some(m) = self.step() {
                self.handle(m);
            }
        }
    }

    /// Moves on by one message from the child; the start's outcome when it was one.
    fn handle(&mut self, message: FromVmm) -> Option<Start> {
        match message {
            FromVmm::VmStarted {
                vm_created_ms,
                first_instruction_ms,
                restored,
            } if matches!(self.phase, Phase::Starting { .. }) => {
                self.phase = Phase::Booting {
                    until: Instant::now() + BOOT_PATIENCE,
                };
                Some(Start::Started {
                    vm_created_ms,
                    first_instruction_ms,
                    restored,
                })
            }
            FromVmm::StartFailed(f) if matches!(self.phase, Phase::Starting { .. }) => {
                self.begin_reaping(false);
                Some(Start::Failed(f))
            }
            FromVmm::JobStarted if matches!(self.phase, Phase::Booting { .. }) => {
                self.phase = Phase::Running;
                None
            }
            FromVmm::Exited {
                wait_status,
                rusage,
                memory,
                job_started,
                job_ended,
                timings,
                output_failures,
            } if self.report.is_none() => {
                self.report = Some(Ok(JobOutcome {
                    wait_status,
                    rusage,
                    memory,
                    job_started,
                    job_ended,
                    timings,
                    output_failures,
                    network_lost: None,
                }));
                self.begin_reaping(false);
                None
            }
            FromVmm::Failed(e) if self.report.is_none() => {
                self.report = Some(Err(e));
                self.begin_reaping(false);
                None
            }
            // Asked for at any time (a periodic checkpoint may come before the job runs, and
            // is refused then); it never moves the phase.
            FromVmm::Checkpointed(result)
                if matches!(
                    self.phase,
                    Phase::Booting { .. } | Phase::Running | Phase::Stopping { .. }
                ) =>
            {
                match &result {
                    CheckpointOutcome::Taken(r) => tracing::info!(
                        generation = r.generation,
                        snapshot_bytes = r.snapshot_bytes,
                        paused_ms = r.paused_ms,
                        "checkpoint taken"
                    ),
                    CheckpointOutcome::NotNow(e) => tracing::info!("no checkpoint now: {e}"),
                    CheckpointOutcome::Failed(e) => tracing::warn!("checkpoint failed: {e}"),
                }
                self.control
                    .checkpoint_outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(result);
                None
            }
            other => {
                self.out_of_place(other);
                None
            }
        }
    }

    /// A message already queued, without waiting.
    fn queued(&mut self) -> Option<FromVmm> {
        match self.channel.receive::<FromVmm>(Some(Duration::ZERO)) {
            Ok(Received::Message(m)) => Some(m),
            _ => None,
        }
    }

    /// A message the phase does not allow: the child is not trusted further.
    fn out_of_place(&mut self, message: FromVmm) {
        let what = match message {
            FromVmm::VmStarted { .. } => "VmStarted",
            FromVmm::StartFailed(_) => "StartFailed",
            FromVmm::JobStarted => "JobStarted",
            FromVmm::Exited { .. } => "Exited",
            FromVmm::Failed(_) => "Failed",
            FromVmm::Checkpointed(_) => "Checkpointed",
        };
        self.kill(format!(
            "the job's VMM process sent {what} out of place ({:?})",
            self.phase
        ));
    }

    /// One round: a stop request, a deadline, one message (returned), or the child's end.
    fn step(&mut self) -> Option<FromVmm> {
        let now = Instant::now();
        if self.control.stop_requested.load(Ordering::SeqCst)
            && matches!(
                self.phase,
                Phase::Starting { .. } | Phase::Booting { .. } | Phase::Running
            )
        {
            self.phase = Phase::Stopping {
                until: now + STOP_GRACE,
            };
        }
        if self.phase.deadline().is_some_and(|until| now >= until) {
            match self.phase {
                Phase::Starting { .. } => self.kill(format!(
                    "the job's VM did not start within {START_PATIENCE:?}"
                )),
                Phase::Booting { .. } => self.kill(format!(
                    "the job did not start in its VM within {BOOT_PATIENCE:?}"
                )),
                Phase::Stopping { .. } => self.kill(format!(
                    "the job's VMM process did not stop its VM within {STOP_GRACE:?}"
                )),
                Phase::Reaping { killed: false, .. } => {
                    self.kill("the job's VMM process did not exit after its report".into())
                }
                Phase::Reaping { killed: true, .. } | Phase::Running => {}
            }
        }
        let wait = self
            .phase
            .deadline()
            .map(|d| d.saturating_duration_since(now).min(TICK))
            .unwrap_or(TICK);
        match self.channel.receive::<FromVmm>(Some(wait)) {
            Ok(Received::Message(m)) => return Some(m),
            Ok(Received::Nothing) => {}
            Ok(Received::Closed) => {
                // The child is ending; it must be gone soon.
                if !matches!(self.phase, Phase::Reaping { .. }) {
                    self.begin_reaping(false);
                }
                // Closed stays readable: wait for the exit without spinning.
                std::thread::sleep(wait.min(Duration::from_millis(5)));
            }
            Err(e) => self.kill(format!("the job's VMM process broke its channel: {e}")),
        }
        if self.reaped.is_none() {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.reaped = Some(status);
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    // Not our child any more (cannot happen while we hold it): stop waiting.
                    self.reaped = Some(WaitStatus::Exited(self.pid, -1));
                }
            }
        }
        None
    }

    fn begin_reaping(&mut self, killed: bool) {
        self.phase = Phase::Reaping {
            until: Instant::now() + REAP_PATIENCE,
            killed,
        };
    }

    /// Whether even the kill's deadline has passed.
    fn reap_due(&self) -> bool {
        matches!(self.phase, Phase::Reaping { until, killed: true } if Instant::now() >= until)
    }

    /// SIGKILL to the child (never reaped yet, so the pid is still ours), with the reason.
    fn kill(&mut self, reason: String) {
        if self.reaped.is_none() {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        }
        self.kill_reason.get_or_insert(reason);
        self.begin_reaping(true);
    }

    /// The job's result once the child is reaped.
    fn result(mut self, status: WaitStatus) -> Result<JobOutcome, JobError> {
        if let Some(report) = self.report.take() {
            return report;
        }
        let pid = self.pid;
        let how = match status {
            WaitStatus::Signaled(_, sig, _) => format!("was killed by signal {}", describe(sig)),
            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
            other => format!("ended ({other:?})"),
        };
        let why = match self.kill_reason.take() {
            Some(reason) => format!("{reason}; killed"),
            None => {
                format!("the job's VMM process (pid {pid}) {how} before it reported the job's end")
            }
        };
        Err(JobError::Vm(why))
    }
}

/// A signal by number and name, with what it usually means for the VMM.
fn describe(sig: Signal) -> String {
    let n = sig as i32;
    let meaning = match sig {
        Signal::SIGSYS => ": a seccomp filter refused a system call",
        Signal::SIGSEGV | Signal::SIGBUS => ": a memory fault",
        Signal::SIGKILL => ": killed by its owner, an OOM kill or a hard limit",
        _ => "",
    };
    format!("{n} ({}{meaning})", sig.as_str())
}

impl std::fmt::Debug for VmmProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmProcess")
            .field("pid", &self.pid)
            .field("phase", &self.phase)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timings::Timings;
    use crate::vmm_process::fork;
    use guest_agent::protocol::Rusage;
    use std::time::SystemTime;

    fn started() -> FromVmm {
        FromVmm::VmStarted {
            vm_created_ms: None,
            first_instruction_ms: None,
            restored: None,
        }
    }

    /// Forks a VMM process running `body` and waits for its start.
    fn spawn(body: impl FnOnce(&Channel)) -> (VmmProcess, bool) {
        let mut process = fork(None, &[], body).unwrap();
        let ok = matches!(process.await_start(), Start::Started { .. });
        (process, ok)
    }

    #[test]
    fn a_report_is_the_result_and_the_child_is_reaped() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            ch.send(&FromVmm::JobStarted).unwrap();
            ch.send(&FromVmm::Exited {
                wait_status: 3 << 8,
                rusage: Rusage::default(),
                memory: Default::default(),
                job_started: SystemTime::now(),
                job_ended: SystemTime::now(),
                timings: Timings::default(),
                output_failures: Vec::new(),
            })
            .unwrap();
        });
        assert!(ok);
        let pid = process.pid();
        assert_eq!(process.wait().unwrap().wait_status, 3 << 8);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_child_killed_by_a_seccomp_filter_is_the_jobs_error_with_the_reason() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            // SAFETY: raise has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGSYS) };
        });
        assert!(ok);
        let err = process.wait().unwrap_err().to_string();
        assert!(err.contains("killed by signal 31 (SIGSYS"), "{err}");
    }

    #[test]
    fn a_child_dying_before_the_vm_started_is_reported_by_wait() {
        let (process, ok) = spawn(|_| {
            // SAFETY: raise has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGSEGV) };
        });
        assert!(!ok);
        let err = process.wait().unwrap_err().to_string();
        assert!(err.contains("killed by signal 11 (SIGSEGV"), "{err}");
    }

    #[test]
    fn a_start_failure_is_reported_as_such() {
        let mut process = fork(None, &[], |ch| {
            ch.send(&FromVmm::StartFailed(StartFailure::Start("no".into())))
                .unwrap();
        })
        .unwrap();
        assert!(matches!(
            process.await_start(),
            Start::Failed(StartFailure::Start(m)) if m == "no"
        ));
    }

    #[test]
    fn a_panicking_child_reports_its_panic() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            panic!("boom");
        });
        assert!(ok);
        let err = process.wait().unwrap_err().to_string();
        assert!(err.contains("panicked: boom"), "{err}");
    }

    /// A child that breaks the order (the job's end before the VM's start, twice an exit) is
    /// not trusted further: killed, with the reason.
    #[test]
    fn a_message_out_of_place_kills_the_child() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            ch.send(&started()).unwrap();
            std::thread::sleep(Duration::from_secs(60));
        });
        assert!(ok);
        let t0 = Instant::now();
        let err = process.wait().unwrap_err().to_string();
        assert!(err.contains("VmStarted out of place"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// Issue 14: checkpoint outcomes may come while the VM boots (a periodic checkpoint asked
    /// for before the job runs is refused) and while the job runs; they never move the phase
    /// nor count as the child breaking the order.
    #[test]
    fn checkpoint_outcomes_come_at_any_time_before_the_end() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            ch.send(&FromVmm::Checkpointed(CheckpointOutcome::NotNow(
                "the job is not running in its VM yet".into(),
            )))
            .unwrap();
            ch.send(&FromVmm::JobStarted).unwrap();
            ch.send(&FromVmm::Checkpointed(CheckpointOutcome::Failed(
                "disk full".into(),
            )))
            .unwrap();
            ch.send(&FromVmm::Failed(JobError::Migrated {
                dir: "/ckpt".into(),
                generation: 2,
            }))
            .unwrap();
        });
        assert!(ok);
        let control = process.control();
        match process.wait() {
            Err(JobError::Migrated { dir, generation }) => {
                assert_eq!((dir.as_str(), generation), ("/ckpt", 2))
            }
            other => panic!("expected the migration, got {other:?}"),
        }
        // the shepherd's relay reads them, in order, once each
        let outcomes = control.take_checkpoint_outcomes();
        assert!(
            matches!(
                outcomes.as_slice(),
                [CheckpointOutcome::NotNow(_), CheckpointOutcome::Failed(f)] if f == "disk full"
            ),
            "{outcomes:?}"
        );
        assert!(control.take_checkpoint_outcomes().is_empty());
    }

    /// A child that ignores the stop request is killed after [`STOP_GRACE`].
    #[test]
    fn a_child_that_does_not_stop_is_killed_after_the_grace() {
        let (process, ok) = spawn(|ch| {
            ch.send(&started()).unwrap();
            std::thread::sleep(Duration::from_secs(60));
        });
        assert!(ok);
        process.control().stop_vm();
        let t0 = Instant::now();
        let err = process.wait().unwrap_err().to_string();
        let took = t0.elapsed();
        assert!(err.contains("did not stop its VM"), "{err}");
        assert!(
            took >= STOP_GRACE && took < STOP_GRACE + REAP_PATIENCE,
            "{took:?}"
        );
    }

    #[test]
    fn signals_and_stop_requests_reach_the_child_in_order() {
        let (a, b) = Channel::pair().unwrap();
        let (process, ok) = spawn(move |ch| {
            ch.send(&started()).unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                if let Ok(Received::Message(m)) = ch.receive::<ToVmm>(None) {
                    got.push(m);
                }
            }
            a.send(&got).unwrap();
            ch.send(&FromVmm::Failed(JobError::AgentLost("stopped".into())))
                .unwrap();
        });
        assert!(ok);
        let control = process.control();
        control.signal(libc::SIGUSR1);
        control.stop_vm();
        assert!(matches!(
            process.wait(),
            Err(JobError::AgentLost(m)) if m == "stopped"
        ));
        let got: Received<Vec<ToVmm>> = b.receive(Some(Duration::from_secs(5))).unwrap();
        assert!(
            matches!(&got, Received::Message(v) if *v == [ToVmm::Signal(libc::SIGUSR1), ToVmm::StopVm]),
            "{got:?}"
        );
    }
}
