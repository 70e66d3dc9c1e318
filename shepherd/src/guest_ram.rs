//! How much RAM a job's guest gets, and which rule chose it. A job must get the memory it
//! would get as a host process: its own memory request when it made one, else the host's
//! memory (less a reserve), never a fixed small number. Guest RAM is mapped lazily and given
//! back when the guest frees it (virtio-balloon free page reporting), so a large guest costs the
//! host only what the job touches; what a VM needs up front is [`start_footprint_mib`].

use std::fmt;

use guest_agent::protocol::GuestMemoryReport;

/// The least guest RAM the guest kernel boots with.
pub const MIN_GUEST_MIB: u32 = 64;

/// What the job asked for, in bytes over all its slots on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMemoryRequest {
    /// `h_vmem` (execd's PDC kills the job when the VMM's RSS goes above it).
    pub hard_vmem: Option<u64>,
    /// `s_vmem`.
    pub soft_vmem: Option<u64>,
    /// A memory consumable the job requested (`-l mem_free=4G`): its name and amount.
    pub consumable: Option<(String, u64)>,
}

/// What the settings say about guest RAM for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamPolicy {
    /// A fixed size for jobs that request none (`memory_mib`); `None`: the host's memory.
    pub fixed_mib: Option<u32>,
    /// The most any job's guest gets in this queue (`memory_max_mib`).
    pub max_mib: Option<u32>,
    /// Host memory kept back from a guest sized from the host (`memory_reserve_mib`).
    pub reserve_mib: u32,
    /// Host memory the VMM itself needs beyond guest RAM (`vmm_overhead_mib`).
    pub vmm_overhead_mib: u32,
}

/// The rule that chose a guest's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeRule {
    /// The job's `h_vmem` (bytes over its slots), less the VMM's overhead.
    HardVmem(u64),
    /// The job's `s_vmem`, less the VMM's overhead.
    SoftVmem(u64),
    /// A memory consumable the job requested, less the VMM's overhead.
    Consumable(String, u64),
    /// The queue's `memory_mib`.
    Fixed,
    /// The host's memory less the reserve and the VMM's overhead.
    Host { total_mib: u64, reserve_mib: u32 },
    /// The host's memory is unknown and nothing else said: the least a guest boots with.
    Least,
}

impl SizeRule {
    /// The job's own request chose the size (so a guest too small to boot is the job's).
    pub fn is_the_jobs(&self) -> bool {
        matches!(
            self,
            SizeRule::HardVmem(_) | SizeRule::SoftVmem(_) | SizeRule::Consumable(..)
        )
    }
}

/// A guest's RAM size with the reasons for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRam {
    pub mib: u32,
    pub rule: SizeRule,
    /// The size the rule gave when a cap lowered it, and which cap.
    pub capped: Option<(u32, &'static str)>,
}

impl GuestRam {
    /// Chooses the size for a job: `h_vmem`, else `s_vmem`, else a requested memory consumable,
    /// else the queue's fixed size, else the host's memory less the reserve. The job's rules
    /// are capped by what the host has (a guest larger than the host only costs the guest
    /// kernel's page array); every rule by the queue's `memory_max_mib`. `host_total_mib`:
    /// the host's MemTotal, `None` when unknown.
    pub fn choose(policy: &RamPolicy, job: &JobMemoryRequest, host_total_mib: Option<u64>) -> Self {
        let overhead = u64::from(policy.vmm_overhead_mib);
        let less_overhead = |bytes: u64| (bytes >> 20).saturating_sub(overhead);
        let host_rule = host_total_mib.map(|total_mib| {
            (
                total_mib
                    .saturating_sub(u64::from(policy.reserve_mib))
                    .saturating_sub(overhead),
                SizeRule::Host {
                    total_mib,
                    reserve_mib: policy.reserve_mib,
                },
            )
        });
        let (mib, rule) = if let Some(b) = job.hard_vmem {
            (less_overhead(b), SizeRule::HardVmem(b))
        } else if let Some(b) = job.soft_vmem {
            (less_overhead(b), SizeRule::SoftVmem(b))
        } else if let Some((name, b)) = &job.consumable {
            (less_overhead(*b), SizeRule::Consumable(name.clone(), *b))
        } else if let Some(fixed) = policy.fixed_mib {
            (u64::from(fixed), SizeRule::Fixed)
        } else if let Some(host) = host_rule.clone() {
            host
        } else {
            (u64::from(MIN_GUEST_MIB), SizeRule::Least)
        };
        let mut size = GuestRam {
            mib: clamp_mib(mib),
            rule,
            capped: None,
        };
        if size.rule.is_the_jobs() {
            if let Some((host_mib, _)) = host_rule {
                size.cap(clamp_mib(host_mib), "the host's memory less the reserve");
            }
        }
        if let Some(max) = policy.max_mib {
            size.cap(max.max(MIN_GUEST_MIB), "the queue's memory_max_mib");
        }
        size
    }

