//! The job's command line (`builtin_starter.c`): argv per `shell_start_mode`,
//! `handle_as_binary`, `no_shell` and `starter_method`, plus how a job script reaches the guest.
//!
//! Where the guest sees the script's directory (shared from the host), the script runs from its
//! own path as with the stock shepherd. Otherwise a tiny `/bin/sh` bootstrap first writes the
//! script to [`GUEST_SCRIPT_PATH`] and then execs the argv built here (with that path as the
//! script). A script that fits in one environment string travels in [`SCRIPT_ENV`]; a larger
//! one, or one with a NUL byte, travels ahead of the job's stdin, from which the bootstrap takes
//! exactly its length (any size, any bytes). `script_from_stdin` feeds the script as the job's
//! stdin either way.

use std::path::Path;

use super::config::{ConfigError, JobConfig};

/// Where the job script lives in the guest.
pub const GUEST_SCRIPT_PATH: &str = "/tmp/sge_job_script";
/// The environment variable carrying the script to the bootstrap (removed before the job runs).
pub const SCRIPT_ENV: &str = "SGE_VM_JOB_SCRIPT";
/// A single environment string may not exceed the kernel's MAX_ARG_STRLEN (32 pages) in the
/// guest: larger scripts go through stdin.
pub const MAX_SCRIPT_ENV_BYTES: usize = 128 * 1024 - SCRIPT_ENV.len() - 2;

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
}

/// How a script job's script reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptDelivery {
    /// The guest sees the script at its host path (its directory is shared).
    SharedPath,
    /// Copied by the bootstrap to [`GUEST_SCRIPT_PATH`] (see [`PlacedScript`]).
    Copied,
}

/// A script the bootstrap writes to [`GUEST_SCRIPT_PATH`] before the job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacedScript {
    /// In the environment variable [`SCRIPT_ENV`] (UTF-8, at most [`MAX_SCRIPT_ENV_BYTES`], no
    /// NUL).
    Environment(Vec<u8>),
    /// Ahead of the job's stdin: the bootstrap reads exactly this many bytes first.
    StdinPrefix(Vec<u8>),
}

impl PlacedScript {
    fn for_script(script: Vec<u8>) -> Self {
        // the environment is text: other bytes would not arrive as they are
        let text = std::str::from_utf8(&script).is_ok();
        if text && script.len() <= MAX_SCRIPT_ENV_BYTES && !script.contains(&0) {
            PlacedScript::Environment(script)
        } else {
            PlacedScript::StdinPrefix(script)
        }
    }
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    /// The job's argv as the stock shepherd would exec it.
    pub argv: Vec<String>,
    /// The script to place at [`GUEST_SCRIPT_PATH`] first ([`ScriptDelivery::Copied`]).
    pub script: Option<PlacedScript>,
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
            script: Some(PlacedScript::for_script(script)),
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
    /// the script to [`GUEST_SCRIPT_PATH`] and then execs it. `job_stdin_null`: the job's own
    /// stdin is `/dev/null` (a script that came ahead of stdin leaves only EOF behind it).
    pub fn guest_argv(&self, job_stdin_null: bool) -> Vec<String> {
        let copy = match &self.script {
            None => return self.argv.clone(),
            Some(PlacedScript::Environment(_)) => {
                format!("printf '%s' \"${SCRIPT_ENV}\" >{GUEST_SCRIPT_PATH}")
            }
            // one block of exactly the script's length, read in full: nothing of the job's
            // stdin behind it is consumed
            Some(PlacedScript::StdinPrefix(script)) => format!(
                "dd of={GUEST_SCRIPT_PATH} bs={} count=1 iflag=fullblock status=none",
                script.len().max(1)
            ),
        };
        let stdin = if job_stdin_null { " </dev/null" } else { "" };
        let boot = format!(
            "{copy} && chmod 700 {GUEST_SCRIPT_PATH} && unset {SCRIPT_ENV} && exec \"$@\"{stdin}"
        );
        let mut argv = vec!["/bin/sh".to_string(), "-c".into(), boot, "sge_job".into()];
        argv.extend(self.argv.iter().cloned());
        argv
    }

    /// The script the bootstrap reads from [`SCRIPT_ENV`], if that is its way.
    pub fn script_in_environment(&self) -> Option<&[u8]> {
        match &self.script {
            Some(PlacedScript::Environment(s)) => Some(s),
            _ => None,
        }
    }

    /// The script the guest must read from stdin ahead of the job's own stdin, if that is its
    /// way.
    pub fn script_ahead_of_stdin(&self) -> Option<&[u8]> {
        match &self.script {
            Some(PlacedScript::StdinPrefix(s)) => Some(s),
            _ => None,
        }
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
        let cmd = build(&c, ScriptDelivery::Copied, no_script).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", "-c", "/bin/sleep 300 "]);
        assert_eq!(cmd.guest_argv(true), cmd.argv);
    }

    #[test]
    fn binary_job_without_shell() {
        let c = JobConfig::parse(
            "script_file=/bin/echo\nhandle_as_binary=1\nno_shell=1\nnjob_args=2\njob_arg1=a b\njob_arg2=c\n",
        );
        assert_eq!(
            build(&c, ScriptDelivery::Copied, no_script).unwrap().argv,
            ["/bin/echo", "a b", "c"]
        );
    }

