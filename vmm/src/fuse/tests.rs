//! Tests of the server through `handle`, with requests built byte by byte as the kernel (or a
//! hostile guest) would send them.

use std::fs;
use std::os::unix::fs::symlink;

use proptest::prelude::*;

use super::abi::opcode;
use super::*;

const UNIQUE: u64 = 0x0123_4567_89ab_cdef;

fn request(op: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER_SIZE + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&op.to_le_bytes());
    r.extend_from_slice(&UNIQUE.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    // uid, gid, pid: the server must ignore them (root here, which it must not become).
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Sends one request; returns (error, body) after checking the header's len and unique.
fn call(server: &mut FuseServer, op: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
    let mut reply = Vec::new();
    assert_eq!(
        server.handle(&request(op, nodeid, body), &mut reply),
        Handled::Reply
    );
    assert_eq!(u32_at(&reply, 0) as usize, reply.len());
    assert_eq!(u64_at(&reply, 8), UNIQUE);
    (u32_at(&reply, 4) as i32, reply[16..].to_vec())
}

fn errno(server: &mut FuseServer, op: u32, nodeid: u64, body: &[u8]) -> i32 {
    call(server, op, nodeid, body).0
}

fn init(server: &mut FuseServer, minor: u32) -> (i32, Vec<u8>) {
    call(
        server,
        opcode::INIT,
        0,
        &words(&[7, minor, 65536, 0xffff_ffff]),
    )
}

/// A server on a fresh share, after INIT at 7.38 (what a 6.1 guest sends).
fn server(read_only: bool) -> (tempfile::TempDir, FuseServer) {
    let share = tempfile::tempdir().unwrap();
    let mut server = FuseServer::new(share.path(), read_only).unwrap();
    assert_eq!(init(&mut server, 38).0, 0);
    (share, server)
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn lookup(server: &mut FuseServer, parent: u64, n: &str) -> Result<u64, i32> {
    match call(server, opcode::LOOKUP, parent, &name(n)) {
        (0, body) => Ok(u64_at(&body, 0)),
        (e, _) => Err(e),
    }
}

fn open(server: &mut FuseServer, nodeid: u64, flags: i32) -> Result<u64, i32> {
    match call(server, opcode::OPEN, nodeid, &words(&[flags as u32, 0])) {
        (0, body) => Ok(u64_at(&body, 0)),
        (e, _) => Err(e),
    }
}

fn opendir(server: &mut FuseServer, nodeid: u64) -> Result<u64, i32> {
    match call(server, opcode::OPENDIR, nodeid, &words(&[0, 0])) {
        (0, body) => Ok(u64_at(&body, 0)),
        (e, _) => Err(e),
    }
}

fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&words(&[size, 0, 0, 0, 0, 0]));
    body
}

#[test]
fn the_server_can_move_to_the_device_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<FuseServer>();
}

#[test]
fn requests_too_short_for_a_header_get_no_reply() {
    let (_share, mut server) = server(false);
    let mut reply = vec![1, 2, 3];
    for len in [0, 1, 39] {
        assert_eq!(server.handle(&vec![0u8; len], &mut reply), Handled::NoReply);
        assert!(reply.is_empty());
    }
}

#[test]
fn a_header_whose_len_disagrees_with_the_request_is_einval() {
    let (_share, mut server) = server(false);
    let mut forged = request(opcode::GETATTR, 1, &[0u8; 16]);
    forged[0..4].copy_from_slice(&1000u32.to_le_bytes());
    let mut reply = Vec::new();
    assert_eq!(server.handle(&forged, &mut reply), Handled::Reply);
    assert_eq!(reply.len(), 16);
    assert_eq!(u32_at(&reply, 4) as i32, -libc::EINVAL);
    assert_eq!(u64_at(&reply, 8), UNIQUE);
    // Oversized requests too, even with a matching len.
    let big = request(opcode::GETATTR, 1, &vec![0u8; MAX_REQUEST]);
    assert_eq!(server.handle(&big, &mut reply), Handled::Reply);
    assert_eq!(u32_at(&reply, 4) as i32, -libc::EINVAL);
}

