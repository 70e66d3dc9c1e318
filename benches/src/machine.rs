//! What the benchmarks ran on: CPU, cores, memory, kernel, virtualization flags, the KVM module,
//! QEMU's version and what the embedded VMM's probe says about this host.

use std::process::Command;

use serde::{Deserialize, Serialize};

/// The machine a result was measured on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub os: String,
    /// `vmx` (Intel VT-x) in the CPU flags.
    pub vmx: bool,
    /// `svm` (AMD-V) in the CPU flags.
    pub svm: bool,
    pub dev_kvm: bool,
    /// KVM modules under /sys/module (e.g. `kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub kvm_modules: Vec<String>,
    pub qemu_version: String,
    /// The embedded VMM's verdict (`vmm::kvm_can_run_linux`): can KVM run a Linux guest here?
    pub kvm_can_run_linux: bool,
    pub kvm_probe: String,
}

impl MachineInfo {
    pub fn hardware_kvm(&self) -> bool {
        self.dev_kvm && (self.vmx || self.svm)
    }

    /// Collects the description of this machine.
    pub fn collect() -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_default();
        let kvm_modules = std::fs::read_dir("/sys/module")
            .map(|d| {
                let mut v: Vec<String> = d
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let probe = vmm::kvm_can_run_linux();
        MachineInfo {
            cpu_model: field("model name"),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_gib: mem_kb / (1024.0 * 1024.0),
            kernel: first_line("uname", &["-sr"]),
            os,
            vmx: has_flag("vmx"),
            svm: has_flag("svm"),
            dev_kvm: std::path::Path::new("/dev/kvm").exists(),
            kvm_modules,
            qemu_version: first_line("qemu-system-x86_64", &["--version"]),
            kvm_can_run_linux: probe.usable,
            kvm_probe: probe.reason,
        }
    }
}

/// First line of a command's stdout, or a note that it could not run.
fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(e) => format!("({program} not available: {e})"),
    }
}