    #[test]
    fn script_modes() {
        let base = "script_file=/spool/job_scripts/3\nhandle_as_binary=0\nshell_path=/bin/sh\nnjob_args=1\njob_arg1=x\n";
        let read = |_: &Path| Ok(b"echo hi\n".to_vec());
        let c = JobConfig::parse(&format!("{base}shell_start_mode=posix_compliant\n"));
        let cmd = build(&c, ScriptDelivery::Copied, read).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", GUEST_SCRIPT_PATH, "x"]);
        assert_eq!(cmd.script_in_environment(), Some(&b"echo hi\n"[..]));
        let c = JobConfig::parse(&format!("{base}shell_start_mode=unix_behavior\n"));
        assert_eq!(
            build(&c, ScriptDelivery::Copied, read).unwrap().argv,
            [GUEST_SCRIPT_PATH, "x"]
        );
        let c = JobConfig::parse(&format!("{base}shell_start_mode=script_from_stdin\n"));
        let cmd = build(&c, ScriptDelivery::SharedPath, read).unwrap();
        assert_eq!(cmd.argv, ["/bin/sh", "-s", "x"]);
        assert_eq!(cmd.stdin_script.as_deref(), Some(&b"echo hi\n"[..]));
        assert_eq!(cmd.script, None);
        assert_eq!(cmd.guest_argv(false), cmd.argv);
        let c = JobConfig::parse(&format!(
            "{base}shell_start_mode=unix_behavior\nstarter_method=/opt/starter\n"
        ));
        assert_eq!(
            build(&c, ScriptDelivery::Copied, read).unwrap().argv,
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

    /// Runs the bootstrap with the host's /bin/sh (and dd) as the guest would, with the script
    /// path redirected into a temporary directory and `stdin` as what the guest agent relays;
    /// returns (exit code, stdout, the script as written).
    fn run_bootstrap(script: &[u8], job_stdin: Option<&[u8]>) -> (Option<i32>, Vec<u8>, Vec<u8>) {
        use std::io::Write;
        let c = JobConfig::parse(
            "script_file=/s\nhandle_as_binary=0\nshell_path=/bin/sh\nnjob_args=1\njob_arg1=arg\n",
        );
        let script = script.to_vec();
        let cmd = build(&c, ScriptDelivery::Copied, |_| Ok(script)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("script");
        let argv: Vec<String> = cmd
            .guest_argv(job_stdin.is_none())
            .into_iter()
            .map(|a| a.replace(GUEST_SCRIPT_PATH, fake.to_str().unwrap()))
            .collect();
        let mut run = std::process::Command::new(&argv[0]);
        run.args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if let Some(s) = cmd.script_in_environment() {
            run.env(SCRIPT_ENV, std::ffi::OsStr::from_bytes(s));
        }
        let mut child = run.spawn().unwrap();
        let mut input = cmd.script_ahead_of_stdin().unwrap_or_default().to_vec();
        input.extend_from_slice(job_stdin.unwrap_or_default());
        let mut stdin = child.stdin.take().unwrap();
        // a thread: the pipe holds less than a large script
        let writer = std::thread::spawn(move || {
            // the job may not read all of its stdin
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let written = std::fs::read(&fake).unwrap_or_default();
        (out.status.code(), out.stdout, written)
    }

    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn bootstrap_writes_and_execs_a_script_from_the_environment() {
        let script = b"echo \"$0:$1\"\nexit 3\n";
        let (code, out, written) = run_bootstrap(script, None);
        assert_eq!(code, Some(3));
        assert_eq!(written, script);
        assert!(
            String::from_utf8_lossy(&out).ends_with("/script:arg\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_large_script_or_one_with_nul_comes_ahead_of_stdin_byte_for_byte() {
        // 1 MiB: far beyond one environment string; the job's stdin follows it untouched
        let mut big = b"echo \"$1\"\ncat\nexit 4\n#".to_vec();
        big.resize(1 << 20, b'x');
        big.push(b'\n');
        let c = JobConfig::parse("script_file=/s\nhandle_as_binary=0\n");
        let cmd = build(&c, ScriptDelivery::Copied, |_| Ok(big.clone())).unwrap();
        assert!(cmd.script_in_environment().is_none());
        assert_eq!(
            cmd.script_ahead_of_stdin().map(<[u8]>::len),
            Some(big.len())
        );
        let (code, out, written) = run_bootstrap(&big, Some(b"the job's own stdin\n"));
        assert_eq!(code, Some(4));
        assert_eq!(written.len(), big.len());
        assert!(written == big);
        assert_eq!(out, b"arg\nthe job's own stdin\n");
        // without stdin of its own the job reads /dev/null after the script
        let (code, out, _) = run_bootstrap(&big, None);
        assert_eq!((code, &out[..]), (Some(4), &b"arg\n"[..]));
        // a NUL byte cannot be in the environment: the same way, and the bytes arrive as they are
        let nul = b"echo nul\nexit 0\n#\0after\n".to_vec();
        let (code, out, written) = run_bootstrap(&nul, None);
        assert_eq!((code, &out[..]), (Some(0), &b"nul\n"[..]));
        assert_eq!(written, nul);
    }

    #[test]
    fn unreadable_script() {
        let c = JobConfig::parse("script_file=/s\nhandle_as_binary=0\n");
        assert!(matches!(
            build(&c, ScriptDelivery::Copied, |_| Err(
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )),
            Err(ArgvError::Script { .. })
        ));
        let just_fits = vec![b'x'; MAX_SCRIPT_ENV_BYTES];
        let cmd = build(&c, ScriptDelivery::Copied, |_| Ok(just_fits.clone())).unwrap();
        assert_eq!(cmd.script_in_environment(), Some(&just_fits[..]));
    }
}
