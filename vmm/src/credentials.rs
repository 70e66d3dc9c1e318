//! Per-thread credentials: the VMM's threads can take the job user's uid, gid and supplementary
//! groups while the rest of the embedding process (a Grid Engine shepherd running as root) keeps
//! its own. The kernel keeps credentials per thread; glibc's `setresuid` and friends change every
//! thread of the process (through a signal to each), so this module makes the raw system calls,
//! which change the calling thread only.

/// A user identity for a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCredentials {
    /// Real, effective, saved and file-system uid.
    pub uid: u32,
    /// Real, effective, saved and file-system gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why the calling thread could not take the credentials.
#[derive(Debug, thiserror::Error)]
#[error("cannot switch this thread to uid {uid} gid {gid}: {step}: {source}")]
pub struct CredentialsError {
    uid: u32,
    gid: u32,
    step: &'static str,
    source: std::io::Error,
}

impl ThreadCredentials {
    /// Switches the calling thread (only) to these credentials: groups, then gid, then uid, so
    /// that the thread keeps the right to do each step until the last. Irreversible unless the
    /// new uid is 0.
    pub fn apply_to_current_thread(&self) -> Result<(), CredentialsError> {
        let fail = |step| {
            let source = std::io::Error::last_os_error();
            move || CredentialsError {
                uid: self.uid,
                gid: self.gid,
                step,
                source,
            }
        };
        // SAFETY: setgroups reads `groups.len()` gid_t values from a live slice; the raw
        // syscall affects only the calling thread, which is what this function promises.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                self.groups.len(),
                self.groups.as_ptr() as *const libc::gid_t,
            )
        };
        if rc != 0 {
            return Err(fail("setgroups")());
        }
        // SAFETY: plain integer arguments; affects the calling thread only.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, self.gid, self.gid, self.gid) };
        if rc != 0 {
            return Err(fail("setresgid")());
        }
        // SAFETY: plain integer arguments; affects the calling thread only.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid) };
        if rc != 0 {
            return Err(fail("setresuid")());
        }
        Ok(())
    }
}

impl ThreadCredentials {
    /// Runs `f` on a short-lived thread that first takes these credentials, and returns its
    /// result: a root caller acts as the user for one task without changing its own threads.
    /// A panic in `f` is passed on to the caller.
    pub fn run_on_own_thread<T: Send>(
        &self,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T, CredentialsError> {
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                self.apply_to_current_thread()?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The effective uid of the calling thread, by raw syscall (glibc does not cache it).
    fn thread_euid() -> u32 {
        // SAFETY: no arguments, no memory.
        unsafe { libc::syscall(libc::SYS_geteuid) as u32 }
    }

    #[test]
    fn only_the_calling_thread_changes() {
        if thread_euid() != 0 {
            eprintln!("SKIPPED credentials test: needs root to switch uid");
            return;
        }
        let creds = ThreadCredentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let other =
            std::thread::spawn(move || creds.apply_to_current_thread().map(|()| thread_euid()))
                .join()
                .unwrap();
        assert_eq!(other.unwrap(), 65534);
        assert_eq!(thread_euid(), 0, "the main thread kept root");
    }

    #[test]
    fn an_unprivileged_thread_cannot_become_root() {
        if thread_euid() != 0 {
            eprintln!("SKIPPED credentials test: needs root to switch uid");
            return;
        }
        let r = std::thread::spawn(|| {
            let nobody = ThreadCredentials {
                uid: 65534,
                gid: 65534,
                groups: vec![],
            };
            nobody.apply_to_current_thread().unwrap();
            ThreadCredentials {
                uid: 0,
                gid: 0,
                groups: vec![],
            }
            .apply_to_current_thread()
        })
        .join()
        .unwrap();
        let err = r.unwrap_err().to_string();
        assert!(err.contains("setgroups"), "{err}");
    }
}
