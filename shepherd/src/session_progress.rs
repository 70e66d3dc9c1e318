//! Where a running agent session stands, for checkpoints: the session's protocol state, and
//! for stdout and stderr the bytes written and the destination file's length, read together
//! while the writers are held between writes.
//!
//! A checkpoint reads it after the VM's snapshot is taken (the VM paused): every output
//! acknowledgement the snapshot's agent holds was sent before, so the agent kept at least the
//! bytes from the offsets read here on, and a restore resumes there without a gap. Bytes the
//! host writes after this point (a VM that runs on after a periodic checkpoint) are cut off
//! the files again when that checkpoint is restored.

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::agent_protocol::SessionState;
use crate::output_writer::OutputWriter;

/// How long a checkpoint waits for a write to the job's output to end.
const HOLD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// One output stream at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPoint {
    /// Bytes of the stream the host had written (the agent sends again from here).
    pub written: u64,
    /// The destination's length then, when it is a regular file (a restore cuts it back to
    /// this); `None` for a pipe, a terminal or `/dev/null`.
    pub file_len: Option<u64>,
}

/// The session at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionPoint {
    pub stdout: StreamPoint,
    pub stderr: StreamPoint,
}

/// Why a session cannot be checkpointed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCheckpointable {
    #[error("the job is not running in its VM yet")]
    NotStarted,
    #[error("the job has ended")]
    Ended,
    #[error("the job's {0} could not be examined: {1}")]
    Destination(&'static str, String),
}

/// One stream's writer and destination file.
pub(crate) struct StreamTap {
    pub writer: Arc<OutputWriter>,
    /// The destination when it is a regular file.
    pub file: Option<File>,
}

struct Progress {
    state: SessionState,
    stdout: StreamTap,
    stderr: StreamTap,
}

/// Shared between the session (which updates it) and whoever takes checkpoints.
#[derive(Clone, Default)]
pub(crate) struct SessionProgress(Arc<Mutex<Option<Progress>>>);

impl SessionProgress {
    fn lock(&self) -> MutexGuard<'_, Option<Progress>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session's output writers exist (the job runs, or is about to).
    pub(crate) fn begin(&self, state: SessionState, stdout: StreamTap, stderr: StreamTap) {
        *self.lock() = Some(Progress {
            state,
            stdout,
            stderr,
        });
    }

    /// The session moved to `state`.
    pub(crate) fn set_state(&self, state: SessionState) {
        if let Some(p) = self.lock().as_mut() {
            p.state = state;
        }
    }

    /// The session is over: nothing more to checkpoint (and the writers may close).
    pub(crate) fn end(&self) {
        *self.lock() = None;
    }

    /// The session's point now; the session stands still while it is read.
    pub fn capture(&self) -> Result<SessionPoint, NotCheckpointable> {
        let guard = self.lock();
        let p = guard.as_ref().ok_or(NotCheckpointable::NotStarted)?;
        match p.state {
            SessionState::Running { .. } => {}
            SessionState::Exited | SessionState::Failed => return Err(NotCheckpointable::Ended),
            _ => return Err(NotCheckpointable::NotStarted),
        }
        let busy = |name| NotCheckpointable::Destination(name, "a write does not end".into());
        let _out = p.stdout.writer.hold(HOLD_PATIENCE).ok_or(busy("stdout"))?;
        let _err = p.stderr.writer.hold(HOLD_PATIENCE).ok_or(busy("stderr"))?;
        let point = |name, tap: &StreamTap| -> Result<StreamPoint, NotCheckpointable> {
            let file_len = match &tap.file {
                Some(f) => Some(
                    f.metadata()
                        .map_err(|e| NotCheckpointable::Destination(name, e.to_string()))?
                        .len(),
                ),
                None => None,
            };
            Ok(StreamPoint {
                written: tap.writer.written(),
                file_len,
            })
        };
        Ok(SessionPoint {
            stdout: point("stdout", &p.stdout)?,
            stderr: point("stderr", &p.stderr)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::AtomicBool;

    fn tap(file: &File, offset: u64) -> StreamTap {
        let writer = OutputWriter::start_at(
            "test",
            Box::new(file.try_clone().unwrap()),
            Arc::new(AtomicBool::new(false)),
            offset,
            Box::new(|_| {}),
        )
        .unwrap();
        StreamTap {
            writer: Arc::new(writer),
            file: Some(file.try_clone().unwrap()),
        }
    }

    /// The point reads, while the job runs, the bytes written (from the stream's offset) and
    /// the file's length, which agree; before the job runs and after it ended there is none.
    #[test]
    fn a_running_session_reports_its_written_bytes_and_file_lengths() {
        let progress = SessionProgress::default();
        assert_eq!(progress.capture(), Err(NotCheckpointable::NotStarted));
        let dir = tempfile::tempdir().unwrap();
        let mut out = File::create(dir.path().join("out")).unwrap();
        out.write_all(b"earlier run\n").unwrap();
        let err = File::create(dir.path().join("err")).unwrap();
        let (stdout, stderr) = (tap(&out, 5), tap(&err, 0));
        let writer = stdout.writer.clone();
        progress.begin(SessionState::Spawning, stdout, stderr);
        assert_eq!(progress.capture(), Err(NotCheckpointable::NotStarted));
        progress.set_state(SessionState::Running {
            stdout_open: true,
            stderr_open: true,
        });
        writer.write(b"0123456789");
        writer.drain();
        let point = progress.capture().unwrap();
        assert_eq!(
            point.stdout,
            StreamPoint {
                written: 15,
                file_len: Some(22)
            }
        );
        assert_eq!(point.stderr.written, 0);
        progress.set_state(SessionState::Exited);
        assert_eq!(progress.capture(), Err(NotCheckpointable::Ended));
        progress.end();
        assert_eq!(progress.capture(), Err(NotCheckpointable::NotStarted));
    }
}
