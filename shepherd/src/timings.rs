//! Phase timestamps of one job, reported by `run --timings` and used by the benchmarks.

use std::sync::OnceLock;
use std::time::Instant;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start; call first thing in `main`.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Milliseconds since process start of each phase (None where the backend cannot tell).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    pub backend: String,
    pub backend_reason: String,
    pub vm_created_ms: Option<f64>,
    pub first_instruction_ms: Option<f64>,
    pub agent_hello_ms: Option<f64>,
    pub job_spawned_ms: Option<f64>,
    pub job_exited_ms: Option<f64>,
    pub vm_gone_ms: Option<f64>,
    /// Guest CLOCK_BOOTTIME when the agent (init) started: the guest kernel's boot time.
    pub guest_init_ms: Option<f64>,
}

/// Milliseconds from process start to `at`.
pub fn since_start(at: Instant) -> f64 {
    at.saturating_duration_since(process_start()).as_secs_f64() * 1000.0
}

/// Milliseconds from process start to now.
pub fn now_ms() -> Option<f64> {
    Some(since_start(Instant::now()))
}
