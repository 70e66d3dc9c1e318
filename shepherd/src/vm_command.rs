//! `sge_virtualizer vm`: boot a VM directly in the embedded VMM, for debugging and benchmarks.
//! No agent conversation: the VM runs until the guest resets, triple-faults or is interrupted,
//! and the exit reason, boot timestamps and VMM memory overhead are printed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use signal_hook::consts::signal::{SIGINT, SIGTERM};

/// Options of `vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Kernel (uncompressed vmlinux, or any 64-bit ELF).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: the VMM's).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Hybrid-vsock base path: guest connections to port P go to PATH_P; host connections to
    /// PATH say `CONNECT P`.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// Write the serial console to this new file (bounded to 1 MiB; an existing file or a
    /// symlink is refused) instead of our stdout.
    #[arg(long)]
    pub serial: Option<PathBuf>,
    /// Do not install the seccomp filters (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Leave out the virtio-balloon device that jobs' VMs get: a VM with only the serial port
    /// and the i8042 controller, to compare the guest's boot with VMMs that add no device.
    #[arg(long)]
    pub no_balloon: bool,
}

/// Boots the VM and waits for it; returns the process exit code (0 for a guest reset).
pub fn run(args: VmArgs) -> anyhow::Result<i32> {
    let mut config = vmm::VmConfig::new(&args.kernel);
    config.initrd = args.initrd;
    if let Some(c) = args.cmdline {
        config.cmdline = c;
    }
    config.mem_mib = args.mem;
    config.vcpus = args.vcpus;
    config.seccomp = !args.no_seccomp;
    config.balloon = !args.no_balloon;
    config.vsock = args.vsock_uds.map(|uds_path| vmm::VsockConfig {
        guest_cid: 3,
        uds_path,
    });
    config.serial = match args.serial {
        Some(path) => vmm::SerialSink::File {
            path,
            max_bytes: 1 << 20,
        },
        None => vmm::SerialSink::Memory { capacity: 1 << 20 },
    };
    let to_stdout = matches!(config.serial, vmm::SerialSink::Memory { .. });

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let vm = vmm::Vm::start(config).context("starting the VM")?;
    let mut printed = 0usize;
    let reason = loop {
        let done = vm.wait_timeout(Duration::from_millis(50));
        if to_stdout {
            if let Some(out) = vm.console_output() {
                // The ring keeps the last MiB; print what is new since the last look.
                let fresh = out.len().saturating_sub(printed.min(out.len()));
                use std::io::Write;
                let _ = std::io::stdout().write_all(&out[out.len() - fresh..]);
                printed = out.len();
            }
        }
        if let Some(reason) = done {
            break reason;
        }
        if stop.load(Ordering::Relaxed) {
            vm.request_stop();
        }
    };
    let t = vm.timestamps();
    let ms = |a: Option<std::time::Instant>| match (t.created(), a) {
        (Some(c), Some(a)) => format!(
            "{:.3} ms",
            a.saturating_duration_since(c).as_secs_f64() * 1e3
        ),
        _ => "-".into(),
    };
    eprintln!("vm: ended: {reason}");
    eprintln!(
        "vm: since VM created: first vCPU run {}, boot timer {}, exit {}",
        ms(t.first_vcpu_run()),
        ms(t.boot_timer()),
        ms(t.exited())
    );
    if let Ok(m) = vm.memory_usage() {
        eprintln!(
            "vm: RSS {} KiB, guest RAM resident {} KiB, VMM overhead {} KiB",
            m.process_rss_bytes / 1024,
            m.guest_ram_resident_bytes / 1024,
            m.vmm_overhead_bytes() / 1024
        );
    }
    Ok(match reason {
        vmm::ExitReason::GuestReset | vmm::ExitReason::GuestShutdown => 0,
        vmm::ExitReason::HostRequest => 130,
        _ => 1,
    })
}
