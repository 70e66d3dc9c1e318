//! Resident memory of another process from `/proc/<pid>/smaps`, split into guest RAM (the
//! mappings whose name marks them as guest memory, e.g. QEMU's `memfd:mem`) and the rest.

use anyhow::Context;

/// A process's resident memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentSplit {
    /// Sum of `Rss:` over all mappings.
    pub total_bytes: u64,
    /// Sum of `Rss:` over the guest-RAM mappings.
    pub guest_bytes: u64,
}

impl ResidentSplit {
    pub fn overhead_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.guest_bytes)
    }
}

/// Parses smaps text; a mapping is guest RAM when its header line contains `guest_marker`.
pub fn parse_smaps(text: &str, guest_marker: &str) -> ResidentSplit {
    let mut split = ResidentSplit::default();
    let mut in_guest = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest = line.contains(guest_marker);
        } else if first == "Rss:" {
            let kb: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            split.total_bytes += kb * 1024;
            if in_guest {
                split.guest_bytes += kb * 1024;
            }
        }
    }
    split
}

/// Resident bytes by kind of mapping: the executable `exe`, shared libraries, heap, stacks,
/// KVM's per-vCPU run pages, other anonymous memory (which includes guest RAM), other.
pub fn rss_by_kind(text: &str, exe: &str) -> Vec<(String, u64)> {
    const KINDS: [&str; 7] = [
        "executable",
        "shared libraries",
        "heap",
        "main stack",
        "KVM vCPU mappings",
        "anonymous (incl. guest RAM, thread stacks)",
        "other",
    ];
    let mut sums = [0u64; KINDS.len()];
    let mut kind = 6;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            let path = line.split_whitespace().nth(5).unwrap_or("");
            kind = if path.is_empty() {
                5
            } else if path == exe {
                0
            } else if path.contains(".so") {
                1
            } else if path == "[heap]" {
                2
            } else if path == "[stack]" {
                3
            } else if path.starts_with("anon_inode:kvm") {
                4
            } else {
                6
            };
        } else if first == "Rss:" {
            let kb: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            sums[kind] += kb * 1024;
        }
    }
    KINDS
        .iter()
        .zip(sums)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Reads `/proc/<pid>/smaps`.
pub fn resident_split(pid: u32, guest_marker: &str) -> anyhow::Result<ResidentSplit> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_smaps(&text, guest_marker))
}

/// Direct children of `pid` (from `/proc/*/stat`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces; split after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory (VmRSS) of `pid` and every process below it, in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        frontier.extend(children(p));
    }
    total
}

/// The command name of `pid`.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_mappings() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Size:                 64 kB
Rss:                  40 kB
7f00-7f80 rw-s 00000000 00:01 7 /memfd:mem (deleted)
Size:             131072 kB
Rss:                 100 kB
7f90-7fa0 rw-p 00000000 00:00 0
Rss:                   8 kB
";
        let s = parse_smaps(smaps, "memfd:mem");
        assert_eq!(s.total_bytes, 148 * 1024);
        assert_eq!(s.guest_bytes, 100 * 1024);
        assert_eq!(s.overhead_bytes(), 48 * 1024);
    }
}
