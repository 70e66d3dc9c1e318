//! A checkpoint directory: `<n>/vm.snap` and `<n>/session.json` for checkpoint `n`, and
//! `latest`, naming the newest complete one. A checkpoint is written into its own new
//! subdirectory and published by renaming `latest` over the old one; older checkpoints are
//! removed after that. Files are created new (`O_EXCL`, `O_NOFOLLOW`), never followed through
//! a symlink, and read with a bound.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::{CheckpointRecord, RECORD_FORMAT};

/// The VM snapshot in a checkpoint's subdirectory.
pub const SNAPSHOT_FILE: &str = "vm.snap";
/// The session record in a checkpoint's subdirectory.
pub const RECORD_FILE: &str = "session.json";
/// The name of the newest complete checkpoint.
const LATEST: &str = "latest";
/// Largest `latest` or record accepted.
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// What can go wrong with checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint directory {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("checkpoint directory {0} holds no checkpoint")]
    NoCheckpoint(PathBuf),
    #[error("checkpoint directory {dir}: {what}")]
    Invalid { dir: PathBuf, what: String },
    #[error("the job cannot be checkpointed now: {0}")]
    NotCheckpointable(#[from] crate::session_progress::NotCheckpointable),
    #[error("the VM's snapshot failed: {0}")]
    Snapshot(String),
    #[error("the checkpoint does not fit this job: {0}")]
    Mismatch(String),
}

