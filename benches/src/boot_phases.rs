//! Benchmark 12: the guest kernel's boot on real KVM, in the nested real-KVM host
//! (`scripts/nested-kvm-host.sh`), with the same kernel, initramfs and kernel command line under
//! each VMM: the embedded VMM (`sge_virtualizer vm`), QEMU microvm with `-accel kvm`, Firecracker
//! when the user gives a binary built from Firecracker's own repository (never vendored here),
//! and optionally an older `sge_virtualizer` as a baseline, so that an optimisation's before and
//! after are measured in one interleaved run (issue 16: guest boot at least as fast as
//! Firecracker's).
//!
//! Init is busybox's shell (`rdinit=`): it prints the kernel's "Run /bin/busybox as init
//! process" line from the kernel log to the console (`quiet` keeps it off the console
//! otherwise) and reboots at once, so each run ends with the guest's reset and its console holds
//! two guest-clock timestamps: init started and the reset began.
//!
//! Like section 9, the harness runs itself inside the nested host (`nested-boot-inside`), which
//! writes the result to a file in the shared repository; the outer side labels it and stores it.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::chart::{self, Bar};
use crate::clock::{monotonic_ns, ms_between};
use crate::context::{workspace_root, BenchContext};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;

/// The result's id (and the subcommand that makes it).
pub const ID: &str = "nested-boot";
const TITLE: &str = "Nested real KVM: the guest kernel's boot, same kernel, initramfs and command \
                     line under each VMM";

/// The kernel command line of issue 16 up to the init arguments (`reboot=k`: the guest resets
/// through the i8042 keyboard controller, which the embedded VMM and Firecracker emulate).
const ISSUE_CMDLINE_HEAD: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule quiet \
                                  i8042.noaux i8042.nomux i8042.dumbkbd 8250.nr_uarts=1";
/// Init: busybox's shell copies the kernel's "Run … as init process" line (with its timestamp)
/// back into the kernel log at level 2, which `quiet` still prints on the console, and reboots.
/// Through the kernel log, not the tty: a tty write just before `reboot -f` can still sit in the
/// UART driver's buffer when the guest resets, while a console-level printk is written out
/// synchronously (`/dev/kmsg` comes with devtmpfs: the initramfs has only the console and
/// null nodes). The console then shows `[t2] init: [t1] Run /bin/busybox as init process`,
/// and t1 is the time. The pattern is `R[u]n /`, not `Run /`: the kernel logs its own command
/// line ("Command line: …") first, and a pattern that matched itself there would make `grep -m1`
/// print that line instead. The double quotes are part of the command line: the kernel passes
/// the quoted string to init as one argument.
const ISSUE_CMDLINE_INIT: &str = r#"rdinit=/bin/busybox -- sh -c "mount -t proc p /proc; mount -t devtmpfs d /dev; dmesg | grep -m1 'R[u]n /' | sed 's/^/<2>init: /' > /dev/kmsg; reboot -f""#;

/// The command line for a VMM whose guest resets with `reboot` (`k` or `t`).
pub fn cmdline(reboot: &str) -> String {
    format!("{ISSUE_CMDLINE_HEAD} {ISSUE_CMDLINE_INIT}").replacen("reboot=k", reboot, 1)
}

/// The embedded VMM and Firecracker: reset through the i8042 controller.
fn cmdline_i8042() -> String {
    cmdline("reboot=k")
}

/// QEMU microvm has no i8042 (with `reboot=k` the guest polls the missing controller for
/// seconds): a triple-fault reset, which `-no-reboot` turns into QEMU's exit.
fn cmdline_qemu() -> String {
    cmdline("reboot=t")
}

/// Guest vCPUs and RAM, the same for every VMM.
const GUEST_VCPUS: u32 = 1;
const GUEST_MIB: u32 = 128;
/// One boot's deadline: after it the VMM is killed and the run counts as failed.
const DEADLINE: Duration = Duration::from_secs(300);
/// How much of the console an error message quotes.
const CONSOLE_TAIL: usize = 2048;

pub const EMBEDDED: &str = "embedded VMM";
pub const QEMU: &str = "QEMU microvm -accel kvm";
pub const FIRECRACKER: &str = "Firecracker";

/// Options of `nested-boot` (and of its inside).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// A Firecracker binary, built by you from Firecracker's own repository (not part of this
    /// project). Must lie inside this repository: the nested host shares only the repository,
    /// /usr and /etc.
    #[arg(long)]
    pub firecracker: Option<PathBuf>,
    /// A baseline measured as the extra variant "embedded VMM, baseline LABEL" in the same
    /// interleaved run: an older `sge_virtualizer` binary (booting the guest under test), or a
    /// directory made by `benches/build-under-test.sh` (its `sge_virtualizer` booting its own
    /// `guest/vmlinux` and `guest/initramfs.cpio`, so that a guest kernel or initramfs change is
    /// measured too). Must lie inside this repository.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The baseline's label in the report (default: its path in the repository).
    #[arg(long, requires = "baseline")]
    pub baseline_label: Option<String>,
}

