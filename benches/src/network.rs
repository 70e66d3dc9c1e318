//! Benchmark 11: the job's network. TCP from a client to servers on the host's loopback
//! (127.0.0.1, in threads of this process): a stream of 64 MiB into a sink that reads to EOF,
//! and 200 sequential connections to a server that accepts and closes. The same static client
//! (`benches/guest-programs/net_client.c`) runs directly on the host, in a job of
//! `sge_virtualizer run` (eth0 through passt, to the guest's gateway, which is the host's
//! loopback), and, where QEMU has user networking, in a bare QEMU microvm with its own slirp
//! and with passt on a socketpair (`-netdev socket,fd=`, as the QEMU backend attaches it), the
//! same kernel and the same init. The client's own clock times the transfer and the connects;
//! the wall time of a VM variant (its boot included) is recorded next to them.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::BenchContext;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::shepherd_run;

/// Sequential connections per run.
const CONNECTS: usize = 200;
/// MiB streamed per run.
const STREAM_MIB: u64 = 64;
const STREAM_BYTES: u64 = STREAM_MIB << 20;
/// The longest one run of a variant may take (a VM's boot included) before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Where set-up installs the passt it builds (the shepherd's `network::passt::BUILT_PASST`).
const BUILT_PASST: &str = "/usr/local/libexec/sge_virtualizer/passt";
/// QEMU's slirp addresses (its defaults), used for the bare QEMU boots with either netdev.
const GUEST_ADDRESS: &str = "10.0.2.15";
const GATEWAY: &str = "10.0.2.2";

/// The baseline every other variant is compared with.
pub const HOST: &str = "host: client → 127.0.0.1 (no VM)";
/// The comparisons the report's ratio table shows: (metric, what, higher is better).
pub const RATIO_METRICS: [(&str, &str, bool); 4] = [
    ("stream_throughput", "TCP stream, 64 MiB", true),
    ("connect", "connect()", false),
    ("connect_to_close", "connect() to the server's close", false),
    (
        "connect_loop_mean",
        "connect, wait for close, close: mean",
        false,
    ),
];

/// The two servers on 127.0.0.1, each in its own thread, for the whole benchmark.
struct Servers {
    sink_port: u16,
    close_port: u16,
    /// Bytes the sink read from each connection, in order.
    sink_bytes: mpsc::Receiver<u64>,
    stop: Arc<AtomicBool>,
}

impl Servers {
    fn start() -> anyhow::Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the sink")?;
        let close = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a server")?;
        let (sink_port, close_port) = (sink.local_addr()?.port(), close.local_addr()?.port());
        let (tx, sink_bytes) = mpsc::channel();
        let stop_sink = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            for conn in sink.incoming() {
                if stop_sink.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(RUN_LIMIT));
                let mut bytes = 0u64;
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => bytes += n as u64,
                    }
                }
                drop(conn);
                if tx.send(bytes).is_err() {
                    break;
                }
            }
        });
        let stop_close = stop.clone();
        std::thread::spawn(move || {
            for conn in close.incoming() {
                if stop_close.load(Ordering::Relaxed) {
                    break;
                }
                drop(conn);
            }
        });
        Ok(Servers {
            sink_port,
            close_port,
            sink_bytes,
            stop,
        })
    }

    /// Forgets what the sink saw of earlier (failed) runs.
    fn forget(&self) {
        while self.sink_bytes.try_recv().is_ok() {}
    }

    /// Fails unless the sink read the whole stream of the run that just ended.
    fn check_stream(&self) -> anyhow::Result<()> {
        let got = self
            .sink_bytes
            .recv_timeout(Duration::from_secs(10))
            .context("the sink saw no connection end")?;
        if got != STREAM_BYTES {
            bail!("the sink read {got} bytes, expected {STREAM_BYTES}");
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake both accept loops so they see the flag.
        for port in [self.sink_port, self.close_port] {
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        }
    }
}

/// How a child ended, what it wrote, and its wall time (ms, spawn to exit).
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    wall_ms: f64,
}

/// Runs `cmd` (stdout and stderr piped), killing it after [`RUN_LIMIT`].
fn run_within(cmd: &mut Command, what: &str) -> anyhow::Result<Finished> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let pid = child.id() as libc::pid_t;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, killed) = match rx.recv_timeout(RUN_LIMIT) {
        Ok(status) => (status, false),
        Err(_) => {
            // SAFETY: kill with the pid of our child, not yet reaped (the waiter has not
            // returned), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (rx.recv().context("waiting for the child")?, true)
        }
    };
    let status = status.with_context(|| format!("waiting for {what}"))?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if killed {
        bail!(
            "{what} killed after {} s: {}",
            RUN_LIMIT.as_secs(),
            tail(&format!("{stdout}{stderr}"))
        );
    }
    Ok(Finished {
        status,
        stdout,
        stderr,
        wall_ms,
    })
}

