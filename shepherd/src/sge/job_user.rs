//! The job owner on the host: identity from the password database, the groups the job and its
//! VMM run with (`initgroups` + `add_grp_id` [+ `qsub_gid`]), the min_uid/min_gid checks, and
//! file access performed with the job owner's rights (output files, the job script).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

use super::config::JobConfig;
use super::job_fifo::{self, JobInput};

/// Why the job owner cannot run the job.
#[derive(Debug, thiserror::Error)]
pub enum JobUserError {
    #[error("config has no job_owner")]
    NoOwner,
    #[error("can't look up user {0:?}: {1}")]
    Lookup(String, String),
    #[error("unknown user {0:?}")]
    Unknown(String),
    #[error("uid {uid} of {user} is lower than min_uid {min}")]
    UidTooLow { user: String, uid: u32, min: u64 },
    #[error("gid {gid} of {user} is lower than min_gid {min}")]
    GidTooLow { user: String, gid: u32, min: u64 },
    #[error("can't get the groups of {0}: {1}")]
    Groups(String, String),
    #[error("invalid add_grp_id {0:?}")]
    AddGrpId(String),
}

/// The job owner and the credentials the job runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    /// Primary gid (the `qsub_gid` when USE_QSUB_GID is on).
    pub gid: u32,
    /// Supplementary groups, `add_grp_id` included.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub add_grp_id: Option<u32>,
}

