//! The FUSE passthrough server against a real kernel FUSE client: the host's own, through
//! `/dev/fuse` and a `mount(2)` of type "fuse" (the guest's virtio-fs client speaks the same
//! protocol). Each test mounts its own share on its own mount point and serves it from a thread;
//! the test thread then uses ordinary file system calls on the mount point.
//!
//! Needs root and `/dev/fuse`; without them each test prints `SKIPPED fuse_passthrough: ...`
//! and returns.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::RenameFlags;
use nix::mount::{MntFlags, MsFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use vmm::credentials::ThreadCredentials;
use vmm::fuse::{FuseServer, Handled, MAX_REQUEST};

/// A share served through the kernel at `mountpoint` until dropped.
struct Mounted {
    mountpoint: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

/// Where the kernel's FUSE connection ends: its `/dev/fuse` descriptor and the mount point.
struct KernelMount {
    dev: OwnedFd,
    mountpoint: tempfile::TempDir,
}

/// Opens `/dev/fuse` and mounts a FUSE file system served through it on a fresh directory.
/// Err is the reason the test cannot run here.
fn kernel_mount() -> Result<KernelMount, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root (mounting a FUSE file system needs CAP_SYS_ADMIN)".into());
    }
    let dev: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("cannot open /dev/fuse: {e}"))?
        .into();
    let mountpoint = tempfile::tempdir().expect("mount point");
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        dev.as_raw_fd()
    );
    match nix::mount::mount(
        Some("sgevfs-test"),
        mountpoint.path(),
        Some("fuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    ) {
        Ok(()) => Ok(KernelMount { dev, mountpoint }),
        Err(Errno::EPERM) => Err("mount(2) of a fuse file system: EPERM".into()),
        Err(e) => panic!("mount fuse on {}: {e}", mountpoint.path().display()),
    }
}

