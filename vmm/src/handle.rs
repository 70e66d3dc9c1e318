//! [`VmHandle`]: what the caller holds while a VM runs — wait for its end, stop, pause and
//! resume it, snapshot it, read its timestamps, console and memory footprint. Dropping the
//! handle stops the VM and joins its threads (within a deadline: see [`crate::thread_exit`]).

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::devices::console::ConsoleRing;
use crate::devices::serial::SerialDevice;
use crate::event_loop::EventLoop;
use crate::lifecycle::{ExitReason, Lifecycle, Timestamps};
use crate::memory::{self, GuestMemory};
use crate::resources::MemoryUsage;
use crate::snapshot::format::{build_id, Header};
use crate::snapshot::vcpu_state::VcpuStateCaps;
use crate::snapshot::vm_state::{self, DeviceState};
use crate::snapshot::{self, SnapshotError, SnapshotInfo};
use crate::thread_exit::{join_by, THREAD_EXIT_PATIENCE};
use crate::virtio::mmio::TransportStateError;
use crate::virtio::{
    BalloonDeviceInfo, DeviceInfo, NetDeviceInfo, ShareDeviceInfo, VirtioTransports,
    VsockDeviceInfo,
};
use crate::vm::VmError;

/// How long [`VmHandle::pause`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`VmHandle::snapshot`] waits for the parked vCPUs to report their state.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a snapshot needs beyond the VM itself.
pub(crate) struct SnapshotSupport {
    /// A configured device whose state cannot be captured yet.
    pub(crate) unsupported_device: Option<&'static str>,
    /// The virtio devices' transports, whose state is captured.
    pub(crate) virtio: VirtioTransports,
    /// The serial port, for its registers.
    pub(crate) serial: Arc<SerialDevice>,
    /// vCPUs in the VM.
    pub(crate) vcpus: u8,
    /// What KVM offers for capturing vCPU state, shared with the vCPU threads: probed by the
    /// first snapshot, on its caller's thread (see `vm::launch`).
    pub(crate) state_caps: Arc<OnceLock<VcpuStateCaps>>,
    /// Held while a snapshot is taken: one at a time.
    pub(crate) in_progress: Mutex<()>,
}

struct Threads {
    vcpus: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoop>,
}

/// A running (or stopped, not yet dropped) VM.
pub struct VmHandle {
    lifecycle: Arc<Lifecycle>,
    threads: Mutex<Threads>,
    console: Option<ConsoleRing>,
    vsock: Option<VsockDeviceInfo>,
    shares: Vec<ShareDeviceInfo>,
    net: Option<NetDeviceInfo>,
    balloon: Option<BalloonDeviceInfo>,
    memory: Arc<GuestMemory>,
    snapshot: SnapshotSupport,
    // Declared last: the VM and KVM fds are closed only after the threads using them are joined
    // (in Drop) and the fields above are dropped.
    vm: VmFd,
    kvm: Kvm,
}

