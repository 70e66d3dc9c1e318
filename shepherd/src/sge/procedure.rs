//! Host-side procedures: prolog, pe_start, pe_stop and epilog (`[user@]path args`, `$var`
//! expanded, split on whitespace and exec'd directly), with the stock shepherd's failure states,
//! and the start of every host command as the job's (or a named) user in the job's working
//! directory, which tells a working directory that cannot be entered (the job owner's error)
//! from a command that cannot be exec'd.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::fcntl::OFlag;
use nix::unistd::User;

use super::config::JobConfig;
use super::environment::JobEnvironment;
use super::expand::{expand, ExpandError, PE_VARIABLES, PROLOG_EPILOG_VARIABLES};
use super::fault::{Fault, JobCause};
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
    /// The working directory could not be entered: the job owner's error (no cwd), whatever
    /// the procedure.
    #[error("error: can't chdir to {}: {source}", cwd.display())]
    Cwd {
        cwd: PathBuf,
        source: std::io::Error,
    },
}

impl ProcedureError {
    /// The shepherd state for this failure of a `kind` procedure: a working directory that
    /// cannot be entered is the job's error, as with the stock shepherd (whose child sets
    /// `SSTATE_NO_CWD` before it fails); anything else means the procedure could not start.
    pub fn state(&self, kind: ProcedureKind) -> ShepherdState {
        match self {
            ProcedureError::Cwd { .. } => Fault::Job(JobCause::Cwd).state(),
            // the procedure's own command line is short: what exec refuses as too large is
            // the job's environment, which the procedure gets
            ProcedureError::Spawn { source, .. } if source.raw_os_error() == Some(libc::E2BIG) => {
                Fault::Job(JobCause::Request).state()
            }
            _ => kind.states().0,
        }
    }
}

/// Why a host command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Entering the working directory failed in the child (as the job owner).
    #[error("error: can't chdir to {}: {source}", cwd.display())]
    Cwd {
        cwd: PathBuf,
        source: std::io::Error,
    },
    /// Anything else: credentials, exec.
    #[error(transparent)]
    Start(std::io::Error),
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
    /// The job owner, whose rights enter the working directory (the stock shepherd's
    /// "intermediate user"), also for a `user@` procedure.
    pub owner: RunAs,
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
        Ok(Some(Procedure {
            kind,
            argv,
            run_as,
            owner: RunAs::from(job_user),
        }))
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
            &self.owner,
            env,
            cwd,
            Stdio::from(stdout),
            Stdio::from(stderr),
        )
        .map_err(|e| match e {
            SpawnError::Cwd { cwd, source } => ProcedureError::Cwd { cwd, source },
            SpawnError::Start(source) => ProcedureError::Spawn {
                kind: self.kind.key(),
                program: self.argv[0].clone(),
                source,
            },
        })
    }
}