impl Options {
    fn baseline_variant(&self, root: &Path) -> Option<String> {
        let path = self.baseline.as_ref()?;
        let label = match &self.baseline_label {
            Some(l) => l.clone(),
            None => path
                .strip_prefix(root)
                .unwrap_or(path)
                .display()
                .to_string(),
        };
        Some(format!("{EMBEDDED}, baseline {label}"))
    }
}

/// What `--baseline` names: the VMM to run and the guest it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Baseline {
    shepherd: PathBuf,
    /// `None`: the guest under test.
    guest: Option<Guest>,
}

impl Baseline {
    /// `path` as a binary, or as a `build-under-test.sh` directory.
    fn resolve(path: &Path) -> Baseline {
        if path.is_dir() {
            Baseline {
                shepherd: path.join("sge_virtualizer"),
                guest: Some(Guest {
                    kernel: path.join("guest/vmlinux"),
                    initrd: path.join("guest/initramfs.cpio"),
                }),
            }
        } else {
            Baseline {
                shepherd: path.to_path_buf(),
                guest: None,
            }
        }
    }

    /// Every file it uses.
    fn files(&self) -> Vec<(&Path, &'static str)> {
        let mut files = vec![(self.shepherd.as_path(), "--baseline's sge_virtualizer")];
        if let Some(g) = &self.guest {
            files.push((g.kernel.as_path(), "--baseline's guest/vmlinux"));
            files.push((g.initrd.as_path(), "--baseline's guest/initramfs.cpio"));
        }
        files
    }
}

/// Is `path` at or below `root`? Both canonical (absolute, no symlinks, no `..`).
fn is_inside(root: &Path, path: &Path) -> bool {
    path.starts_with(root)
}

/// `path` made canonical, checked to be a file inside the repository `root` (canonical).
fn shared_file(root: &Path, path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let canonical = std::fs::canonicalize(path)
        .with_context(|| format!("{what} {}: not found", path.display()))?;
    if !canonical.is_file() {
        bail!("{what} {}: not a file", canonical.display());
    }
    if !is_inside(root, &canonical) {
        bail!(
            "{what} {} is outside the repository {}: the nested host shares only the \
             repository, /usr and /etc, so it could not run it; copy it under {} (e.g. \
             target/) and pass that path",
            canonical.display(),
            root.display(),
            root.display()
        );
    }
    Ok(canonical)
}

/// Every printk timestamp (seconds) in a console line, each with the text after it:
/// `[    0.95] init: [    0.91] Run /bin/busybox as init process` → (0.95, "init: [ …"),
/// (0.91, "Run /bin/…"). Noise such as a terminal escape may come before the first.
fn printk_stamps(line: &str) -> impl Iterator<Item = (f64, &str)> {
    let line = line.trim_end_matches(['\r', '\n']);
    line.match_indices('[').filter_map(move |(open, _)| {
        let rest = &line[open + 1..];
        let close = rest.find(']')?;
        let secs: f64 = rest[..close].trim().parse().ok()?;
        Some((secs, rest[close + 1..].trim_start()))
    })
}

/// Guest clock (ms) of the first timestamp in the console whose text satisfies `is_it` (the
/// time of a kernel line, or of one quoted inside another).
fn guest_ms(console: &str, is_it: impl Fn(&str) -> bool) -> Option<f64> {
    console
        .split('\n')
        .flat_map(printk_stamps)
        .find(|(_, text)| is_it(text))
        .map(|(secs, _)| secs * 1e3)
}

/// Guest clock (ms) of the kernel's "Run /… as init process" line.
fn guest_init_ms(console: &str) -> Option<f64> {
    guest_ms(console, |t| {
        t.starts_with("Run /") && t.contains(" as init process")
    })
}

/// Guest clock (ms) of the kernel's "reboot: Restarting system" line.
fn guest_reset_ms(console: &str) -> Option<f64> {
    guest_ms(console, |t| t.starts_with("reboot: Restarting system"))
}

/// `first vCPU run` (ms since the VM was created) from `sge_virtualizer vm`'s stderr line
/// `vm: since VM created: first vCPU run 643.304 ms, boot timer -, exit 28929.695 ms`.
fn first_vcpu_run_ms(stderr: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("vm: since VM created:"))?;
    let (_, after) = line.split_once("first vCPU run ")?;
    after.split_once(" ms")?.0.trim().parse().ok()
}

/// The last `max` bytes of `text` (at a character boundary) on one line, for an error message.
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..]
        .trim()
        .replace("\r\n", "\n")
        .replace(['\r', '\n'], " ⏎ ")
}

