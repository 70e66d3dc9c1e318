//! The shepherd's result files in the active job directory, with the formats, owners and modes
//! execd expects: `pid`, `job_pid`, `addgrpid`, `usage` (admin user), `trace`, `error`,
//! `exit_status` (job owner), and the `noresources` / `checkpointed` markers.
//!
//! `exit_status` is written last: it is execd's sign that the shepherd ended on purpose.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{fchown, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a result file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("can't write {path}: {source}")]
pub struct ResultFileError {
    pub path: String,
    pub source: std::io::Error,
}

/// Owner of a file (uid, gid); `None` keeps the creating process's.
pub type Owner = Option<(u32, u32)>;

/// The active job directory (the shepherd's cwd).
#[derive(Debug, Clone)]
pub struct ActiveDir {
    dir: PathBuf,
    /// Owner of `pid`, `job_pid`, `addgrpid`, `usage`.
    admin: Owner,
    /// Owner of `trace`, `error`, `exit_status`.
    job_owner: Owner,
}

impl ActiveDir {
    pub fn new(dir: PathBuf) -> Self {
        ActiveDir {
            dir,
            admin: None,
            job_owner: None,
        }
    }

    pub fn set_admin(&mut self, owner: Owner) {
        self.admin = owner;
    }

    pub fn set_job_owner(&mut self, owner: Owner) {
        self.job_owner = owner;
        // files created before the owner was known change hands now, as the stock shepherd's do
        for name in ["trace", "error", "exit_status"] {
            if let (Some((u, g)), Ok(f)) = (owner, File::open(self.path(name))) {
                let _ = fchown(&f, Some(u), Some(g));
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(
        &self,
        name: &str,
        text: &str,
        append: bool,
        owner: Owner,
    ) -> Result<(), ResultFileError> {
        let path = self.path(name);
        let err = |source| ResultFileError {
            path: path.display().to_string(),
            source,
        };
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .mode(0o644)
            .open(&path)
            .map_err(err)?;
        if let Some((u, g)) = owner {
            fchown(&f, Some(u), Some(g)).map_err(err)?;
        }
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_data().map_err(err)
    }

    /// `pid`: the shepherd's PID.
    pub fn write_pid(&self, pid: u32) -> Result<(), ResultFileError> {
        self.write("pid", &format!("{pid}\n"), false, self.admin)
    }

    /// `job_pid`: the job's top process on the host (for a VM job, the VMM).
    pub fn write_job_pid(&self, pid: u32) -> Result<(), ResultFileError> {
        self.write("job_pid", &format!("{pid}\n"), false, self.admin)
    }

    /// `addgrpid`: the job's additional group id; execd starts accounting once it is there.
    pub fn write_addgrpid(&self, gid: u32) -> Result<(), ResultFileError> {
        self.write("addgrpid", &format!("{gid}\n"), false, self.admin)
    }

    pub fn write_usage(&self, text: &str) -> Result<(), ResultFileError> {
        self.write("usage", text, false, self.admin)
    }

    /// Creates `error` and `exit_status` empty (and `trace` if missing).
    pub fn create_empty_results(&self) -> Result<(), ResultFileError> {
        self.write("error", "", false, self.job_owner)?;
        self.write("exit_status", "", false, self.job_owner)?;
        self.write("trace", "", true, self.job_owner)
    }

    /// Appends a timestamped line to `trace`. Failures are ignored: the trace is for humans.
    /// Control characters in `msg` are escaped (messages may carry text from the guest, which
    /// must not be able to forge trace lines).
    pub fn trace(&self, msg: &str) {
        let msg = one_line(msg);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = self.write(
            "trace",
            &format!("{now:.3} [{}] sge_virtualizer: {msg}\n", std::process::id()),
            true,
            self.job_owner,
        );
    }

    /// Appends a line to `error`; execd takes its first line as the job's error reason. Control
    /// characters are escaped, as in [`Self::trace`].
    pub fn append_error(&self, msg: &str) -> Result<(), ResultFileError> {
        let line = one_line(msg);
        self.write("error", &format!("{line}\n"), true, self.job_owner)
    }

    /// Writes `exit_status` (the final act).
    pub fn write_exit_status(&self, state: i32) -> Result<(), ResultFileError> {
        self.write("exit_status", &format!("{state}\n"), false, self.job_owner)
    }

    /// `noresources`: execd re-queues the job (failed 25) without a queue error.
    pub fn write_noresources(&self) -> Result<(), ResultFileError> {
        self.write("noresources", "", false, self.admin)
    }

    /// `checkpointed` (empty): the job was migrated; execd re-queues it.
    pub fn write_checkpointed(&self) -> Result<(), ResultFileError> {
        self.write("checkpointed", "", false, self.admin)
    }
}

/// `msg` with every control character (newlines, carriage returns, escape sequences, C1
/// codes) written as its Rust escape (`\n`, `\u{1b}`): one line, whatever the text held.
fn one_line(msg: &str) -> Cow<'_, str> {
    if !msg.chars().any(char::is_control) {
        return Cow::Borrowed(msg);
    }
    let mut escaped = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn formats_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ActiveDir::new(tmp.path().to_path_buf());
        d.write_pid(1234).unwrap();
        d.create_empty_results().unwrap();
        d.trace("hello");
        d.append_error("first\nline").unwrap();
        d.append_error("second").unwrap();
        d.write_exit_status(25).unwrap();
        d.write_noresources().unwrap();
        let read = |n: &str| std::fs::read_to_string(tmp.path().join(n)).unwrap();
        assert_eq!(read("pid"), "1234\n");
        assert_eq!(read("error"), "first\\nline\nsecond\n");
        assert_eq!(read("exit_status"), "25\n");
        assert_eq!(read("noresources"), "");
        assert!(read("trace").contains("sge_virtualizer: hello"));
        let mode = std::fs::metadata(tmp.path().join("exit_status"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // exit_status is replaced, never appended
        d.write_exit_status(0).unwrap();
        assert_eq!(read("exit_status"), "0\n");
    }

    /// Issue 12 item 7: text from the guest (a spawn failure's message, an agent error) cannot
    /// forge lines in `trace` or `error`.
    #[test]
    fn guest_text_cannot_forge_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ActiveDir::new(tmp.path().to_path_buf());
        let forged =
            "x\n1700000000.000 [1] sge_virtualizer: job ended: exit status 0\r\u{1b}[2K\u{85}é";
        d.trace(&format!("the job failed: {forged}"));
        d.append_error(forged).unwrap();
        let trace = std::fs::read_to_string(tmp.path().join("trace")).unwrap();
        assert_eq!(trace.lines().count(), 1, "{trace:?}");
        assert!(
            trace.ends_with(
                "the job failed: x\\n1700000000.000 [1] sge_virtualizer: job ended: exit status \
                 0\\r\\u{1b}[2K\\u{85}é\n"
            ),
            "{trace:?}"
        );
        let error = std::fs::read_to_string(tmp.path().join("error")).unwrap();
        assert_eq!(error.lines().count(), 1, "{error:?}");
        assert!(
            !error.contains('\r') && !error.contains('\u{1b}'),
            "{error:?}"
        );
        assert_eq!(one_line("plain é text"), "plain é text");
    }

    #[test]
    fn owners_are_applied_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: owners_are_applied_when_root needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut d = ActiveDir::new(tmp.path().to_path_buf());
        d.set_admin(Some((2, 2)));
        d.create_empty_results().unwrap();
        d.set_job_owner(Some((1, 1)));
        d.write_pid(1).unwrap();
        d.write_exit_status(0).unwrap();
        let uid = |n: &str| std::fs::metadata(tmp.path().join(n)).unwrap().uid();
        assert_eq!(uid("pid"), 2);
        assert_eq!(uid("error"), 1);
        assert_eq!(uid("exit_status"), 1);
        assert_eq!(uid("trace"), 1);
    }
}
