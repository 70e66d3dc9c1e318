//! The handle through which the shepherd's policy (signals from the user or from execd) reaches
//! a running job: signals go down to the VMM process ([`crate::vmm_process`]), which sends them
//! to the agent as Signal frames, queued until the agent is ready ([`AgentLink`]) and written by
//! a thread of their own so that no caller waits on an agent that does not read.

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};

use guest_agent::protocol::{Frame, FrameWriter, ProtocolError};

use crate::checkpoint::taker::AfterCheckpoint;
#[cfg(test)]
use crate::vmm_process::message::{Channel, ToVmm};
use crate::vmm_process::VmmControl;

#[derive(Default)]
struct State {
    writer: Option<FrameWriter<UnixStream>>,
    pending: Vec<i32>,
}

/// Sends frames to the agent; shared by the session, the stdin forwarder and every
/// [`JobController`].
#[derive(Clone, Default)]
pub(crate) struct AgentLink {
    state: Arc<Mutex<State>>,
    /// Signals for the signal-sender thread, started on the first signal.
    signals: Arc<Mutex<Option<mpsc::Sender<i32>>>>,
    /// Set once the VM is being stopped: the session stops waiting for the job's output to be
    /// written (see [`crate::output_writer`]).
    output_abandoned: Arc<AtomicBool>,
}

impl AgentLink {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flag the session's output writers watch.
    pub(crate) fn output_abandoned(&self) -> Arc<AtomicBool> {
        self.output_abandoned.clone()
    }

    /// Attaches the connection once the job runs, and sends the signals that were waiting.
    pub(crate) fn attach(&self, stream: UnixStream) -> Result<(), ProtocolError> {
        let mut state = self.lock();
        let mut writer = FrameWriter::new(stream);
        for signo in std::mem::take(&mut state.pending) {
            writer.write_frame(&Frame::Signal { signo })?;
        }
        state.writer = Some(writer);
        Ok(())
    }

    /// Sends `frame` if attached; returns false when not (yet) attached.
    pub(crate) fn send(&self, frame: &Frame) -> Result<bool, ProtocolError> {
        let mut state = self.lock();
        match state.writer.as_mut() {
            Some(w) => w.write_frame(frame).map(|_| true),
            None => Ok(false),
        }
    }

    /// Hands `signo` to the sender thread and returns at once: writing to the agent can wait
    /// as long as the agent does not read (a job that never reads its stdin backs the stdin
    /// frames up into the connection), and the caller — the thread that reads execd's
    /// signals and stops the VM on its deadline — must never wait on that.
    pub(crate) fn signal(&self, signo: i32) {
        let mut sender = self.signals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = sender.as_ref() {
            if tx.send(signo).is_ok() {
                return;
            }
        }
        let (tx, rx) = mpsc::channel();
        let state = self.state.clone();
        let started = std::thread::Builder::new()
            .name("signal-sender".into())
            .spawn(move || {
                // Ends when every link (and with it the sending end) is gone.
                for signo in rx {
                    deliver(&state, signo);
                }
            });
        match started {
            Ok(_) => {
                let _ = tx.send(signo);
                *sender = Some(tx);
            }
            // No thread to spare: deliver from here rather than not at all.
            Err(_) => deliver(&self.state, signo),
        }
    }
}

/// Writes a Signal frame, or keeps it for [`AgentLink::attach`] while the job is not running.
fn deliver(state: &Mutex<State>, signo: i32) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    match state.writer.as_mut() {
        // A failed write means the agent is gone; the session reports that.
        Some(w) => {
            let _ = w.write_frame(&Frame::Signal { signo });
        }
        None => state.pending.push(signo),
    }
}

/// Controls a running job from any thread of the shepherd.
#[derive(Clone)]
pub struct JobController {
    pub(crate) vmm: Arc<VmmControl>,
}

impl JobController {
    /// Delivers `signo` to the job's process group in the guest (queued until the job runs).
    pub fn signal(&self, signo: i32) {
        self.vmm.signal(signo);
    }

    /// Stops the VM at once; the job's outcome then reports the agent as lost. A VMM process
    /// that does not stop it in time is killed.
    pub fn kill_vm(&self) {
        self.vmm.stop_vm();
    }

    /// Pauses (`true`) or resumes the VM's vCPUs, for a suspended job (`qmod -s`): its guest
    /// then uses no CPU and runs no timers; its clock, read from the host's, is right again at
    /// once on resume. Returns at once; backends that cannot pause ignore it.
    pub fn suspend_vm(&self, suspend: bool) {
        self.vmm.suspend_vm(suspend);
    }

    /// Takes a checkpoint of a job launched with a checkpoint directory
    /// ([`crate::launch::CheckpointPlan`]); with [`AfterCheckpoint::StayPaused`] its VM is
    /// stopped after it and the job ends as [`crate::launch::JobError::Migrated`]. Returns at
    /// once; a failure is logged and the job runs on.
    pub fn checkpoint(&self, then: AfterCheckpoint) {
        self.vmm.checkpoint(then);
    }

    /// What came of the checkpoints asked for, as reported since the last call.
    pub fn take_checkpoint_outcomes(&self) -> Vec<crate::vmm_process::message::CheckpointOutcome> {
        self.vmm.take_checkpoint_outcomes()
    }

    /// A controller whose requests arrive, as [`ToVmm`] messages, on the returned channel end.
    #[cfg(test)]
    pub(crate) fn detached() -> (JobController, Channel) {
        let (vmm, channel) = VmmControl::detached();
        (JobController { vmm }, channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm_process::message::Received;
    use std::time::Duration;

    #[test]
    fn signals_and_stops_go_down_to_the_vmm_process_as_messages() {
        let (controller, vmm) = JobController::detached();
        controller.signal(libc::SIGTERM);
        controller.kill_vm();
        let next = || vmm.receive::<ToVmm>(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(
            next(),
            Received::Message(ToVmm::Signal(libc::SIGTERM))
        ));
        assert!(matches!(next(), Received::Message(ToVmm::StopVm)));
        controller.checkpoint(AfterCheckpoint::StayPaused);
        assert!(matches!(
            next(),
            Received::Message(ToVmm::Checkpoint(AfterCheckpoint::StayPaused))
        ));
    }

    /// Issue 18 item 6: with the connection full (a job that never reads its stdin, whose
    /// frames back up), a signal used to block its caller for ever. Now it returns at once.
    #[test]
    fn a_signal_never_waits_on_an_agent_that_does_not_read() {
        let (host, _agent_never_reads) = UnixStream::pair().unwrap();
        let link = AgentLink::default();
        link.attach(host).unwrap();
        let filler = link.clone();
        std::thread::spawn(move || {
            let chunk = vec![0u8; 60_000];
            while filler.send(&Frame::Stdin(chunk.clone())).is_ok() {}
        });
        // Let the stdin frames fill the connection.
        std::thread::sleep(Duration::from_millis(300));
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            link.signal(libc::SIGKILL);
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("signalling the job waited on the agent");
    }
}