#[test]
fn nothing_is_served_before_init() {
    let share = tempfile::tempdir().unwrap();
    let mut server = FuseServer::new(share.path(), false).unwrap();
    assert_eq!(
        errno(&mut server, opcode::GETATTR, 1, &[0u8; 16]),
        -libc::EIO
    );
    assert_eq!(errno(&mut server, opcode::LOOKUP, 1, b"x\0"), -libc::EIO);
}

#[test]
fn init_negotiates_protocol_7_31_and_offers_only_what_is_implemented() {
    let share = tempfile::tempdir().unwrap();
    let mut server = FuseServer::new(share.path(), false).unwrap();
    let (error, body) = init(&mut server, 38);
    assert_eq!(error, 0);
    assert_eq!(body.len(), 64, "a full fuse_init_out");
    assert_eq!((u32_at(&body, 0), u32_at(&body, 4)), (7, 31));
    assert_eq!(u32_at(&body, 8), 65536, "max_readahead as requested");
    assert_eq!(u32_at(&body, 12), SUPPORTED_INIT_FLAGS);
    assert_eq!(u32_at(&body, 12) & (1 << 13), 0, "no READDIRPLUS");
    assert_eq!(u32_at(&body, 12) & (1 << 22), 0, "no MAX_PAGES");
    assert_eq!(u32_at(&body, 12) & (1 << 1), 0, "no POSIX locks");
    assert_eq!(u32_at(&body, 20), MAX_WRITE);
    assert_eq!(u32_at(&body, 24), 1, "time_gran");
    assert_eq!(u16::from_le_bytes([body[28], body[29]]), 0, "max_pages");
    // Served now; a second INIT is a protocol error.
    assert_eq!(call(&mut server, opcode::GETATTR, 1, &[0u8; 16]).0, 0);
    assert_eq!(init(&mut server, 38).0, -libc::EIO);
}

#[test]
fn init_replies_are_sized_for_older_kernels() {
    let share = tempfile::tempdir().unwrap();
    for (minor, size, negotiated) in [(22, 24, 22), (4, 8, 4), (31, 64, 31), (23, 64, 23)] {
        let mut server = FuseServer::new(share.path(), false).unwrap();
        let (error, body) = init(&mut server, minor);
        assert_eq!(error, 0);
        assert_eq!(body.len(), size, "minor {minor}");
        assert_eq!(u32_at(&body, 4), negotiated);
    }
    // A newer major gets ours, and must INIT again; an older one cannot be served.
    let mut server = FuseServer::new(share.path(), false).unwrap();
    let (error, body) = call(&mut server, opcode::INIT, 0, &words(&[8, 0, 0, 0]));
    assert_eq!((error, u32_at(&body, 0)), (0, 7));
    assert_eq!(
        errno(&mut server, opcode::GETATTR, 1, &[0u8; 16]),
        -libc::EIO
    );
    assert_eq!(
        errno(&mut server, opcode::INIT, 0, &words(&[6, 0, 0, 0])),
        -libc::EPROTO
    );
    assert_eq!(
        errno(&mut server, opcode::INIT, 0, &words(&[7])),
        -libc::EINVAL
    );
}

