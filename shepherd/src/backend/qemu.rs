//! The QEMU backend: `qemu-system-x86_64 -M microvm` with a vhost-user vsock device served by
//! `vhost-device-vsock`. Used where KVM cannot run a Linux guest (TCG then) and in tests.
//!
//! Two host processes per VM: the vsock daemon (started first; it creates the vhost-user
//! socket QEMU connects to) and QEMU. Both run with the job's credentials when given, and both
//! are killed when the VM ends. They create sockets only (in the VM's socket directory, theirs);
//! their logs and the guest console are files the shepherd creates in its own directory and
//! hands them as open descriptors, so no root-read file is named by a path the job user
//! controls.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::helper_process::prepare_helper;
use super::{BackendError, EndedBy, RunningVm, VmBackend, VmExit, VmKiller, VmSpec};
use crate::network::link::DeviceLink;
use crate::run_dir;

/// The guest's vsock context id (any value ≥ 3; each VM has its own daemon).
const GUEST_CID: u32 = 3;
/// The vsock daemon's log in the run directory.
const VHOST_LOG: &str = "vhost-device-vsock.log";
/// QEMU's log in the run directory.
const QEMU_LOG: &str = "qemu.log";
/// The fd set QEMU finds the console log's descriptor in (`-add-fd`).
const CONSOLE_FDSET: u32 = 1;

/// Finds the programs QEMU needs.
pub struct QemuBackend {
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    accel: String,
}