impl Mounted {
    fn path(&self) -> &Path {
        self.mountpoint.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Detach even if a test failed with files open, so no mount is left behind; the
        // server then sees ENODEV (or the stop flag) and closes /dev/fuse, which aborts the
        // connection for anything still open.
        if let Err(e) = nix::mount::umount2(self.mountpoint.path(), MntFlags::MNT_DETACH) {
            eprintln!("umount2 {}: {e}", self.mountpoint.path().display());
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Mounts `share` through `/dev/fuse`, served by a thread that first takes `credentials` (if
/// any). Err is the reason the test cannot run here.
fn mount(
    share: &Path,
    read_only: bool,
    credentials: Option<ThreadCredentials>,
) -> Result<Mounted, String> {
    let KernelMount { dev, mountpoint } = kernel_mount()?;
    let server = FuseServer::new(share, read_only).expect("FuseServer::new");
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || serve(dev, server, credentials, &server_stop));
    Ok(Mounted {
        mountpoint,
        stop,
        server: Some(server),
    })
}

/// The server loop: one request per read(), one reply per write(), until the kernel ends the
/// connection (ENODEV after unmount) or the test stops it.
fn serve(
    dev: OwnedFd,
    mut server: FuseServer,
    credentials: Option<ThreadCredentials>,
    stop: &AtomicBool,
) {
    if let Some(credentials) = credentials {
        credentials
            .apply_to_current_thread()
            .expect("server thread takes the job user's credentials");
    }
    let mut request = vec![0u8; MAX_REQUEST + 4096];
    let mut reply = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(dev.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(100u8)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("poll /dev/fuse: {e}"),
        }
        let n = match nix::unistd::read(dev.as_raw_fd(), &mut request) {
            Ok(n) => n,
            // ENOENT: the request was interrupted before it was read; EAGAIN: another reader.
            Err(Errno::EINTR | Errno::ENOENT | Errno::EAGAIN) => continue,
            Err(Errno::ENODEV) => return,
            Err(e) => panic!("read /dev/fuse: {e}"),
        };
        if server.handle(&request[..n], &mut reply) == Handled::Reply {
            match nix::unistd::write(&dev, &reply) {
                Ok(_) | Err(Errno::ENOENT) => {} // ENOENT: the request was aborted meanwhile
                Err(Errno::ENODEV) => return,
                Err(e) => panic!("write /dev/fuse: {e}"),
            }
        }
    }
}

/// A fresh share and its mount, or None (after saying why) when the test cannot run.
fn share_and_mount(
    read_only: bool,
    credentials: Option<ThreadCredentials>,
    prepare: impl FnOnce(&Path),
) -> Option<(tempfile::TempDir, Mounted)> {
    let share = tempfile::tempdir().expect("share");
    prepare(share.path());
    match mount(share.path(), read_only, credentials) {
        Ok(mounted) => Some((share, mounted)),
        Err(reason) => {
            eprintln!("SKIPPED fuse_passthrough: {reason}");
            None
        }
    }
}

/// FNV-1a, enough to compare 1 MiB of data.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn files_written_through_the_mount_are_the_hosts_files() {
    let Some((share, mounted)) = share_and_mount(false, None, |_| {}) else {
        return;
    };
    let mnt = mounted.path();

    fs::write(mnt.join("hello.txt"), b"hello, guest\n").expect("write");
    assert_eq!(
        fs::read(share.path().join("hello.txt")).expect("host read"),
        b"hello, guest\n"
    );
    assert_eq!(
        fs::read(mnt.join("hello.txt")).expect("read"),
        b"hello, guest\n"
    );

    // 1 MiB: several MAX_WRITE writes and reads.
    let big: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(mnt.join("big.bin"), &big).expect("write 1 MiB");
    let host_big = fs::read(share.path().join("big.bin")).expect("host read 1 MiB");
    assert_eq!(checksum(&host_big), checksum(&big));
    let mut back = Vec::new();
    File::open(mnt.join("big.bin"))
        .expect("open")
        .read_to_end(&mut back)
        .expect("read 1 MiB");
    assert_eq!(back.len(), big.len());
    assert_eq!(checksum(&back), checksum(&big));

    // A write at an offset.
    let mut file = OpenOptions::new()
        .write(true)
        .open(mnt.join("hello.txt"))
        .expect("open for writing");
    file.seek(SeekFrom::Start(7)).expect("seek");
    file.write_all(b"HOST").expect("write at offset");
    drop(file);
    assert_eq!(
        fs::read(share.path().join("hello.txt")).expect("host read"),
        b"hello, HOSTt\n"
    );

    // Truncate, chmod, utimes.
    let file = OpenOptions::new()
        .write(true)
        .open(mnt.join("big.bin"))
        .expect("open");
    file.set_len(1000).expect("ftruncate");
    drop(file);
    assert_eq!(
        fs::metadata(share.path().join("big.bin")).unwrap().len(),
        1000
    );
    fs::set_permissions(mnt.join("big.bin"), fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(
        fs::metadata(share.path().join("big.bin")).unwrap().mode() & 0o7777,
        0o640
    );
    let then = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(mnt.join("big.bin"))
        .expect("open")
        .set_modified(then)
        .expect("utimes");
    let host = fs::metadata(share.path().join("big.bin")).unwrap();
    assert_eq!(
        (host.mtime(), host.mtime_nsec()),
        (1_000_000_000, 123_456_789)
    );
    let through = fs::metadata(mnt.join("big.bin")).unwrap();
    assert_eq!(through.modified().unwrap(), then);
    assert_eq!(through.ino(), host.ino(), "attr.ino is the host's st_ino");
    // touch: UTIME_NOW for both times.
    nix::sys::stat::utimensat(
        None,
        &mnt.join("big.bin"),
        &nix::sys::time::TimeSpec::UTIME_NOW,
        &nix::sys::time::TimeSpec::UTIME_NOW,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .expect("utimensat UTIME_NOW");
    let touched = fs::metadata(share.path().join("big.bin")).unwrap();
    assert!(touched.modified().unwrap() > then + Duration::from_secs(1_000_000));

    // fsync, fallocate, SEEK_DATA/SEEK_HOLE reach the host file.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("big.bin"))
        .expect("open");
    file.sync_all().expect("fsync");
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        1 << 20,
    )
    .expect("fallocate");
    assert_eq!(
        fs::metadata(share.path().join("big.bin")).unwrap().len(),
        1 << 20
    );
    let data = nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekData);
    assert_eq!(data, Ok(0));
    let hole =
        nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekHole).expect("SEEK_HOLE");
    assert!(hole > 0 && hole <= 1 << 20, "{hole}");
    drop(file);

