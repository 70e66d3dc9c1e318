//! The run state every thread of a VM shares: running, paused or stopping, the first reason the
//! VM stopped, the boot timestamps, and the kick that pulls vCPUs out of `KVM_RUN` so they see a
//! change. vCPU threads park here while paused; the handle waits here for the end. A snapshot
//! asks the parked vCPU threads, through here, to capture their own state
//! ([`Lifecycle::capture_vcpus`]): KVM wants a vCPU's ioctls from the thread that runs it.

use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::snapshot::vcpu_state::VcpuState;
use crate::snapshot::SnapshotError;

/// Why a VM stopped. The first reason wins; later ones are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset through the i8042 controller (`reboot=k`); this is how a
    /// Linux guest reboots or (with `reboot=k`) powers off.
    GuestReset,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    GuestShutdown,
    /// The guest raised a system event (`KVM_EXIT_SYSTEM_EVENT`, e.g. PSCI/ACPI shutdown).
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*` type.
        kind: u32,
    },
    /// KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`), e.g. an instruction its
    /// emulator cannot handle.
    InternalError {
        /// The vCPU that hit it.
        vcpu: u8,
        /// `KVM_INTERNAL_ERROR_*` sub-error.
        suberror: u32,
    },
    /// The vCPU could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The host asked the VM to stop ([`crate::VmHandle::request_stop`]).
    HostRequest,
    /// The VMM thread that drives the virtio devices failed.
    DeviceError {
        /// What went wrong.
        message: String,
    },
    /// A vCPU thread failed (an ioctl error or an exit the VMM does not handle).
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// What went wrong.
        message: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => write!(f, "guest reset (i8042)"),
            Self::GuestShutdown => write!(f, "guest shutdown (triple fault)"),
            Self::SystemEvent { kind } => write!(f, "guest system event {kind}"),
            Self::InternalError { vcpu, suberror } => {
                write!(f, "KVM internal error {suberror} on vCPU {vcpu}")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu} failed to enter the guest (reason {reason:#x})"
                )
            }
            Self::HostRequest => write!(f, "stopped at the host's request"),
            Self::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            Self::DeviceError { message } => write!(f, "device emulation failed: {message}"),
        }
    }
}

/// What the vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Host monotonic timestamps of a VM's life.
#[derive(Debug, Default)]
pub struct Timestamps {
    created: OnceLock<Instant>,
    first_vcpu_run: OnceLock<Instant>,
    boot_timer: OnceLock<Instant>,
    exited: OnceLock<Instant>,
}

impl Timestamps {
    pub(crate) fn mark_created(&self) {
        let _ = self.created.set(Instant::now());
    }
    pub(crate) fn mark_first_vcpu_run(&self) {
        let _ = self.first_vcpu_run.set(Instant::now());
    }
    /// Records the boot-timer write; only the first one counts. Returns whether it was first.
    pub(crate) fn mark_boot_timer(&self) -> bool {
        self.boot_timer.set(Instant::now()).is_ok()
    }
    pub(crate) fn mark_exited(&self) {
        let _ = self.exited.set(Instant::now());
    }
    /// When the VM was created (before guest memory was set up).
    pub fn created(&self) -> Option<Instant> {
        self.created.get().copied()
    }
    /// When the first vCPU entered `KVM_RUN`.
    pub fn first_vcpu_run(&self) -> Option<Instant> {
        self.first_vcpu_run.get().copied()
    }
    /// When the guest wrote the boot timer (see [`crate::devices::boot_timer`]).
    pub fn boot_timer(&self) -> Option<Instant> {
        self.boot_timer.get().copied()
    }
    /// When the VM stopped.
    pub fn exited(&self) -> Option<Instant> {
        self.exited.get().copied()
    }
    /// Time from VM creation to the boot-timer write.
    pub fn boot_time(&self) -> Option<Duration> {
        Some(
            self.boot_timer()?
                .saturating_duration_since(self.created()?),
        )
    }
}

