//! Whether this host can back a VM's start now ([`crate::guest_ram::start_footprint_mib`]).
//! Guest RAM is backed lazily, so a VM the host cannot even start would be killed by the OOM
//! killer on its way up; a shepherd refuses it up front instead, as a shortage that may pass
//! (other jobs end, memory frees up). "Can give" is what the kernel reports it could give without
//! swapping out page cache it needs (`MemAvailable`) plus free swap.

use std::path::Path;

/// The host cannot back a VM of this size now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the VM needs {wanted_mib} MiB to start (the VMM, the guest kernel's page array, boot \
     memory) and this host can give {available_mib} MiB now (MemAvailable + SwapFree)"
)]
pub struct MemoryShortfall {
    pub wanted_mib: u64,
    pub available_mib: u64,
}

/// Checks `wanted_mib` against `/proc/meminfo`. A host whose meminfo cannot be read is not
/// refused: nothing says it is short.
pub fn can_back(wanted_mib: u64) -> Result<(), MemoryShortfall> {
    match available_mib(Path::new("/proc/meminfo")) {
        Some(available_mib) if wanted_mib > available_mib => Err(MemoryShortfall {
            wanted_mib,
            available_mib,
        }),
        _ => Ok(()),
    }
}

/// `MemAvailable + SwapFree` in MiB, from a meminfo file.
fn available_mib(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    parse_available_mib(&text)
}

fn parse_available_mib(text: &str) -> Option<u64> {
    let available = field_kib(text, "MemAvailable")?;
    let swap = field_kib(text, "SwapFree").unwrap_or(0);
    Some(available.saturating_add(swap) / 1024)
}

/// The host's `MemTotal` in MiB (what a guest sized from the host is sized from).
pub fn total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_total_mib(&text)
}

fn parse_total_mib(text: &str) -> Option<u64> {
    Some(field_kib(text, "MemTotal")? / 1024)
}

/// The value in kB of meminfo line `key:`.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_available_memory_and_free_swap() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\n\
                    MemAvailable:    2097152 kB\nSwapTotal: 0 kB\nSwapFree:        1048576 kB\n";
        assert_eq!(parse_available_mib(text), Some(3072));
        assert_eq!(parse_available_mib("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn reads_mem_total() {
        assert_eq!(
            parse_total_mib("MemTotal:       24684544 kB\nMemFree: 1 kB\n"),
            Some(24106)
        );
        assert_eq!(parse_total_mib("MemFree: 1 kB\n"), None);
        assert!(total_mib().unwrap_or(0) > 0);
    }

    #[test]
    fn this_host_backs_a_small_vm_but_not_an_impossible_one() {
        assert_eq!(can_back(1), Ok(()));
        let e = can_back(u64::MAX / 2).unwrap_err();
        assert!(e.available_mib > 0);
        assert!(e.to_string().contains("MemAvailable"), "{e}");
    }
}