    fs::remove_file(mnt.join("big.bin")).expect("unlink");
    assert!(!share.path().join("big.bin").exists());
    eprintln!(
        "fuse_passthrough: wrote, read back (1 MiB checksum), wrote at an offset, truncated, chmod, utimes (set and NOW), fsync, fallocate, SEEK_DATA/SEEK_HOLE, unlinked"
    );
}

#[test]
fn directories_links_and_renames_are_the_hosts() {
    let Some((share, mounted)) = share_and_mount(false, None, |share| {
        fs::write(share.join("from-host"), b"x").unwrap();
    }) else {
        return;
    };
    let mnt = mounted.path();

    fs::create_dir(mnt.join("dir")).expect("mkdir");
    assert!(share.path().join("dir").is_dir());
    for name in ["a", "b", "c"] {
        fs::write(mnt.join("dir").join(name), name).expect("create");
    }
    // Many entries: READDIR continues from the host's offsets across replies.
    for i in 0..300 {
        fs::write(
            mnt.join("dir")
                .join(format!("entry-with-a-long-name-{i:04}")),
            b"",
        )
        .unwrap();
    }
    assert_eq!(
        sorted_names(&mnt.join("dir")),
        sorted_names(&share.path().join("dir"))
    );
    assert_eq!(sorted_names(&mnt.join("dir")).len(), 303);
    assert_eq!(sorted_names(mnt), vec!["dir", "from-host"]);

    fs::rename(mnt.join("dir/a"), mnt.join("dir/renamed")).expect("rename");
    assert!(share.path().join("dir/renamed").exists() && !share.path().join("dir/a").exists());
    let noreplace = nix::fcntl::renameat2(
        None,
        &mnt.join("dir/b"),
        None,
        &mnt.join("dir/c"),
        RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(noreplace, Err(Errno::EEXIST));
    assert_eq!(fs::read(share.path().join("dir/c")).unwrap(), b"c");
    nix::fcntl::renameat2(
        None,
        &mnt.join("dir/b"),
        None,
        &mnt.join("dir/c"),
        RenameFlags::RENAME_EXCHANGE,
    )
    .expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(share.path().join("dir/c")).unwrap(), b"b");

    fs::hard_link(mnt.join("dir/c"), mnt.join("hardlink")).expect("link");
    let host_link = fs::metadata(share.path().join("hardlink")).unwrap();
    assert_eq!(host_link.nlink(), 2);
    assert_eq!(
        host_link.ino(),
        fs::metadata(share.path().join("dir/c")).unwrap().ino()
    );

    std::os::unix::fs::symlink("/etc", mnt.join("to-etc")).expect("symlink");
    assert_eq!(
        fs::read_link(share.path().join("to-etc")).unwrap(),
        PathBuf::from("/etc")
    );
    assert_eq!(
        fs::read_link(mnt.join("to-etc")).unwrap(),
        PathBuf::from("/etc")
    );
    std::os::unix::fs::symlink("../..", mnt.join("dir/up")).expect("symlink");
    assert_eq!(
        fs::read_link(mnt.join("dir/up")).unwrap(),
        PathBuf::from("../..")
    );

    nix::unistd::mkfifo(&mnt.join("fifo"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
    assert!(fs::symlink_metadata(share.path().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    let through = nix::sys::statvfs::statvfs(mnt).expect("statvfs through the mount");
    let host = nix::sys::statvfs::statvfs(share.path()).expect("statvfs of the share");
    assert_eq!(through.blocks(), host.blocks());
    assert_eq!(through.fragment_size(), host.fragment_size());

    assert_eq!(
        fs::remove_dir(mnt.join("dir")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOTEMPTY))
    );
    fs::remove_dir_all(mnt.join("dir")).expect("rm -r");
    assert!(!share.path().join("dir").exists());
    eprintln!("fuse_passthrough: mkdir, readdir of 303 entries, rename (NOREPLACE, EXCHANGE), link, symlink, mkfifo, statfs, rmdir");
}

#[test]
fn the_server_acts_as_the_job_user() {
    const NOBODY: u32 = 65534;
    let credentials = ThreadCredentials {
        uid: NOBODY,
        gid: NOBODY,
        groups: vec![],
    };
    let Some((share, mounted)) = share_and_mount(false, Some(credentials), |share| {
        nix::unistd::chown(
            share,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .expect("chown share");
        fs::write(share.join("root-only"), b"secret").unwrap();
        fs::set_permissions(share.join("root-only"), fs::Permissions::from_mode(0o600)).unwrap();
    }) else {
        return;
    };
    let mnt = mounted.path();

    // The test thread is root; the file still belongs to the server's user.
    fs::write(mnt.join("made-by-guest"), b"data").expect("create through the mount");
    let host = fs::metadata(share.path().join("made-by-guest")).unwrap();
    assert_eq!((host.uid(), host.gid()), (NOBODY, NOBODY));
    fs::create_dir(mnt.join("subdir")).expect("mkdir");
    let host = fs::metadata(share.path().join("subdir")).unwrap();
    assert_eq!((host.uid(), host.gid()), (NOBODY, NOBODY));

    let denied = fs::read(mnt.join("root-only")).expect_err("root's 0600 file is not readable");
    assert_eq!(denied.kind(), ErrorKind::PermissionDenied, "{denied}");
    // access(2) answers for the server's user too, not for the caller (root).
    assert_eq!(
        nix::unistd::access(&mnt.join("root-only"), nix::unistd::AccessFlags::R_OK),
        Err(Errno::EACCES)
    );
    assert_eq!(
        nix::unistd::access(&mnt.join("made-by-guest"), nix::unistd::AccessFlags::W_OK),
        Ok(())
    );
    // Nor can the job user give its file away.
    let chown = nix::unistd::chown(
        &mnt.join("made-by-guest"),
        Some(nix::unistd::Uid::from_raw(0)),
        None,
    );
    assert_eq!(chown, Err(Errno::EPERM));
    eprintln!("fuse_passthrough: files made through the mount belong to 65534; root's 0600 file: read and access(R_OK) EACCES; chown to root: EPERM");
}

#[test]
fn a_read_only_share_refuses_changes() {
    let Some((share, mounted)) = share_and_mount(true, None, |share| {
        fs::write(share.join("existing"), b"read me").unwrap();
    }) else {
        return;
    };
    let mnt = mounted.path();
    assert_eq!(fs::read(mnt.join("existing")).expect("read"), b"read me");
    let create = fs::write(mnt.join("new"), b"x").expect_err("create on a read-only share");
    assert_eq!(create.raw_os_error(), Some(libc::EROFS), "{create}");
    let write = OpenOptions::new()
        .write(true)
        .open(mnt.join("existing"))
        .expect_err("open for writing");
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
    let mkdir = fs::create_dir(mnt.join("d")).expect_err("mkdir");
    assert_eq!(mkdir.raw_os_error(), Some(libc::EROFS), "{mkdir}");
    let unlink = fs::remove_file(mnt.join("existing")).expect_err("unlink");
    assert_eq!(unlink.raw_os_error(), Some(libc::EROFS), "{unlink}");
    assert_eq!(fs::read(share.path().join("existing")).unwrap(), b"read me");
    eprintln!("fuse_passthrough: read-only share: read works; create, open for writing, mkdir, unlink: EROFS");
}

/// Builds a request as the kernel would.
fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    r.extend_from_slice(body);
    r
}

/// (error, body) of a reply.
fn parse_reply(reply: &[u8]) -> (i32, &[u8]) {
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
        reply.len()
    );
    (
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        &reply[16..],
    )
}

/// Escape attempts with forged requests, which the kernel client would never send: the server
/// itself must refuse them.
#[test]
fn forged_lookups_do_not_leave_the_share() {
    const LOOKUP: u32 = 1;
    const INIT: u32 = 26;
    let outer = tempfile::tempdir().unwrap();
    fs::write(outer.path().join("outside"), b"x").unwrap();
    let share = outer.path().join("share");
    fs::create_dir(&share).unwrap();
    std::os::unix::fs::symlink("..", share.join("up")).unwrap();
    std::os::unix::fs::symlink(outer.path(), share.join("abs")).unwrap();

    let mut server = FuseServer::new(&share, false).unwrap();
    let mut reply = Vec::new();
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    server.handle(&request(INIT, 1, 0, &init), &mut reply);
    assert_eq!(parse_reply(&reply).0, 0);

    for name in [
        &b"..\0"[..],
        b"a/../..\0",
        b"../outside\0",
        b"/\0",
        b".\0",
        b"\0",
    ] {
        server.handle(&request(LOOKUP, 2, 1, name), &mut reply);
        assert_eq!(parse_reply(&reply).0, -libc::EINVAL, "{name:?}");
    }
    // The symlinks resolve to node ids of themselves, never of their targets...
    for link in [&b"up\0"[..], b"abs\0"] {
        server.handle(&request(LOOKUP, 3, 1, link), &mut reply);
        let (error, body) = parse_reply(&reply);
        assert_eq!(error, 0);
        let nodeid = u64::from_le_bytes(body[..8].try_into().unwrap());
        let mode = u32::from_le_bytes(body[40 + 60..40 + 64].try_into().unwrap());
        assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK);
        // ...and used as a directory they lead nowhere.
        server.handle(&request(LOOKUP, 4, nodeid, b"outside\0"), &mut reply);
        assert_eq!(parse_reply(&reply).0, -libc::ENOTDIR, "{link:?}");
        server.handle(&request(LOOKUP, 5, nodeid, b"share\0"), &mut reply);
        assert_eq!(parse_reply(&reply).0, -libc::ENOTDIR, "{link:?}");
    }
    // A node id the server never gave out.
    server.handle(&request(LOOKUP, 6, 999, b"outside\0"), &mut reply);
    assert_eq!(parse_reply(&reply).0, -libc::EBADF);
    eprintln!("fuse_passthrough: forged LOOKUPs (.., a/../.., /, symlinks as parents, unknown node id) refused");
}

/// The server in a child process that takes the job user's credentials and then the VMM
/// thread's seccomp filter for file servers (`vmm_thread_filter(true)`), as the VMM thread that
/// serves a virtio-fs share does. A process, not a thread: a system call the filter lacks kills
/// the server (SIGSYS), which closes its `/dev/fuse` and aborts the connection, so the test
/// fails with the signal instead of hanging on requests its own dead thread would never answer.
struct FilteredServer {
    mountpoint: tempfile::TempDir,
    child: nix::unistd::Pid,
}

impl FilteredServer {
    fn start(share: &Path, credentials: ThreadCredentials) -> Result<Self, String> {
        let KernelMount { dev, mountpoint } = kernel_mount()?;
        let filter = vmm::seccomp::vmm_thread_filter(true).expect("the VMM thread's filter");
        let mut request = vec![0u8; MAX_REQUEST + 4096];
        let mut reply = Vec::with_capacity(MAX_REQUEST + 4096);
        // SAFETY: the child only opens the share, runs the server loop and leaves with _exit;
        // it takes no lock another thread of the test process could hold (glibc resets its
        // malloc locks in the child of a fork).
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    // As the VMM does: the identity, then the server (its /proc/self/fd is
                    // this process's), then the filter.
                    credentials.apply_to_current_thread().ok()?;
                    let mut server = FuseServer::new(share, false).ok()?;
                    seccompiler::apply_filter(&filter).ok()?;
                    loop {
                        let n = match nix::unistd::read(dev.as_raw_fd(), &mut request) {
                            Ok(n) => n,
                            Err(Errno::EINTR | Errno::ENOENT | Errno::EAGAIN) => continue,
                            Err(Errno::ENODEV) => return Some(()),
                            Err(_) => return None,
                        };
                        if server.handle(&request[..n], &mut reply) == Handled::Reply {
                            match nix::unistd::write(&dev, &reply) {
                                Ok(_) | Err(Errno::ENOENT) => {}
                                Err(Errno::ENODEV) => return Some(()),
                                Err(_) => return None,
                            }
                        }
                    }
                })();
                // SAFETY: _exit ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(if code.is_some() { 0 } else { 3 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                // Only the child holds the connection now.
                drop(dev);
                Ok(Self { mountpoint, child })
            }
        }
    }

    fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// Unmounts and returns how the server process ended (it ends on ENODEV).
    fn finish(self) -> nix::sys::wait::WaitStatus {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let _ = nix::mount::umount2(self.mountpoint.path(), MntFlags::MNT_DETACH);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(self.child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = nix::sys::signal::kill(self.child, nix::sys::signal::SIGKILL);
                    return waitpid(self.child, None).expect("waitpid");
                }
                Ok(status) => return status,
                Err(e) => panic!("waitpid: {e}"),
            }
        }
    }
}

