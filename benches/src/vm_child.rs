//! The child side of the embedded-VMM measurements: boot the tiny guest in this (fresh, minimal)
//! process, optionally hold it booted and read this process's memory, and print a
//! [`ChildReport`] as one JSON line. Compiled into `bench-vm` (benches/src/vm_child_main.rs),
//! a binary with nothing but this, so the memory it reports is the VMM's and a Rust runtime's.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::clock::{instant_to_monotonic_ns, monotonic_ns};

/// Time between the guest's signal and the memory reading, so start-up transients settle.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Longest a tiny guest may take to signal (it runs a handful of instructions).
const BOOT_PATIENCE: Duration = Duration::from_secs(10);

/// The VM every embedded measurement boots: the tiny guest, `mem_mib` of RAM, one vCPU, no
/// kernel command line, console discarded.
pub fn config(guest: &Path, mem_mib: u32) -> vmm::VmConfig {
    let mut c = vmm::VmConfig::new(guest);
    c.mem_mib = mem_mib.into();
    c.cmdline = String::new();
    c
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
    /// Resident bytes by kind of mapping (see [`crate::proc_memory::rss_by_kind`]).
    #[serde(default)]
    pub rss_by_kind: Vec<(String, u64)>,
}

/// The child side (`bench-vm`): boots `guest`; with `hold`, waits for the
/// boot timer, lets the process settle, reads its memory, then stops the VM; prints the report.
pub fn child_main(guest: &Path, mem_mib: u32, hold: bool) -> anyhow::Result<()> {
    let main_ns = monotonic_ns();
    let vm = vmm::Vm::start(config(guest, mem_mib)).context("vmm::Vm::start")?;
    let deadline = Instant::now() + BOOT_PATIENCE;
    let mut memory = None;
    let mut rss_by_kind = Vec::new();
    if hold {
        while vm.timestamps().boot_timer().is_none() {
            if Instant::now() > deadline || vm.exit_reason().is_some() {
                bail!("the guest did not write the boot timer");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(SETTLE);
        memory = Some(vm.memory_usage().context("reading memory usage")?);
        let smaps = std::fs::read_to_string("/proc/self/smaps").context("reading smaps")?;
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        rss_by_kind = crate::proc_memory::rss_by_kind(&smaps, &exe);
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
        rss_by_kind,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