/// The last lines of `text`, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" / ")
}

/// The `key=value` fields of the client's `NET_CLIENT <mode> …` line in `text`.
fn client_fields(text: &str, mode: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let prefix = format!("NET_CLIENT {mode} ");
    let Some(line) = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c == '\r' || c.is_whitespace()))
        .find(|l| l.starts_with(&prefix))
    else {
        match text.lines().find(|l| l.contains("NET_CLIENT error")) {
            Some(e) => bail!("the client failed: {}", e.trim()),
            None => bail!("no `{prefix}` line in the output: {}", tail(text)),
        }
    };
    line[prefix.len()..]
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("a field without =")?;
            Ok((k.to_string(), v.parse().with_context(|| kv.to_string())?))
        })
        .collect()
}

fn field(fields: &[(String, f64)], key: &str) -> anyhow::Result<f64> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .with_context(|| format!("no {key}= in the client's line"))
}

/// The client's two lines (connect, then stream) as a sample.
fn client_sample(text: &str) -> anyhow::Result<Sample> {
    let connect = client_fields(text, "connect")?;
    let stream = client_fields(text, "stream")?;
    let bytes = field(&stream, "bytes")?;
    if bytes as u64 != STREAM_BYTES {
        bail!("the client sent {bytes} bytes, expected {STREAM_BYTES}");
    }
    let seconds = field(&stream, "seconds")?;
    Ok(vec![
        ("stream_throughput", bytes / 1e6 / seconds),
        ("connect", field(&connect, "connect_us")?),
        ("connect_to_close", field(&connect, "close_us")?),
        ("connect_loop_mean", field(&connect, "mean_us")?),
        ("clock_resolution", field(&connect, "clock_res_us")?),
    ])
}

