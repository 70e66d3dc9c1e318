//! The guest's memory as the host should hear of it when the job ends: its size and how many
//! processes the kernel's OOM killer took (the guest runs only this job, so they were the job's).

use crate::protocol::GuestMemoryReport;

/// Reads `/proc/meminfo` and `/proc/vmstat`; a file that cannot be read counts as zero.
pub fn report() -> GuestMemoryReport {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    GuestMemoryReport {
        total_kib: field(&read("/proc/meminfo"), "MemTotal:").unwrap_or(0),
        oom_kills: field(&read("/proc/vmstat"), "oom_kill").unwrap_or(0),
    }
}

/// The number after `key` on the line that starts with it (`MemTotal: 123 kB`, `oom_kill 2`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        // `oom_kill` must not match `oom_kill_something`
        if !key.ends_with(':') && !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_size_and_the_oom_kills() {
        assert_eq!(
            field("MemFree: 1 kB\nMemTotal:  246120 kB\n", "MemTotal:"),
            Some(246120)
        );
        assert_eq!(field("oom_kill_x 5\noom_kill 2\n", "oom_kill"), Some(2));
        assert_eq!(field("pgfault 7\n", "oom_kill"), None);
        let r = report();
        assert!(r.total_kib > 0, "{r:?}");
    }
}
