//! Where the job's stdin, stdout and stderr are (`build_path` in `builtin_starter.c`): a
//! `stdout_path`/`stderr_path` that is a directory gets `<job_name>.o<job_id>[.<task>]`
//! (`.e` for stderr, `.po`/`.pe` for a PE's start/stop output) appended; `merge_stderr` sends
//! stderr to stdout's file.

use std::path::{Path, PathBuf};

use super::config::{ConfigError, JobConfig};

/// Which stream a path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Stdout,
    Stderr,
    PeStdout,
    PeStderr,
}

impl OutputKind {
    fn letter(self) -> &'static str {
        match self {
            OutputKind::Stdout => "o",
            OutputKind::Stderr => "e",
            OutputKind::PeStdout => "po",
            OutputKind::PeStderr => "pe",
        }
    }
}

/// The file a configured path names: itself, or inside it when it is a directory.
pub fn resolve(configured: &Path, kind: OutputKind, config: &JobConfig) -> PathBuf {
    if !configured.is_dir() {
        return configured.to_path_buf();
    }
    let job_name = config.get("job_name").unwrap_or_default();
    let job_id = config.get("job_id").unwrap_or_default();
    let mut name = format!("{job_name}.{}{job_id}", kind.letter());
    if let Some(task) = config
        .get("ja_task_id")
        .map(str::trim)
        .filter(|t| !t.is_empty() && *t != "0")
    {
        name.push('.');
        name.push_str(task);
    }
    configured.join(name)
}

/// The job's three stream paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStreams {
    pub stdin: PathBuf,
    pub stdout: PathBuf,
    /// `None` when stderr is merged into stdout.
    pub stderr: Option<PathBuf>,
}

impl JobStreams {
    pub fn from_config(config: &JobConfig) -> Result<Self, ConfigError> {
        let stdin = PathBuf::from(config.get("stdin_path").unwrap_or("/dev/null"));
        let stdout = resolve(
            Path::new(config.require("stdout_path")?),
            OutputKind::Stdout,
            config,
        );
        let stderr = if config.flag("merge_stderr") {
            None
        } else {
            Some(resolve(
                Path::new(config.require("stderr_path")?),
                OutputKind::Stderr,
                config,
            ))
        };
        Ok(JobStreams {
            stdin,
            stdout,
            stderr,
        })
    }

    /// The stderr file (stdout's when merged).
    pub fn stderr_file(&self) -> &Path {
        self.stderr.as_deref().unwrap_or(&self.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_gets_the_default_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let c = JobConfig::parse(&format!(
            "job_name=sleep\njob_id=17\nja_task_id=0\nstdout_path={d}\nstderr_path={d}/err.txt\nmerge_stderr=0\n"
        ));
        let s = JobStreams::from_config(&c).unwrap();
        assert_eq!(s.stdout, dir.path().join("sleep.o17"));
        assert_eq!(s.stderr, Some(dir.path().join("err.txt")));
        assert_eq!(s.stdin, PathBuf::from("/dev/null"));
    }

    #[test]
    fn array_task_suffix_and_pe_names() {
        let dir = tempfile::tempdir().unwrap();
        let c = JobConfig::parse("job_name=a\njob_id=5\nja_task_id=3\n");
        assert_eq!(
            resolve(dir.path(), OutputKind::Stderr, &c),
            dir.path().join("a.e5.3")
        );
        assert_eq!(
            resolve(dir.path(), OutputKind::PeStdout, &c),
            dir.path().join("a.po5.3")
        );
    }

    #[test]
    fn merged_stderr_uses_stdout() {
        let c = JobConfig::parse("stdout_path=/nonexistent/out\nmerge_stderr=1\nstdin_path=/in\n");
        let s = JobStreams::from_config(&c).unwrap();
        assert_eq!(s.stderr, None);
        assert_eq!(s.stderr_file(), Path::new("/nonexistent/out"));
        assert_eq!(s.stdin, PathBuf::from("/in"));
    }
}