#[test]
fn names_that_would_leave_a_directory_are_refused() {
    let (share, mut server) = server(false);
    fs::create_dir(share.path().join("sub")).unwrap();
    let sub = lookup(&mut server, 1, "sub").unwrap();
    for bad in ["..", ".", "", "/", "a/../..", "sub/..", "/etc"] {
        assert_eq!(lookup(&mut server, 1, bad), Err(-libc::EINVAL), "{bad:?}");
        assert_eq!(lookup(&mut server, sub, bad), Err(-libc::EINVAL), "{bad:?}");
    }
    // A name without its NUL.
    assert_eq!(errno(&mut server, opcode::LOOKUP, 1, b"sub"), -libc::EINVAL);
    // A negative entry.
    assert_eq!(lookup(&mut server, 1, "missing"), Err(-libc::ENOENT));
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let (share, mut server) = server(false);
    symlink("/etc", share.path().join("etc")).unwrap();
    symlink("..", share.path().join("up")).unwrap();
    let etc = lookup(&mut server, 1, "etc").unwrap();
    let up = lookup(&mut server, 1, "up").unwrap();
    assert_eq!(lookup(&mut server, etc, "passwd"), Err(-libc::ENOTDIR));
    assert_eq!(lookup(&mut server, up, "share"), Err(-libc::ENOTDIR));
    assert_eq!(opendir(&mut server, etc), Err(-libc::ELOOP));
    assert_eq!(open(&mut server, etc, libc::O_RDONLY), Err(-libc::ELOOP));
    let (error, target) = call(&mut server, opcode::READLINK, etc, &[]);
    assert_eq!((error, target.as_slice()), (0, &b"/etc"[..]));
    // CREATE over an existing symlink does not write through it.
    let mut body = words(&[libc::O_WRONLY as u32, 0o644, 0, 0]);
    body.extend_from_slice(&name("etc"));
    assert_eq!(errno(&mut server, opcode::CREATE, 1, &body), -libc::ELOOP);
}

#[test]
fn a_kernel_interface_file_system_is_refused_as_a_share() {
    for root in ["/proc", "/sys"] {
        let err = FuseServer::new(std::path::Path::new(root), true).unwrap_err();
        assert!(
            matches!(err, FuseError::KernelFileSystem { .. }),
            "{root}: {err}"
        );
    }
}

/// procfs mounted at `dir` for the guard's life (detached on drop, so a failing test leaves no
/// busy mount behind).
struct ProcMount(std::path::PathBuf);

