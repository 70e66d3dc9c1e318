//! The job's command line (`builtin_starter.c`): argv per `shell_start_mode`,
//! `handle_as_binary`, `no_shell` and `starter_method`, plus how a job script reaches the guest.
//!
//! Where the guest sees the script's directory (shared from the host), the script runs from its
//! own path as with the stock shepherd. Otherwise the script travels in the environment
//! variable [`SCRIPT_ENV`] and a tiny `/bin/sh` bootstrap writes it to [`GUEST_SCRIPT_PATH`]
//! before exec'ing the argv built here (with that path as the script). `script_from_stdin`
//! feeds the script as the job's stdin either way.

use std::path::Path;

use super::config::{ConfigError, JobConfig};

/// Where the job script lives in the guest.
pub const GUEST_SCRIPT_PATH: &str = "/tmp/sge_job_script";
/// The environment variable carrying the script to the bootstrap (removed before the job runs).
pub const SCRIPT_ENV: &str = "SGE_VM_JOB_SCRIPT";
/// A single argument (and so the script in [`SCRIPT_ENV`]) may not exceed the kernel's
/// MAX_ARG_STRLEN (32 pages) in the guest.
pub const MAX_SCRIPT_BYTES: usize = 128 * 1024 - SCRIPT_ENV.len() - 2;

/// Why the command could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ArgvError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("can't read job script {path}: {source}")]
    Script {
        path: String,
        source: std::io::Error,
    },
    #[error("job script {path} is {len} bytes; the guest takes at most {MAX_SCRIPT_BYTES}")]
    ScriptTooLarge { path: String, len: usize },
    #[error("job script {0} contains a NUL byte, which cannot be passed to the guest")]
    ScriptHasNul(String),
}

/// How a script job's script reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptDelivery {
    /// The guest sees the script at its host path (its directory is shared).
    SharedPath,
    /// Through [`SCRIPT_ENV`] and the bootstrap.
    Environment,
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    /// The job's argv as the stock shepherd would exec it.
    pub argv: Vec<String>,
    /// The script to place at [`GUEST_SCRIPT_PATH`] first ([`ScriptDelivery::Environment`]).
    pub script: Option<Vec<u8>>,
    /// `script_from_stdin`: the script, to be the job's stdin.
    pub stdin_script: Option<Vec<u8>>,
}

/// Builds the command; `read_script` reads the job script (as the job user).
pub fn build(
    config: &JobConfig,
    delivery: ScriptDelivery,
    read_script: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<JobCommand, ArgvError> {
    let script_file = config.require("script_file")?.to_string();
    let args = config.job_args()?;
    let shell = config.get("shell_path").unwrap_or("/bin/sh").to_string();
    let starter = config.get_not_none("starter_method").map(str::to_string);

    if config.flag("handle_as_binary") {
        let mut argv = if config.flag("no_shell") {
            let mut v = vec![script_file];
            v.extend(args);
            v
        } else {
            // the stock shepherd runs `shell -c "cmd arg1 arg2 "`
            let mut line = script_file;
            for a in &args {
                line.push(' ');
                line.push_str(a);
            }
            line.push(' ');
            vec![shell, "-c".into(), line]
        };
        if let Some(s) = starter {
            argv.insert(0, s);
        }
        return Ok(JobCommand {
            argv,
            script: None,
            stdin_script: None,
        });
    }

    let mode = config.get("shell_start_mode").unwrap_or("posix_compliant");
    if delivery == ScriptDelivery::SharedPath && mode != "script_from_stdin" {
        let (mut argv, _) = argv_for_mode(mode, starter.is_some(), shell, script_file);
        argv.extend(args);
        if let Some(s) = starter {
            argv.insert(0, s);
        }
        return Ok(JobCommand {
            argv,
            script: None,
            stdin_script: None,
        });
    }
    let script = read_script(Path::new(&script_file)).map_err(|source| ArgvError::Script {
        path: script_file.clone(),
        source,
    })?;
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(ArgvError::ScriptTooLarge {
            path: script_file,
            len: script.len(),
        });
    }
    if script.contains(&0) {
        return Err(ArgvError::ScriptHasNul(script_file));
    }
    let (mut argv, on_stdin) = argv_for_mode(
        mode,
        starter.is_some(),
        shell,
        GUEST_SCRIPT_PATH.to_string(),
    );
    argv.extend(args);
    if let Some(s) = starter {
        argv.insert(0, s);
    }
    Ok(if on_stdin {
        JobCommand {
            argv,
            script: None,
            stdin_script: Some(script),
        }
    } else {
        JobCommand {
            argv,
            script: Some(script),
            stdin_script: None,
        }
    })
}

/// argv (without the job's arguments) for a script at `script`, and whether the script is
/// read from stdin instead.
fn argv_for_mode(
    mode: &str,
    has_starter: bool,
    shell: String,
    script: String,
) -> (Vec<String>, bool) {
    match mode {
        // a starter method always gets the shell (unix_behavior is treated as posix_compliant)
        "unix_behavior" | "raw_exec" if !has_starter => (vec![script], false),
        "script_from_stdin" => (vec![shell, "-s".into()], true),
        _ => (vec![shell, script], false),
    }
}