/// The client's arguments after the address: the accept-and-close server, then the sink.
fn client_runs(servers: &Servers) -> [(u16, &'static str, u64); 2] {
    [
        (servers.close_port, "connect", CONNECTS as u64),
        (servers.sink_port, "stream", STREAM_MIB),
    ]
}

/// The static client, built from benches/guest-programs/net_client.c into `dir`.
fn build_client(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-programs/net_client.c");
    let out = dir.join("net_client");
    let built = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .output()
        .context("running cc (build-essential)")?;
    if !built.status.success() {
        bail!(
            "cc -static {}: {}",
            source.display(),
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    Ok(out)
}

/// (a) The client directly on the host.
fn host_once(client: &Path, servers: &Servers) -> anyhow::Result<Sample> {
    servers.forget();
    let mut text = String::new();
    for (port, mode, n) in client_runs(servers) {
        let f = run_within(
            Command::new(client)
                .arg("127.0.0.1")
                .arg(port.to_string())
                .arg(mode)
                .arg(n.to_string()),
            "net_client",
        )?;
        if !f.status.success() {
            bail!("net_client {mode}: {} {}", f.status, tail(&f.stdout));
        }
        text.push_str(&f.stdout);
    }
    let sample = client_sample(&text)?;
    servers.check_stream()?;
    Ok(sample)
}

/// The guest's commands: the client against `gateway` (a shell word), connect then stream.
fn guest_commands(client: &str, gateway: &str, servers: &Servers) -> String {
    client_runs(servers)
        .iter()
        .map(|(port, mode, n)| format!("{client} {gateway} {port} {mode} {n}"))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// (b) The product's path: a job of `sge_virtualizer run` whose client connects to the guest's
/// default gateway (passt maps it to the host's loopback).
fn product_once(
    ctx: &BenchContext,
    backend: &str,
    dir: &Path,
    servers: &Servers,
) -> anyhow::Result<Sample> {
    servers.forget();
    let script = format!(
        "set -- $(ip route show default); {}",
        guest_commands("./net_client", "$3", servers)
    );
    let dir = dir.to_str().context("a non-UTF-8 path")?;
    let f = run_within(
        &mut shepherd_run::command_with(
            &ctx.under_test,
            backend,
            &["--cwd", dir],
            &["sh", "-c", &script],
        ),
        "sge_virtualizer run",
    )?;
    if !f.status.success() {
        bail!(
            "run failed ({}): {} {}",
            f.status,
            tail(&f.stdout),
            tail(&f.stderr)
        );
    }
    let mut sample = client_sample(&f.stdout)?;
    servers.check_stream()?;
    let t = shepherd_run::parse_timings(&f.stderr)?;
    if let (Some(spawned), Some(exited)) = (t.job_spawned_ms, t.job_exited_ms) {
        sample.push(("job_duration", exited - spawned));
    }
    sample.push(("wall", f.wall_ms));
    Ok(sample)
}

/// A busybox initramfs whose /init brings eth0 up with QEMU's slirp addresses, runs the client
/// against the gateway and resets the VM (a triple fault with `reboot=t`; `-no-reboot` ends
/// QEMU: microvm without ACPI cannot power off).
fn build_initramfs(dir: &Path, client: &Path, servers: &Servers) -> anyhow::Result<PathBuf> {
    let root = dir.join("initramfs-root");
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (static busybox; Debian's busybox-static)")?;
    for applet in ["sh", "mount", "ip", "reboot", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::copy(client, root.join("net_client"))?;
    let init = format!(
        "#!/bin/sh
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_ADDRESS}/24 dev eth0
ip route add default via {GATEWAY}
{}
echo NET_CLIENT done
reboot -f
",
        guest_commands("/net_client", GATEWAY, servers)
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init)?;
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755))?;
    let archive = dir.join("net-initramfs.cpio");
    let file = std::fs::File::create(&archive)?;
    let status = Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet"])
        .current_dir(&root)
        .stdout(file)
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("find | cpio failed ({status})");
    }
    Ok(archive)
}

/// The network device of a bare QEMU boot.
#[derive(Clone, Copy)]
enum Netdev<'a> {
    /// QEMU's own user networking.
    Slirp,
    /// passt (this binary) on a socketpair, as the QEMU backend attaches it.
    Passt(&'a Path),
}

/// Clears close-on-exec of `fd` in the child, so it inherits it under the same number.
fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: fcntl on a descriptor number is async-signal-safe and touches only the child's
    // descriptor table.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// (c), (d) QEMU microvm booting `kernel` with the bench's initramfs, with `netdev`.
fn qemu_once(
    kernel: &Path,
    initrd: &Path,
    accel: &str,
    netdev: Netdev,
    servers: &Servers,
) -> anyhow::Result<Sample> {
    servers.forget();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "microvm,acpi=off", "-accel", accel, "-cpu", "max"])
        .args(["-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"]);
    let mut passt = None;
    match netdev {
        Netdev::Slirp => {
            qemu.args(["-netdev", "user,id=n0"]);
        }
        Netdev::Passt(binary) => {
            let (qemu_end, passt_end) = UnixStream::pair().context("socketpair")?;
            let mut cmd = Command::new(binary);
            cmd.args(["--foreground", "--one-off", "--quiet", "--ipv4-only"])
                .args(["--fd", &passt_end.as_raw_fd().to_string()])
                .args(["--address", GUEST_ADDRESS, "--netmask", "24"])
                .args(["--gateway", GATEWAY, "--mtu", "1500"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            inherit_fd(&mut cmd, passt_end.as_raw_fd());
            let child = cmd.spawn().context("starting passt")?;
            drop(passt_end);
            qemu.args([
                "-netdev",
                &format!("socket,id=n0,fd={}", qemu_end.as_raw_fd()),
            ]);
            inherit_fd(&mut qemu, qemu_end.as_raw_fd());
            passt = Some((child, qemu_end));
        }
    }
    qemu.args(["-device", "virtio-net-device,netdev=n0,host_mtu=1500"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            // noapictimer as the QEMU backend under TCG with one vCPU (it skips a calibration).
            if accel == "tcg" {
                "console=ttyS0 panic=-1 quiet noapictimer reboot=t"
            } else {
                "console=ttyS0 panic=-1 quiet reboot=t"
            },
        ]);
    // passt ends (--one-off) once every copy of QEMU's end is closed: QEMU's when it exits,
    // ours below.
    let finished = run_within(&mut qemu, "qemu-system-x86_64");
    let passt_log = match passt {
        Some((mut child, end)) => {
            drop(end);
            // --one-off: passt ends when QEMU's end closes.
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if child.try_wait()?.is_none() {
                let _ = child.kill();
            }
            let out = child.wait_with_output()?;
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
        None => String::new(),
    };
    let f = finished?;
    if !f.status.success() {
        bail!(
            "qemu exited with {}: {} {} {}",
            f.status,
            tail(&f.stdout),
            tail(&f.stderr),
            passt_log.trim()
        );
    }
    let mut sample = client_sample(&f.stdout).with_context(|| passt_log.trim().to_string())?;
    servers.check_stream()?;
    sample.push(("wall", f.wall_ms));
    Ok(sample)
}

/// The passt binary the shepherd would use: `$SGE_VIRTUALIZER_PASST`, set-up's build, the PATH.
fn locate_passt() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SGE_VIRTUALIZER_PASST") {
        return Some(PathBuf::from(p));
    }
    if Path::new(BUILT_PASST).is_file() {
        return Some(PathBuf::from(BUILT_PASST));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("passt"))
        .find(|p| p.is_file())
}

/// passt's version: the `passt.version` file scripts/build-passt.sh installs next to it, else
/// what `--version` prints (this passt prints nothing there).
fn version_of(binary: &Path) -> String {
    if let Ok(v) = std::fs::read_to_string(binary.with_file_name("passt.version")) {
        return v.trim().to_string();
    }
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = [o.stdout, o.stderr].concat();
            let line = String::from_utf8_lossy(&text)
                .lines()
                .next()?
                .trim()
                .to_string();
            (!line.is_empty()).then_some(line)
        })
        .unwrap_or_else(|| "version unknown".into())
}