/// Waits for `child` until `deadline`; returns its status and when it ended (monotonic ns), or
/// `None` after killing and reaping it at the deadline. The end is seen through a pidfd (no
/// polling delay); without pidfd_open it polls every 2 ms.
fn wait_with_deadline(
    child: &mut Child,
    deadline: Duration,
) -> anyhow::Result<Option<(ExitStatus, u64)>> {
    let until = Instant::now() + deadline;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed. The child is not reaped before we wait for it below, so its pid is still ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if raw >= 0 {
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: poll reads and writes the one pollfd we pass, which lives for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                let end = monotonic_ns();
                let status = child.wait().context("waiting for the VMM")?;
                return Ok(Some((status, end)));
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("polling the VMM's pidfd");
                }
            }
        }
    } else {
        while Instant::now() < until {
            if let Some(status) = child.try_wait().context("waiting for the VMM")? {
                return Ok(Some((status, monotonic_ns())));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// The guest a VMM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// A VMM and how to start it.
#[derive(Clone)]
enum Vmm {
    /// `sge_virtualizer vm` of this binary.
    Embedded(PathBuf),
    Qemu,
    Firecracker(PathBuf),
}

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

/// One boot in a fresh directory under `scratch`: wall, guest_init, guest_reset (ms) and, for
/// the embedded VMM, first_vcpu_run.
fn boot_once(vmm: &Vmm, guest: &Guest, scratch: &Path) -> anyhow::Result<Sample> {
    let dir = tempfile::Builder::new()
        .prefix("boot.")
        .tempdir_in(scratch)
        .context("creating the run's directory")?;
    let console = dir.path().join("console.txt");
    let stdout_path = dir.path().join("stdout.txt");
    let stderr_path = dir.path().join("stderr.txt");
    let create =
        |p: &Path| std::fs::File::create(p).with_context(|| format!("creating {}", p.display()));
    let (mut cmd, name) = match vmm {
        Vmm::Embedded(shepherd) => {
            let mut cmd = Command::new(shepherd);
            cmd.arg("vm")
                .arg("--kernel")
                .arg(&guest.kernel)
                .arg("--initrd")
                .arg(&guest.initrd)
                .args(["--mem", &GUEST_MIB.to_string()])
                .args(["--vcpus", &GUEST_VCPUS.to_string()])
                .args(["--cmdline", &cmdline_i8042()])
                // The same devices as Firecracker's and QEMU's VMs here: serial and i8042 only.
                .arg("--no-balloon")
                // A new file: `vm` refuses existing ones.
                .arg("--serial")
                .arg(&console)
                .stdout(create(&stdout_path)?);
            (cmd, "sge_virtualizer vm")
        }
        Vmm::Qemu => {
            let mem = format!("{GUEST_MIB}M");
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-accel", "kvm"])
                .args(["-M", "microvm,acpi=off,memory-backend=mem"])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                ])
                .args(["-m", &mem, "-smp", &GUEST_VCPUS.to_string()])
                .args(["-cpu", "max"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .arg("-no-reboot")
                .args(["-serial", &format!("file:{}", utf8(&console)?)])
                .arg("-kernel")
                .arg(&guest.kernel)
                .arg("-initrd")
                .arg(&guest.initrd)
                .args(["-append", &cmdline_qemu()])
                .stdout(create(&stdout_path)?);
            (cmd, "qemu-system-x86_64")
        }
        Vmm::Firecracker(binary) => {
            let config = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": utf8(&guest.kernel)?,
                    "initrd_path": utf8(&guest.initrd)?,
                    "boot_args": cmdline_i8042(),
                },
                // Required by some Firecracker versions even when empty.
                "drives": [],
                "machine-config": {
                    "vcpu_count": GUEST_VCPUS,
                    "mem_size_mib": GUEST_MIB,
                },
            });
            let conf = dir.path().join("firecracker.json");
            std::fs::write(&conf, serde_json::to_string_pretty(&config)?)
                .with_context(|| format!("writing {}", conf.display()))?;
            let mut cmd = Command::new(binary);
            cmd.args(["--no-api", "--config-file"])
                .arg(&conf)
                .args(["--level", "Error"])
                // Firecracker's serial console is its stdout.
                .stdout(create(&console)?);
            (cmd, "firecracker")
        }
    };
    cmd.stdin(Stdio::null()).stderr(create(&stderr_path)?);
    let start = monotonic_ns();
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let ended = wait_with_deadline(&mut child, DEADLINE)?;
    let read = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let console_text = read(&console);
    let stderr_text = read(&stderr_path);
    let Some((status, end)) = ended else {
        bail!(
            "{name} still ran after {} s: killed, run failed; console's last 2 KB: {}",
            DEADLINE.as_secs(),
            tail(&console_text, CONSOLE_TAIL)
        );
    };
    if !status.success() {
        bail!(
            "{name} exited with {status}; stderr: {}; console's last 2 KB: {}",
            tail(&stderr_text, 1024),
            tail(&console_text, CONSOLE_TAIL)
        );
    }
    let init = guest_init_ms(&console_text).ok_or_else(|| {
        anyhow!(
            "{name}: the console has no \"Run /… as init process\" line; its last 2 KB: {}",
            tail(&console_text, CONSOLE_TAIL)
        )
    })?;
    let reset = guest_reset_ms(&console_text).ok_or_else(|| {
        anyhow!(
            "{name}: the console has no \"reboot: Restarting system\" line; its last 2 KB: {}",
            tail(&console_text, CONSOLE_TAIL)
        )
    })?;
    let mut sample = vec![
        ("wall", ms_between(start, end)),
        ("guest_init", init),
        ("guest_reset", reset),
    ];
    if let Vmm::Embedded(_) = vmm {
        match first_vcpu_run_ms(&stderr_text) {
            Some(v) => sample.push(("first_vcpu_run", v)),
            None => eprintln!(
                "\n  {name}: no first vCPU run time on its stderr: {}",
                tail(&stderr_text, 512)
            ),
        }
    }
    Ok(sample)
}