struct State {
    run: RunState,
    exit: Option<ExitReason>,
    /// vCPU threads currently parked because of a pause.
    parked: usize,
    /// vCPU threads still running their loop.
    live: usize,
    /// vCPUs the VM has.
    vcpus: usize,
    /// Bumped by each capture request; a parked vCPU serves each generation once.
    capture_generation: u64,
    /// The current request's results, one slot per vCPU.
    captures: Vec<Option<Result<VcpuState, SnapshotError>>>,
}

/// Shared run state of one VM.
pub(crate) struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
    pub(crate) kicker: crate::vcpu::Kicker,
    pub(crate) timestamps: Timestamps,
}

impl Lifecycle {
    pub(crate) fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(State {
                run: RunState::Running,
                exit: None,
                parked: 0,
                live: vcpus,
                vcpus,
                capture_generation: 0,
                captures: Vec::new(),
            }),
            changed: Condvar::new(),
            kicker: crate::vcpu::Kicker::new(vcpus),
            timestamps: Timestamps::default(),
        }
    }

    /// Locks the state; a poisoned lock (a thread panicked holding it) still gives the state,
    /// which is plain data that stays consistent between statements.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        self.kicker.kick_all();
    }

    /// Stops the VM for `reason` unless it is already stopping; kicks every vCPU.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        {
            let mut s = self.lock();
            if s.exit.is_none() {
                tracing::debug!(%reason, "VM stopping");
                s.exit = Some(reason);
                self.timestamps.mark_exited();
            }
            s.run = RunState::Stopping;
        }
        self.changed.notify_all();
        self.kick();
    }

    pub(crate) fn run_state(&self) -> RunState {
        self.lock().run
    }

    pub(crate) fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Called by vCPU thread `index` that saw [`RunState::Paused`]: parks until resumed or
    /// stopped. While parked it answers capture requests ([`Self::capture_vcpus`]) by calling
    /// `capture` on this thread, without the lock held.
    pub(crate) fn park_while_paused(
        &self,
        index: usize,
        capture: &mut dyn FnMut() -> Result<VcpuState, SnapshotError>,
    ) {
        let mut s = self.lock();
        s.parked += 1;
        self.changed.notify_all();
        let mut served = s.capture_generation;
        while s.run == RunState::Paused {
            if s.capture_generation != served {
                served = s.capture_generation;
                drop(s);
                let result = capture();
                s = self.lock();
                if s.capture_generation == served {
                    if let Some(slot) = s.captures.get_mut(index) {
                        *slot = Some(result);
                    }
                    self.changed.notify_all();
                }
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// Asks every parked vCPU thread to capture its state and waits (up to `timeout`) for all
    /// of them. The VM must be paused with every vCPU parked.
    pub(crate) fn capture_vcpus(&self, timeout: Duration) -> Result<Vec<VcpuState>, SnapshotError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if s.run != RunState::Paused || s.live != s.vcpus {
            return Err(SnapshotError::NotRunning);
        }
        if s.parked < s.live {
            return Err(SnapshotError::Timeout("pause"));
        }
        s.capture_generation += 1;
        s.captures = (0..s.vcpus).map(|_| None).collect();
        self.changed.notify_all();
        while s.captures.iter().any(Option::is_none) {
            if s.run != RunState::Paused {
                return Err(SnapshotError::NotRunning);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SnapshotError::Timeout("report their state"));
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut s.captures)
            .into_iter()
            .flatten()
            .collect()
    }

    /// Called by a vCPU thread when its loop ends.
    pub(crate) fn vcpu_exited(&self) {
        self.lock().live -= 1;
        self.changed.notify_all();
    }

    /// Pauses all vCPUs; returns once every live vCPU is parked (or the VM stopped). Returns
    /// false if the VM is stopping.
    pub(crate) fn pause(&self, timeout: Duration) -> bool {
        {
            let mut s = self.lock();
            if s.run == RunState::Stopping {
                return false;
            }
            s.run = RunState::Paused;
        }
        self.kick();
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.run == RunState::Paused && s.parked < s.live {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Re-kick periodically: a vCPU that was between exits when the first kick landed
            // may have consumed it already.
            let wait = (deadline - now).min(Duration::from_millis(20));
            let (guard, _) = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner());
            s = guard;
            if s.parked < s.live {
                drop(s);
                self.kick();
                s = self.lock();
            }
        }
        s.run == RunState::Paused && s.parked >= s.live
    }

    /// Resumes paused vCPUs.
    pub(crate) fn resume(&self) -> bool {
        let mut s = self.lock();
        if s.run != RunState::Paused {
            return false;
        }
        s.run = RunState::Running;
        drop(s);
        self.changed.notify_all();
        true
    }

    /// Waits until the VM has an exit reason, or `timeout` passes.
    pub(crate) fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        loop {
            if let Some(r) = &s.exit {
                return Some(r.clone());
            }
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.changed
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins() {
        let l = Lifecycle::new(1);
        l.request_exit(ExitReason::GuestReset);
        l.request_exit(ExitReason::HostRequest);
        assert_eq!(l.exit_reason(), Some(ExitReason::GuestReset));
        assert_eq!(l.run_state(), RunState::Stopping);
        assert!(l.timestamps.exited().is_some());
    }

    #[test]
    fn pause_waits_for_parked_vcpus_and_resume_releases_them() {
        let l = Arc::new(Lifecycle::new(1));
        let l2 = l.clone();
        let t = std::thread::spawn(move || loop {
            match l2.run_state() {
                RunState::Paused => l2.park_while_paused(0, &mut || Err(SnapshotError::NotRunning)),
                RunState::Stopping => break,
                RunState::Running => std::thread::sleep(Duration::from_millis(1)),
            }
        });
        assert!(l.pause(Duration::from_secs(5)));
        assert!(l.resume());
        assert!(!l.resume(), "already running");
        l.request_exit(ExitReason::HostRequest);
        t.join().unwrap();
        assert!(
            !l.pause(Duration::from_millis(10)),
            "cannot pause a stopping VM"
        );
    }

    #[test]
    fn capture_asks_every_parked_vcpu_once_per_request_on_its_own_thread() {
        let l = Arc::new(Lifecycle::new(2));
        let threads: Vec<_> = (0..2usize)
            .map(|index| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut served = 0u32;
                    loop {
                        match l.run_state() {
                            RunState::Paused => l.park_while_paused(index, &mut || {
                                served += 1;
                                Err(SnapshotError::InvalidState(format!(
                                    "vCPU {index} request {served}"
                                )))
                            }),
                            RunState::Stopping => break served,
                            RunState::Running => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        assert!(
            matches!(
                l.capture_vcpus(Duration::from_secs(5)),
                Err(SnapshotError::NotRunning)
            ),
            "only a paused VM is captured"
        );
        assert!(l.pause(Duration::from_secs(5)));
        for request in 1..=2 {
            match l.capture_vcpus(Duration::from_secs(5)) {
                Err(SnapshotError::InvalidState(m)) => {
                    assert_eq!(m, format!("vCPU 0 request {request}"))
                }
                other => panic!("{other:?}"),
            }
        }
        l.request_exit(ExitReason::HostRequest);
        assert!(matches!(
            l.capture_vcpus(Duration::from_secs(5)),
            Err(SnapshotError::NotRunning)
        ));
        for t in threads {
            assert_eq!(t.join().unwrap(), 2, "one capture per request and vCPU");
        }
    }

    #[test]
    fn wait_exit_times_out_without_a_reason() {
        let l = Lifecycle::new(0);
        assert_eq!(l.wait_exit(Some(Duration::from_millis(10))), None);
    }
}
