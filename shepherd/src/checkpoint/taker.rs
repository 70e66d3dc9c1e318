//! Taking a checkpoint of a running job, and cutting its output back to one for a restore.
//!
//! Order matters: the VM's snapshot first (the VM is paused from then on), the session's point
//! second. Every acknowledgement the snapshot's agent holds was sent before the point is read,
//! so the agent kept the bytes from the point's offsets on; a restore resumes there with
//! nothing lost and nothing twice.

use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::record::{CheckpointRecord, RECORD_FORMAT};
use super::store::{CheckpointDir, CheckpointError, SNAPSHOT_FILE};
use crate::agent_session::{JobIo, StreamOffsets};
use crate::backend::VmCheckpoint;
use crate::session_progress::{SessionProgress, StreamPoint};

/// What the VM does after its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AfterCheckpoint {
    /// Runs on (a periodic checkpoint).
    Resume,
    /// Stays paused: it is about to be stopped (a migration).
    StayPaused,
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointReport {
    pub generation: u64,
    pub snapshot_bytes: u64,
    pub memory_bytes_stored: u64,
    /// How long the VM was paused for it (until resumed, or until written when it stays
    /// paused), in ms.
    pub paused_ms: f64,
}

/// Takes checkpoints of one running job.
pub struct Checkpointer {
    vm: Arc<dyn VmCheckpoint>,
    progress: SessionProgress,
    store: CheckpointDir,
    mem_mib: u32,
    vcpus: u8,
    /// One checkpoint at a time.
    busy: Mutex<()>,
}

impl Checkpointer {
    pub(crate) fn new(
        vm: Arc<dyn VmCheckpoint>,
        progress: SessionProgress,
        store: CheckpointDir,
        mem_mib: u32,
        vcpus: u8,
    ) -> Self {
        Checkpointer {
            vm,
            progress,
            store,
            mem_mib,
            vcpus,
            busy: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &CheckpointDir {
        &self.store
    }

    /// Takes a checkpoint. On failure nothing is published and the VM runs on.
    pub fn take(&self, then: AfterCheckpoint) -> Result<CheckpointReport, CheckpointError> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        // Refused before the VM is paused when the job is not running.
        self.progress.capture()?;
        let (n, sub) = self.store.begin()?;
        let paused = Instant::now();
        let taken = self
            .vm
            .snapshot(&sub.join(SNAPSHOT_FILE))
            .map_err(|e| CheckpointError::Snapshot(e.to_string()))
            .and_then(|snap| Ok((snap, self.progress.capture()?)));
        let (snap, point) = match taken {
            Ok(t) => t,
            Err(e) => {
                let _ = self.vm.resume();
                self.store.abandon(n);
                return Err(e);
            }
        };
        let record = CheckpointRecord {
            format: RECORD_FORMAT,
            generation: n,
            taken_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            session: point,
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            snapshot_bytes: snap.file_bytes,
            memory_bytes_stored: snap.memory_bytes_stored,
            build_id: snap.build_id,
        };
        let published = self.store.publish(&record);
        if then == AfterCheckpoint::Resume || published.is_err() {
            self.vm
                .resume()
                .map_err(|e| CheckpointError::Snapshot(format!("resuming the VM: {e}")))?;
        }
        if let Err(e) = published {
            self.store.abandon(n);
            return Err(e);
        }
        Ok(CheckpointReport {
            generation: n,
            snapshot_bytes: record.snapshot_bytes,
            memory_bytes_stored: record.memory_bytes_stored,
            paused_ms: paused.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Another descriptor of `file` when it is a regular file (for [`JobIo::stdout_file`] and
/// [`JobIo::stderr_file`]); `None` for a pipe, a terminal or a device.
pub fn regular_file(file: &impl std::os::fd::AsFd) -> Option<std::fs::File> {
    let fd = file.as_fd().try_clone_to_owned().ok()?;
    let file = std::fs::File::from(fd);
    file.metadata().ok()?.is_file().then_some(file)
}

/// Makes the job's output what it was at `record`'s checkpoint: a regular file is cut back to
/// its length then (the bytes after it, written by a VM that ran on, come again from the
/// restored agent) and written on at its end. Returns the offsets the session resumes at.
pub(crate) fn rewind_outputs(
    record: &CheckpointRecord,
    io: &JobIo,
) -> Result<StreamOffsets, CheckpointError> {
    for (name, point, file) in [
        ("stdout", record.session.stdout, io.stdout_file.as_ref()),
        ("stderr", record.session.stderr, io.stderr_file.as_ref()),
    ] {
        rewind(name, point, file)?;
    }
    Ok(StreamOffsets {
        stdout: record.session.stdout.written,
        stderr: record.session.stderr.written,
    })
}

fn rewind(
    name: &str,
    point: StreamPoint,
    file: Option<&std::fs::File>,
) -> Result<(), CheckpointError> {
    let (Some(len), Some(mut file)) = (point.file_len, file) else {
        // A pipe or terminal then or now: what it took cannot be taken back.
        if point.file_len.is_some() {
            tracing::warn!(
                "the job's {name} was a file at the checkpoint and is not one now: it goes on \
                 from the checkpoint's byte {}",
                point.written
            );
        }
        return Ok(());
    };
    let mismatch = |what: String| CheckpointError::Mismatch(format!("the job's {name}: {what}"));
    let now = file.metadata().map_err(|e| mismatch(e.to_string()))?.len();
    if now < len {
        return Err(mismatch(format!(
            "the file has {now} bytes, fewer than the {len} it had at the checkpoint (it was \
             truncated or replaced; for `run`, append to it: >>)"
        )));
    }
    file.set_len(len)
        .map_err(|e| mismatch(format!("cutting it back: {e}")))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| mismatch(format!("seeking to its end: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_session::StdinSource;
    use crate::session_progress::SessionPoint;

    fn record(stdout_len: u64) -> CheckpointRecord {
        CheckpointRecord {
            format: RECORD_FORMAT,
            generation: 1,
            taken_unix_ms: 0,
            session: SessionPoint {
                stdout: StreamPoint {
                    written: 4,
                    file_len: Some(stdout_len),
                },
                stderr: StreamPoint {
                    written: 2,
                    file_len: None,
                },
            },
            mem_mib: 256,
            vcpus: 1,
            snapshot_bytes: 0,
            memory_bytes_stored: 0,
            build_id: String::new(),
        }
    }

    fn io_on(file: &std::fs::File) -> JobIo {
        let mut io = JobIo::streams(
            StdinSource::Null,
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
        );
        io.stdout_file = regular_file(file);
        io
    }

    /// What a VM that ran on after the checkpoint wrote is cut off (the restored job writes it
    /// again); the session resumes at the checkpoint's offsets.
    #[test]
    fn a_longer_output_file_is_cut_back_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"1\n2\n3\n4\n").unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let at = rewind_outputs(&record(4), &io_on(&file)).unwrap();
        assert_eq!((at.stdout, at.stderr), (4, 2));
        assert_eq!(std::fs::read(&path).unwrap(), b"1\n2\n");
    }

    /// A file shorter than at the checkpoint lost bytes the restored job will not send again:
    /// refused, and the file left alone.
    #[test]
    fn a_shorter_output_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"1\n").unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let err = rewind_outputs(&record(4), &io_on(&file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fewer than the 4"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"1\n");
        assert!(regular_file(&std::fs::File::open("/dev/null").unwrap()).is_none());
    }
}
