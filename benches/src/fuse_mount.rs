//! The FUSE server behind the host kernel's own FUSE client: a share mounted through
//! `/dev/fuse` (needs root) and served by one thread, which counts the READ and WRITE requests
//! that reach it. Unmounted (detached) on drop.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use vmm::fuse::{FuseServer, Handled, MAX_REQUEST};

use crate::virtio_fs_driver::{FUSE_READ, FUSE_WRITE};

/// Requests of each kind the server thread has answered.
#[derive(Default)]
pub struct Served {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

pub struct FuseMount {
    at: PathBuf,
    served: Arc<Served>,
    thread: Option<JoinHandle<()>>,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn c_path(p: &Path) -> anyhow::Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

impl FuseMount {
    /// Serves `share` at the (existing, empty) directory `at`. Err says why it cannot here.
    pub fn new(share: &Path, at: &Path) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("not root (mounting a FUSE file system needs CAP_SYS_ADMIN)");
        }
        let dev: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse")?
            .into();
        let options = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        ))?;
        let (source, target, fstype) = (c"sgevfs-bench", c_path(at)?, c"fuse");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!("mount(2) of type fuse on {}: {}", at.display(), errno());
        }
        // Created after the mount so that a failed mount leaves no thread behind.
        let server = FuseServer::new(share, false).context("FuseServer::new")?;
        let served = Arc::new(Served::default());
        let counts = served.clone();
        let thread = std::thread::spawn(move || serve(&dev, server, &counts));
        Ok(Self {
            at: at.to_path_buf(),
            served,
            thread: Some(thread),
        })
    }

    pub fn served(&self) -> &Served {
        &self.served
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // Detaching ends the connection once nothing uses the mount; the blocked read then
        // fails with ENODEV and the thread returns.
        if let Ok(target) = c_path(&self.at) {
            // SAFETY: a NUL-terminated path that outlives the call.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!("umount2 {}: {}", self.at.display(), errno());
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request per read(2) of `/dev/fuse`, one reply per write(2), until the connection ends.
fn serve(dev: &OwnedFd, mut server: FuseServer, served: &Served) {
    let mut request = vec![0u8; MAX_REQUEST + 4096];
    let mut reply = Vec::new();
    loop {
        // SAFETY: reads into our buffer, at most its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), request.as_mut_ptr().cast(), request.len()) };
        if n < 0 {
            match errno().raw_os_error() {
                // Interrupted, or a request aborted before it was read.
                Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => continue,
                _ => return,
            }
        }
        let request = &request[..n as usize];
        match request
            .get(4..8)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        {
            Some(FUSE_READ) => served.reads.fetch_add(1, Ordering::Relaxed),
            Some(FUSE_WRITE) => served.writes.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if server.handle(request, &mut reply) == Handled::Reply {
            // SAFETY: writes from our buffer, its length.
            let w = unsafe { libc::write(dev.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
            if w < 0 && errno().raw_os_error() == Some(libc::ENODEV) {
                return;
            }
        }
    }
}