/// A checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    /// `dir`, created (mode 0700) if it does not exist.
    pub fn open(dir: &Path) -> Result<CheckpointDir, CheckpointError> {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CheckpointError::Io {
                    dir: dir.into(),
                    what: "creating it".into(),
                    source,
                })
            }
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|source| CheckpointError::Io {
            dir: dir.into(),
            what: "examining it".into(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(CheckpointError::Invalid {
                dir: dir.into(),
                what: "not a directory (or a symlink)".into(),
            });
        }
        Ok(CheckpointDir { dir: dir.into() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let (dir, what) = (self.dir.clone(), what.into());
        move |source| CheckpointError::Io { dir, what, source }
    }

    fn invalid(&self, what: impl Into<String>) -> CheckpointError {
        CheckpointError::Invalid {
            dir: self.dir.clone(),
            what: what.into(),
        }
    }

    /// The newest complete checkpoint's number, if any.
    pub fn latest(&self) -> Result<Option<u64>, CheckpointError> {
        let text = match read_bounded(&self.dir.join(LATEST)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("reading latest")(e)),
        };
        let text = String::from_utf8_lossy(&text);
        text.trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| self.invalid(format!("latest holds {:?}, not a number", text.trim())))
    }

    /// A new subdirectory for the next checkpoint; its number and path.
    pub fn begin(&self) -> Result<(u64, PathBuf), CheckpointError> {
        let mut n = self.latest()?.unwrap_or(0) + 1;
        loop {
            let path = self.dir.join(n.to_string());
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok((n, path)),
                // Left by a checkpoint that did not complete: never reused.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(self.io(format!("creating {}", path.display()))(e)),
            }
        }
    }

    /// Writes `record` into checkpoint `n` (whose snapshot is written) and makes it the latest;
    /// then removes the older ones.
    pub fn publish(&self, record: &CheckpointRecord) -> Result<(), CheckpointError> {
        let n = record.generation;
        let sub = self.dir.join(n.to_string());
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| self.invalid(format!("encoding the record: {e}")))?;
        write_new(&sub.join(RECORD_FILE), &json).map_err(self.io("writing the record"))?;
        let tmp = self.dir.join(format!("{LATEST}.{n}"));
        write_new(&tmp, format!("{n}\n").as_bytes()).map_err(self.io("writing latest"))?;
        std::fs::rename(&tmp, self.dir.join(LATEST)).map_err(self.io("publishing latest"))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        self.remove_older_than(n);
        Ok(())
    }

    /// Removes an unfinished checkpoint `n`.
    pub fn abandon(&self, n: u64) {
        let _ = std::fs::remove_dir_all(self.dir.join(n.to_string()));
    }

    /// Removes the checkpoints older than `n` (and unfinished ones).
    fn remove_older_than(&self, n: u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let older = name
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|m| m < n);
            if older && entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The latest checkpoint's record and snapshot file.
    pub fn load_latest(&self) -> Result<(CheckpointRecord, PathBuf), CheckpointError> {
        let n = self
            .latest()?
            .ok_or_else(|| CheckpointError::NoCheckpoint(self.dir.clone()))?;
        let sub = self.dir.join(n.to_string());
        let bytes = read_bounded(&sub.join(RECORD_FILE)).map_err(self.io("reading the record"))?;
        let record: CheckpointRecord = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(format!("checkpoint {n}'s record: {e}")))?;
        if record.format != RECORD_FORMAT || record.generation != n {
            return Err(self.invalid(format!(
                "checkpoint {n}'s record has format {} and number {} (expected {RECORD_FORMAT} \
                 and {n})",
                record.format, record.generation
            )));
        }
        let snapshot = sub.join(SNAPSHOT_FILE);
        let meta = std::fs::symlink_metadata(&snapshot).map_err(self.io("the snapshot file"))?;
        if !meta.is_file() {
            return Err(self.invalid(format!("checkpoint {n}'s snapshot is not a regular file")));
        }
        Ok((record, snapshot))
    }

    /// Removes every checkpoint (the job ended on its own: they are of no more use).
    pub fn clean(&self) {
        if let Ok(Some(n)) = self.latest() {
            self.remove_older_than(n + 1);
        }
        let _ = std::fs::remove_file(self.dir.join(LATEST));
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(std::io::Error::other("larger than a record can be"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session_progress::{SessionPoint, StreamPoint};

    fn record(generation: u64) -> CheckpointRecord {
        let stream = StreamPoint {
            written: 10,
            file_len: Some(10),
        };
        CheckpointRecord {
            format: RECORD_FORMAT,
            generation,
            taken_unix_ms: 1,
            session: SessionPoint {
                stdout: stream,
                stderr: stream,
            },
            mem_mib: 256,
            vcpus: 1,
            snapshot_bytes: 1,
            memory_bytes_stored: 1,
            build_id: "b".into(),
        }
    }

    fn complete(store: &CheckpointDir) -> u64 {
        let (n, sub) = store.begin().unwrap();
        std::fs::write(sub.join(SNAPSHOT_FILE), b"snapshot").unwrap();
        store.publish(&record(n)).unwrap();
        n
    }

    #[test]
    fn the_latest_complete_checkpoint_is_loaded_and_older_ones_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CheckpointDir::open(&tmp.path().join("ckpt")).unwrap();
        assert!(matches!(
            store.load_latest(),
            Err(CheckpointError::NoCheckpoint(_))
        ));
        assert_eq!(complete(&store), 1);
        // One that never completed is neither loaded nor reused.
        let (unfinished, _) = store.begin().unwrap();
        assert_eq!(unfinished, 2);
        assert_eq!(store.load_latest().unwrap().0.generation, 1);
        assert_eq!(complete(&store), 3);
        let (rec, snap) = store.load_latest().unwrap();
        assert_eq!(rec, record(3));
        assert!(snap.ends_with("3/vm.snap"));
        assert!(!store.path().join("1").exists() && !store.path().join("2").exists());
        store.clean();
        assert!(matches!(
            store.load_latest(),
            Err(CheckpointError::NoCheckpoint(_))
        ));
    }

    #[test]
    fn damaged_records_and_symlinks_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CheckpointDir::open(tmp.path()).unwrap();
        let n = complete(&store);
        let rec = store.path().join(n.to_string()).join(RECORD_FILE);
        std::fs::remove_file(&rec).unwrap();
        std::fs::write(&rec, b"{\"format\": 1").unwrap();
        let err = store.load_latest().unwrap_err().to_string();
        assert!(err.contains("record"), "{err}");
        std::fs::remove_file(&rec).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &rec).unwrap();
        assert!(store.load_latest().is_err());
        std::fs::write(store.path().join(LATEST), b"../../etc").unwrap();
        let err = store.load_latest().unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(CheckpointDir::open(&link).is_err(), "a symlinked directory");
    }
}
