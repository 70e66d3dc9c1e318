//! While the job runs: execd's signals, through the notify state machine and the
//! suspend/resume/terminate methods, to the job's process group in the guest; and the VM's hard
//! stop when the job outlives its SIGKILL.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::active_dir::ActiveDir;
use super::config::JobConfig;
use super::control_method::{ControlMethod, ControlMethods, MethodRunner};
use super::job_checkpoints::{CheckpointStep, JobCheckpoints};
use super::notify::{Notifier, NotifyAction};
use super::signal_source::SignalSource;
use super::signals::{execd_intent, read_signal_file};
use super::vm_stop::{VmStop, VmStopStep, STOP_PATIENCE};
use crate::checkpoint::taker::AfterCheckpoint;
use crate::launch::{JobController, JobError, JobOutcome};
use crate::vmm_process::message::CheckpointOutcome;

/// Repeated KILLs within this time are dropped, as the stock shepherd does.
const KILL_REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// Loop tick while nothing is due.
const TICK: Duration = Duration::from_millis(100);

/// The job's end as the waiter thread reports it.
pub type JobResult = Result<JobOutcome, JobError>;

/// Relays signals for one running job.
pub struct SignalRelay<'a> {
    dir: &'a ActiveDir,
    config: &'a JobConfig,
    methods: &'a ControlMethods,
    runner: MethodRunner,
    notifier: Notifier,
    last_kill: Option<Instant>,
    stop: VmStop,
    killed: bool,
    /// The VM's vCPUs are paused for a suspension (the default SIGSTOP).
    vm_suspended: bool,
    /// A checkpointing job's checkpoints (VM snapshots).
    checkpoints: Option<JobCheckpoints>,
}

/// How the relay ended.
pub struct RelayEnd {
    pub result: JobResult,
    /// The job was killed on execd's request (or for its migration).
    pub killed: bool,
    pub checkpoints: Option<JobCheckpoints>,
}

impl<'a> SignalRelay<'a> {
    pub fn new(
        dir: &'a ActiveDir,
        config: &'a JobConfig,
        methods: &'a ControlMethods,
        runner: MethodRunner,
    ) -> Self {
        SignalRelay {
            dir,
            config,
            methods,
            runner,
            notifier: Notifier::from_config(config),
            last_kill: None,
            stop: VmStop::Running,
            killed: false,
            vm_suspended: false,
            checkpoints: None,
        }
    }

    /// Checkpoints the job (it was launched with a checkpoint directory): periodically, and on
    /// execd's migration request. `steps` are the first ones to take.
    pub fn with_checkpoints(
        mut self,
        checkpoints: JobCheckpoints,
        steps: Vec<CheckpointStep>,
    ) -> Self {
        for step in steps {
            self.checkpoint_step(step, None);
        }
        self.checkpoints = Some(checkpoints);
        self
    }