impl JobUser {
    /// Looks up `job_owner` and applies `min_uid`, `min_gid`, `qsub_gid` and `add_grp_id`.
    pub fn from_config(config: &JobConfig) -> Result<Self, JobUserError> {
        let name = config.get("job_owner").ok_or(JobUserError::NoOwner)?;
        let user = User::from_name(name)
            .map_err(|e| JobUserError::Lookup(name.into(), e.to_string()))?
            .ok_or_else(|| JobUserError::Unknown(name.into()))?;
        let min_uid = config.number("min_uid", 0).unwrap_or(0);
        let min_gid = config.number("min_gid", 0).unwrap_or(0);
        let uid = user.uid.as_raw();
        if u64::from(uid) < min_uid {
            return Err(JobUserError::UidTooLow {
                user: name.into(),
                uid,
                min: min_uid,
            });
        }
        let gid = match config
            .get("qsub_gid")
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            Some(g) => g,
            None => user.gid.as_raw(),
        };
        if u64::from(gid) < min_gid {
            return Err(JobUserError::GidTooLow {
                user: name.into(),
                gid,
                min: min_gid,
            });
        }
        let cname = CString::new(name).map_err(|_| JobUserError::Unknown(name.into()))?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, Gid::from_raw(gid))
            .map_err(|e| JobUserError::Groups(name.into(), e.to_string()))?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let add_grp_id = match config.get("add_grp_id").map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| JobUserError::AddGrpId(v.into()))?,
            ),
        };
        if let Some(g) = add_grp_id {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Ok(JobUser {
            name: name.into(),
            uid,
            gid,
            groups,
            home: user.dir,
            add_grp_id,
        })
    }

    /// Runs `f` with this user's effective uid, gid and groups, then returns to root. Needs
    /// real uid 0 and must run while the process has a single thread (the ids are per process).
    pub fn with_rights<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        if !nix::unistd::getuid().is_root() {
            // not privileged (tests): the caller's own rights are the best we have
            return f();
        }
        let groups: Vec<Gid> = self.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        let switch = || -> nix::Result<()> {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setegid(Gid::from_raw(self.gid))?;
            nix::unistd::seteuid(Uid::from_raw(self.uid))
        };
        let switched = switch();
        let result = match switched {
            Ok(()) => f(),
            Err(e) => Err(std::io::Error::from(e)),
        };
        let restored = nix::unistd::seteuid(Uid::from_raw(0))
            .and_then(|_| nix::unistd::setegid(Gid::from_raw(0)))
            .and_then(|_| nix::unistd::setgroups(&[Gid::from_raw(0)]));
        restored.map_err(std::io::Error::from)?;
        result
    }

    /// Opens an output file as the job user: append, create with mode 0644. Never waits: a
    /// FIFO without a reader fails with `ENXIO` (see [`super::job_fifo`]); the file returned
    /// blocks on writes as usual.
    pub fn open_output(&self, path: &Path) -> std::io::Result<File> {
        let f = self
            .with_rights(|| {
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
            })
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => std::io::Error::new(
                    e.kind(),
                    "a FIFO that no process has open for reading (start its reader first)",
                ),
                _ => e,
            })?;
        job_fifo::set_blocking(&f)?;
        Ok(f)
    }

    /// Opens the job's stdin as the job user; a directory is refused. Never waits: a FIFO's
    /// wait for its writer is left to the first read (see [`super::job_fifo`]).
    pub fn open_input(&self, path: &Path) -> std::io::Result<JobInput> {
        let f = self.with_rights(|| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
        })?;
        if f.metadata()?.is_dir() {
            return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
        }
        JobInput::from_nonblocking(f)
    }

    /// Reads a whole file as the job user.
    pub fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.with_rights(|| std::fs::read(path))
    }

    /// The job owner's identity for one thread (see [`vmm::ThreadCredentials`]).
    pub fn thread_credentials(&self) -> vmm::ThreadCredentials {
        vmm::ThreadCredentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Whether the job user can enter `dir`, and if not, why. The check runs on a thread that
    /// has taken the job user's real and effective ids: access(2) answers for the real ids, so
    /// [`Self::with_rights`] (effective ids only) would ask root, who may enter any directory.
    pub fn check_can_enter(&self, dir: &Path) -> std::io::Result<()> {
        let check = || {
            nix::unistd::access(dir, nix::unistd::AccessFlags::X_OK)?;
            if !std::fs::metadata(dir)?.is_dir() {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            Ok(())
        };
        if !nix::unistd::getuid().is_root() {
            // not privileged (tests): the caller's own rights are the best we have
            return check();
        }
        self.thread_credentials()
            .run_on_own_thread(check)
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_with_add_grp_id_and_min_uid() {
        let c = JobConfig::parse("job_owner=root\nadd_grp_id=65432\nmin_uid=0\nmin_gid=0\n");
        let u = JobUser::from_config(&c).unwrap();
        assert_eq!(u.uid, 0);
        assert!(u.groups.contains(&65432));
        assert_eq!(u.add_grp_id, Some(65432));
        let c = JobConfig::parse("job_owner=root\nmin_uid=1000\n");
        assert!(matches!(
            JobUser::from_config(&c),
            Err(JobUserError::UidTooLow { .. })
        ));
        let c = JobConfig::parse("job_owner=no_such_user_xyz\n");
        assert!(matches!(
            JobUser::from_config(&c),
            Err(JobUserError::Unknown(_))
        ));
        let c = JobConfig::parse("job_owner=root\nqsub_gid=4242\n");
        assert_eq!(JobUser::from_config(&c).unwrap().gid, 4242);
    }

    #[test]
    fn files_open_with_the_users_rights() {
        let tmp = tempfile::tempdir().unwrap();
        let u = JobUser::from_config(&JobConfig::parse("job_owner=root\n")).unwrap();
        let p = tmp.path().join("out");
        std::fs::write(&p, "a").unwrap();
        use std::io::Write;
        u.open_output(&p).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ab");
        assert!(u.open_input(tmp.path()).is_err());
        u.check_can_enter(tmp.path()).unwrap();
        let missing = u.check_can_enter(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn a_directory_root_may_enter_but_the_job_user_may_not_is_refused() {
        if !nix::unistd::getuid().is_root() {
            eprintln!("SKIPPED: a_directory_root_may_enter_but_the_job_user_may_not_is_refused needs root");
            return;
        }
        let Ok(u) = JobUser::from_config(&JobConfig::parse("job_owner=nobody\n")) else {
            eprintln!("SKIPPED: a_directory_root_may_enter_but_the_job_user_may_not_is_refused: no user nobody");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        let locked = tmp.path().join("locked");
        for (dir, mode) in [(tmp.path(), 0o755), (&*open, 0o755), (&*locked, 0o700)] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
        }
        u.check_can_enter(&open).unwrap();
        // root's access(2) would say yes: the answer must be the job user's
        for dir in [locked.clone(), locked.join("below")] {
            let err = u.check_can_enter(&dir).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{dir:?}");
        }
        // and the caller keeps its own identity
        assert!(nix::unistd::geteuid().is_root());
    }

    /// Issue 18 item 6: a FIFO as -o or -i used to block `open` on the thread that reads
    /// execd's signals. Now an output FIFO without a reader fails at once, one with a reader
    /// opens for blocking writes, and an input FIFO opens at once.
    #[test]
    fn fifos_never_block_the_open() {
        use crate::sge::job_fifo::tests::bounded;
        use std::io::{Read, Write};
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let u = JobUser::from_config(&JobConfig::parse("job_owner=root\n")).unwrap();
        let limit = Duration::from_secs(10);
        let (user, path) = (u.clone(), fifo.clone());
        let no_reader = bounded(limit, move || user.open_output(&path).err());
        let e = no_reader.expect("an output FIFO without a reader opened");
        assert!(
            e.to_string().contains("no process has open for reading"),
            "{e}"
        );

        let (user, path) = (u.clone(), fifo.clone());
        let mut input = bounded(limit, move || user.open_input(&path)).unwrap();
        // A reader exists now (the job's stdin end): the output side opens, and blocks on
        // writes like any descriptor (O_NONBLOCK cleared).
        let (user, path) = (u.clone(), fifo.clone());
        let mut out = bounded(limit, move || user.open_output(&path)).unwrap();
        // SAFETY: F_GETFL on a descriptor `out` owns.
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&out), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        out.write_all(b"through the fifo").unwrap();
        drop(out);
        let read = bounded(limit, move || {
            let mut s = String::new();
            input.read_to_string(&mut s).map(|_| s)
        });
        assert_eq!(read.unwrap(), "through the fifo");
    }

    #[test]
    fn another_user_is_refused_where_it_has_no_rights() {
        if !nix::unistd::getuid().is_root() {
            eprintln!("SKIPPED: another_user_is_refused_where_it_has_no_rights needs root");
            return;
        }
        let Ok(u) = JobUser::from_config(&JobConfig::parse("job_owner=nobody\n")) else {
            eprintln!("SKIPPED: no user nobody");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        // credentials are per process: switch them in a child, not under the other test threads
        // SAFETY: the child only runs this test's code and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let refused = u
                    .open_output(&tmp.path().join("x"))
                    .is_err_and(|e| e.raw_os_error() == Some(libc::EACCES));
                let root_again = nix::unistd::geteuid().is_root()
                    && std::fs::write(tmp.path().join("y"), "ok").is_ok();
                // SAFETY: _exit ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(if refused && root_again { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
