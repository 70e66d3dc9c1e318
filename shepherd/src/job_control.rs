//! The handle through which the shepherd's policy (signals from the user or from execd) reaches
//! a running job: signals go to the agent as Signal frames, queued until the agent is ready.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use guest_agent::protocol::{Frame, FrameWriter, ProtocolError};

use crate::backend::VmKiller;

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

    fn signal(&self, signo: i32) {
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

/// Controls a running job from any thread.
#[derive(Clone)]
pub struct JobController {
    pub(crate) link: AgentLink,
    pub(crate) killer: VmKiller,
}

impl JobController {
    /// Delivers `signo` to the job's process group in the guest (queued until the job runs).
    pub fn signal(&self, signo: i32) {
        self.link.signal(signo);
    }

    /// Stops the VM at once; the job's outcome then reports the agent as lost. Output the
    /// job's destinations have not taken yet is dropped rather than waited for.
    pub fn kill_vm(&self) {
        self.link.output_abandoned.store(true, Ordering::SeqCst);
        (self.killer)();
    }
}
