//! The seccomp allow-lists really block: a thread that installed the vCPU (or VMM-thread) filter
//! and then makes a system call outside it kills the process with SIGSYS. Each check runs in a
//! child process (this test binary re-executed), since the kill takes the whole process.
//! That the allow-lists are wide enough for real work is shown by the VM tests, which run with
//! seccomp on.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

/// Runs `test_name` of this binary in a child with `CHILD_ENV` set; returns (signal, stderr).
fn run_child(test_name: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    (
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// In the child: on a new thread named `name`, runs `prepare` (before the filter, as the VMM
/// creates its fds before starting the thread), installs `filter`, runs `allowed` (which must
/// succeed), reports, then runs `forbidden` (which must not return).
fn child_body<T: 'static>(
    name: &str,
    filter: seccompiler::BpfProgram,
    prepare: fn() -> T,
    allowed: fn(T),
    forbidden: fn(),
) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let prepared = prepare();
            seccompiler::apply_filter(&filter).unwrap();
            allowed(prepared);
            eprintln!("ALLOWED-SYSCALLS-OK");
            forbidden();
            eprintln!("FORBIDDEN-SYSCALL-RETURNED");
        })
        .unwrap()
        .join()
        .unwrap();
}

fn vcpu_prepare() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(0).unwrap()
}

fn vcpu_allowed(irqfd: vmm_sys_util::eventfd::EventFd) {
    // What a vCPU thread does: signal an irqfd (eventfd write), take a lock, allocate.
    irqfd.write(1).unwrap();
    let m = std::sync::Mutex::new(vec![1u8; 1 << 20]);
    m.lock().unwrap().push(2);
    drop(irqfd);
}

fn vcpu_forbidden() {
    // A compromised vCPU thread trying to open a host file.
    // SAFETY: plain syscall with a valid NUL-terminated path.
    unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
}

#[test]
fn vcpu_filter_blocks_a_syscall_outside_its_allow_list() {
    if std::env::var(CHILD_ENV).is_ok() {
        child_body(
            "vcpu0",
            vmm::seccomp::vcpu_filter().unwrap(),
            vcpu_prepare,
            vcpu_allowed,
            vcpu_forbidden,
        );
        return;
    }
    let (signal, stderr) = run_child("vcpu_filter_blocks_a_syscall_outside_its_allow_list");
    assert!(
        stderr.contains("ALLOWED-SYSCALLS-OK"),
        "child stderr: {stderr}"
    );
    assert!(
        !stderr.contains("FORBIDDEN-SYSCALL-RETURNED"),
        "child stderr: {stderr}"
    );
    assert_eq!(signal, Some(libc::SIGSYS), "child stderr: {stderr}");
}

fn vmm_prepare() -> (std::os::unix::net::UnixListener, std::path::PathBuf) {
    // The VMM binds its listener before the VMM thread starts; so does this check.
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("listener");
    let _ = std::fs::remove_file(&path);
    (std::os::unix::net::UnixListener::bind(&path).unwrap(), path)
}

fn vmm_allowed((listener, path): (std::os::unix::net::UnixListener, std::path::PathBuf)) {
    // The vsock muxer's kind of work: connect to a Unix listener, accept, nonblocking I/O.
    use std::io::{Read, Write};
    let mut a = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let (mut b, _) = listener.accept().unwrap();
    a.set_nonblocking(true).unwrap();
    a.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    b.read_exact(&mut buf).unwrap();
}

fn vmm_forbidden() {
    // An IP socket: the VMM thread may only create Unix sockets.
    // SAFETY: plain syscall; the result is not used.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

#[test]
fn vmm_thread_filter_blocks_ip_sockets() {
    if std::env::var(CHILD_ENV).is_ok() {
        child_body(
            "vmm",
            vmm::seccomp::vmm_thread_filter(false).unwrap(),
            vmm_prepare,
            vmm_allowed,
            vmm_forbidden,
        );
        return;
    }
    let (signal, stderr) = run_child("vmm_thread_filter_blocks_ip_sockets");
    assert!(
        stderr.contains("ALLOWED-SYSCALLS-OK"),
        "child stderr: {stderr}"
    );
    assert!(
        !stderr.contains("FORBIDDEN-SYSCALL-RETURNED"),
        "child stderr: {stderr}"
    );
    assert_eq!(signal, Some(libc::SIGSYS), "child stderr: {stderr}");
}

/// What the virtio-net device uses on the VMM thread, set up before the filter as the VMM does:
/// the stream to passt, passt's end, the device's epoll set and its eventfd.
struct NetIo {
    stream: vmm::virtio::net::passt_stream::PasstStream,
    peer: std::os::unix::net::UnixStream,
    epoll: vmm_sys_util::epoll::Epoll,
    more: vmm_sys_util::eventfd::EventFd,
}

fn net_prepare() -> NetIo {
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = std::sync::Arc::new(std::os::fd::OwnedFd::from(ours));
    NetIo {
        stream: vmm::virtio::net::passt_stream::PasstStream::new(fd).unwrap(),
        peer,
        epoll: vmm_sys_util::epoll::Epoll::new().unwrap(),
        more: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }
}

fn net_allowed(io: NetIo) {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
    let NetIo {
        stream,
        mut peer,
        epoll,
        more,
    } = io;
    // A length-prefixed frame each way (send with MSG_DONTWAIT | MSG_NOSIGNAL, recv with
    // MSG_DONTWAIT).
    let mut wire = vmm::virtio::net::passt_stream::encode_len(60)
        .unwrap()
        .to_vec();
    wire.extend_from_slice(&[0x5a; 60]);
    assert_eq!(stream.send(&wire).unwrap(), wire.len());
    let mut got = vec![0u8; wire.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, wire);
    peer.write_all(&wire).unwrap();
    assert_eq!(stream.recv(&mut got).unwrap(), wire.len());
    // Watching the socket for what the device waits for, and waking itself.
    let fd = stream.as_raw_fd();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    epoll
        .ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(EventSet::OUT, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 2];
    assert_eq!(epoll.wait(0, &mut events).unwrap(), 1);
    epoll
        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        .unwrap();
    more.write(1).unwrap();
    more.read().unwrap();
    // passt gone: EPIPE, not SIGPIPE; then the device closes its end.
    drop(peer);
    let e = stream.send(&wire).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    drop(stream);
}

#[test]
fn vmm_thread_filter_allows_the_net_device_stream_io() {
    if std::env::var(CHILD_ENV).is_ok() {
        child_body(
            "vmm",
            vmm::seccomp::vmm_thread_filter(false).unwrap(),
            net_prepare,
            net_allowed,
            vmm_forbidden,
        );
        return;
    }
    let (signal, stderr) = run_child("vmm_thread_filter_allows_the_net_device_stream_io");
    assert!(
        stderr.contains("ALLOWED-SYSCALLS-OK"),
        "child stderr: {stderr}"
    );
    assert!(
        !stderr.contains("FORBIDDEN-SYSCALL-RETURNED"),
        "child stderr: {stderr}"
    );
    assert_eq!(signal, Some(libc::SIGSYS), "child stderr: {stderr}");
}
