//! Bounds on the rusage the guest agent reports for the job. The guest is the job owner's, and
//! its report becomes the job's accounting (`usage` → qacct, share-tree usage, billing), so a
//! report no VM of the job's size could produce is cut down to what it could: CPU time at most
//! the job's wall time (measured on the host) times the VM's vCPUs; no negative counters.

use std::time::Duration;

use guest_agent::protocol::Rusage;

/// Allowance for the host measuring the job's wall time from the `Started` frame's arrival,
/// a little after the job began in the guest.
const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// `reported` within what a VM of `vcpus` vCPUs can use in `wall`, and, if anything had to be
/// changed, a sentence saying what (for the trace).
pub fn bounded(reported: Rusage, wall: Duration, vcpus: u8) -> (Rusage, Option<String>) {
    let mut r = reported;
    let mut changes = Vec::new();

    let limit_us = (wall + CLOCK_SLACK)
        .as_micros()
        .saturating_mul(u128::from(vcpus.max(1)));
    let limit_us = u64::try_from(limit_us).unwrap_or(u64::MAX);
    let cpu_us = u128::from(r.utime_us) + u128::from(r.stime_us);
    if cpu_us > u128::from(limit_us) {
        // Keep the guest's user/system split, scaled down to the limit.
        let utime = u128::from(r.utime_us) * u128::from(limit_us) / cpu_us;
        r.utime_us = u64::try_from(utime).unwrap_or(limit_us);
        r.stime_us = limit_us - r.utime_us;
        changes.push(format!(
            "CPU time {:.6} s clamped to {:.6} s (wall time {:.3} s + {} s × {} vCPUs)",
            cpu_us as f64 / 1e6,
            limit_us as f64 / 1e6,
            wall.as_secs_f64(),
            CLOCK_SLACK.as_secs(),
            vcpus.max(1)
        ));
    }

    let mut negative = Vec::new();
    for (name, value) in [
        ("maxrss", &mut r.maxrss),
        ("ixrss", &mut r.ixrss),
        ("idrss", &mut r.idrss),
        ("isrss", &mut r.isrss),
        ("minflt", &mut r.minflt),
        ("majflt", &mut r.majflt),
        ("nswap", &mut r.nswap),
        ("inblock", &mut r.inblock),
        ("oublock", &mut r.oublock),
        ("msgsnd", &mut r.msgsnd),
        ("msgrcv", &mut r.msgrcv),
        ("nsignals", &mut r.nsignals),
        ("nvcsw", &mut r.nvcsw),
        ("nivcsw", &mut r.nivcsw),
    ] {
        if *value < 0 {
            *value = 0;
            negative.push(name);
        }
    }
    if !negative.is_empty() {
        changes.push(format!("negative {} set to 0", negative.join(", ")));
    }

    let note = (!changes.is_empty()).then(|| {
        format!(
            "the guest's rusage report was implausible: {}",
            changes.join("; ")
        )
    });
    (r, note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_plausible_report_is_kept() {
        let r = Rusage {
            utime_us: 3_000_000,
            stime_us: 500_000,
            maxrss: 1024,
            ..Rusage::default()
        };
        // 3.5 s of CPU in 2 s on 2 vCPUs.
        assert_eq!(bounded(r, Duration::from_secs(2), 2), (r, None));
    }

    /// Issue 12 item 7: a guest reporting a year of CPU for a one-second job on one vCPU.
    #[test]
    fn inflated_cpu_time_is_clamped_and_said() {
        let year = 365 * 24 * 3600 * 1_000_000u64;
        let r = Rusage {
            utime_us: year,
            stime_us: year,
            ..Rusage::default()
        };
        let (b, note) = bounded(r, Duration::from_secs(1), 1);
        assert_eq!(b.utime_us + b.stime_us, 2_000_000);
        assert_eq!(b.utime_us, 1_000_000, "the split is kept");
        let note = note.unwrap();
        assert!(
            note.contains("CPU time") && note.contains("clamped"),
            "{note}"
        );
    }

    #[test]
    fn negative_counters_become_zero() {
        let r = Rusage {
            maxrss: -5,
            nvcsw: i64::MIN,
            minflt: 3,
            ..Rusage::default()
        };
        let (b, note) = bounded(r, Duration::from_secs(1), 1);
        assert_eq!((b.maxrss, b.nvcsw, b.minflt), (0, 0, 3));
        assert!(note.unwrap().contains("maxrss, nvcsw"));
    }

    proptest! {
        #[test]
        fn the_result_is_always_within_bounds(
            utime in any::<u64>(), stime in any::<u64>(), wall_ms in 0u64..10_000_000,
            vcpus in any::<u8>(), maxrss in any::<i64>()
        ) {
            let r = Rusage { utime_us: utime, stime_us: stime, maxrss, ..Rusage::default() };
            let wall = Duration::from_millis(wall_ms);
            let (b, note) = bounded(r, wall, vcpus);
            let limit = (wall + CLOCK_SLACK).as_micros() * u128::from(vcpus.max(1));
            prop_assert!(u128::from(b.utime_us) + u128::from(b.stime_us) <= limit);
            prop_assert!(b.maxrss >= 0);
            prop_assert_eq!(note.is_none(), b == r);
        }
    }
}
