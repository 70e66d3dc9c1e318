//! A VM's runtime directory, laid out by who may write where.
//!
//! The shepherd runs as root and the job's owner has a shell on the host, so no file root
//! creates or reads may live in a directory the job user can write: the user would plant a
//! symlink (or swap a socket for one) under the name root is about to use, and root would write
//! or chown the target. So:
//!
//! * the run directory itself stays this process's own (mode 0711 when another user must pass
//!   through it): the console log and the backends' logs are created there, new and never
//!   through a symlink;
//! * its subdirectory `vm/` holds the VM's sockets. The agent's listening socket is bound there
//!   while only root can write the directory, and handed to the job user; the directory itself
//!   goes to the job user only for a backend whose helper processes bind sockets of their own
//!   there (QEMU's vsock daemon), and root creates nothing there after that.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::path_trust::{self, UntrustedPath};

/// The subdirectory for the VM's sockets.
pub const VM_SUBDIR: &str = "vm";
/// How much of a log's end is read back for an error message.
pub const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// A user and group that a file or directory is handed to.
pub type Owner = (u32, u32);

/// Why the runtime directory could not be laid out or used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("VM runtime directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM runtime directory: {0}")]
    Untrusted(#[from] UntrustedPath),
}

fn io_err(path: &Path) -> impl FnOnce(nix::Error) -> RunDirError + '_ {
    move |e| RunDirError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Opens the directory `path` itself (never a symlink in its place).
