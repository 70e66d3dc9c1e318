//! Host-side procedures: prolog, pe_start, pe_stop and epilog (`[user@]path args`, `$var`
//! expanded, split on whitespace and exec'd directly), with the stock shepherd's failure states,
//! and the asynchronous command runner the control methods share.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::unistd::User;

use super::config::JobConfig;
use super::environment::JobEnvironment;
use super::expand::{expand, ExpandError, PE_VARIABLES, PROLOG_EPILOG_VARIABLES};
use super::job_user::JobUser;
use super::state::{script_result_state, ShepherdState};

/// Which procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcedureKind {
    Prolog,
    PeStart,
    PeStop,
    Epilog,
}

impl ProcedureKind {
    pub fn key(self) -> &'static str {
        match self {
            ProcedureKind::Prolog => "prolog",
            ProcedureKind::PeStart => "pe_start",
            ProcedureKind::PeStop => "pe_stop",
            ProcedureKind::Epilog => "epilog",
        }
    }

    fn variables(self) -> &'static [&'static str] {
        match self {
            ProcedureKind::Prolog | ProcedureKind::Epilog => PROLOG_EPILOG_VARIABLES,
            ProcedureKind::PeStart | ProcedureKind::PeStop => PE_VARIABLES,
        }
    }

    /// (could not be started, failed) states.
    pub fn states(self) -> (ShepherdState, ShepherdState) {
        use ShepherdState::*;
        match self {
            ProcedureKind::Prolog => (BeforeProlog, PrologFailed),
            ProcedureKind::PeStart => (BeforePeStart, PeStartFailed),
            ProcedureKind::PeStop => (BeforePeStop, PeStopFailed),
            ProcedureKind::Epilog => (BeforeEpilog, EpilogFailed),
        }
    }

    /// The state for an outcome: `None` exit code = could not be started.
    pub fn result_state(self, exit_code: Option<i32>) -> Option<ShepherdState> {
        let (before, failed) = self.states();
        script_result_state(exit_code, before, failed)
    }
}

/// Why a procedure could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ProcedureError {
    #[error("{kind} {value:?}: {source}")]
    Expand {
        kind: &'static str,
        value: String,
        source: ExpandError,
    },
    #[error("{kind}: unknown user {user:?}")]
    User { kind: &'static str, user: String },
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("can't start {kind} {program:?}: {source}")]
    Spawn {
        kind: &'static str,
        program: String,
        source: std::io::Error,
    },
}

/// Credentials a host command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl From<&JobUser> for RunAs {
    fn from(u: &JobUser) -> Self {
        RunAs {
            uid: u.uid,
            gid: u.gid,
            groups: u.groups.clone(),
        }
    }
}

/// A configured procedure, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procedure {
    pub kind: ProcedureKind,
    pub argv: Vec<String>,
    pub run_as: RunAs,
}

impl Procedure {
    /// The procedure from `config`, or `None` when it is missing or `none`.
    pub fn from_config(
        kind: ProcedureKind,
        config: &JobConfig,
        job_user: &JobUser,
    ) -> Result<Option<Self>, ProcedureError> {
        let Some(value) = config
            .get_not_none(kind.key())
            .filter(|v| !v.trim().is_empty())
        else {
            return Ok(None);
        };
        let value = value.trim();
        // `user@/path`: the part before '@' names the user when it has no '/'
        let (user, command) = match value.split_once('@') {
            Some((u, rest)) if !u.contains('/') && !u.contains(' ') => (Some(u), rest),
            _ => (None, value),
        };
        let run_as =
            match user {
                None => RunAs::from(job_user),
                Some(name) => {
                    let u = User::from_name(name).ok().flatten().ok_or_else(|| {
                        ProcedureError::User {
                            kind: kind.key(),
                            user: name.into(),
                        }
                    })?;
                    let mut groups = vec![u.gid.as_raw()];
                    if let Some(g) = job_user.add_grp_id {
                        groups.push(g);
                    }
                    RunAs {
                        uid: u.uid.as_raw(),
                        gid: u.gid.as_raw(),
                        groups,
                    }
                }
            };
        let expanded =
            expand(command, kind.variables(), config).map_err(|source| ProcedureError::Expand {
                kind: kind.key(),
                value: value.into(),
                source,
            })?;
        let argv: Vec<String> = expanded.split_whitespace().map(str::to_string).collect();
        if argv.is_empty() {
            return Err(ProcedureError::Empty { kind: kind.key() });
        }
        Ok(Some(Procedure { kind, argv, run_as }))
    }