/// Looks for `name` in `$override_var`, then `/usr/local/bin` (where set-up installs), then
/// `PATH`, then `extra` directories. `/usr/local/bin` comes before `PATH` because the program
/// may run as the job user, who cannot execute from root's `~/.cargo/bin` that root's `PATH`
/// often lists.
pub fn find_program(name: &str, override_var: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(override_var) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/local/bin"))
        .chain(std::env::split_paths(&path))
        .chain(extra.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl QemuBackend {
    /// Finds `qemu-system-x86_64` and `vhost-device-vsock` (override with
    /// `SGE_VIRTUALIZER_QEMU` / `SGE_VIRTUALIZER_VHOST_VSOCK`; `SGE_VIRTUALIZER_QEMU_ACCEL`
    /// picks the accelerator; by default `kvm` where KVM can run a Linux guest, else `tcg`).
    pub fn locate() -> Result<Self, BackendError> {
        let mut extra = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            extra.push(PathBuf::from(home).join(".cargo/bin"));
        }
        extra.push(PathBuf::from("/root/.cargo/bin"));
        let qemu = find_program("qemu-system-x86_64", "SGE_VIRTUALIZER_QEMU", &extra).ok_or_else(
            || {
                BackendError::Unavailable(
                    "qemu-system-x86_64 not found (install Debian's qemu-system-x86)".into(),
                )
            },
        )?;
        let vhost_vsock = find_program("vhost-device-vsock", "SGE_VIRTUALIZER_VHOST_VSOCK", &extra)
            .ok_or_else(|| {
                BackendError::Unavailable(
                    "vhost-device-vsock not found (cargo install vhost-device-vsock --locked)"
                        .into(),
                )
            })?;
        // Jobs with shared directories always take QEMU, so on hosts with hardware
        // virtualization QEMU must use it too rather than emulate the CPU.
        let accel = std::env::var("SGE_VIRTUALIZER_QEMU_ACCEL").unwrap_or_else(|_| {
            if super::embedded::usable().0 {
                "kvm".into()
            } else {
                "tcg".into()
            }
        });
        Ok(QemuBackend {
            qemu,
            vhost_vsock,
            accel,
        })
    }
}

fn wait_for_path(path: &Path, child: &mut Child, patience: Duration) -> Result<(), BackendError> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            return Err(BackendError::Start(format!(
                "vhost-device-vsock exited early ({status})"
            )));
        }
        if start.elapsed() > patience {
            return Err(BackendError::Start(format!(
                "vhost-device-vsock did not create {} within {patience:?}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A path inside a QEMU option value: commas are doubled.
fn option_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The OS image as the first virtio-blk disk (read-only: QEMU opens the file read-only and the
/// guest sees a read-only device), and each share as a virtio-9p device served by QEMU itself.
///
/// 9p uses `security_model=none`: QEMU, running as the job user, creates files as itself and
/// its permission checks are the job user's; `multidevs=remap` keeps inode numbers unique
/// when a share spans several host file systems.
/// The virtio-balloon device: free page reporting (the guest hands back what it frees; QEMU
/// punches it out of the memfd), and the guest may deflate under memory pressure. Never inflated
/// by the host: the guest keeps all the RAM it was given.
const BALLOON_DEVICE: &str = "virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on";

/// QEMU's virtio-net device on the stream `fd` (`-netdev socket` speaks passt's framing).
fn network_args(net: Option<&crate::network::VmNetwork>, fd: Option<RawFd>) -> Vec<String> {
    let (Some(net), Some(fd)) = (net, fd) else {
        return Vec::new();
    };
    let mac: Vec<String> = net.mac.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        "-netdev".into(),
        format!("socket,id=net0,fd={fd}"),
        "-device".into(),
        format!(
            "virtio-net-device,netdev=net0,mac={},host_mtu={}",
            mac.join(":"),
            net.mtu
        ),
    ]
}

fn disk_and_share_args(spec: &VmSpec) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(disk) = &spec.root_disk {
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,format=raw,readonly=on,id=root",
            option_path(disk)
        ));
        args.push("-device".into());
        args.push("virtio-blk-device,drive=root".into());
    }
    for (i, share) in spec.shares.iter().enumerate() {
        args.push("-fsdev".into());
        args.push(format!(
            "local,id=fs{i},path={},security_model=none,multidevs=remap{}",
            option_path(&share.host_path),
            if share.read_only { ",readonly=on" } else { "" }
        ));
        args.push("-device".into());
        args.push(format!(
            "virtio-9p-device,fsdev=fs{i},mount_tag={}",
            share.tag
        ));
    }
    args
}

impl QemuBackend {
    /// The kernel command line for this backend: microvm has no i8042 to pulse, so a
    /// triple-fault reset ends it (with -no-reboot). (With `reboot=k`, as the shared command
    /// line once had, the guest polled the missing keyboard controller 10 × 65536 times before
    /// its fallback: a second under TCG, about 10 s under nested KVM, where each port read is a
    /// VM exit.) Under TCG with one vCPU, `noapictimer`
    /// skips the emulated APIC timer's calibration, about 0.2 s of every boot
    /// (benches/REPORT.md, compare-cmdline); with more vCPUs it gains nothing.
    fn cmdline(&self, spec: &VmSpec) -> String {
        let tcg_single = self.accel == "tcg" && spec.vcpus <= 1;
        format!(
            "{}{} reboot=t",
            if tcg_single { "noapictimer " } else { "" },
            spec.cmdline
        )
    }
}

impl VmBackend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn attaches_disks(&self) -> bool {
        true
    }

    fn attaches_shares(&self) -> bool {
        true
    }

    fn helpers_create_sockets(&self) -> bool {
        true
    }

    fn log_files(&self) -> &'static [&'static str] {
        &[VHOST_LOG, QEMU_LOG]
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, BackendError> {
        let vhost_sock = spec.vsock_uds.with_file_name("vhost-vsock.sock");
        // The helpers write these as the job user: the job user's files, on the user's quota.
        let daemon_log = spec.logs.open(VHOST_LOG)?;
        let mut daemon_cmd = Command::new(&self.vhost_vsock);
        daemon_cmd
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhost_sock.display(),
                spec.vsock_uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(daemon_log.try_clone()?)
            .stderr(daemon_log);
        prepare_helper(&mut daemon_cmd, spec.credentials.as_ref(), &[]);
        let mut daemon = daemon_cmd
            .spawn()
            .map_err(|e| BackendError::Start(format!("{}: {e}", self.vhost_vsock.display())))?;
        if let Err(e) = wait_for_path(&vhost_sock, &mut daemon, Duration::from_secs(5)) {
            let _ = daemon.kill();
            let _ = daemon.wait();
            return Err(e);
        }

        let net_link = spec
            .network
            .as_ref()
            .map(DeviceLink::attach)
            .transpose()
            .map_err(|e| BackendError::Start(e.to_string()));
        let net_link = match net_link {
            Ok(l) => l,
            Err(e) => {
                let _ = daemon.kill();
                let _ = daemon.wait();
                return Err(e);
            }
        };
        let mem = format!("{}M", spec.mem_mib);
        let qemu_log = spec.logs.open(QEMU_LOG)?;
        let console = spec.logs.open(super::CONSOLE_LOG)?;
        let mut qemu_cmd = Command::new(&self.qemu);
        qemu_cmd
            .args(["-accel", &self.accel])
            .args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-m", &mem])
            .args(["-smp", &spec.vcpus.to_string()])
            .args(["-cpu", "max"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-add-fd",
                &format!("fd={},set={CONSOLE_FDSET}", console.as_raw_fd()),
                "-chardev",
                &format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET}"),
            ])
            .args(["-serial", "chardev:console"])
            .args([
                "-chardev",
                &format!("socket,id=vsock,path={}", vhost_sock.display()),
            ])
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            // Pages the guest frees go back to the host (its RAM is backed as it is touched).
            .args(["-device", BALLOON_DEVICE])
            .args(disk_and_share_args(spec))
            .args(network_args(
                spec.network.as_ref(),
                net_link.as_ref().map(|l| l.stream.as_raw_fd()),
            ))
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &self.cmdline(spec)])
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log);
        let keep_fds: Vec<RawFd> = std::iter::once(console.as_raw_fd())
            .chain(net_link.as_ref().map(|l| l.stream.as_raw_fd()))
            .collect();
        prepare_helper(&mut qemu_cmd, spec.credentials.as_ref(), &keep_fds);
        let spawned = qemu_cmd.spawn();
        // QEMU has its own copy now (or none: it did not start).
        drop(console);
        let qemu = match spawned {
            Ok(q) => q,
            Err(e) => {
                let _ = daemon.kill();
                let _ = daemon.wait();
                return Err(BackendError::Start(format!("{}: {e}", self.qemu.display())));
            }
        };
        Ok(Box::new(QemuVm {
            qemu,
            daemon,
            log: spec.run_dir.join(QEMU_LOG),
            reaped: Arc::new(AtomicBool::new(false)),
            _net_link: net_link,
        }))
    }
}

