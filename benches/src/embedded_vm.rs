//! The embedded VMM (`vmm` crate) booting the tiny test guest, in this process or in a child
//! process of this binary (`bench-report embedded-vm`), which then reports its timestamps and
//! memory on stdout as one JSON line.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::clock::{instant_to_monotonic_ns, monotonic_ns, ms_between};

/// Longest a tiny guest may take to signal (it runs a handful of instructions).
const BOOT_PATIENCE: Duration = Duration::from_secs(10);

fn config(guest: &Path, mem_mib: u32) -> vmm::VmConfig {
    let mut c = vmm::VmConfig::new(guest);
    c.mem_mib = mem_mib.into();
    c.cmdline = String::new();
    c
}

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
    let vm = vmm::Vm::start(config(guest, mem_mib)).context("vmm::Vm::start")?;
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

/// What the child process reports: monotonic timestamps (ns) and, when held, its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildReport {
    pub main_ns: u64,
    pub first_vcpu_run_ns: u64,
    pub boot_timer_ns: u64,
    pub process_rss_bytes: Option<u64>,
    pub guest_ram_resident_bytes: Option<u64>,
    pub guest_ram_bytes: Option<u64>,
}

/// The child side (`bench-report embedded-vm`): boots `guest`; with `hold`, waits for the
/// boot timer, lets the process settle, reads its memory, then stops the VM; prints the report.
pub fn child_main(guest: &Path, mem_mib: u32, hold: bool) -> anyhow::Result<()> {
    let main_ns = monotonic_ns();
    let vm = vmm::Vm::start(config(guest, mem_mib)).context("vmm::Vm::start")?;
    let deadline = Instant::now() + BOOT_PATIENCE;
    let mut memory = None;
    if hold {
        while vm.timestamps().boot_timer().is_none() {
            if Instant::now() > deadline || vm.exit_reason().is_some() {
                bail!("the guest did not write the boot timer");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(crate::memory_overhead::SETTLE);
        memory = Some(vm.memory_usage().context("reading memory usage")?);
        vm.request_stop();
        vm.wait();
    } else if vm.wait_timeout(BOOT_PATIENCE).is_none() {
        bail!("the guest did not end within {BOOT_PATIENCE:?}");
    }
    let ts = vm.timestamps();
    let (Some(run), Some(timer)) = (ts.first_vcpu_run(), ts.boot_timer()) else {
        bail!("the guest did not write the boot timer");
    };
    let report = ChildReport {
        main_ns,
        first_vcpu_run_ns: instant_to_monotonic_ns(run),
        boot_timer_ns: instant_to_monotonic_ns(timer),
        process_rss_bytes: memory.map(|m| m.process_rss_bytes),
        guest_ram_resident_bytes: memory.map(|m| m.guest_ram_resident_bytes),
        guest_ram_bytes: memory.map(|m| m.guest_ram_bytes),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs the child and returns (start of spawn in monotonic ns, its report, process gone ns).
pub fn run_child(
    guest: &Path,
    mem_mib: u32,
    hold: bool,
) -> anyhow::Result<(u64, ChildReport, u64)> {
    let exe: PathBuf = std::env::current_exe().context("locating bench-report")?;
    let mut cmd = Command::new(exe);
    cmd.arg("embedded-vm")
        .arg("--guest")
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
        .context("starting bench-report embedded-vm")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let output = child.wait_with_output()?;
    let gone = monotonic_ns();
    if !output.status.success() {
        bail!(
            "embedded-vm child failed ({}): {}",
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