/// Starts `cmd` with `run_as`'s credentials (when we are root), `env`, `cwd`, stdin from
/// `/dev/null`, in its own process group. The child enters `cwd` with `owner`'s rights before it
/// takes `run_as`'s, as the stock shepherd does, so the answer is the job owner's at the moment
/// of use (the owner may change the directory's mode after any earlier check). That failure is
/// reported as [`SpawnError::Cwd`]: the child sends its errno through a pipe of its own before
/// it fails, since the error std reports carries only an errno, which an exec failure can share.
pub fn spawn_as(
    mut cmd: Command,
    run_as: &RunAs,
    owner: &RunAs,
    env: &JobEnvironment,
    cwd: &Path,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child, SpawnError> {
    cmd.env_clear()
        .envs(env.iter())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let cwd_c = std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| SpawnError::Start(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let (cwd_report, cwd_report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| SpawnError::Start(e.into()))?;
    let report_fd = cwd_report_w.as_raw_fd();
    let groups: Vec<libc::gid_t> = run_as.groups.clone();
    let (uid, gid) = (run_as.uid, run_as.gid);
    let owner_groups: Vec<libc::gid_t> = owner.groups.clone();
    let (owner_uid, owner_gid) = (owner.uid, owner.gid);
    let privileged = nix::unistd::geteuid().is_root();
    const UNCHANGED: u32 = u32::MAX;
    // SAFETY: only async-signal-safe system calls between fork and exec; the buffers they read
    // (group lists, the path, the errno) live in this closure.
    unsafe {
        cmd.pre_exec(move || {
            let failed = || Err(std::io::Error::last_os_error());
            // the owner's effective ids enter the directory; real and saved stay root
            if privileged
                && (libc::setgroups(owner_groups.len(), owner_groups.as_ptr()) != 0
                    || libc::setresgid(UNCHANGED, owner_gid, UNCHANGED) != 0
                    || libc::setresuid(UNCHANGED, owner_uid, UNCHANGED) != 0)
            {
                return failed();
            }
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                let bytes = errno.to_ne_bytes();
                libc::write(report_fd, bytes.as_ptr().cast(), bytes.len());
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            if privileged
                && (libc::setresuid(UNCHANGED, 0, UNCHANGED) != 0
                    || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0)
            {
                return failed();
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // the child has exec'd or exited by now: what it reported is in the pipe
    drop(cwd_report_w);
    spawned.map_err(|e| {
        let mut errno = [0u8; 4];
        match nix::unistd::read(cwd_report.as_raw_fd(), &mut errno) {
            Ok(4) => SpawnError::Cwd {
                cwd: cwd.to_path_buf(),
                source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
            },
            _ => SpawnError::Start(e),
        }
    })
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

    #[test]
    fn a_cwd_that_cannot_be_entered_is_the_jobs_error_not_an_unstartable_procedure() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("gone");
        let f = File::create(tmp.path().join("o")).unwrap();
        for kind in [
            ProcedureKind::Prolog,
            ProcedureKind::PeStart,
            ProcedureKind::PeStop,
            ProcedureKind::Epilog,
        ] {
            let c = JobConfig::parse(&format!("{}=/bin/true\n", kind.key()));
            let p = Procedure::from_config(kind, &c, &root()).unwrap().unwrap();
            let err = p
                .spawn(
                    &JobEnvironment::default(),
                    &gone,
                    f.try_clone().unwrap(),
                    f.try_clone().unwrap(),
                )
                .unwrap_err();
            assert!(
                matches!(&err, ProcedureError::Cwd { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
                "{err:?}"
            );
            assert_eq!(err.state(kind), ShepherdState::NoCwd);
            assert!(
                err.to_string().starts_with("error: can't chdir to "),
                "{err}"
            );
        }
        // an environment too large for exec is the job's (it comes from the job)
        let c = JobConfig::parse("epilog=/bin/true\n");
        let p = Procedure::from_config(ProcedureKind::Epilog, &c, &root())
            .unwrap()
            .unwrap();
        // 8 MB: beyond what exec takes even under an unlimited stack (6 MiB)
        let mut huge = JobEnvironment::default();
        for i in 0..80 {
            huge.set(&format!("BIG_{i}"), &"x".repeat(100_000));
        }
        let err = p
            .spawn(
                &huge,
                tmp.path(),
                f.try_clone().unwrap(),
                f.try_clone().unwrap(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, ProcedureError::Spawn { source, .. } if source.raw_os_error() == Some(libc::E2BIG)),
            "{err:?}"
        );
        assert_eq!(err.state(ProcedureKind::Epilog), ShepherdState::AppError);
        // a program that cannot be exec'd, in a good directory, is still "before"
        let c = JobConfig::parse("pe_start=/nonexistent/pe_start\n");
        let p = Procedure::from_config(ProcedureKind::PeStart, &c, &root())
            .unwrap()
            .unwrap();
        let err = p
            .spawn(
                &JobEnvironment::default(),
                tmp.path(),
                f.try_clone().unwrap(),
                f,
            )
            .unwrap_err();
        assert_eq!(
            err.state(ProcedureKind::PeStart),
            ShepherdState::BeforePeStart
        );
    }

    #[test]
    fn the_cwd_is_entered_with_the_job_owners_rights_whoever_runs_the_procedure() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED: the_cwd_is_entered_with_the_job_owners_rights_whoever_runs_the_procedure needs root"
            );
            return;
        }
        let Ok(owner) = JobUser::from_config(&JobConfig::parse("job_owner=nobody\n")) else {
            eprintln!("SKIPPED: the_cwd_is_entered_with_the_job_owners_rights_whoever_runs_the_procedure: no user nobody");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &Path, m| {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
        };
        mode(tmp.path(), 0o755);
        let open = tmp.path().join("open");
        let locked = tmp.path().join("locked");
        std::fs::create_dir(&open).unwrap();
        std::fs::create_dir(&locked).unwrap();
        mode(&open, 0o777);
        mode(&locked, 0o700);
        let out = open.join("out");
        let run = |value: &str, cwd: &Path| {
            let c = JobConfig::parse(&format!("prolog={value}\n"));
            let p = Procedure::from_config(ProcedureKind::Prolog, &c, &owner)
                .unwrap()
                .unwrap();
            let f = File::create(&out).unwrap();
            p.spawn(&JobEnvironment::default(), cwd, f.try_clone().unwrap(), f)
                .map(|mut child| {
                    exit_code(child.wait().unwrap());
                    std::fs::read_to_string(&out).unwrap()
                })
        };
        // root may enter it, the owner may not: refused for the owner's procedure and for root's
        for value in ["/usr/bin/id -u", "root@/usr/bin/id -u"] {
            let err = run(value, &locked).unwrap_err();
            assert!(
                matches!(&err, ProcedureError::Cwd { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
                "{value}: {err:?}"
            );
        }
        // where the owner may enter, each runs with its own ids
        assert_eq!(
            run("/usr/bin/id -u", &open).unwrap(),
            format!("{}\n", owner.uid)
        );
        assert_eq!(run("root@/usr/bin/id -u", &open).unwrap(), "0\n");
    }
}