/// Whether `qemu-system-x86_64 -netdev help` lists `user` (slirp compiled in).
fn qemu_has_user_networking() -> bool {
    Command::new("qemu-system-x86_64")
        .args(["-netdev", "help"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "user")
        })
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let dir = ctx.work_dir.join("network");
    std::fs::create_dir_all(&dir)?;
    // The job's --cwd: shared into the guest, readable by whoever the job runs as.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let client = build_client(&dir)?;
    let servers = Servers::start()?;
    let s = &servers;
    let ut = &ctx.under_test;
    let hw = ctx.machine.kvm_can_run_linux;
    let accel = if hw { "kvm" } else { "tcg" };
    let accel_name = if hw { "KVM" } else { "TCG" };
    let passt = locate_passt();

    let slirp = qemu_has_user_networking();
    let initrd = if slirp || passt.is_some() {
        Some(build_initramfs(&dir, &client, s)?)
    } else {
        None
    };

    let mut variants = vec![Variant::new(HOST, "", || host_once(&client, s))];
    variants.push(Variant::new(
        format!("sge_virtualizer run --backend qemu (passt; {accel_name})"),
        "",
        || product_once(ctx, "qemu", &dir, s),
    ));
    if hw {
        variants.push(Variant::new(
            "sge_virtualizer run --backend embedded (passt; KVM)",
            "",
            || product_once(ctx, "embedded", &dir, s),
        ));
    }
    let mut notes = vec![
        format!(
            "One run of a variant: `net_client ADDR PORT connect {CONNECTS}` ({CONNECTS} \
             sequential TCP connections to a server on the host's 127.0.0.1 that accepts and \
             closes each), then `net_client ADDR PORT stream {STREAM_MIB}` ({STREAM_MIB} MiB in \
             64 KiB writes to a sink on 127.0.0.1 that reads to EOF; shutdown(SHUT_WR), then \
             the client waits for the sink's close, and the harness checks that the sink read \
             every byte). Both servers are threads of the harness. The client \
             (benches/guest-programs/net_client.c, `cc -static -O2`) times itself with \
             CLOCK_MONOTONIC: connect = connect() returning (median of the {CONNECTS}), \
             connect_to_close = from connect() to the server's close seen (median), \
             connect_loop_mean = the whole loop / {CONNECTS} (close() included), \
             stream_throughput = bytes / (connect to the sink's close)."
        ),
        format!(
            "Guest code runs under {accel_name} here{}: the ratios to the host are for this \
             machine only, not what the same path gives on hardware KVM. On this {}-core \
             machine the guest's vCPU, QEMU's I/O, passt or slirp and the harness's server \
             threads share the cores.",
            if hw {
                ""
            } else {
                " (software CPU emulation: this host has no vmx/svm)"
            },
            ctx.machine.cores
        ),
        "clock_resolution = CLOCK_MONOTONIC's resolution as the client sees it \
         (clock_getres). Where it is coarser than 1 µs (a guest kernel that fell back to the \
         jiffies clocksource, 4 ms steps: microvm without ACPI has no HPET or PM timer, and \
         under TCG the kernel cannot calibrate the TSC), the per-connection medians come from \
         the CPU's time-stamp counter (under TCG the host's), scaled to CLOCK_MONOTONIC over \
         the whole loop (hundreds of ms there: a few per cent at worst); the stream's time and \
         connect_loop_mean always come from CLOCK_MONOTONIC."
            .into(),
        "The product's path: `sge_virtualizer run --backend qemu -n --timings --cwd DIR -- sh -c \
         'set -- $(ip route show default); ./net_client $3 …'`, the client (in DIR, shared into \
         the guest) connecting to the guest's default gateway, which passt maps to the host's \
         loopback. Its wall (ms) is the whole `run`, the VM's boot and end included, and \
         job_duration the job's own run (job_spawned → job_exited of --timings); the client's \
         timer measures only the connects and the transfer."
            .into(),
    ];
    if let Some(initrd) = &initrd {
        let kernel = &ut.kernel;
        if slirp {
            variants.push(Variant::new(
                format!("QEMU microvm, -netdev user (slirp; {accel_name})"),
                "",
                move || qemu_once(kernel, initrd, accel, Netdev::Slirp, s),
            ));
        }
        if let Some(p) = &passt {
            variants.push(Variant::new(
                format!("QEMU microvm, -netdev socket + passt --fd ({accel_name})"),
                "",
                move || qemu_once(kernel, initrd, accel, Netdev::Passt(p), s),
            ));
        }
        notes.push(format!(
            "The bare QEMU boots: `qemu-system-x86_64 -M microvm,acpi=off -accel {accel} -cpu \
             max -m 256M -smp 1 -nodefaults -no-user-config -display none -no-reboot -serial \
             stdio -netdev … -device virtio-net-device,netdev=n0,host_mtu=1500 -kernel {} \
             -initrd INITRAMFS` (the kernel under test), the initramfs made here with cpio: \
             static busybox and the client, an /init that sets eth0 to {GUEST_ADDRESS}/24 via \
             {GATEWAY} with `ip`, runs the client against {GATEWAY} (prints its lines on the \
             serial console, parsed from QEMU's stdout) and resets the VM. slirp: `-netdev \
             user,id=n0` (its gateway {GATEWAY} reaches the host's 127.0.0.1). passt: `-netdev \
             socket,id=n0,fd=N` on one end of a socketpair, passt on the other (`--foreground \
             --one-off --quiet --ipv4-only --fd N --address {GUEST_ADDRESS} --netmask 24 \
             --gateway {GATEWAY} --mtu 1500`; its default --map-host-loopback is the \
             gateway), as the QEMU backend attaches it, so slirp and passt are compared in the \
             same QEMU with the same kernel and init. Their wall (ms) is QEMU's start to its \
             exit, the boot included; no vsock, agent or job set-up, unlike the product's.",
            ut.kernel.display()
        ));
    }
    if !slirp {
        notes.push(
            "QEMU's user networking is not measured: `qemu-system-x86_64 -netdev help` does \
             not list `user` (a QEMU built without libslirp)."
                .into(),
        );
    }
    match &passt {
        Some(p) => notes.push(format!(
            "passt: {} ({}), the binary the shepherd uses, in the product's path and the bare \
             QEMU boot alike.",
            p.display(),
            version_of(p)
        )),
        None => notes.push(
            "No passt binary found: the bare QEMU boot with passt is not measured (the \
             product's path fails too)."
                .into(),
        ),
    }
    eprintln!(
        "network: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (mut series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    drop(servers);
    for s in &mut series {
        s.unit = match s.metric.as_str() {
            "stream_throughput" => "MB/s",
            "connect" | "connect_to_close" | "connect_loop_mean" | "clock_resolution" => "µs",
            _ => "ms",
        }
        .into();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchResult::measured(
        ctx,
        "network",
        "Job network: guest → host-loopback TCP throughput and connection latency (passt in \
         the product, QEMU's slirp, the host directly)",
        series,
        outcomes,
        notes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_clients_lines_among_console_noise() {
        let text = "[    1.2] random: crng init done\r\n\
            NET_CLIENT connect n=200 connect_us=150.5 connect_p90_us=200.0 close_us=300.25 \
            mean_us=320.0 clock_res_us=4000.0 tsc=1\r\n\
            NET_CLIENT stream bytes=67108864 seconds=0.5\r\n";
        let s = client_sample(text).unwrap();
        assert_eq!(
            s,
            vec![
                ("stream_throughput", 67108864.0 / 1e6 / 0.5),
                ("connect", 150.5),
                ("connect_to_close", 300.25),
                ("connect_loop_mean", 320.0),
                ("clock_resolution", 4000.0),
            ]
        );
        let err = client_sample("NET_CLIENT error connect: Connection refused\n").unwrap_err();
        assert!(format!("{err:#}").contains("Connection refused"), "{err:#}");
        assert!(client_sample("NET_CLIENT stream bytes=5 seconds=1\n").is_err());
    }
}
