//! The job's network end to end (issue 13): a real guest's eth0 through virtio-net and passt to
//! servers this test runs on the host's loopback (no traffic leaves the machine), as the job's
//! user; `--network none`; an allow-list; passt dying under a running job.
//!
//! Every check runs once per backend: `qemu::*` (TCG here) and `embedded::*` (real KVM, in the
//! nested tier; here it says why it did not run).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::{guest_run, parent_pid};
use sha2::{Digest, Sha256};

/// 16 MiB each way.
const VOLUME: usize = 16 << 20;

/// `sge_virtualizer run` of the project's guest on `backend`, stdin closed.
fn run_command(backend: &str, args: &[&str]) -> Command {
    let mut cmd = guest_run(backend);
    cmd.arg("-n").args(args).stdin(Stdio::null());
    cmd
}

fn run_output(backend: &str, args: &[&str]) -> Output {
    run_command(backend, args)
        .output()
        .expect("run sge_virtualizer")
}

/// The host's IPv4 default gateway: under passt the guest's gateway, whose address reaches the
/// host's loopback.
fn host_gateway() -> Ipv4Addr {
    let table = std::fs::read_to_string("/proc/net/route").unwrap();
    table
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000"))
                .then(|| Ipv4Addr::from(u32::from_str_radix(f[2], 16).unwrap().to_ne_bytes()))
        })
        .expect("this host has an IPv4 default route (passt needs one)")
}

/// Who the job runs as: `nobody` when the test is root (so the host side is provably not
/// root's), else the caller.
fn job_user() -> (Vec<String>, u32) {
    if nix::unistd::geteuid().is_root() {
        (vec!["--user".into(), "nobody".into()], 65534)
    } else {
        (Vec::new(), nix::unistd::geteuid().as_raw())
    }
}

/// A directory the job user can read, holding the static UDP client.
fn guest_programs() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/guest-programs/udp_echo.c");
    let built = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.path().join("udp_echo"))
        .arg(source)
        .output()
        .expect("run cc (build-essential; scripts/setup.sh installs it)");
    assert!(built.status.success(), "cc {source}: {built:?}");
    dir
}

/// The owner uid of the host TCP socket whose local port is `port` (`/proc/net/tcp`).
fn tcp_socket_owner(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.split(':').nth(1)?, 16).ok()?;
        (local_port == port).then(|| f.get(7)?.parse().ok())?
    })
}

/// What the host's TCP echo server saw of its one connection.
struct Served {
    sha256: String,
    bytes: usize,
    peer_uid: Option<u32>,
}

/// A TCP server on the host's loopback that echoes `expect` bytes of one connection back as
/// they come, then closes. Returns its port and what it saw.
fn tcp_echo_server(expect: usize) -> (u16, mpsc::Receiver<Served>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let peer_uid = tcp_socket_owner(peer.port());
        let mut back = conn.try_clone().unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut bytes = 0;
        conn.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        while bytes < expect {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    bytes += n;
                    if back.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        drop(back);
        drop(conn);
        let _ = tx.send(Served {
            sha256: format!("{:x}", hash.finalize()),
            bytes,
            peer_uid,
        });
    });
    (port, rx)
}

/// A UDP server on the host's loopback that answers every datagram with `echo: ` and it.
fn udp_echo_server() -> u16 {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = b"echo: ".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    });
    port
}

