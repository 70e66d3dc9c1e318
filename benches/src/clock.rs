//! A clock two processes share: `CLOCK_MONOTONIC` in nanoseconds, so a child can report when
//! something happened and the parent can subtract its own start time.

use std::time::Instant;

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `CLOCK_MONOTONIC` reading (ns) of a past `Instant` (std's `Instant` is that clock on Linux,
/// but opaque; the conversion is exact to the two readings' distance, well under a microsecond).
pub fn instant_to_monotonic_ns(at: Instant) -> u64 {
    let now_instant = Instant::now();
    let now_mono = monotonic_ns();
    let ago = now_instant.saturating_duration_since(at).as_nanos() as u64;
    now_mono.saturating_sub(ago)
}

/// Milliseconds from `start_ns` to `end_ns` (both monotonic).
pub fn ms_between(start_ns: u64, end_ns: u64) -> f64 {
    (end_ns as f64 - start_ns as f64) / 1e6
}