/// A running QEMU and its vsock daemon.
struct QemuVm {
    qemu: Child,
    daemon: Child,
    log: PathBuf,
    /// Set before the children are reaped, so a late kill never hits a recycled pid.
    reaped: Arc<AtomicBool>,
    /// The network device's stream (QEMU has its own copy) and its filter's relay.
    _net_link: Option<DeviceLink>,
}

fn kill_pid(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child, so
    // it cannot have been recycled.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

impl RunningVm for QemuVm {
    fn first_instruction(&self) -> Option<Instant> {
        None
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.qemu.try_wait()? {
                self.reaped.store(true, Ordering::SeqCst);
                // The vsock daemon gone first: something outside ended the VM's device.
                let daemon_gone = matches!(self.daemon.try_wait(), Ok(Some(_)));
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                let log = run_dir::read_log_tail(&self.log);
                let log = String::from_utf8_lossy(&log);
                // QEMU exits 0 on SIGTERM/SIGINT/SIGHUP, and says so in its log.
                let signalled = std::os::unix::process::ExitStatusExt::signal(&status).is_some()
                    || log.contains("terminating on signal");
                let orderly = status.success() && !signalled;
                let mut description = format!("qemu exited ({status})");
                if !orderly {
                    if let Some(last) = log.lines().rev().find(|l| !l.trim().is_empty()) {
                        description.push_str(": ");
                        description.push_str(last.trim());
                    }
                }
                // QEMU exits 0 when the guest resets or shuts down (-no-reboot), and with an
                // error when it cannot run the VM.
                let ended_by = if signalled || daemon_gone {
                    EndedBy::Outside
                } else if status.success() {
                    EndedBy::Guest
                } else {
                    EndedBy::Vmm
                };
                return Ok(Some(VmExit {
                    orderly,
                    ended_by,
                    description,
                }));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn killer(&self) -> VmKiller {
        let (q, d, reaped) = (self.qemu.id(), self.daemon.id(), self.reaped.clone());
        Arc::new(move || {
            if !reaped.load(Ordering::SeqCst) {
                kill_pid(q);
                kill_pid(d);
            }
        })
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.reaped.store(true, Ordering::SeqCst);
        for child in [&mut self.qemu, &mut self.daemon] {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::VmShare;

    fn spec() -> VmSpec {
        VmSpec::for_tests()
    }

    #[test]
    fn the_last_reboot_word_is_the_triple_fault() {
        let backend = QemuBackend {
            qemu: PathBuf::from("qemu"),
            vhost_vsock: PathBuf::from("vhost"),
            accel: "kvm".into(),
        };
        let mut s = spec();
        s.cmdline = crate::launch::DEFAULT_CMDLINE.to_string();
        let line = backend.cmdline(&s);
        let last = line.split_whitespace().rfind(|w| w.starts_with("reboot="));
        assert_eq!(last, Some("reboot=t"), "{line}");
    }

    #[test]
    fn no_disk_and_no_shares_add_no_devices() {
        assert!(disk_and_share_args(&spec()).is_empty());
    }

    #[test]
    fn the_image_is_read_only_and_commas_in_paths_are_escaped() {
        let mut s = spec();
        s.root_disk = Some(PathBuf::from("/img/a,b/rootfs.ext4"));
        s.shares = vec![VmShare {
            tag: "sge0".into(),
            host_path: PathBuf::from("/home/u"),
            read_only: true,
        }];
        let args = disk_and_share_args(&s);
        assert_eq!(
            args,
            [
                "-drive",
                "file=/img/a,,b/rootfs.ext4,if=none,format=raw,readonly=on,id=root",
                "-device",
                "virtio-blk-device,drive=root",
                "-fsdev",
                "local,id=fs0,path=/home/u,security_model=none,multidevs=remap,readonly=on",
                "-device",
                "virtio-9p-device,fsdev=fs0,mount_tag=sge0",
            ]
        );
    }
}