    /// Relays until the job's result arrives on `done`.
    pub fn run(
        mut self,
        signals: &mut SignalSource,
        controller: &JobController,
        done: &mpsc::Receiver<JobResult>,
    ) -> RelayEnd {
        loop {
            let result = match done.recv_timeout(Duration::from_millis(1)) {
                Ok(result) => Some(result),
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(JobError::Vm(
                    "job waiter ended without a result".into(),
                ))),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
            };
            if let Some(result) = result {
                // the outcomes that came with the end (a migration's snapshot)
                self.checkpoint_outcomes(controller);
                return RelayEnd {
                    result,
                    killed: self.killed,
                    checkpoints: self.checkpoints,
                };
            }
            let now = Instant::now();
            let mut wait = TICK;
            let checkpoint_due = self.checkpoints.as_ref().and_then(JobCheckpoints::deadline);
            for at in [
                self.notifier.deadline(),
                self.stop.deadline(),
                checkpoint_due,
            ]
            .into_iter()
            .flatten()
            {
                wait = wait.min(at.saturating_duration_since(now));
            }
            let mut actions = Vec::new();
            for sig in signals.wait(wait) {
                match execd_intent(sig, || read_signal_file(&self.dir.path("signal"))) {
                    Ok(intent) => {
                        self.dir
                            .trace(&format!("received signal {sig} -> {intent}"));
                        let intent = if intent != libc::SIGTTOU {
                            intent
                        } else if let Some(cp) = self.checkpoints.as_mut() {
                            for step in cp.on_migrate(Instant::now()) {
                                self.checkpoint_step(step, Some(controller));
                            }
                            continue;
                        } else {
                            // migrate a job without checkpoints: killed and re-queued, as
                            // the stock shepherd does
                            let _ = self.dir.write_checkpointed();
                            libc::SIGKILL
                        };
                        actions.extend(self.notifier.on_signal(intent, Instant::now()));
                    }
                    Err(e) => self.dir.trace(&format!("signal {sig}: {e}")),
                }
            }
            actions.extend(self.notifier.on_time(Instant::now()));
            for action in actions {
                self.act(action, controller);
            }
            self.checkpoint_outcomes(controller);
            let steps = self
                .checkpoints
                .as_mut()
                .map(|cp| cp.on_time(Instant::now()))
                .unwrap_or_default();
            for step in steps {
                self.checkpoint_step(step, Some(controller));
            }
            match self.stop.due(Instant::now()) {
                Some(VmStopStep::StopVm) => {
                    self.dir
                        .trace("job still running after SIGKILL: stopping its VM");
                    controller.kill_vm();
                }
                Some(VmStopStep::GiveUp) => {
                    let msg = format!(
                        "its VM did not stop within {STOP_PATIENCE:?} of being told to; \
                         the shepherd ends it by exiting"
                    );
                    self.dir.trace(&format!("job killed: {msg}"));
                    return RelayEnd {
                        result: Err(JobError::Vm(msg)),
                        killed: self.killed,
                        checkpoints: self.checkpoints,
                    };
                }
                None => {}
            }
            self.runner.reap();
        }
    }

    /// Feeds the VMM process's checkpoint outcomes to the job's checkpoints.
    fn checkpoint_outcomes(&mut self, controller: &JobController) {
        for outcome in controller.take_checkpoint_outcomes() {
            self.dir.trace(&match &outcome {
                CheckpointOutcome::Taken(r) => format!(
                    "checkpoint {} taken: {} bytes, VM paused {:.0} ms",
                    r.generation, r.snapshot_bytes, r.paused_ms
                ),
                CheckpointOutcome::NotNow(why) => format!("no checkpoint now: {why}"),
                CheckpointOutcome::Failed(why) => format!("checkpoint failed: {why}"),
            });
            let steps = self
                .checkpoints
                .as_mut()
                .map(|cp| cp.on_outcome(&outcome))
                .unwrap_or_default();
            for step in steps {
                self.checkpoint_step(step, Some(controller));
            }
        }
    }

    /// Does what the job's checkpoints ask. Without a controller (before the job), only the
    /// marks are written.
    fn checkpoint_step(&mut self, step: CheckpointStep, controller: Option<&JobController>) {
        match (step, controller) {
            (CheckpointStep::MarkArena, _) => {
                if let Err(e) = self.dir.write_checkpoint_in_arena() {
                    self.dir
                        .trace(&format!("can't mark the checkpoint in the arena: {e}"));
                }
            }
            (CheckpointStep::Take(then), Some(controller)) => {
                self.dir.trace(&match then {
                    AfterCheckpoint::Resume => "taking a periodic checkpoint".to_string(),
                    AfterCheckpoint::StayPaused => {
                        "migration: taking a checkpoint, then stopping the job's VM".to_string()
                    }
                });
                controller.checkpoint(then);
            }
            (CheckpointStep::KillForMigration { in_arena }, Some(controller)) => {
                let marked = if in_arena {
                    self.dir.write_checkpoint_in_arena()
                } else {
                    self.dir.write_checkpointed()
                };
                if let Err(e) = marked {
                    self.dir.trace(&format!("can't mark the job migrated: {e}"));
                }
                self.dir.trace(&format!(
                    "migration: no checkpoint of the job now; killing it to be re-queued {}",
                    if in_arena {
                        "from its latest checkpoint"
                    } else {
                        "from the start"
                    }
                ));
                controller.signal(libc::SIGKILL);
                self.killed = true;
                self.stop.job_killed(Instant::now());
            }
            (_, None) => {}
        }
    }

    fn act(&mut self, action: NotifyAction, controller: &JobController) {
        let sig = match action {
            NotifyAction::Notify(sig) => {
                self.dir.trace(&format!("notify: sending {sig}"));
                controller.signal(sig);
                return;
            }
            NotifyAction::Deliver(sig) => sig,
        };
        if sig == libc::SIGKILL {
            if self
                .last_kill
                .is_some_and(|t| t.elapsed() < KILL_REPEAT_WINDOW)
            {
                return;
            }
            self.last_kill = Some(Instant::now());
        }
        // A suspended job's VM runs again before anything else reaches it: a resume method,
        // the job's SIGCONT, or a SIGKILL its agent must deliver.
        if self.vm_suspended && matches!(sig, libc::SIGCONT | libc::SIGKILL) {
            self.dir.trace("resuming the VM's vCPUs");
            controller.suspend_vm(false);
            self.vm_suspended = false;
        }
        match self.methods.for_signal(sig) {
            Some(ControlMethod::Command(cmd)) => {
                let msg = self.runner.start(cmd, self.config);
                self.dir.trace(&msg);
            }
            Some(ControlMethod::Signal(s)) => {
                self.dir.trace(&format!("method: sending {s} for {sig}"));
                controller.signal(*s);
            }
            _ => {
                self.dir.trace(&format!("sending {sig} to the job"));
                controller.signal(sig);
                if sig == libc::SIGSTOP {
                    // Then the vCPUs: no guest timers, no CPU while suspended. Should they
                    // stop before the agent has stopped the job, the job is frozen with its VM
                    // all the same, and gets its SIGSTOP, then its SIGCONT, on resume.
                    self.dir.trace("pausing the VM's vCPUs");
                    controller.suspend_vm(true);
                    self.vm_suspended = true;
                }
            }
        }
        if sig == libc::SIGKILL {
            // A terminate_method replaces the SIGKILL but not the job's end: the stock
            // shepherd leaves that to the method, which cannot reach the job inside its VM
            // (and qmaster would ask again for ever). So the job gets the same time to end
            // as after a SIGKILL, then its VM is stopped.
            self.killed = true;
            self.stop.job_killed(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sge::environment::JobEnvironment;
    use crate::sge::procedure::RunAs;
    use crate::sge::vm_stop::KILL_GRACE;

    /// Methods run as this test's own user, in `dir`.
    fn runner_as_me(dir: &std::path::Path) -> MethodRunner {
        let me = RunAs {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups: vec![nix::unistd::getgid().as_raw()],
        };
        MethodRunner::new(me, JobEnvironment::default(), dir.into())
    }

    /// qmod -s pauses the VM after stopping the job; qmod -us resumes it before the job's
    /// SIGCONT; a KILL for a suspended job resumes it first, so its agent can deliver it.
    #[test]
    fn a_suspension_pauses_the_vm_and_what_follows_resumes_it_first() {
        use crate::vmm_process::message::{Received, ToVmm};
        let tmp = tempfile::tempdir().unwrap();
        let dir = ActiveDir::new(tmp.path().to_path_buf());
        let config = JobConfig::parse("");
        let methods = ControlMethods::from_config(&config).unwrap();
        let runner = runner_as_me(tmp.path());
        let mut relay = SignalRelay::new(&dir, &config, &methods, runner);
        let (controller, vmm) = JobController::detached();
        let sent = || match vmm.receive::<ToVmm>(Some(Duration::from_secs(5))).unwrap() {
            Received::Message(m) => m,
            _ => panic!("nothing sent"),
        };
        relay.act(NotifyAction::Deliver(libc::SIGSTOP), &controller);
        assert_eq!(sent(), ToVmm::Signal(libc::SIGSTOP));
        assert_eq!(sent(), ToVmm::Suspend(true));
        relay.act(NotifyAction::Deliver(libc::SIGCONT), &controller);
        assert_eq!(sent(), ToVmm::Suspend(false));
        assert_eq!(sent(), ToVmm::Signal(libc::SIGCONT));
        relay.act(NotifyAction::Deliver(libc::SIGSTOP), &controller);
        assert_eq!(sent(), ToVmm::Signal(libc::SIGSTOP));
        assert_eq!(sent(), ToVmm::Suspend(true));
        relay.act(NotifyAction::Deliver(libc::SIGKILL), &controller);
        assert_eq!(sent(), ToVmm::Suspend(false));
        assert_eq!(sent(), ToVmm::Signal(libc::SIGKILL));
        // a CONT for a job that is not suspended touches no vCPU
        relay.act(NotifyAction::Deliver(libc::SIGCONT), &controller);
        assert_eq!(sent(), ToVmm::Signal(libc::SIGCONT));
        relay.runner.reap();
    }

    /// Issue 18 item 6: a terminate_method (a command or a signal) used to leave the job
    /// running with no hard stop armed; qdel then never ended a job the method cannot reach.
    /// Now the VM is stopped [`KILL_GRACE`] after the method, as after a SIGKILL.
    #[test]
    fn a_terminate_method_arms_the_vms_hard_stop() {
        for method in ["/bin/true", "SIGTERM"] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = ActiveDir::new(tmp.path().to_path_buf());
            let config = JobConfig::parse(&format!("terminate_method={method}\n"));
            let methods = ControlMethods::from_config(&config).unwrap();
            let runner = runner_as_me(tmp.path());
            let mut relay = SignalRelay::new(&dir, &config, &methods, runner);
            let (controller, _vmm) = JobController::detached();
            let before = Instant::now();
            relay.act(NotifyAction::Deliver(libc::SIGKILL), &controller);
            assert!(relay.killed, "{method}");
            let at = relay.stop.deadline().expect("no hard stop armed");
            assert!(at >= before + KILL_GRACE && at <= Instant::now() + KILL_GRACE);
            assert_eq!(
                relay.stop.due(at),
                Some(VmStopStep::StopVm),
                "{method}: the VM is not stopped after the method"
            );
            relay.runner.reap();
        }
    }
}