impl VmHandle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kvm: Kvm,
        vm: VmFd,
        memory: Arc<GuestMemory>,
        lifecycle: Arc<Lifecycle>,
        console: Option<ConsoleRing>,
        devices: DeviceInfo,
        event_loop: Option<EventLoop>,
        snapshot: SnapshotSupport,
    ) -> Self {
        Self {
            lifecycle,
            threads: Mutex::new(Threads {
                vcpus: Vec::new(),
                event_loop,
            }),
            console,
            vsock: devices.vsock,
            shares: devices.shares,
            net: devices.net,
            balloon: devices.balloon,
            memory,
            snapshot,
            vm,
            kvm,
        }
    }

    pub(crate) fn add_vcpu_thread(&mut self, t: JoinHandle<()>) {
        self.threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .vcpus
            .push(t);
    }

    /// Blocks until the VM stops; joins its threads and returns why it stopped.
    pub fn wait(&self) -> ExitReason {
        let reason = self
            .lifecycle
            .wait_exit(None)
            .unwrap_or(ExitReason::HostRequest);
        self.join_threads();
        reason
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout`, returning `None` (the VM keeps
    /// running).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.lifecycle.wait_exit(Some(timeout))?;
        self.join_threads();
        Some(reason)
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lifecycle.exit_reason()
    }

    /// Asks the VM to stop ([`ExitReason::HostRequest`] unless it already stopped for another
    /// reason). Returns at once; use [`wait`](Self::wait) to wait for the threads.
    pub fn request_stop(&self) {
        self.lifecycle.request_exit(ExitReason::HostRequest);
    }

    /// Pauses every vCPU (out of `KVM_RUN`, parked); returns once all are parked. Devices keep
    /// running, so host-side I/O already queued still drains.
    pub fn pause(&self) -> Result<(), VmError> {
        if self.lifecycle.pause(PAUSE_TIMEOUT) {
            Ok(())
        } else if self.lifecycle.exit_reason().is_some() {
            Err(VmError::NotRunning)
        } else {
            Err(VmError::PauseTimeout)
        }
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) -> Result<(), VmError> {
        if self.lifecycle.resume() {
            Ok(())
        } else {
            Err(VmError::NotRunning)
        }
    }

    /// Pauses the VM and writes a snapshot of it to `path`, a new file (created with `O_EXCL`
    /// and `O_NOFOLLOW`, mode 0600: an existing file or symlink is refused). Each vCPU thread
    /// captures its own state once parked; then the interrupt controllers, PIT, clock, serial
    /// port and boot timer, and the guest RAM's non-zero pages are written. Leaves the VM paused,
    /// whether the snapshot succeeded or not: the caller resumes it ([`resume`](Self::resume))
    /// or stops it. [`crate::Vm::restore`] starts a new VM from the file.
    ///
    /// The virtio devices' transports are locked from before their state is captured until the
    /// file is written, so the VMM thread neither moves a queue nor writes guest RAM in between.
    /// A VM with a virtio device whose state cannot be captured yet (a writable disk, a network
    /// device) is refused ([`SnapshotError::UnsupportedDevice`]) before it is paused.
    pub fn snapshot(&self, path: impl AsRef<Path>) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(device) = self.snapshot.unsupported_device {
            return Err(SnapshotError::UnsupportedDevice(device.into()));
        }
        let _one_at_a_time = self
            .snapshot
            .in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.snapshot
            .state_caps
            .get_or_init(|| VcpuStateCaps::probe(&self.kvm, &self.vm));
        match self.pause() {
            Ok(()) => {}
            Err(VmError::NotRunning) => return Err(SnapshotError::NotRunning),
            Err(_) => return Err(SnapshotError::Timeout("pause")), // VmError::PauseTimeout
        }
        let vcpus = self.lifecycle.capture_vcpus(CAPTURE_TIMEOUT)?;
        let transports = self.snapshot.virtio.lock_all();
        let virtio = transports
            .iter()
            .map(|t| t.save_state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| match e {
                TransportStateError::Unsupported(t) => {
                    SnapshotError::UnsupportedDevice(format!("virtio (type {t})"))
                }
                other => SnapshotError::InvalidState(other.to_string()),
            })?;
        let devices = DeviceState {
            serial: (&self.snapshot.serial.state()).into(),
            boot_timer_written: self.lifecycle.timestamps.boot_timer().is_some(),
            virtio,
        };
        let vm = vm_state::capture(&self.vm, devices)?;
        let cpuid = vcpus
            .first()
            .map(|v| v.cpuid.clone())
            .ok_or_else(|| SnapshotError::InvalidState("a VM without vCPUs".into()))?;
        let header = Header {
            build_id: build_id(),
            vcpus: self.snapshot.vcpus,
            guest_ram_bytes: memory::ram_size(&self.memory),
            cpuid,
        };
        let written =
            snapshot::write_snapshot_file(path.as_ref(), &header, &vm, &vcpus, &self.memory);
        drop(transports);
        written
    }

    /// Host timestamps: created, first vCPU run, boot-timer write, exit.
    pub fn timestamps(&self) -> &Timestamps {
        &self.lifecycle.timestamps
    }

    /// The console bytes kept so far (for a [`SerialSink::Memory`](crate::SerialSink::Memory)
    /// console; `None` otherwise).
    pub fn console_output(&self) -> Option<Vec<u8>> {
        self.console.as_ref().map(|c| c.contents())
    }

    /// The virtio-fs devices' state, in [`crate::VmConfig::shares`] order.
    pub fn shares(&self) -> &[ShareDeviceInfo] {
        &self.shares
    }

    /// The virtio-vsock device's state, if the VM has one.
    pub fn vsock(&self) -> Option<&VsockDeviceInfo> {
        self.vsock.as_ref()
    }

    /// The virtio-net device's state (link, counters), if the VM has one.
    pub fn net(&self) -> Option<&NetDeviceInfo> {
        self.net.as_ref()
    }

    /// The virtio-balloon device's state, if the VM has one.
    pub fn balloon(&self) -> Option<&BalloonDeviceInfo> {
        self.balloon.as_ref()
    }

    /// The process's resident memory and how much of it is guest RAM.
    pub fn memory_usage(&self) -> std::io::Result<MemoryUsage> {
        Ok(MemoryUsage {
            process_rss_bytes: crate::resources::process_rss_bytes()?,
            guest_ram_resident_bytes: memory::resident_bytes(&self.memory)?,
            guest_ram_bytes: memory::ram_size(&self.memory),
        })
    }

    /// Joins the vCPU and event threads, all within [`THREAD_EXIT_PATIENCE`]; one stuck past
    /// it is left behind (see [`crate::thread_exit`]).
    fn join_threads(&self) {
        let deadline = Instant::now() + THREAD_EXIT_PATIENCE;
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for v in t.vcpus.drain(..) {
            join_by(v, deadline);
        }
        if let Some(mut el) = t.event_loop.take() {
            el.stop_by(deadline);
        }
        // The handle keeps the devices (for snapshots): let go of what they hold on the host,
        // so whoever reads a vsock connection sees it close once the VM has stopped.
        self.snapshot.virtio.release_devices();
    }
}

// The shepherd shares a handle between its waiting and signal-relaying threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<VmHandle>();
};

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.lifecycle.request_exit(ExitReason::HostRequest);
        self.join_threads();
    }
}