impl JobCommand {
    /// The argv to send to the guest agent: the job's own, or the bootstrap that first writes
    /// the script (read from [`SCRIPT_ENV`]) and then execs it.
    pub fn guest_argv(&self) -> Vec<String> {
        if self.script.is_none() {
            return self.argv.clone();
        }
        let boot = format!(
            "printf '%s' \"${SCRIPT_ENV}\" >{GUEST_SCRIPT_PATH} && chmod 700 {GUEST_SCRIPT_PATH} \
             && unset {SCRIPT_ENV} && exec \"$@\""
        );
        let mut argv = vec!["/bin/sh".to_string(), "-c".into(), boot, "sge_job".into()];
        argv.extend(self.argv.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_script(_: &Path) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::other("should not be read"))
    }

    #[test]
    fn binary_job_runs_through_the_shell() {
        let c = JobConfig::parse(
            "script_file=/bin/sleep\nhandle_as_binary=1\nno_shell=0\nshell_path=/bin/sh\nnjob_args=1\njob_arg1=300\n",
        );
        let cmd = build(&c, ScriptDelivery::Environment, no_script).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", "-c", "/bin/sleep 300 "]);
        assert_eq!(cmd.guest_argv(), cmd.argv);
    }

    #[test]
    fn binary_job_without_shell() {
        let c = JobConfig::parse(
            "script_file=/bin/echo\nhandle_as_binary=1\nno_shell=1\nnjob_args=2\njob_arg1=a b\njob_arg2=c\n",
        );
        assert_eq!(
            build(&c, ScriptDelivery::Environment, no_script)
                .unwrap()
                .argv,
            ["/bin/echo", "a b", "c"]
        );
    }

    #[test]
    fn script_modes() {
        let base = "script_file=/spool/job_scripts/3\nhandle_as_binary=0\nshell_path=/bin/sh\nnjob_args=1\njob_arg1=x\n";
        let read = |_: &Path| Ok(b"echo hi\n".to_vec());
        let c = JobConfig::parse(&format!("{base}shell_start_mode=posix_compliant\n"));
        let cmd = build(&c, ScriptDelivery::Environment, read).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", GUEST_SCRIPT_PATH, "x"]);
        assert_eq!(cmd.script.as_deref(), Some(&b"echo hi\n"[..]));
        let c = JobConfig::parse(&format!("{base}shell_start_mode=unix_behavior\n"));
        assert_eq!(
            build(&c, ScriptDelivery::Environment, read).unwrap().argv,
            [GUEST_SCRIPT_PATH, "x"]
        );
        let c = JobConfig::parse(&format!("{base}shell_start_mode=script_from_stdin\n"));
        let cmd = build(&c, ScriptDelivery::SharedPath, read).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", "-s", "x"]);
        assert_eq!(cmd.stdin_script.as_deref(), Some(&b"echo hi\n"[..]));
        assert_eq!(cmd.script, None);
        assert_eq!(cmd.guest_argv(), cmd.argv);
        let c = JobConfig::parse(&format!(
            "{base}shell_start_mode=unix_behavior\nstarter_method=/opt/starter\n"
        ));
        assert_eq!(
            build(&c, ScriptDelivery::Environment, read).unwrap().argv,
            ["/opt/starter", "/bin/sh", GUEST_SCRIPT_PATH, "x"]
        );
    }

    #[test]
    fn shared_script_runs_from_its_own_path() {
        let c = JobConfig::parse(
            "script_file=/spool/job_scripts/3\nhandle_as_binary=0\nshell_path=/bin/bash\n\
             shell_start_mode=posix_compliant\nnjob_args=1\njob_arg1=x\n",
        );
        let cmd = build(&c, ScriptDelivery::SharedPath, no_script).unwrap();
        assert_eq!(cmd.argv, ["/bin/bash", "/spool/job_scripts/3", "x"]);
        assert_eq!((cmd.script, cmd.stdin_script), (None, None));
    }

    #[test]
    fn bootstrap_writes_and_execs_the_script() {
        // the bootstrap itself, run by the host's /bin/sh
        let c = JobConfig::parse(
            "script_file=/s\nhandle_as_binary=0\nshell_path=/bin/sh\nnjob_args=1\njob_arg1=arg\n",
        );
        let cmd = build(&c, ScriptDelivery::Environment, |_| {
            Ok(b"echo \"$0:$1\"\nexit 3\n".to_vec())
        })
        .unwrap();
        let argv = cmd.guest_argv();
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("script");
        let argv: Vec<String> = argv
            .into_iter()
            .map(|a| a.replace(GUEST_SCRIPT_PATH, fake.to_str().unwrap()))
            .collect();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env(SCRIPT_ENV, String::from_utf8(cmd.script.unwrap()).unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}:arg\n", fake.display())
        );
    }

    #[test]
    fn unreadable_or_oversized_script() {
        let c = JobConfig::parse("script_file=/s\nhandle_as_binary=0\n");
        assert!(matches!(
            build(&c, ScriptDelivery::Environment, |_| Err(
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )),
            Err(ArgvError::Script { .. })
        ));
        assert!(matches!(
            build(&c, ScriptDelivery::Environment, |_| Ok(vec![
                b'x';
                MAX_SCRIPT_BYTES
                    + 1
            ])),
            Err(ArgvError::ScriptTooLarge { .. })
        ));
    }
}