#[test]
fn the_vmm_threads_seccomp_filter_allows_everything_the_server_does() {
    const NOBODY: u32 = 65534;
    let share = tempfile::tempdir().expect("share");
    nix::unistd::chown(
        share.path(),
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .expect("chown share");
    let credentials = ThreadCredentials {
        uid: NOBODY,
        gid: NOBODY,
        groups: vec![],
    };
    let server = match FilteredServer::start(share.path(), credentials) {
        Ok(s) => s,
        Err(reason) => {
            eprintln!("SKIPPED fuse_passthrough: {reason}");
            return;
        }
    };
    let mnt = server.path().to_path_buf();
    // Every kind of request a guest's jobs make, each checked against the host.
    // The failing step's line, with the error.
    fn at(line: u32, e: impl Into<std::io::Error>) -> std::io::Error {
        let e = e.into();
        std::io::Error::new(e.kind(), format!("line {line}: {e}"))
    }
    let workload = || -> std::io::Result<()> {
        fs::create_dir(mnt.join("d")).map_err(|e| at(line!(), e))?;
        let mut f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(mnt.join("d/f"))
            .map_err(|e| at(line!(), e))?;
        f.write_all(&[7u8; 300_000]).map_err(|e| at(line!(), e))?;
        f.seek(SeekFrom::Start(10)).map_err(|e| at(line!(), e))?;
        let mut b = [0u8; 4];
        f.read_exact(&mut b).map_err(|e| at(line!(), e))?;
        assert_eq!(b, [7; 4]);
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            400_000,
        )
        .map_err(|e| at(line!(), e))?;
        f.set_len(200_000).map_err(|e| at(line!(), e))?;
        f.sync_all().map_err(|e| at(line!(), e))?;
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .map_err(|e| at(line!(), e))?;
        f.set_permissions(fs::Permissions::from_mode(0o640))
            .map_err(|e| at(line!(), e))?;
        drop(f);
        assert_eq!(fs::read_dir(mnt.join("d"))?.count(), 1);
        fs::rename(mnt.join("d/f"), mnt.join("d/g")).map_err(|e| at(line!(), e))?;
        fs::hard_link(mnt.join("d/g"), mnt.join("d/h")).map_err(|e| at(line!(), e))?;
        std::os::unix::fs::symlink("g", mnt.join("d/s")).map_err(|e| at(line!(), e))?;
        assert_eq!(fs::read_link(mnt.join("d/s"))?, Path::new("g"));
        nix::unistd::mkfifo(&mnt.join("d/p"), Mode::from_bits_truncate(0o600))
            .map_err(|e| at(line!(), e))?;
        nix::sys::statvfs::statvfs(&mnt).map_err(|e| at(line!(), e))?;
        nix::unistd::access(&mnt.join("d/g"), nix::unistd::AccessFlags::W_OK)
            .map_err(|e| at(line!(), e))?;
        for name in ["g", "h", "s", "p"] {
            fs::remove_file(mnt.join("d").join(name)).map_err(|e| at(line!(), e))?;
        }
        fs::remove_dir(mnt.join("d")).map_err(|e| at(line!(), e))?;
        Ok(())
    };
    let result = workload();
    let status = server.finish();
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(status.pid().expect("pid"), 0),
        "the filtered server process ended abnormally (SIGSYS: a system call missing from \
         vmm::seccomp's FILE_SERVER list); workload: {result:?}"
    );
    result.expect("every operation through the filtered server");
    assert!(fs::read_dir(share.path()).expect("share").next().is_none());
    eprintln!("fuse_passthrough: a server under the VMM thread's seccomp filter served mkdir, create, write, seek, read, fallocate, truncate, fsync, utimes, chmod, readdir, rename, link, symlink, readlink, mkfifo, statfs, access, unlink, rmdir");
}