    fn cap(&mut self, cap: u32, what: &'static str) {
        if self.mib > cap {
            let before = self.capped.map_or(self.mib, |(b, _)| b);
            self.capped = Some((before, what));
            self.mib = cap;
        }
    }
}

fn clamp_mib(mib: u64) -> u32 {
    mib.clamp(u64::from(MIN_GUEST_MIB), u64::from(u32::MAX)) as u32
}

impl fmt::Display for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest RAM {} MiB: ", self.mib)?;
        let mib = |b: &u64| b >> 20;
        match &self.rule {
            SizeRule::HardVmem(b) => write!(f, "the job's h_vmem ({} MiB) less the VMM's", mib(b))?,
            SizeRule::SoftVmem(b) => write!(f, "the job's s_vmem ({} MiB) less the VMM's", mib(b))?,
            SizeRule::Consumable(name, b) => {
                write!(f, "the job's request {name}={} MiB less the VMM's", mib(b))?
            }
            SizeRule::Fixed => write!(f, "the queue's memory_mib")?,
            SizeRule::Host {
                total_mib,
                reserve_mib,
            } => write!(
                f,
                "the host's {total_mib} MiB less the {reserve_mib} MiB reserve and the VMM's"
            )?,
            SizeRule::Least => write!(f, "the least a guest boots with (host memory unknown)")?,
        }
        if let Some((before, what)) = self.capped {
            write!(f, ", capped from {before} MiB by {what}")?;
        }
        Ok(())
    }
}

/// Host memory a VM needs to start, in MiB: the VMM, the guest kernel's page array (64 bytes
/// per 4 KiB page of guest RAM, which it writes at boot) and what the guest boots in. The rest
/// of guest RAM is backed only as the job touches it, as a host process's memory would be.
pub fn start_footprint_mib(guest_mib: u32, vmm_overhead_mib: u32) -> u64 {
    u64::from(vmm_overhead_mib) + u64::from(guest_mib).div_ceil(64) + u64::from(MIN_GUEST_MIB)
}