    /// Starts it: stdin `/dev/null`, stdout/stderr to the given files, in `cwd`, with `env`
    /// only, in its own process group.
    pub fn spawn(
        &self,
        env: &JobEnvironment,
        cwd: &Path,
        stdout: File,
        stderr: File,
    ) -> Result<Child, ProcedureError> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        spawn_as(
            cmd,
            &self.run_as,
            env,
            cwd,
            Stdio::from(stdout),
            Stdio::from(stderr),
        )
        .map_err(|source| ProcedureError::Spawn {
            kind: self.kind.key(),
            program: self.argv[0].clone(),
            source,
        })
    }
}

/// Starts `cmd` with `run_as`'s credentials (when we are root), `env`, `cwd`, stdin from
/// `/dev/null`, in its own process group. Fails if it cannot be exec'd.
pub fn spawn_as(
    mut cmd: Command,
    run_as: &RunAs,
    env: &JobEnvironment,
    cwd: &Path,
    stdout: Stdio,
    stderr: Stdio,
) -> std::io::Result<Child> {
    cmd.env_clear()
        .envs(env.iter())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let cwd: PathBuf = cwd.to_path_buf();
    let cwd_c = std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let groups: Vec<libc::gid_t> = run_as.groups.clone();
    let (uid, gid) = (run_as.uid, run_as.gid);
    let privileged = nix::unistd::geteuid().is_root();
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if privileged
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // entered as the user, as the stock shepherd does
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Exit code of a finished procedure (128 + signal when killed).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> JobUser {
        JobUser::from_config(&JobConfig::parse("job_owner=root\nadd_grp_id=65431\n")).unwrap()
    }

    #[test]
    fn parses_user_prefix_and_expands() {
        let c = JobConfig::parse(
            "prolog=root@/bin/echo $job_id $host\njob_id=9\nhost=vm\nepilog=NONE\n",
        );
        let p = Procedure::from_config(ProcedureKind::Prolog, &c, &root())
            .unwrap()
            .unwrap();
        assert_eq!(p.argv, ["/bin/echo", "9", "vm"]);
        assert_eq!(p.run_as.uid, 0);
        assert!(p.run_as.groups.contains(&65431));
        assert!(Procedure::from_config(ProcedureKind::Epilog, &c, &root())
            .unwrap()
            .is_none());
        assert!(Procedure::from_config(ProcedureKind::PeStart, &c, &root())
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_variable_and_user() {
        let c = JobConfig::parse("prolog=/bin/echo $job_pid\nepilog=nouser_xyz@/bin/true\n");
        assert!(matches!(
            Procedure::from_config(ProcedureKind::Prolog, &c, &root()),
            Err(ProcedureError::Expand { .. })
        ));
        assert!(matches!(
            Procedure::from_config(ProcedureKind::Epilog, &c, &root()),
            Err(ProcedureError::User { .. })
        ));
    }

    #[test]
    fn runs_with_env_cwd_and_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let c = JobConfig::parse("epilog=/bin/sh -c 'pwd;echo stat;exit 3'\n");
        // whitespace splitting, as the stock shepherd does: quotes are not special
        let p = Procedure::from_config(ProcedureKind::Epilog, &c, &root())
            .unwrap()
            .unwrap();
        assert_eq!(p.argv[2], "'pwd;echo");
        let p = Procedure {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd;echo $SGE_JOBEXIT_STAT;exit 3".into(),
            ],
            ..p
        };
        let mut env = JobEnvironment::default();
        env.set("SGE_JOBEXIT_STAT", "7");
        let f = File::create(&out).unwrap();
        let status = p
            .spawn(&env, tmp.path(), f.try_clone().unwrap(), f)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(exit_code(status), 3);
        assert_eq!(
            ProcedureKind::Epilog.result_state(Some(3)),
            Some(ShepherdState::EpilogFailed)
        );
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text,
            format!("{}\n7\n", tmp.path().canonicalize().unwrap().display())
        );
    }

    #[test]
    fn missing_program_cannot_start() {
        let tmp = tempfile::tempdir().unwrap();
        let c = JobConfig::parse("prolog=/nonexistent/prolog\n");
        let p = Procedure::from_config(ProcedureKind::Prolog, &c, &root())
            .unwrap()
            .unwrap();
        let f = File::create(tmp.path().join("o")).unwrap();
        let err = p.spawn(
            &JobEnvironment::default(),
            tmp.path(),
            f.try_clone().unwrap(),
            f,
        );
        assert!(matches!(err, Err(ProcedureError::Spawn { .. })));
        assert_eq!(
            ProcedureKind::Prolog.result_state(None),
            Some(ShepherdState::BeforeProlog)
        );
        assert_eq!(
            ProcedureKind::Prolog.result_state(Some(99)),
            Some(ShepherdState::Again)
        );
    }
}
