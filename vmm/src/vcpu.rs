//! vCPU threads: one per vCPU, each looping on `KVM_RUN` and dispatching port and MMIO exits to
//! the device buses, turning guest stops (reset, triple fault, system event, KVM errors) into an
//! [`ExitReason`], and parking while the VM is paused.
//!
//! A vCPU blocked in `KVM_RUN` (halted, or an AP waiting for its start-up IPI) is pulled out by
//! [`Kicker`]: a real-time signal whose handler sets `kvm_run.immediate_exit`, so a kick that
//! lands just before `KVM_RUN` is not lost either.
//!
//! A parked vCPU thread also captures its own state for a snapshot when asked
//! ([`crate::lifecycle::Lifecycle::capture_vcpus`]): first it completes any port or MMIO access
//! still pending inside KVM (a `KVM_RUN` with `immediate_exit` set finishes the instruction
//! without entering the guest), so the registers it reads are those after the instruction, and a
//! restored guest neither repeats nor loses an I/O access.

use std::cell::Cell;
use std::sync::{Arc, Mutex, Once, OnceLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::credentials::ThreadCredentials;
use crate::lifecycle::{ExitReason, Lifecycle, RunState};
use crate::snapshot::vcpu_state::{self, CpuidEntry, VcpuState, VcpuStateCaps};
use crate::snapshot::SnapshotError;

/// Most `KVM_RUN`s with `immediate_exit` a snapshot spends completing a vCPU's pending I/O (a
/// string instruction exits once per page or so).
const MAX_IO_COMPLETION_RUNS: usize = 1 << 16;

/// Offset from `SIGRTMIN` of the signal used to kick vCPU threads. The VMM installs a handler
/// for it; the embedding program must leave it alone.
pub const VCPU_KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let page = KVM_RUN_PAGE.with(|p| p.get());
    if !page.is_null() {
        // SAFETY: the pointer is this thread's own mmap'd kvm_run page, set while the VcpuFd is
        // alive on this thread and cleared before it is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
    }
}

/// The kick signal number.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick);
    });
    result
}

/// Sends the kick signal to every vCPU thread still in its loop.
pub(crate) struct Kicker {
    /// One slot per vCPU: the thread's id while it runs its loop. A thread clears its slot (under
    /// the lock) before it ends, so no signal ever targets a finished thread.
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
}

impl Kicker {
    pub(crate) fn new(vcpus: usize) -> Self {
        Self {
            threads: Mutex::new(vec![None; vcpus]),
        }
    }

    fn set(&self, index: usize, thread: Option<libc::pthread_t>) {
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = t.get_mut(index) {
            *slot = thread;
        }
    }