fn open_dir(path: &Path) -> Result<OwnedFd, RunDirError> {
    let fd = nix::fcntl::openat(
        None,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(path))?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the file `path` for writing: a new file, never an existing one and never through a
/// symlink (`O_CREAT | O_EXCL | O_NOFOLLOW`, relative to a descriptor of its directory, which
/// must not be a symlink either), mode 0600, close-on-exec. With `owner` it is handed to that
/// user, so that the writes of the user's processes count against the user's disk quota.
pub fn create_file(path: &Path, owner: Option<Owner>) -> Result<File, RunDirError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(RunDirError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    let dir_fd = open_dir(dir)?;
    let fd = nix::fcntl::openat(
        Some(dir_fd.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(io_err(path))?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(io_err(path))?;
    }
    Ok(file)
}

/// The last [`LOG_TAIL_BYTES`] of the log file at `path`, for an error message; empty when it
/// cannot be read. Opened without following a symlink and without blocking on a FIFO, and only
/// a regular file is read, so a log its writer controls cannot make the reader hang or read
/// another file.
pub fn read_log_tail(path: &Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let tail = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(meta.len().saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    tail().unwrap_or_default()
}

/// A laid-out runtime directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    vm_dir: PathBuf,
    vm_dir_fd: OwnedFd,
    /// Who the VM runs as, when another user than this process.
    vm_user: Option<Owner>,
}

impl RunDir {
    /// Lays out `path`, a fresh empty directory this process made (a temporary directory). It
    /// must be this process's own, writable by nobody else, and reached only through
    /// directories nobody else can change ([`path_trust`]); otherwise another user could swap
    /// it. With `vm_user`, it becomes searchable by others (0711: not listable) so that user
    /// can reach the sockets in `vm/`.
    pub fn prepare(path: &Path, vm_user: Option<Owner>) -> Result<RunDir, RunDirError> {
        let euid = nix::unistd::geteuid().as_raw();
        let dir_fd = open_dir(path)?;
        let dir = File::from(dir_fd);
        let meta = dir.metadata().map_err(|source| RunDirError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        path_trust::check_private(path, &meta, euid)?;
        if let Some(parent) = path.parent() {
            path_trust::check_directories(parent, euid)?;
        }
        let vm_user = vm_user.filter(|(uid, _)| *uid != euid);
        let mode = Mode::from_bits_truncate(if vm_user.is_some() { 0o711 } else { 0o700 });
        nix::sys::stat::fchmod(dir.as_raw_fd(), mode).map_err(io_err(path))?;
        let vm_dir = path.join(VM_SUBDIR);
        nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            VM_SUBDIR,
            Mode::from_bits_truncate(0o700),
        )
        .map_err(io_err(&vm_dir))?;
        let vm_dir_fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            VM_SUBDIR,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(&vm_dir))?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        let vm_dir_fd = unsafe { OwnedFd::from_raw_fd(vm_dir_fd) };
        // After mkdir, whose mode the umask trims.
        nix::sys::stat::fchmod(vm_dir_fd.as_raw_fd(), mode).map_err(io_err(&vm_dir))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            vm_dir,
            vm_dir_fd,
            vm_user,
        })
    }

    /// The directory for root's files (logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory for the VM's sockets.
    pub fn vm_dir(&self) -> &Path {
        &self.vm_dir
    }

    /// The user the VM runs as, when another user than this process.
    pub fn vm_user(&self) -> Option<Owner> {
        self.vm_user
    }

    /// Binds a listening socket `name` in `vm/` and hands it to the VM's user, who must be
    /// able to connect to it. Must come before [`RunDir::give_vm_dir`]: while only this
    /// process can write `vm/`, nobody can put a symlink under the name between the bind and
    /// the change of owner.
    pub fn bind_listener(&self, name: &str) -> Result<UnixListener, RunDirError> {
        let path = self.vm_dir.join(name);
        let listener = UnixListener::bind(&path).map_err(|source| RunDirError::Io {
            path: path.clone(),
            source,
        })?;
        if let Some((uid, gid)) = self.vm_user {
            nix::unistd::fchownat(
                Some(self.vm_dir_fd.as_raw_fd()),
                name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io_err(&path))?;
        }
        Ok(listener)
    }

    /// Hands `vm/` to the VM's user, for a backend whose helper processes (running as that
    /// user) create their sockets there. This process creates nothing in it afterwards.
    pub fn give_vm_dir(&self) -> Result<(), RunDirError> {
        if let Some((uid, gid)) = self.vm_user {
            nix::unistd::fchown(
                self.vm_dir_fd.as_raw_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .map_err(io_err(&self.vm_dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const NOBODY: u32 = 65534;

    fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        vmm::ThreadCredentials {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![NOBODY],
        }
        .run_on_own_thread(f)
        .unwrap()
    }

    #[test]
    fn a_new_file_is_never_an_existing_one_nor_a_symlinks_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("console.log")).unwrap();
        assert!(create_file(&dir.path().join("console.log"), None).is_err());
        std::fs::write(dir.path().join("qemu.log"), b"old").unwrap();
        assert!(create_file(&dir.path().join("qemu.log"), None).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // Nor in a directory reached through a symlink.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(create_file(&link.join("other.log"), None).is_err());
        let f = create_file(&dir.path().join("new.log"), None).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_log_tail_is_bounded_and_never_read_through_a_symlink_or_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut text = vec![b'x'; LOG_TAIL_BYTES as usize];
        text.extend_from_slice(b"last line\n");
        std::fs::write(&log, &text).unwrap();
        let tail = read_log_tail(&log);
        assert_eq!(tail.len() as u64, LOG_TAIL_BYTES);
        assert!(tail.ends_with(b"last line\n"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&log, &link).unwrap();
        assert!(read_log_tail(&link).is_empty());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_log_tail(&fifo).is_empty(), "a FIFO with no writer");
    }

    #[test]
    fn the_job_user_can_reach_its_sockets_but_write_nothing_of_roots() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: run_dir ownership test: needs root to act as a job user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::prepare(tmp.path(), Some((NOBODY, NOBODY))).unwrap();
        let listener = run.bind_listener("sock").unwrap();
        let (root_dir, vm_dir) = (run.path().to_path_buf(), run.vm_dir().to_path_buf());
        // Before the hand-over, and always for the run directory: nothing can be added.
        let attempts = as_nobody(|| {
            [
                std::fs::write(root_dir.join("console.log"), b"x").is_err(),
                std::fs::write(vm_dir.join("planted"), b"x").is_err(),
                std::os::unix::net::UnixStream::connect(vm_dir.join("sock")).is_ok(),
            ]
        });
        assert_eq!(attempts, [true, true, true]);
        drop(listener);
        run.give_vm_dir().unwrap();
        let (in_root, in_vm) = as_nobody(|| {
            (
                std::fs::write(root_dir.join("console.log"), b"x").is_ok(),
                std::fs::write(vm_dir.join("vhost.sock"), b"x").is_ok(),
            )
        });
        assert!(!in_root, "the job user wrote in root's directory");
        assert!(in_vm, "the job user's helpers cannot create their sockets");
        let meta = std::fs::metadata(run.path()).unwrap();
        assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o711));
    }

    #[test]
    fn a_run_directory_someone_else_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            RunDir::prepare(&shared, None),
            Err(RunDirError::Untrusted(_))
        ));
        // Below a directory others can write (and not sticky), it could be swapped.
        let inner = shared.join("run");
        std::fs::create_dir(&inner).unwrap();
        assert!(matches!(
            RunDir::prepare(&inner, None),
            Err(RunDirError::Untrusted(_))
        ));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(
            RunDir::prepare(&link, None).is_err(),
            "a symlink in its place"
        );
    }
}