/// What to tell the job's owner when the guest's kernel killed processes of the job for want
/// of memory (the job then usually ends with 137, as on a host whose OOM killer struck).
pub fn out_of_memory_note(report: &GuestMemoryReport) -> Option<String> {
    (report.oom_kills > 0).then(|| {
        format!(
            "the guest ran out of memory: its kernel's OOM killer killed {} process{} of the \
             job; the guest had {} MiB (ask for more with h_vmem, or see memory_max_mib)",
            report.oom_kills,
            if report.oom_kills == 1 { "" } else { "es" },
            report.total_kib / 1024
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn policy() -> RamPolicy {
        RamPolicy {
            fixed_mib: None,
            max_mib: None,
            reserve_mib: 1024,
            vmm_overhead_mib: 192,
        }
    }

    #[test]
    fn with_no_request_the_guest_gets_the_host_less_the_reserve() {
        let r = GuestRam::choose(&policy(), &JobMemoryRequest::default(), Some(16384));
        assert_eq!(r.mib, 16384 - 1024 - 192);
        assert!(!r.rule.is_the_jobs());
        let text = r.to_string();
        assert!(
            text.contains("host's 16384 MiB less the 1024 MiB reserve"),
            "{text}"
        );
    }

    #[test]
    fn the_jobs_requests_come_first_in_order() {
        let job = JobMemoryRequest {
            hard_vmem: Some(G),
            soft_vmem: Some(2 * G),
            consumable: Some(("mem_free".into(), 4 * G)),
        };
        let r = GuestRam::choose(&policy(), &job, Some(16384));
        assert_eq!((r.mib, r.rule.clone()), (1024 - 192, SizeRule::HardVmem(G)));
        assert!(r.rule.is_the_jobs());
        let job = JobMemoryRequest {
            hard_vmem: None,
            ..job
        };
        let r = GuestRam::choose(&policy(), &job, Some(16384));
        assert_eq!(r.rule, SizeRule::SoftVmem(2 * G));
        let job = JobMemoryRequest {
            soft_vmem: None,
            ..job
        };
        let r = GuestRam::choose(&policy(), &job, Some(16384));
        assert_eq!(r.mib, 4096 - 192);
        assert!(r.to_string().contains("mem_free=4096 MiB"), "{r}");
    }

    #[test]
    fn a_fixed_size_applies_only_without_a_request() {
        let p = RamPolicy {
            fixed_mib: Some(512),
            ..policy()
        };
        let r = GuestRam::choose(&p, &JobMemoryRequest::default(), Some(16384));
        assert_eq!((r.mib, r.rule), (512, SizeRule::Fixed));
        let job = JobMemoryRequest {
            hard_vmem: Some(2 * G),
            ..Default::default()
        };
        assert_eq!(GuestRam::choose(&p, &job, Some(16384)).mib, 2048 - 192);
    }

    #[test]
    fn caps_lower_the_size_and_say_so() {
        let p = RamPolicy {
            max_mib: Some(4096),
            ..policy()
        };
        let r = GuestRam::choose(&p, &JobMemoryRequest::default(), Some(16384));
        assert_eq!(r.mib, 4096);
        assert_eq!(
            r.capped,
            Some((16384 - 1024 - 192, "the queue's memory_max_mib"))
        );
        // a request beyond the host is the host's size
        let job = JobMemoryRequest {
            hard_vmem: Some(1 << 40),
            ..Default::default()
        };
        let r = GuestRam::choose(&policy(), &job, Some(16384));
        assert_eq!(r.mib, 16384 - 1024 - 192);
        assert!(r.to_string().contains("capped from"), "{r}");
        // both caps: the first size is the one reported
        let r = GuestRam::choose(&p, &job, Some(16384));
        assert_eq!(r.mib, 4096);
        assert_eq!(r.capped.map(|c| c.0), Some((1u32 << 20) - 192));
    }

    #[test]
    fn never_below_what_a_guest_boots_with() {
        let job = JobMemoryRequest {
            hard_vmem: Some(100 << 20),
            ..Default::default()
        };
        assert_eq!(
            GuestRam::choose(&policy(), &job, Some(16384)).mib,
            MIN_GUEST_MIB
        );
        let r = GuestRam::choose(&policy(), &JobMemoryRequest::default(), None);
        assert_eq!((r.mib, r.rule), (MIN_GUEST_MIB, SizeRule::Least));
        let p = RamPolicy {
            max_mib: Some(1),
            ..policy()
        };
        let r = GuestRam::choose(&p, &JobMemoryRequest::default(), Some(16384));
        assert_eq!(r.mib, MIN_GUEST_MIB);
    }

    #[test]
    fn the_start_footprint_is_the_vmm_and_the_guests_page_array() {
        assert_eq!(start_footprint_mib(64 * 1024, 192), 192 + 1024 + 64);
        assert_eq!(start_footprint_mib(256, 192), 192 + 4 + 64);
    }

    #[test]
    fn an_oom_kill_in_the_guest_is_told_with_its_size() {
        let quiet = GuestMemoryReport {
            total_kib: 800 << 10,
            oom_kills: 0,
        };
        assert_eq!(out_of_memory_note(&quiet), None);
        let note = out_of_memory_note(&GuestMemoryReport {
            oom_kills: 1,
            ..quiet
        })
        .unwrap();
        assert!(note.contains("ran out of memory"), "{note}");
        assert!(note.contains("killed 1 process of the job"), "{note}");
        assert!(note.contains("800 MiB"), "{note}");
    }
}