    pub(crate) fn kick_all(&self) {
        let t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for thread in t.iter().flatten() {
            // SAFETY: the id belongs to a thread that is still inside its vCPU loop (it removes
            // itself under this lock before returning), so it is a live thread.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }
}

/// What to do after one `KVM_RUN`.
enum Step {
    Continue,
    Exit(ExitReason),
    InternalError,
}

/// One vCPU and what its thread needs.
pub(crate) struct Vcpu {
    pub(crate) index: u8,
    pub(crate) fd: VcpuFd,
    pub(crate) io: Arc<IoManager>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// Seccomp filter to install on the thread before the first `KVM_RUN`.
    pub(crate) seccomp: Option<seccompiler::BpfProgram>,
    /// Identity the thread takes before the first `KVM_RUN`.
    pub(crate) run_as: Option<ThreadCredentials>,
    /// What KVM offers for capturing this vCPU's state (probed by the snapshot's caller
    /// before it asks for a capture, or when the VM was restored).
    pub(crate) state_caps: Arc<OnceLock<VcpuStateCaps>>,
    /// The CPUID the VMM gave this vCPU, recorded in its snapshots.
    pub(crate) cpuid: Vec<CpuidEntry>,
}

impl Vcpu {
    /// The thread body.
    pub(crate) fn run(mut self) {
        let index = self.index;
        if let Err(e) = unblock_kick_signal() {
            self.lifecycle.request_exit(ExitReason::VcpuError {
                vcpu: index,
                message: format!("cannot unblock the kick signal: {e}"),
            });
        }
        let page: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PAGE.with(|p| p.set(page));
        // SAFETY: pthread_self has no preconditions.
        self.lifecycle
            .kicker
            .set(usize::from(index), Some(unsafe { libc::pthread_self() }));

        // A vCPU that cannot take the job user's identity never runs guest code.
        let mut ready = true;
        if let Some(creds) = self.run_as.take() {
            if let Err(e) = creds.apply_to_current_thread() {
                ready = false;
                self.lifecycle.request_exit(ExitReason::VcpuError {
                    vcpu: index,
                    message: e.to_string(),
                });
            }
        }
        if let Some(filter) = self.seccomp.take() {
            if let Err(e) = seccompiler::apply_filter(&filter) {
                self.lifecycle.request_exit(ExitReason::VcpuError {
                    vcpu: index,
                    message: format!("cannot install the seccomp filter: {e}"),
                });
            }
        }

        if ready {
            self.run_loop();
        }

        self.lifecycle.kicker.set(usize::from(index), None);
        KVM_RUN_PAGE.with(|p| p.set(std::ptr::null_mut()));
        self.lifecycle.vcpu_exited();
    }

    fn run_loop(&mut self) {
        loop {
            match self.lifecycle.run_state() {
                RunState::Stopping => return,
                RunState::Paused => {
                    let (fd, io, caps, cpuid, index) = (
                        &mut self.fd,
                        &self.io,
                        &self.state_caps,
                        &self.cpuid,
                        self.index,
                    );
                    self.lifecycle
                        .park_while_paused(usize::from(index), &mut || {
                            capture_state(fd, io, caps, cpuid, index)
                        });
                    continue;
                }
                RunState::Running => {}
            }
            if self.index == 0 {
                self.lifecycle.timestamps.mark_first_vcpu_run();
            }
            let step = self.run_once();
            match step {
                Step::Continue => {}
                Step::Exit(reason) => self.lifecycle.request_exit(reason),
                Step::InternalError => {
                    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    self.lifecycle.request_exit(ExitReason::InternalError {
                        vcpu: self.index,
                        suberror,
                    });
                }
            }
        }
    }

    fn run_once(&mut self) -> Step {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => handle_exit(index, exit, &self.io),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it and look at the run state again.
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(ExitReason::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}

/// Dispatches one exit of `KVM_RUN` to the device buses.
fn handle_exit(index: u8, exit: VcpuExit<'_>, io: &IoManager) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if io.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::IoOut(port, data) => {
            let _ = io.pio_write(PioAddress(port), data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if io.mmio_read(MmioAddress(addr), data).is_err() {
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            let _ = io.mmio_write(MmioAddress(addr), data);
            Step::Continue
        }
        // With the in-kernel irqchip these do not reach user space; without work to do
        // the loop simply re-enters the guest.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
        VcpuExit::Shutdown => Step::Exit(ExitReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => Step::Exit(ExitReason::SystemEvent { kind }),
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, _) => Step::Exit(ExitReason::FailEntry {
            vcpu: index,
            reason,
        }),
        other => Step::Exit(ExitReason::VcpuError {
            vcpu: index,
            message: format!("unhandled vCPU exit {other:?}"),
        }),
    }
}

/// Captures this (parked) vCPU's state on its own thread: completes the I/O access KVM may
/// still hold from the last exit (`KVM_RUN` with `immediate_exit` returns `EINTR` once it has,
/// without entering the guest), then reads the state.
fn capture_state(
    fd: &mut VcpuFd,
    io: &IoManager,
    caps: &OnceLock<VcpuStateCaps>,
    cpuid: &[CpuidEntry],
    index: u8,
) -> Result<VcpuState, SnapshotError> {
    let caps = caps.get().ok_or_else(|| {
        SnapshotError::InvalidState("vCPU state capabilities were not probed".into())
    })?;
    let mut runs = 0;
    loop {
        fd.set_kvm_immediate_exit(1);
        let step = match fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Err(e) => {
                fd.set_kvm_immediate_exit(0);
                return Err(SnapshotError::Kvm {
                    what: format!("vCPU {index}: KVM_RUN completing pending I/O"),
                    source: e,
                });
            }
            // A string instruction's next piece of I/O: serve it and go on completing.
            Ok(exit) => handle_exit(index, exit, io),
        };
        if !matches!(step, Step::Continue) {
            fd.set_kvm_immediate_exit(0);
            return Err(SnapshotError::InvalidState(format!(
                "vCPU {index} stopped while completing its pending I/O"
            )));
        }
        runs += 1;
        if runs >= MAX_IO_COMPLETION_RUNS {
            fd.set_kvm_immediate_exit(0);
            return Err(SnapshotError::InvalidState(format!(
                "vCPU {index} kept exiting while completing its pending I/O"
            )));
        }
    }
    fd.set_kvm_immediate_exit(0);
    vcpu_state::capture(fd, index, caps, cpuid)
}

/// vCPU threads may be spawned from a thread that blocks real-time signals; the kick must get
/// through.
fn unblock_kick_signal() -> std::io::Result<()> {
    // SAFETY: the sigset is initialised by sigemptyset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        let rc = libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}