fn host_name() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A job on eth0: 16 MiB to a TCP server on the host's loopback and the same 16 MiB back,
/// byte-identical; a UDP round trip; the host's name as the guest's, resolving to the guest's
/// (the host's) address; the server sees a socket of the job user, never root's.
fn a_job_reaches_the_hosts_loopback_as_its_user(backend: &str) {
    let (tcp_port, served) = tcp_echo_server(VOLUME);
    let udp_port = udp_echo_server();
    let programs = guest_programs();
    let (user_args, uid) = job_user();
    let script = format!(
        "set -e
         set -- $(ip route show default); gw=$3
         echo gateway=$gw
         head -c {VOLUME} /dev/urandom > /tmp/out
         nc $gw {tcp_port} < /tmp/out > /tmp/in
         sha256sum /tmp/out /tmp/in
         echo hostname=$(hostname)
         ping -c 1 -W 2 $(hostname) 2>&1 | head -n 1
         ip -4 addr show dev eth0 | grep inet
         ./udp_echo $gw {udp_port} hello-udp"
    );
    let mut args: Vec<String> = user_args;
    args.extend(["--cwd".into(), programs.path().display().to_string()]);
    args.extend(["--".into(), "sh".into(), "-c".into(), script]);
    let out = run_output(
        backend,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let stdout = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(&format!("gateway={}", host_gateway())),
        "{stdout}"
    );
    let sums: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("/tmp/out") || l.contains("/tmp/in"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(sums.len(), 2, "{stdout}");
    assert_eq!(sums[0], sums[1], "what came back differs: {stdout}");
    let served = served.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(served.bytes, VOLUME);
    assert_eq!(served.sha256, sums[0], "the server got other bytes");
    assert_eq!(
        served.peer_uid,
        Some(uid),
        "the host socket of the job's connection is not the job user's"
    );
    assert!(
        stdout.contains(&format!("hostname={}\n", host_name())),
        "{stdout}"
    );
    let address = stdout
        .lines()
        .find(|l| l.contains("inet "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no eth0 address: {stdout}"))
        .to_string();
    assert!(
        stdout.contains(&format!("PING {} ({address})", host_name())),
        "the host's name does not resolve to the guest's address: {stdout}"
    );
    assert!(stdout.contains("reply: echo: hello-udp"), "{stdout}");
}

/// `--network none`: no eth0 (only lo, up), and the host's name still the guest's.
fn network_none_leaves_only_loopback(backend: &str) {
    let out = run_output(
        backend,
        &[
            "--network",
            "none",
            "--",
            "sh",
            "-c",
            "ls /sys/class/net; hostname; cat /etc/resolv.conf; ping -c 1 -W 2 127.0.0.1 | tail -n 2",
        ],
    );
    let stdout = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("lo"), "{stdout}");
    assert_eq!(lines.next(), Some(host_name().as_str()), "{stdout}");
    assert!(!stdout.contains("nameserver"), "{stdout}");
    assert!(
        stdout.contains("1 packets received"),
        "lo is not up: {stdout}"
    );
}

/// An allow-list reaches its port, and another port is refused at once (a TCP reset, an ICMP
/// port unreachable for UDP) without the host's server seeing anything.
fn an_allow_list_reaches_its_port_and_is_refused_on_another(backend: &str) {
    let (allowed, allowed_seen) = tcp_echo_server(6);
    let refused_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    refused_listener.set_nonblocking(true).unwrap();
    let refused = refused_listener.local_addr().unwrap().port();
    let udp_port = udp_echo_server();
    let programs = guest_programs();
    let gw = host_gateway();
    let script = format!(
        "set -- $(ip route show default); gw=$3
         echo hello | nc $gw {allowed}; echo allowed-rc=$?
         start=$(date +%s)
         nc $gw {refused} < /dev/null; echo refused-rc=$? after=$(( $(date +%s) - start ))
         ./udp_echo $gw {udp_port} x
         ./udp_echo $gw 53 dns"
    );
    let out = run_output(
        backend,
        &[
            "--allow",
            &format!("{gw}:{allowed}/tcp"),
            // No DNS either: passt must still start (and the resolver is refused like the rest).
            "--no-dns",
            "--cwd",
            programs.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let stdout = stdout_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout.contains("hello\nallowed-rc=0"), "{stdout} {stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("network ended"), "{stderr}");
    let after: u64 = stdout
        .split("after=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(stdout.contains("refused-rc=1"), "{stdout}");
    assert!(
        after <= 5,
        "the refusal took {after} s: a drop, not a reset"
    );
    assert_eq!(
        stdout.matches("recv: Connection refused").count(),
        2,
        "the refused UDP port and the resolver: {stdout}"
    );
    assert_eq!(
        allowed_seen
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .bytes,
        6
    );
    assert!(
        refused_listener.accept().is_err(),
        "the refused port's server got a connection"
    );
}

/// `--inbound-tcp PORT`: a connection to the host's PORT reaches a server the job runs on the
/// same port in the guest (passt binds it on the host as the job user).
fn an_inbound_port_reaches_a_server_in_the_job(backend: &str) {
    let port = {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        probe.local_addr().unwrap().port()
    };
    let (user_args, _) = job_user();
    let mut args: Vec<String> = user_args;
    args.extend(["--inbound-tcp".into(), port.to_string()]);
    args.extend(["--".into(), "sh".into(), "-c".into()]);
    args.push(format!(
        "echo served-from-the-guest | nc -l -p {port}; echo server-done"
    ));
    let child = std::thread::spawn({
        let backend = backend.to_string();
        move || {
            run_output(
                &backend,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        }
    });
    // Until the job listens, passt takes the connection and closes it: try again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let got = loop {
        let mut text = String::new();
        if let Ok(mut conn) = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = conn.read_to_string(&mut text);
        }
        if !text.is_empty() || Instant::now() > deadline || child.is_finished() {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(got, "served-from-the-guest\n");
    let out = child.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout_of(&out), "server-done\n");
}

/// The `passt` children of process `pid`.
fn passt_children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_pid(p) == Some(pid))
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("passt"))
        })
        .collect()
}

/// passt killed under a running job: the job's network is gone, the job is not; it ends with
/// its own status and output, and a warning says what happened. No passt of the job is left.
fn passt_dying_ends_the_network_not_the_job(backend: &str) {
    let child = run_command(
        backend,
        &["--", "sh", "-c", "echo up; sleep 4; echo done; exit 5"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let passt = loop {
        if let Some(&p) = passt_children(pid).first() {
            break p;
        }
        assert!(Instant::now() < deadline, "no passt child appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let the job start, then take its network away.
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill with a pid we just found among our child's children.
    unsafe { libc::kill(passt as i32, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(stdout_of(&out), "up\ndone\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the job's network ended before the job: passt"),
        "no word of the lost network: {stderr}"
    );
    assert!(passt_children(pid).is_empty());
}

integration_tests::backend_suites!(
    (qemu, "qemu"),
    (embedded, "embedded");
    [
        a_job_reaches_the_hosts_loopback_as_its_user,
        network_none_leaves_only_loopback,
        an_allow_list_reaches_its_port_and_is_refused_on_another,
        passt_dying_ends_the_network_not_the_job,
        an_inbound_port_reaches_a_server_in_the_job,
    ]
);
