//! The handle through which the shepherd's policy (signals from the user or from execd) reaches
//! a running job: signals go down to the VMM process ([`crate::vmm_process`]), which sends them
//! to the agent as Signal frames, queued until the agent is ready ([`AgentLink`]).

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use guest_agent::protocol::{Frame, FrameWriter, ProtocolError};

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
pub(crate) struct AgentLink(Arc<Mutex<State>>);

impl AgentLink {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
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

    pub(crate) fn signal(&self, signo: i32) {
        let mut state = self.lock();
        match state.writer.as_mut() {
            // A failed write means the agent is gone; the session reports that.
            Some(w) => {
                let _ = w.write_frame(&Frame::Signal { signo });
            }
            None => state.pending.push(signo),
        }
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
    }
}
