//! `suspend_method`, `resume_method`, `terminate_method`: `none`, a signal name that replaces
//! the default signal, or an absolute command run asynchronously on the host (`/bin/sh -c`, as
//! the job owner, in its own process group; a new request is skipped while one still runs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::config::JobConfig;
use super::environment::JobEnvironment;
use super::expand::{expand, CTRL_METHOD_VARIABLES};
use super::procedure::{spawn_as, RunAs};
use super::signals::parse_signal;

/// A configured control method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMethod {
    /// Deliver the default signal.
    Default,
    /// Deliver this signal instead.
    Signal(i32),
    /// Run this command line (unexpanded) on the host.
    Command(String),
}

/// Why a method setting is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key} {value:?} is neither none, an absolute path nor a signal name")]
pub struct MethodError {
    pub key: &'static str,
    pub value: String,
}

impl ControlMethod {
    pub fn from_config(config: &JobConfig, key: &'static str) -> Result<Self, MethodError> {
        let Some(v) = config
            .get_not_none(key)
            .map(str::trim)
            .filter(|v| !v.is_empty())
        else {
            return Ok(ControlMethod::Default);
        };
        if v.starts_with('/') {
            return Ok(ControlMethod::Command(v.to_string()));
        }
        parse_signal(v)
            .map(ControlMethod::Signal)
            .ok_or_else(|| MethodError {
                key,
                value: v.to_string(),
            })
    }
}

/// The three methods of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMethods {
    pub suspend: ControlMethod,
    pub resume: ControlMethod,
    pub terminate: ControlMethod,
}

impl ControlMethods {
    pub fn from_config(config: &JobConfig) -> Result<Self, MethodError> {
        Ok(ControlMethods {
            suspend: ControlMethod::from_config(config, "suspend_method")?,
            resume: ControlMethod::from_config(config, "resume_method")?,
            terminate: ControlMethod::from_config(config, "terminate_method")?,
        })
    }

    /// The method for a STOP, CONT or KILL; `None` for other signals.
    pub fn for_signal(&self, sig: i32) -> Option<&ControlMethod> {
        match sig {
            libc::SIGSTOP => Some(&self.suspend),
            libc::SIGCONT => Some(&self.resume),
            libc::SIGKILL => Some(&self.terminate),
            _ => None,
        }
    }
}

/// Runs method commands, one at a time per method.
pub struct MethodRunner {
    run_as: RunAs,
    env: JobEnvironment,
    cwd: PathBuf,
    running: Vec<(String, Child)>,
}

impl MethodRunner {
    pub fn new(run_as: RunAs, env: JobEnvironment, cwd: PathBuf) -> Self {
        MethodRunner {
            run_as,
            env,
            cwd,
            running: Vec::new(),
        }
    }

    /// Expands and starts `command` unless the same method still runs. Returns what happened,
    /// for the trace.
    pub fn start(&mut self, command: &str, config: &JobConfig) -> String {
        self.reap();
        if self.running.iter().any(|(c, _)| c == command) {
            return format!("method {command:?} still running; request skipped");
        }
        let line = match expand(command, CTRL_METHOD_VARIABLES, config) {
            Ok(l) => l,
            Err(e) => return format!("method {command:?}: {e}"),
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(&line);
        match spawn_as(
            cmd,
            &self.run_as,
            &self.run_as,
            &self.env,
            &self.cwd,
            Stdio::null(),
            Stdio::null(),
        ) {
            Ok(child) => {
                let pid = child.id();
                self.running.push((command.to_string(), child));
                format!("started method {line:?} as pid {pid}")
            }
            Err(e) => format!("can't start method {line:?}: {e}"),
        }
    }

    /// Collects finished method processes.
    pub fn reap(&mut self) {
        self.running
            .retain_mut(|(_, child)| matches!(child.try_wait(), Ok(None)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let c = JobConfig::parse(
            "suspend_method=SIGTSTP\nresume_method=NONE\nterminate_method=/bin/kill -9 $job_pid\n",
        );
        let m = ControlMethods::from_config(&c).unwrap();
        assert_eq!(m.suspend, ControlMethod::Signal(libc::SIGTSTP));
        assert_eq!(m.resume, ControlMethod::Default);
        assert_eq!(
            m.terminate,
            ControlMethod::Command("/bin/kill -9 $job_pid".into())
        );
        assert_eq!(m.for_signal(libc::SIGKILL), Some(&m.terminate));
        assert_eq!(m.for_signal(libc::SIGUSR1), None);
        let bad = JobConfig::parse("suspend_method=pause please\n");
        assert!(ControlMethods::from_config(&bad).is_err());
    }

    #[test]
    fn command_runs_once_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("m");
        let c = JobConfig::parse("job_pid=42\n");
        let run_as = RunAs {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups: vec![nix::unistd::getgid().as_raw()],
        };
        let mut r = MethodRunner::new(run_as, JobEnvironment::default(), tmp.path().into());
        let cmd = format!(
            "/bin/sh -c 'echo $job_pid >> {}; sleep 1'",
            marker.display()
        );
        assert!(r.start(&cmd, &c).starts_with("started"));
        assert!(r.start(&cmd, &c).contains("still running"));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        r.reap();
        assert!(r.running.is_empty());
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "42\n");
    }
}
