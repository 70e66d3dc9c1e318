//! Boots a guest kernel in the embedded VMM until its virtio-vsock driver reaches DRIVER_OK (or
//! `Run /init` appears on the console), then prints the process's resident memory split into
//! guest RAM and VMM overhead — the number the "VMM RSS excluding guest RAM" benchmark tracks.
//!
//! `cargo run -p vmm --release --example boot_footprint -- <vmlinux> [initramfs] [--emulated-host] [--vcpus=N] [--print-console]`
//! `--emulated-host` adds the workarounds a software-emulating KVM (kvm_pvm) needs (see
//! tests/real_kernel.rs).

use std::time::{Duration, Instant};

use vmm::{CpuFeature, SerialSink, Vm, VmConfig, VsockConfig, DEFAULT_CMDLINE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let emulated = args.iter().any(|a| a == "--emulated-host");
    let print_console = args.iter().any(|a| a == "--print-console");
    let vcpus: u8 = args
        .iter()
        .find_map(|a| a.strip_prefix("--vcpus="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(kernel) = paths.first() else {
        eprintln!("usage: boot_footprint <vmlinux> [initramfs] [--emulated-host]");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("vmm-footprint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let mut config = VmConfig::new(kernel.as_str());
    config.initrd = paths.get(1).map(|p| p.into());
    config.vcpus = vcpus;
    config.serial = SerialSink::Memory {
        capacity: 256 * 1024,
    };
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("v.sock"),
    });
    if emulated {
        config.cmdline = format!("{DEFAULT_CMDLINE} noxsave clearcpuid=smap,smep,popcnt,cx16");
        config.hidden_cpu_features = vec![
            CpuFeature::Xsave,
            CpuFeature::Smap,
            CpuFeature::Smep,
            CpuFeature::Popcnt,
            CpuFeature::Cmpxchg16b,
        ];
    }
    let start = Instant::now();
    let vm = match Vm::start(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cannot start the VM: {e}");
            std::process::exit(1);
        }
    };
    let booted = loop {
        let console = vm.console_output().unwrap_or_default();
        if vm.vsock().is_some_and(|v| v.driver_ok())
            || String::from_utf8_lossy(&console).contains("Run /init")
        {
            break true;
        }
        if vm.exit_reason().is_some() || start.elapsed() > Duration::from_secs(600) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let usage = vm.memory_usage().expect("memory usage");
    println!(
        "booted={booted} after {:.1} s: process RSS {} KiB, guest RAM resident {} KiB (of {} MiB), VMM overhead {} KiB",
        start.elapsed().as_secs_f64(),
        usage.process_rss_bytes / 1024,
        usage.guest_ram_resident_bytes / 1024,
        usage.guest_ram_bytes >> 20,
        usage.vmm_overhead_bytes() / 1024
    );
    vm.request_stop();
    println!("VM ended: {}", vm.wait());
    if print_console {
        println!(
            "{}",
            String::from_utf8_lossy(&vm.console_output().unwrap_or_default())
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