impl ProcMount {
    fn at(dir: &std::path::Path) -> nix::Result<Self> {
        nix::mount::mount(
            Some("proc"),
            dir,
            Some("proc"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )?;
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_lookup_into_a_kernel_interface_mount_below_the_share_is_refused() {
    let (share, mut server) = server(false);
    let dir = share.path().join("p");
    fs::create_dir(&dir).unwrap();
    let _mount = match ProcMount::at(&dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED fuse a_lookup_into_a_kernel_interface_mount…: cannot mount procfs here ({e}); needs root");
            return;
        }
    };
    // Before the fix this reached the shepherd's own /proc/self/environ.
    assert_eq!(lookup(&mut server, 1, "p"), Err(-libc::EACCES));
    // An ordinary directory beside it is still served.
    fs::create_dir(share.path().join("d")).unwrap();
    assert!(lookup(&mut server, 1, "d").is_ok());
}

/// Before, each share allowed 65536 inodes and 65536 handles of its own, all drawn from the
/// one process limit: a guest opening directories in a loop took the shepherd to EMFILE.
#[test]
fn the_shares_of_one_vm_draw_on_one_descriptor_budget() {
    let budget = DescriptorBudget::new(4);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fs::create_dir(b_dir.path().join("sub")).unwrap();
    let mut a = FuseServer::with_budget(a_dir.path(), false, budget.clone()).unwrap();
    let mut b = FuseServer::with_budget(b_dir.path(), false, budget.clone()).unwrap();
    assert_eq!(init(&mut a, 38).0, 0);
    assert_eq!(init(&mut b, 38).0, 0);
    let held: Vec<u64> = (0..3).map(|_| opendir(&mut a, 1).unwrap()).collect();
    let sub = lookup(&mut b, 1, "sub").unwrap();
    assert_eq!(budget.left(), 0);
    assert_eq!(opendir(&mut b, 1), Err(-libc::ENFILE));
    assert_eq!(opendir(&mut a, 1), Err(-libc::ENFILE));
    // A lookup of an inode already held costs nothing more.
    assert_eq!(lookup(&mut b, 1, "sub"), Ok(sub));
    let mut release = held[0].to_le_bytes().to_vec();
    release.extend_from_slice(&[0u8; 16]);
    assert_eq!(errno(&mut a, opcode::RELEASEDIR, 1, &release), 0);
    assert_eq!(budget.left(), 1);
    assert!(opendir(&mut b, 1).is_ok());
    // DESTROY (or a transport reset) gives back everything the guest held.
    a.reset();
    assert_eq!(budget.left(), 2);
}

#[test]
fn unknown_node_ids_and_handles_are_errors() {
    let (_share, mut server) = server(false);
    assert_eq!(
        errno(&mut server, opcode::GETATTR, 77, &[0u8; 16]),
        -libc::EBADF
    );
    assert_eq!(lookup(&mut server, 0, "x"), Err(-libc::EBADF));
    assert_eq!(
        open(&mut server, u64::MAX, libc::O_RDONLY),
        Err(-libc::EBADF)
    );
    assert_eq!(
        errno(&mut server, opcode::READ, 1, &read_in(42, 0, 10)),
        -libc::EBADF
    );
    assert_eq!(
        errno(&mut server, opcode::RELEASE, 1, &[0u8; 24]),
        -libc::EBADF
    );
    // A directory handle is not a file handle.
    let dir = opendir(&mut server, 1).unwrap();
    assert_eq!(
        errno(&mut server, opcode::READ, 1, &read_in(dir, 0, 10)),
        -libc::EBADF
    );
    // FORGET of unknown ids (and of the root) changes nothing and is never answered.
    let mut reply = Vec::new();
    let forget = request(opcode::FORGET, 1, &u64::MAX.to_le_bytes());
    assert_eq!(server.handle(&forget, &mut reply), Handled::NoReply);
    assert_eq!(server.inode_count(), 1);
    assert_eq!(call(&mut server, opcode::GETATTR, 1, &[0u8; 16]).0, 0);
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let (share, mut server) = server(true);
    fs::write(share.path().join("f"), b"data").unwrap();
    let f = lookup(&mut server, 1, "f").unwrap();
    let mut create = words(&[libc::O_WRONLY as u32, 0o644, 0, 0]);
    create.extend_from_slice(&name("new"));
    let mut mkdir = words(&[0o755, 0]);
    mkdir.extend_from_slice(&name("d"));
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend_from_slice(&name("f"));
    rename.extend_from_slice(&name("g"));
    let mut write = read_in(1, 0, 1);
    write.push(b'x');
    let refused: Vec<(u32, u64, Vec<u8>)> = vec![
        (opcode::CREATE, 1, create),
        (opcode::MKDIR, 1, mkdir),
        (opcode::UNLINK, 1, name("f")),
        (opcode::RMDIR, 1, name("f")),
        (opcode::RENAME, 1, rename),
        (opcode::SETATTR, f, vec![0u8; 88]),
        (opcode::WRITE, f, write),
        (opcode::OPEN, f, words(&[libc::O_WRONLY as u32, 0])),
        (opcode::OPEN, f, words(&[libc::O_RDWR as u32, 0])),
        (
            opcode::OPEN,
            f,
            words(&[(libc::O_RDONLY | libc::O_TRUNC) as u32, 0]),
        ),
        (opcode::SETXATTR, f, vec![0u8; 16]),
    ];
    for (op, nodeid, body) in refused {
        assert_eq!(errno(&mut server, op, nodeid, &body), -libc::EROFS, "{op}");
    }
    let fh = open(&mut server, f, libc::O_RDONLY).unwrap();
    let (error, data) = call(&mut server, opcode::READ, f, &read_in(fh, 0, 100));
    assert_eq!((error, data.as_slice()), (0, &b"data"[..]));
    assert_eq!(fs::read(share.path().join("f")).unwrap(), b"data");
}

#[test]
fn open_handles_are_bounded() {
    let (_share, mut server) = server(false);
    server.set_limits(100, 3);
    let handles: Vec<u64> = (0..3).map(|_| opendir(&mut server, 1).unwrap()).collect();
    assert_eq!(opendir(&mut server, 1), Err(-libc::ENFILE));
    assert_eq!(server.open_handle_count(), 3);
    let mut release = handles[1].to_le_bytes().to_vec();
    release.extend_from_slice(&[0u8; 16]);
    assert_eq!(errno(&mut server, opcode::RELEASEDIR, 1, &release), 0);
    assert!(opendir(&mut server, 1).is_ok());
}

#[test]
fn inodes_are_bounded_and_forgotten() {
    let (share, mut server) = server(false);
    server.set_limits(3, 100);
    for n in ["a", "b", "c"] {
        fs::write(share.path().join(n), n).unwrap();
    }
    let a = lookup(&mut server, 1, "a").unwrap();
    assert_eq!(
        lookup(&mut server, 1, "a"),
        Ok(a),
        "one host inode, one node id"
    );
    let b = lookup(&mut server, 1, "b").unwrap();
    assert_eq!(lookup(&mut server, 1, "c"), Err(-libc::ENFILE));
    let mut mkdir = words(&[0o755, 0]);
    mkdir.extend_from_slice(&name("d"));
    assert_eq!(errno(&mut server, opcode::MKDIR, 1, &mkdir), -libc::ENFILE);
    assert!(!share.path().join("d").exists(), "refused before creating");

    // FORGET of one of a's two lookups keeps it; BATCH_FORGET of the rest frees both.
    let mut reply = Vec::new();
    let forget = request(opcode::FORGET, a, &1u64.to_le_bytes());
    assert_eq!(server.handle(&forget, &mut reply), Handled::NoReply);
    assert_eq!(server.inode_count(), 3);
    let mut batch = words(&[2, 0]);
    for (id, n) in [(a, 1u64), (b, 1)] {
        batch.extend_from_slice(&id.to_le_bytes());
        batch.extend_from_slice(&n.to_le_bytes());
    }
    let batch = request(opcode::BATCH_FORGET, 0, &batch);
    assert_eq!(server.handle(&batch, &mut reply), Handled::NoReply);
    assert_eq!(server.inode_count(), 1);
    assert_eq!(
        errno(&mut server, opcode::GETATTR, a, &[0u8; 16]),
        -libc::EBADF
    );
    assert!(lookup(&mut server, 1, "c").is_ok());
}

#[test]
fn readdir_lists_the_host_directory_across_replies() {
    let (share, mut server) = server(false);
    let mut expected: Vec<String> = (0..50).map(|i| format!("file-{i:02}")).collect();
    for n in &expected {
        fs::write(share.path().join(n), b"").unwrap();
    }
    expected.extend([".".to_string(), "..".to_string()]);
    expected.sort();
    let dir = opendir(&mut server, 1).unwrap();
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let (error, body) = call(&mut server, opcode::READDIR, 1, &read_in(dir, offset, 256));
        assert_eq!(error, 0);
        assert!(body.len() <= 256);
        if body.is_empty() {
            break;
        }
        let mut at = 0;
        while at < body.len() {
            offset = u64_at(&body, at + 8);
            let len = u32_at(&body, at + 16) as usize;
            names.push(String::from_utf8(body[at + 24..at + 24 + len].to_vec()).unwrap());
            at += (24 + len + 7) & !7;
        }
    }
    names.sort();
    assert_eq!(names, expected);
    // Too small for any entry: an error, not an empty reply (which would mean the end).
    assert_eq!(
        errno(&mut server, opcode::READDIR, 1, &read_in(dir, 0, 8)),
        -libc::EINVAL
    );
}

#[test]
fn files_are_created_written_and_read() {
    let (share, mut server) = server(false);
    let mut create = words(&[(libc::O_RDWR | libc::O_EXCL) as u32, 0o640, 0o022, 0]);
    create.extend_from_slice(&name("new"));
    let (error, body) = call(&mut server, opcode::CREATE, 1, &create);
    assert_eq!(error, 0);
    assert_eq!(body.len(), 128 + 16, "fuse_entry_out + fuse_open_out");
    let nodeid = u64_at(&body, 0);
    let fh = u64_at(&body, 128);
    let mode = u32_at(&body, 40 + 60);
    assert_eq!(mode, libc::S_IFREG | 0o640);
    let mut write = read_in(fh, 3, 5);
    write.extend_from_slice(b"hello");
    let (error, body) = call(&mut server, opcode::WRITE, nodeid, &write);
    assert_eq!((error, u32_at(&body, 0)), (0, 5));
    assert_eq!(fs::read(share.path().join("new")).unwrap(), b"\0\0\0hello");
    let (error, body) = call(&mut server, opcode::READ, nodeid, &read_in(fh, 2, 1 << 30));
    assert_eq!((error, body.as_slice()), (0, &b"\0hello"[..]));
    // A READ larger than MAX_WRITE is cut to it, so the reply fits MAX_REPLY.
    fs::write(share.path().join("new"), vec![7u8; 3 * MAX_WRITE as usize]).unwrap();
    let mut reply = Vec::new();
    let read = request(opcode::READ, nodeid, &read_in(fh, 0, u32::MAX));
    assert_eq!(server.handle(&read, &mut reply), Handled::Reply);
    assert_eq!(reply.len(), MAX_REPLY);
    // O_EXCL on an existing file.
    assert_eq!(
        errno(&mut server, opcode::CREATE, 1, &create),
        -libc::EEXIST
    );
    // The mode the guest asked for, whatever the host process's umask.
    let mut mkdir = words(&[0o777, 0]);
    mkdir.extend_from_slice(&name("open-dir"));
    let (error, body) = call(&mut server, opcode::MKDIR, 1, &mkdir);
    assert_eq!((error, u32_at(&body, 40 + 60)), (0, libc::S_IFDIR | 0o777));
    // Device nodes are refused; fifos are made.
    let mut mknod = words(&[libc::S_IFCHR | 0o666, 0x103, 0, 0]);
    mknod.extend_from_slice(&name("null"));
    assert_eq!(errno(&mut server, opcode::MKNOD, 1, &mknod), -libc::EPERM);
    let mut mkfifo = words(&[libc::S_IFIFO | 0o600, 0, 0, 0]);
    mkfifo.extend_from_slice(&name("fifo"));
    assert_eq!(errno(&mut server, opcode::MKNOD, 1, &mkfifo), 0);
    // RENAME_WHITEOUT is not offered.
    let mut rename2 = 1u64.to_le_bytes().to_vec();
    rename2.extend_from_slice(&words(&[libc::RENAME_WHITEOUT, 0]));
    rename2.extend_from_slice(&name("new"));
    rename2.extend_from_slice(&name("other"));
    assert_eq!(
        errno(&mut server, opcode::RENAME2, 1, &rename2),
        -libc::EINVAL
    );
}

#[test]
fn unimplemented_opcodes_are_enosys() {
    let (_share, mut server) = server(false);
    // GETXATTR, LISTXATTR, GETLK, SETLK, IOCTL, POLL, BMAP, COPY_FILE_RANGE, TMPFILE, unknown.
    for op in [22, 23, 31, 32, 39, 40, 37, 47, 51, 9999, u32::MAX] {
        assert_eq!(errno(&mut server, op, 1, &[0u8; 64]), -libc::ENOSYS, "{op}");
    }
    let mut reply = Vec::new();
    let interrupt = request(opcode::INTERRUPT, 0, &UNIQUE.to_le_bytes());
    assert_eq!(server.handle(&interrupt, &mut reply), Handled::NoReply);
}

#[test]
fn destroy_drops_everything_the_guest_held() {
    let (share, mut server) = server(false);
    fs::write(share.path().join("f"), b"").unwrap();
    let f = lookup(&mut server, 1, "f").unwrap();
    open(&mut server, f, libc::O_RDONLY).unwrap();
    assert_eq!(errno(&mut server, opcode::DESTROY, 0, &[]), 0);
    assert_eq!((server.inode_count(), server.open_handle_count()), (1, 0));
    assert_eq!(
        errno(&mut server, opcode::GETATTR, 1, &[0u8; 16]),
        -libc::EIO
    );
    assert_eq!(init(&mut server, 38).0, 0);
}

/// Checks the invariants of any answer to `request`.
fn check_reply(server: &mut FuseServer, request: &[u8]) -> Result<(), TestCaseError> {
    let mut reply = Vec::new();
    if server.handle(request, &mut reply) == Handled::Reply {
        prop_assert!(request.len() >= IN_HEADER_SIZE);
        prop_assert!(reply.len() >= 16 && reply.len() <= MAX_REPLY);
        prop_assert_eq!(u32_at(&reply, 0) as usize, reply.len());
        prop_assert_eq!(&reply[8..16], &request[8..16]);
        let error = u32_at(&reply, 4) as i32;
        prop_assert!(error <= 0 && error > -4096);
        if error != 0 {
            prop_assert_eq!(reply.len(), 16);
        }
    } else {
        prop_assert!(reply.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let share = tempfile::tempdir().unwrap();
        let mut fresh = FuseServer::new(share.path(), false).unwrap();
        check_reply(&mut fresh, &bytes)?;
        let (_share, mut served) = server(false);
        check_reply(&mut served, &bytes)?;
    }

    #[test]
    fn well_framed_random_requests_never_panic(
        op in 0u32..60,
        nodeid in prop_oneof![Just(1u64), 0u64..4, any::<u64>()],
        body in proptest::collection::vec(any::<u8>(), 0..160),
        read_only in any::<bool>(),
    ) {
        let (share, mut server) = server(read_only);
        fs::write(share.path().join("f"), b"data").unwrap();
        let _ = lookup(&mut server, 1, "f");
        let _ = open(&mut server, 2, libc::O_RDWR);
        let _ = opendir(&mut server, 1);
        check_reply(&mut server, &request(op, nodeid, &body))?;
        // And the server still answers (DESTROY ends the session: INIT comes next).
        let expected = if op == opcode::DESTROY { -libc::EIO } else { 0 };
        prop_assert_eq!(call(&mut server, opcode::GETATTR, 1, &[0u8; 16]).0, expected);
    }
}

/// Runs `f` on another thread and fails the test if it has not returned within 5 s (a blocked
/// server would otherwise hang the test run instead of failing it).
fn within_five_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("the server blocked")
}

#[test]
fn fifos_and_directories_are_never_opened_for_io_so_the_server_cannot_block() {
    let (share, mut server) = server(false);
    nix::unistd::mkfifo(
        &share.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    fs::create_dir(share.path().join("dir")).unwrap();
    let errors = within_five_seconds(move || {
        let fifo = lookup(&mut server, 1, "fifo").unwrap();
        let dir = lookup(&mut server, 1, "dir").unwrap();
        // Each would wait forever for the FIFO's other end if the server opened it plainly: a
        // guest kernel never sends them (it handles FIFOs itself), a hostile guest can.
        let read = open(&mut server, fifo, libc::O_RDONLY);
        let write = open(&mut server, fifo, libc::O_WRONLY);
        let mut truncate = words(&[super::abi::setattr_valid::SIZE, 0]);
        truncate.resize(88, 0);
        let setattr = errno(&mut server, opcode::SETATTR, fifo, &truncate);
        let mut create = words(&[libc::O_WRONLY as u32, 0o600, 0o022, 0]);
        create.extend_from_slice(&name("fifo"));
        let create = errno(&mut server, opcode::CREATE, 1, &create);
        let directory = open(&mut server, dir, libc::O_RDONLY);
        (read, write, setattr, create, directory)
    });
    assert_eq!(
        errors,
        (
            Err(-libc::ENXIO),
            Err(-libc::ENXIO),
            -libc::ENXIO,
            -libc::ENXIO,
            Err(-libc::EISDIR)
        )
    );
}

/// Issue 14: a session saved for a snapshot and restored into a new server over the same share
/// goes on without a new INIT: node ids and handles are the guest's old ones, found again by
/// path (a renamed file under its new name, an O_APPEND handle still appending); files gone
/// since (deleted before or after the snapshot) answer EIO until the guest lets them go; paths
/// a crafted snapshot could hold (a symlink on the way, "..") are never followed.
#[test]
fn a_saved_session_is_restored_by_path_and_gone_files_answer_eio() {
    let (share, mut a) = server(false);
    let root = share.path();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("sub/log"), b"one\n").unwrap();
    fs::write(root.join("gone-later"), b"x").unwrap();
    fs::write(root.join("gone-before"), b"y").unwrap();
    symlink("/etc", root.join("link")).unwrap();
    let sub = lookup(&mut a, 1, "sub").unwrap();
    let log = lookup(&mut a, sub, "log").unwrap();
    let later = lookup(&mut a, 1, "gone-later").unwrap();
    let before = lookup(&mut a, 1, "gone-before").unwrap();
    let append = open(&mut a, log, libc::O_WRONLY | libc::O_APPEND).unwrap();
    let later_fh = open(&mut a, later, libc::O_RDONLY).unwrap();
    let dir_fh = opendir(&mut a, sub).unwrap();
    fs::remove_file(root.join("gone-before")).unwrap();
    fs::rename(root.join("sub"), root.join("moved")).unwrap();

    let saved = a.save_session();
    let paths: Vec<_> = saved.inodes.iter().map(|i| i.path.clone()).collect();
    assert!(paths.contains(&Some(b"moved/log".to_vec())), "{paths:?}");
    assert!(
        paths.contains(&None),
        "the deleted file has no path: {paths:?}"
    );
    let mut saved: SessionState =
        postcard::from_bytes(&postcard::to_stdvec(&saved).unwrap()).unwrap();
    drop(a);
    fs::remove_file(root.join("gone-later")).unwrap();
    // Crafted entries: never followed out of the share.
    for (nodeid, path) in [
        (900, &b"link/passwd"[..]),
        (901, b"../x"),
        (902, b"moved/../log"),
    ] {
        saved.inodes.push(session_state::SavedInode {
            nodeid,
            lookups: 1,
            file_type: libc::S_IFREG,
            path: Some(path.to_vec()),
        });
    }

    let mut b = FuseServer::new(root, false).unwrap();
    let report = b.restore_session(&saved);
    assert_eq!(
        report,
        RestoreReport {
            inodes: 2,
            handles: 2,
            vanished_inodes: 5,
            vanished_handles: 1,
        }
    );
    // No INIT: the session goes on. The O_APPEND handle appends whatever offset comes.
    let mut write = read_in(append, 0, 4);
    write.extend_from_slice(b"two\n");
    assert_eq!(errno(&mut b, opcode::WRITE, log, &write), 0);
    assert_eq!(fs::read(root.join("moved/log")).unwrap(), b"one\ntwo\n");
    assert_eq!(
        lookup(&mut b, sub, "log"),
        Ok(log),
        "one inode, one node id"
    );
    let mut release = dir_fh.to_le_bytes().to_vec();
    release.extend_from_slice(&[0u8; 16]);
    assert_eq!(errno(&mut b, opcode::RELEASEDIR, sub, &release), 0);
    // Gone files: EIO until released or forgotten, then unknown.
    for nodeid in [later, before, 900, 901, 902] {
        assert_eq!(
            errno(&mut b, opcode::GETATTR, nodeid, &[0u8; 16]),
            -libc::EIO,
            "node id {nodeid}"
        );
    }
    assert_eq!(
        errno(&mut b, opcode::READ, later, &read_in(later_fh, 0, 1)),
        -libc::EIO
    );
    let mut release = later_fh.to_le_bytes().to_vec();
    release.extend_from_slice(&[0u8; 16]);
    assert_eq!(errno(&mut b, opcode::RELEASE, later, &release), 0);
    assert_eq!(
        errno(&mut b, opcode::RELEASE, later, &release),
        -libc::EBADF
    );
    let mut reply = Vec::new();
    let forget = request(opcode::FORGET, later, &1u64.to_le_bytes());
    assert_eq!(b.handle(&forget, &mut reply), Handled::NoReply);
    assert_eq!(
        errno(&mut b, opcode::GETATTR, later, &[0u8; 16]),
        -libc::EBADF
    );
    // New node ids and handles never reuse the restored ones.
    fs::write(root.join("new"), b"z").unwrap();
    assert!(lookup(&mut b, 1, "new").unwrap() > 902);
    assert!(opendir(&mut b, 1).unwrap() > dir_fh.max(later_fh).max(append));
    // A node id given twice (a crafted snapshot) is left out, not a panic.
    let mut twice = b.save_session();
    twice.inodes.push(twice.inodes[0].clone());
    let mut c = FuseServer::new(root, false).unwrap();
    let report = c.restore_session(&twice);
    assert_eq!(
        report.inodes + report.vanished_inodes,
        twice.inodes.len() - 1
    );
}
