//! Host resource accounting for the VMM process: resident memory, split into guest RAM and the
//! VMM's own footprint (the benchmark target is the latter after boot).

/// Memory footprint of the process running a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident set size of the whole process (`VmRSS`).
    pub process_rss_bytes: u64,
    /// Bytes of guest RAM resident on the host (`mincore` over the guest mappings).
    pub guest_ram_resident_bytes: u64,
    /// Guest RAM size.
    pub guest_ram_bytes: u64,
}

impl MemoryUsage {
    /// Resident memory that is not guest RAM: the VMM's own footprint (plus whatever else the
    /// embedding process holds).
    pub fn vmm_overhead_bytes(&self) -> u64 {
        self.process_rss_bytes
            .saturating_sub(self.guest_ram_resident_bytes)
    }
}

/// Parses `VmRSS:` (in kB) out of a `/proc/<pid>/status` text.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's resident set size.
pub fn process_rss_bytes() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_vm_rss(&status).ok_or_else(|| std::io::Error::other("no VmRSS in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads: 1\n";
        assert_eq!(parse_vm_rss(s), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("VmRSS: lots"), None);
    }

    #[test]
    fn overhead_excludes_guest_ram() {
        let u = MemoryUsage {
            process_rss_bytes: 10 << 20,
            guest_ram_resident_bytes: 8 << 20,
            guest_ram_bytes: 128 << 20,
        };
        assert_eq!(u.vmm_overhead_bytes(), 2 << 20);
        assert!(process_rss_bytes().unwrap() > 0);
    }
}
