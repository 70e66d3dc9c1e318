//! How the VM's helper processes (QEMU, the vsock daemon, passt) are started: as the job user,
//! tied to the life of the thread that starts them, keeping only the descriptors they are given.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::VmmCredentials;

/// Prepares `cmd`: the job's credentials if given (and not already this process's: the VMM
/// process runs as the job user), and death with the shepherd. A shepherd that is killed
/// outright (SIGKILL: no destructor runs) must not leave its VM or helpers behind. The
/// parent-death signal is tied to the thread that spawns the child, which is the thread that
/// runs the job to its end. `keep_fds`: descriptors of the shepherd's that the child keeps,
/// under the same numbers, across exec (every other one the shepherd opened is close-on-exec).
/// Keeping the numbers, rather than moving them to fixed ones, cannot clobber a descriptor of
/// the child's (such as std's exec-error pipe).
pub fn prepare_helper(cmd: &mut Command, creds: Option<&VmmCredentials>, keep_fds: &[RawFd]) {
    let creds = creds.cloned();
    let keep_fds = keep_fds.to_vec();
    // SAFETY: getpid has no preconditions.
    let shepherd = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // on data captured by value (allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep_fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(c) = creds.as_ref().filter(|c| libc::geteuid() != c.uid) {
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                    || libc::setgid(c.gid) < 0
                    || libc::setuid(c.uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the credential change, which clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != shepherd {
                // The shepherd died before the signal was armed.
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
