//! The embedded VMM (`vmm` crate) booting the tiny test guest, in this process or in a fresh
//! minimal process (`bench-vm`, see [`crate::vm_child`]), which then reports its timestamps and
//! memory on stdout as one JSON line.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};
use crate::vm_child::ChildReport;

/// The minimal child binary (benches/src/vm_child_main.rs), next to bench-report.
const VM_CHILD_BIN: &str = "bench-vm";

/// Longest a tiny guest may take to signal (it runs a handful of instructions).
pub const BOOT_PATIENCE: Duration = Duration::from_secs(10);

/// Phases of one in-process boot, in ms since `Vm::start` was called.
pub struct InProcessBoot {
    /// KVM_CREATE_VM done (the VMM's `created` timestamp).
    pub vm_created: f64,
    /// First KVM_RUN.
    pub first_vcpu_run: f64,
    /// The guest's boot-timer write.
    pub first_instruction: f64,
    /// The VMM saw the triple fault.
    pub exit_seen: f64,
    /// The handle is dropped: threads joined, guest memory unmapped, fds closed.
    pub vm_gone: f64,
}

/// One in-process boot of the exiting guest.
pub fn boot_in_process(guest: &Path, mem_mib: u32) -> anyhow::Result<InProcessBoot> {
    let start = Instant::now();
    let vm = vmm::Vm::start(crate::vm_child::config(guest, mem_mib)).context("vmm::Vm::start")?;
    let Some(reason) = vm.wait_timeout(BOOT_PATIENCE) else {
        bail!("the guest did not end within {BOOT_PATIENCE:?}");
    };
    let ts = vm.timestamps();
    let (Some(created), Some(run), Some(timer), Some(exited)) = (
        ts.created(),
        ts.first_vcpu_run(),
        ts.boot_timer(),
        ts.exited(),
    ) else {
        bail!("guest ended ({reason}) without writing the boot timer");
    };
    drop(vm);
    let gone = Instant::now();
    if reason != vmm::ExitReason::GuestShutdown {
        bail!("guest ended unexpectedly: {reason}");
    }
    let ms = |t: Instant| t.saturating_duration_since(start).as_secs_f64() * 1000.0;
    Ok(InProcessBoot {
        vm_created: ms(created),
        first_vcpu_run: ms(run),
        first_instruction: ms(timer),
        exit_seen: ms(exited),
        vm_gone: ms(gone),
    })
}

/// Runs the child and returns (start of spawn in monotonic ns, its report, process gone ns).
pub fn run_child(
    guest: &Path,
    mem_mib: u32,
    hold: bool,
) -> anyhow::Result<(u64, ChildReport, u64)> {
    let exe: PathBuf = std::env::current_exe().context("locating bench-report")?;
    run_child_binary(&exe.with_file_name(VM_CHILD_BIN), guest, mem_mib, hold)
}

/// Like [`run_child`] with a given `bench-vm` binary (e.g. one built with a patched vmm).
pub fn run_child_binary(
    binary: &Path,
    guest: &Path,
    mem_mib: u32,
    hold: bool,
) -> anyhow::Result<(u64, ChildReport, u64)> {
    let mut cmd = Command::new(binary);
    cmd.arg("--guest")
        .arg(guest)
        .args(["--mem", &mem_mib.to_string()]);
    if hold {
        cmd.arg("--hold");
    }
    let start = monotonic_ns();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {VM_CHILD_BIN} (built with bench-report)"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let output = child.wait_with_output()?;
    let gone = monotonic_ns();
    if !output.status.success() {
        bail!(
            "bench-vm failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let report: ChildReport = serde_json::from_str(line.trim())
        .with_context(|| format!("parsing the child's report {line:?}"))?;
    Ok((start, report, gone))
}

/// One boot of the exiting guest in a fresh process: (first vCPU run, first instruction,
/// process gone) in ms since the spawn.
pub fn boot_in_child(guest: &Path, mem_mib: u32) -> anyhow::Result<(f64, f64, f64)> {
    let (start, r, gone) = run_child(guest, mem_mib, false)?;
    Ok((
        ms_between(start, r.first_vcpu_run_ns),
        ms_between(start, r.boot_timer_ns),
        ms_between(start, gone),
    ))
}