/// `firecracker --version`'s first line (under a deadline).
fn firecracker_version(binary: &Path, scratch: &Path) -> String {
    let out = scratch.join("firecracker-version.txt");
    let run = || -> anyhow::Result<String> {
        let mut child = Command::new(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()?;
        match wait_with_deadline(&mut child, Duration::from_secs(30))? {
            Some((status, _)) if status.success() => {}
            Some((status, _)) => bail!("exited with {status}"),
            None => bail!("still ran after 30 s"),
        }
        let text = std::fs::read_to_string(&out)?;
        Ok(text.lines().next().unwrap_or("").trim().to_string())
    };
    run().unwrap_or_else(|e| format!("`--version` failed: {e:#}"))
}

/// Inside the nested host: every VMM, interleaved; the result goes to `out`.
pub fn inside(ctx: &BenchContext, opts: &Options, out: &Path) -> anyhow::Result<()> {
    ctx.require_shepherd()?;
    if !ctx.machine.kvm_can_run_linux {
        bail!(
            "KVM cannot run a Linux guest here ({}): not the nested real-KVM host?",
            ctx.machine.kvm_probe
        );
    }
    let root = workspace_root();
    let guest = Guest {
        kernel: ctx.under_test.kernel.clone(),
        initrd: ctx.under_test.initrd.clone(),
    };
    let scratch = ctx.work_dir.as_path();
    let fc_version = opts
        .firecracker
        .as_ref()
        .map(|fc| (fc.clone(), firecracker_version(fc, scratch)));
    let mut plan: Vec<(String, Vmm, Guest)> = vec![
        (
            EMBEDDED.to_string(),
            Vmm::Embedded(ctx.under_test.shepherd.clone()),
            guest.clone(),
        ),
        (QEMU.to_string(), Vmm::Qemu, guest.clone()),
    ];
    if let Some(fc) = &opts.firecracker {
        plan.push((
            FIRECRACKER.to_string(),
            Vmm::Firecracker(fc.clone()),
            guest.clone(),
        ));
    }
    let baseline = opts.baseline.as_deref().map(Baseline::resolve);
    if let (Some(b), Some(name)) = (&baseline, opts.baseline_variant(&root)) {
        let g = b.guest.clone().unwrap_or_else(|| guest.clone());
        plan.push((name, Vmm::Embedded(b.shepherd.clone()), g));
    }
    let mut variants: Vec<Variant<'_>> = plan
        .iter()
        .map(|(name, vmm, guest)| {
            Variant::new(name.clone(), "ms", move || boot_once(vmm, guest, scratch))
        })
        .collect();
    eprintln!(
        "{ID}: {} variants, {} warm-up + {} runs each",
        variants.len(),
        ctx.warmup,
        ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let mut notes = vec![
        format!(
            "Kernel command line (embedded VMM, Firecracker): `{}`. QEMU gets the same with \
             `reboot=t` instead of `reboot=k`: microvm has no i8042 keyboard controller, and with \
             reboot=k the guest polls the missing controller for seconds before it resets; \
             reboot=t resets by triple fault, which QEMU's -no-reboot turns into its exit. The \
             grep pattern is written `R[u]n /` so that it does not match the kernel's own \
             \"Command line:\" log line, which contains it.",
            cmdline_i8042()
        ),
        format!(
            "Method, identical for every VMM: each run boots the project's guest kernel and \
             initramfs ({} + {}) with {GUEST_VCPUS} vCPU and {GUEST_MIB} MiB; init is busybox's \
             sh, which copies the kernel's \"Run /bin/busybox as init process\" line (with its \
             timestamp) from dmesg back into the kernel log at console level (a printk reaches \
             the console before the reset; a tty write might not) and reboots at once. wall = host clock from spawning the VMM process \
             to its exit (VMM set-up, kernel load, boot, init, reset, tear-down); guest_init and \
             guest_reset = the guest kernel's own printk clock (kvm-clock, counting from early in \
             the kernel's boot, so VMM set-up is not in them) at that Run line and at \"reboot: \
             Restarting system\"; first_vcpu_run (embedded VMM only) = VM created → first \
             KVM_RUN, from `sge_virtualizer vm`'s stderr. Variants interleaved, a fresh directory \
             per run, a {} s deadline per run (then killed and counted as failed).",
            guest.kernel.display(),
            guest.initrd.display(),
            DEADLINE.as_secs()
        ),
        format!(
            "Nested under TCG: measured inside the nested real-KVM host (scripts/nested-kvm-host.sh: \
             Debian's kvm-amd in QEMU TCG), whose KVM probe says: {}. Guest code and every VMM \
             run emulated twice, so absolute times are not hardware's; the ratios between the \
             VMMs, measured interleaved in one boot of that host, carry over. QEMU: {}.",
            ctx.machine.kvm_probe, ctx.machine.qemu_version
        ),
    ];
    notes.push(match &fc_version {
        Some((path, version)) => format!("Firecracker: {} ({version}).", path.display()),
        None => "Firecracker: not given (pass --firecracker PATH, built from Firecracker's \
                 repository)."
            .to_string(),
    });
    if let (Some(b), Some(name)) = (&baseline, opts.baseline_variant(&root)) {
        notes.push(match &b.guest {
            None => format!(
                "\"{name}\": {}, run exactly like the embedded VMM (same guest).",
                b.shepherd.display()
            ),
            Some(g) => format!(
                "\"{name}\": {} booting its own guest ({} + {}), run exactly like the \
                 embedded VMM.",
                b.shepherd.display(),
                g.kernel.display(),
                g.initrd.display()
            ),
        });
    }
    let result = BenchResult::measured(ctx, ID, TITLE, series, outcomes, notes);
    let text = serde_json::to_string(&result)?;
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}

/// The options again, as command-line words for the inside (or the reproduce line).
fn option_args(opts: &Options) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(p) = &opts.firecracker {
        args.extend(["--firecracker".to_string(), p.display().to_string()]);
    }
    if let Some(p) = &opts.baseline {
        args.extend(["--baseline".to_string(), p.display().to_string()]);
    }
    if let Some(l) = &opts.baseline_label {
        args.extend(["--baseline-label".to_string(), l.clone()]);
    }
    args
}

/// Words quoted for a shell where needed (for the reproduce line).
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--baseline` made canonical, with every file it names checked to lie in the repository
/// (which also refuses a directory outside it).
fn shared_baseline(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let canonical = std::fs::canonicalize(path)
        .with_context(|| format!("--baseline {}: not found", path.display()))?;
    for (file, what) in Baseline::resolve(&canonical).files() {
        shared_file(root, file, what)?;
    }
    Ok(canonical)
}

/// Outside: boots the nested host (2 vCPUs), runs [`inside`] there, and returns its result.
/// `under_test_dir` is the `--under-test` directory, if one was given.
pub fn run(
    ctx: &BenchContext,
    opts: &Options,
    under_test_dir: Option<&Path>,
) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let root = workspace_root();
    let shared = std::fs::canonicalize(&root)
        .with_context(|| format!("the repository {}", root.display()))?;
    // Everything the inside runs or reads must be visible in the nested host.
    let ut = &ctx.under_test;
    shared_file(&shared, &ut.shepherd, "sge_virtualizer")?;
    shared_file(&shared, &ut.kernel, "the guest kernel")?;
    shared_file(&shared, &ut.initrd, "the guest initramfs")?;
    let exe = std::env::current_exe().context("this benchmark's own path")?;
    let exe = shared_file(&shared, &exe, "this benchmark binary")?;
    let inner_opts = Options {
        firecracker: opts
            .firecracker
            .as_deref()
            .map(|p| shared_file(&shared, p, "--firecracker"))
            .transpose()?,
        baseline: opts
            .baseline
            .as_deref()
            .map(|p| shared_baseline(&shared, p))
            .transpose()?,
        baseline_label: opts.baseline_label.clone(),
    };
    let under_test = match under_test_dir {
        Some(dir) => {
            let c = std::fs::canonicalize(dir)
                .with_context(|| format!("--under-test {}: not found", dir.display()))?;
            if !is_inside(&shared, &c) {
                bail!(
                    "--under-test {} is outside the repository {}: the nested host shares only \
                     the repository, /usr and /etc",
                    c.display(),
                    shared.display()
                );
            }
            Some(c)
        }
        None => None,
    };
    let script = root.join("scripts/nested-kvm-host.sh");
    let out = root.join("target/nested-boot-bench.json");
    let variants = 2
        + usize::from(inner_opts.firecracker.is_some())
        + usize::from(inner_opts.baseline.is_some());
    // The runs are spread over several boots of the nested host, a few rounds each: now and then
    // its kernel locks up for good (scripts/test-nested-kvm.sh, "Known"), and then only that
    // boot's rounds are lost and run again on a fresh one.
    let mut merged: Option<BenchResult> = None;
    let mut done = 0;
    let mut boots = 0;
    let mut lost_boots = 0;
    while done < ctx.runs {
        let runs = (ctx.runs - done).min(ROUNDS_PER_BOOT);
        boots += 1;
        let _ = std::fs::remove_file(&out);
        // The outer host's boot, then at most one deadline per boot (usually far less).
        let timeout = 900 + variants * (runs + ctx.warmup) * 120;
        let mut cmd = Command::new(&script);
        cmd.args(["run", "--cpus", "2", "--timeout", &timeout.to_string()])
            .arg("--share")
            .arg(&shared)
            .arg("--")
            .arg(&exe)
            .args([
                "nested-boot-inside",
                "--runs",
                &runs.to_string(),
                "--warmup",
                &ctx.warmup.to_string(),
            ]);
        if let Some(dir) = &under_test {
            cmd.arg("--under-test").arg(dir);
        }
        cmd.args(option_args(&inner_opts)).arg("--json").arg(&out);
        let status = cmd
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        // 125: the outer host failed to boot or stalled (nested-kvm-host.sh).
        if status.code() == Some(125) {
            lost_boots += 1;
            if lost_boots <= MAX_LOST_BOOTS {
                eprintln!("{ID}: the nested host failed or stalled; its {runs} rounds run again");
                continue;
            }
            if merged.is_some() {
                // Keep what earlier boots measured rather than lose it all; the notes say so.
                eprintln!(
                    "{ID}: the nested host stalled {lost_boots} times; keeping the {done} \
                     rounds measured so far"
                );
                break;
            }
        }
        if !status.success() {
            bail!("{} failed: {status}", script.display());
        }
        let text =
            std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        let inner: BenchResult =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
        merged = Some(match merged {
            None => inner,
            Some(acc) => merge(acc, inner),
        });
        done += runs;
    }
    let inner = merged.ok_or_else(|| anyhow!("no runs were asked for (--runs 0)"))?;
    let mut notes = inner.notes;
    if done < ctx.runs {
        notes.push(format!(
            "Only {done} of the {} rounds asked for: the nested host stalled or failed {} \
             times, more than the {MAX_LOST_BOOTS} reruns allowed.",
            ctx.runs, lost_boots
        ));
    }
    notes.push(format!(
        "The nested host ran with 2 vCPUs (scripts/nested-kvm-host.sh run --cpus 2) on this \
         machine; the runs were spread over {} boots of it, at most {ROUNDS_PER_BOOT} rounds \
         (after {} warm-up rounds) each; {lost_boots} of them stalled or failed and their \
         rounds were run again on the next.",
        boots, ctx.warmup
    ));
    let mut result = BenchResult::measured(ctx, ID, TITLE, inner.series, inner.outcomes, notes);
    result.runs = done;
    let extra = option_args(opts);
    if !extra.is_empty() {
        result.command = format!("{} {}", result.command, shell_words(&extra));
    }
    result.machine = inner.machine;
    Ok(result)
}

/// Rounds (one boot of every variant) per boot of the nested host.
const ROUNDS_PER_BOOT: usize = 8;
/// Boots of the nested host that may stall or fail before the benchmark gives up.
const MAX_LOST_BOOTS: usize = 6;

/// Two results of the inside, one after the other: the samples of each series appended, the
/// outcomes added up (notes and machine are the first's: every boot runs the same way).
fn merge(mut acc: BenchResult, next: BenchResult) -> BenchResult {
    for s in next.series {
        match acc
            .series
            .iter_mut()
            .find(|a| a.variant == s.variant && a.metric == s.metric)
        {
            Some(a) => a.samples.extend(s.samples),
            None => acc.series.push(s),
        }
    }
    for o in next.outcomes {
        match acc.outcomes.iter_mut().find(|a| a.variant == o.variant) {
            Some(a) => {
                a.ok += o.ok;
                a.failed += o.failed;
                a.errors.extend(o.errors);
            }
            None => acc.outcomes.push(o),
        }
    }
    acc.runs += next.runs;
    acc
}

/// Medians the report's table and chart use.
fn medians(r: &BenchResult, variant: &str) -> [Option<f64>; 4] {
    ["wall", "guest_init", "guest_reset", "first_vcpu_run"]
        .map(|m| crate::report::median(r, variant, m))
}

/// Section 12's part of the report after the table of every series: the phase durations
/// (differences of the medians, guest_reset − guest_init among them), the ratios against
/// Firecracker when it was measured, and a chart.
pub fn report(out: &mut String, out_dir: &Path, r: &BenchResult) -> anyhow::Result<()> {
    use crate::report::fmt;
    let opt = |v: Option<f64>| v.map(fmt).unwrap_or_else(|| "—".into());
    let mut rows = String::new();
    let mut bars = Vec::new();
    for v in r.variants() {
        let [wall, init, reset, vcpu] = medians(r, v);
        if wall.is_none() && init.is_none() {
            continue;
        }
        let init_to_reset = init.zip(reset).map(|(i, e)| e - i);
        let outside = wall.zip(reset).map(|(w, e)| w - e);
        let _ = writeln!(
            rows,
            "| {} | {} | {} | {} | {} | {} |",
            crate::report::cell(v),
            opt(wall),
            opt(init),
            opt(init_to_reset),
            opt(outside),
            opt(vcpu)
        );
        if let (Some(w), Some(i), Some(e)) = (wall, init, reset) {
            let host = (w - e).max(0.0);
            let to_init = host + i.max(0.0);
            bars.push(Bar {
                label: v.to_string(),
                segments: vec![
                    (
                        "host only: VMM set-up, pre-clock boot, tear-down (wall − guest_reset)"
                            .to_string(),
                        0.0,
                        host,
                    ),
                    ("guest clock: kernel → init".to_string(), host, to_init),
                    (
                        "guest clock: init → reset".to_string(),
                        to_init,
                        to_init + (e - i).max(0.0),
                    ),
                ],
            });
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    if !bars.is_empty() {
        let file = "nested-boot.png";
        match chart::draw_phases(
            &out_dir.join(file),
            "Guest boot per VMM (nested real KVM)",
            &bars,
        ) {
            Ok(()) => {
                let _ = writeln!(out, "![guest boot per VMM]({file})\n");
            }
            Err(e) => {
                let _ = writeln!(out, "(chart not drawn: {e:#})\n");
            }
        }
    }
    out.push_str(
        "Phase durations (ms, differences of the medians; guest clock = the guest kernel's \
         printk clock, host = the harness's):\n\n\
         | variant | wall (host) | kernel → init: guest_init (guest) | init → reset: \
         guest_reset − guest_init (guest) | wall − guest_reset: VMM set-up, pre-clock boot, \
         tear-down | VM created → first vCPU run |\n\
         |---|--:|--:|--:|--:|--:|\n",
    );
    out.push_str(&rows);
    out.push('\n');
    optimisation_log(out, r);
    let [fc_wall, fc_init, ..] = medians(r, FIRECRACKER);
    if fc_wall.is_none() && fc_init.is_none() {
        out.push_str("Firecracker was not measured in this run (see the notes).\n\n");
        return Ok(());
    }
    out.push_str(
        "Against Firecracker (medians; ratio = variant / Firecracker, below 1 is faster):\n\n\
         | variant | metric | variant ms | Firecracker ms | ratio |\n|---|---|--:|--:|--:|\n",
    );
    for v in r.variants().into_iter().filter(|v| *v != FIRECRACKER) {
        let [wall, init, ..] = medians(r, v);
        for (metric, x, f) in [("wall", wall, fc_wall), ("guest_init", init, fc_init)] {
            if let (Some(x), Some(f)) = (x, f) {
                let _ = writeln!(
                    out,
                    "| {} | {metric} | {} | {} | {:.2} |",
                    crate::report::cell(v),
                    fmt(x),
                    fmt(f),
                    x / f
                );
            }
        }
    }
    out.push('\n');
    Ok(())
}

/// What each change bought: every baseline variant (an older build, run exactly like the
/// embedded VMM in the same interleaved run; its label names the change it lacks) against the
/// embedded VMM under test.
fn optimisation_log(out: &mut String, r: &BenchResult) {
    use crate::report::fmt;
    let prefix = format!("{EMBEDDED}, baseline ");
    let [now_wall, now_init, now_reset, _] = medians(r, EMBEDDED);
    let mut rows = String::new();
    for v in r.variants() {
        let Some(label) = v.strip_prefix(&prefix) else {
            continue;
        };
        let [wall, init, reset, _] = medians(r, v);
        for (metric, before, after) in [
            ("guest_init", init, now_init),
            ("guest_reset", reset, now_reset),
            ("wall", wall, now_wall),
        ] {
            if let (Some(b), Some(a)) = (before, after) {
                let _ = writeln!(
                    rows,
                    "| {} | {metric} | {} | {} | {} ({:+.0} %) |",
                    crate::report::cell(label),
                    fmt(b),
                    fmt(a),
                    fmt(a - b),
                    (a / b - 1.0) * 100.0
                );
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "Optimisation log: each baseline is the build without the change its label names, run \
         like the embedded VMM in the same interleaved run (medians, ms):\n\n\
         | baseline (without) | metric | before | after | change |\n|---|---|--:|--:|--:|\n",
    );
    out.push_str(&rows);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the guest's console holds: the kernel's own lines (`\r\n`, as a serial console
    /// gives), the Run line printed by init from dmesg, the reset.
    const CONSOLE: &str = "[    0.000000] Linux version 6.1.192-sge-vm\r\n\
        [    0.000000] Command line: console=ttyS0 reboot=k rdinit=/bin/busybox -- sh -c \"mount -t proc p /proc; mount -t devtmpfs d /dev; dmesg | grep -m1 'R[u]n /' | sed 's/^/<2>init: /' > /dev/kmsg; reboot -f\"\r\n\
        [    0.950000] init: [    0.912345] Run /bin/busybox as init process\r\n\
        [    0.987654] reboot: Restarting system\r\n";

    #[test]
    fn boot_phases_baseline_is_a_binary_or_a_build_directory() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("sge_virtualizer");
        std::fs::write(&binary, b"").unwrap();
        assert_eq!(
            Baseline::resolve(&binary),
            Baseline {
                shepherd: binary.clone(),
                guest: None
            }
        );
        let built = Baseline::resolve(dir.path());
        assert_eq!(built.shepherd, binary);
        assert_eq!(
            built.guest,
            Some(Guest {
                kernel: dir.path().join("guest/vmlinux"),
                initrd: dir.path().join("guest/initramfs.cpio"),
            })
        );
        assert_eq!(built.files().len(), 3);
        // A directory outside the repository is refused before anything boots.
        let root = std::fs::canonicalize(workspace_root()).unwrap();
        let err = shared_baseline(&root, dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("outside the repository"),
            "{err:#}"
        );
    }

    #[test]
    fn boot_phases_parse_printk_lines() {
        let first = |line| printk_stamps(line).next();
        assert_eq!(
            first("[    0.912345] Run /bin/busybox as init process\r"),
            Some((0.912345, "Run /bin/busybox as init process"))
        );
        assert_eq!(first("[12345.5] x"), Some((12345.5, "x")));
        assert_eq!(first("no timestamp"), None);
        assert_eq!(first("[ abc] x"), None);
        let quoted: Vec<_> = printk_stamps("[ 0.95] init: [ 0.91] Run /init").collect();
        assert_eq!(
            quoted,
            [(0.95, "init: [ 0.91] Run /init"), (0.91, "Run /init")]
        );
    }

    #[test]
    fn boot_phases_guest_times_from_console() {
        let init = guest_init_ms(CONSOLE).unwrap();
        let reset = guest_reset_ms(CONSOLE).unwrap();
        assert!((init - 912.345).abs() < 1e-6, "{init}");
        assert!((reset - 987.654).abs() < 1e-6, "{reset}");
        // The kernel's command line mentions "Run /"-like text, but is not the Run line.
        assert_eq!(
            guest_init_ms("[    0.000000] Command line: grep -m1 'Run /'\r\n"),
            None
        );
        assert_eq!(guest_reset_ms("[    0.9] reboot: machine restart\n"), None);
        // Plain `\n` line ends, noise before the timestamp.
        assert!(guest_init_ms("\x1b[0m[    1.5] Run /init as init process\n").is_some());
    }

    #[test]
    fn boot_phases_first_vcpu_run_from_stderr() {
        let stderr = "vm: ended: guest reset\n\
            vm: since VM created: first vCPU run 643.304 ms, boot timer -, exit 28929.695 ms\n\
            vm: RSS 1 KiB, guest RAM resident 1 KiB, VMM overhead 1 KiB\n";
        assert_eq!(first_vcpu_run_ms(stderr), Some(643.304));
        assert_eq!(
            first_vcpu_run_ms("vm: since VM created: first vCPU run -, boot timer -, exit -\n"),
            None
        );
        assert_eq!(first_vcpu_run_ms(""), None);
    }

    #[test]
    fn boot_phases_command_lines() {
        let k = cmdline_i8042();
        assert!(k.starts_with("console=ttyS0 reboot=k panic=1 pci=off nomodule quiet "));
        assert!(k.ends_with(
            r#"8250.nr_uarts=1 rdinit=/bin/busybox -- sh -c "mount -t proc p /proc; mount -t devtmpfs d /dev; dmesg | grep -m1 'R[u]n /' | sed 's/^/<2>init: /' > /dev/kmsg; reboot -f""#
        ));
        let t = cmdline_qemu();
        assert_eq!(t, k.replacen("reboot=k", "reboot=t", 1));
        assert!(!t.contains("reboot=k"));
    }

    #[test]
    fn boot_phases_paths_must_be_in_the_repository() {
        let root = Path::new("/work/main");
        assert!(is_inside(root, Path::new("/work/main/target/firecracker")));
        assert!(!is_inside(root, Path::new("/work/main2/firecracker")));
        assert!(!is_inside(root, Path::new("/usr/bin/firecracker")));
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("fc");
        std::fs::write(&inside, b"").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert!(shared_file(&root, &inside, "--firecracker").is_ok());
        let err = shared_file(&root, Path::new("/bin/sh"), "--firecracker").unwrap_err();
        assert!(
            format!("{err:#}").contains("outside the repository"),
            "{err:#}"
        );
        assert!(shared_file(&root, &root.join("missing"), "--firecracker").is_err());
    }

    fn result(series: &[(&str, &str, &[f64])]) -> BenchResult {
        BenchResult {
            id: ID.into(),
            title: TITLE.into(),
            command: String::new(),
            finished_utc: String::new(),
            machine: Default::default(),
            under_test: String::new(),
            warmup: 0,
            runs: 3,
            load_average: String::new(),
            series: series
                .iter()
                .map(|(variant, metric, samples)| crate::results::Series {
                    variant: variant.to_string(),
                    metric: metric.to_string(),
                    unit: "ms".into(),
                    samples: samples.to_vec(),
                })
                .collect(),
            outcomes: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn boot_phases_optimisation_log_compares_each_baseline_with_the_build_under_test() {
        let base = format!("{EMBEDDED}, baseline without X");
        let r = result(&[
            (EMBEDDED, "guest_init", &[690.0, 700.0, 710.0]),
            (base.as_str(), "guest_init", &[1150.0, 1170.0, 1190.0]),
            (QEMU, "guest_init", &[950.0, 960.0, 990.0]),
        ]);
        let mut out = String::new();
        optimisation_log(&mut out, &r);
        assert!(
            out.contains("| without X | guest_init | 1170 | 700 | -470 (-40 %) |"),
            "{out}"
        );
        assert!(!out.contains("QEMU"), "only baselines are logged: {out}");
        let mut none = String::new();
        optimisation_log(&mut none, &result(&[(EMBEDDED, "guest_init", &[1.0])]));
        assert!(none.is_empty(), "{none}");
    }

    #[test]
    fn boot_phases_boots_merge_into_one_result() {
        let a = result(&[(EMBEDDED, "guest_init", &[1.0, 2.0])]);
        let mut b = result(&[
            (EMBEDDED, "guest_init", &[3.0]),
            (FIRECRACKER, "guest_init", &[4.0]),
        ]);
        b.outcomes = vec![crate::results::VariantOutcome {
            variant: EMBEDDED.into(),
            ok: 1,
            failed: 1,
            errors: vec!["x".into()],
        }];
        let m = merge(a, b);
        assert_eq!(
            m.series(EMBEDDED, "guest_init").unwrap().samples,
            [1.0, 2.0, 3.0]
        );
        assert_eq!(m.series(FIRECRACKER, "guest_init").unwrap().samples, [4.0]);
        assert_eq!((m.outcomes[0].ok, m.outcomes[0].failed), (1, 1));
        assert_eq!(m.runs, 6);
    }

    #[test]
    fn boot_phases_console_tail_is_one_line() {
        assert_eq!(tail("a\r\nb\nc", 100), "a ⏎ b ⏎ c");
        assert_eq!(tail("héllo", 4), "llo");
    }
}
