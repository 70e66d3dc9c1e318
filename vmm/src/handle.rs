//! [`VmHandle`]: what the caller holds while a VM runs — wait for its end, stop, pause and
//! resume it, read its timestamps, console and memory footprint. Dropping the handle stops the VM
//! and joins its threads (within a deadline: see [`crate::thread_exit`]).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::devices::console::ConsoleRing;
use crate::event_loop::EventLoop;
use crate::lifecycle::{ExitReason, Lifecycle, Timestamps};
use crate::memory::{self, GuestMemory};
use crate::resources::MemoryUsage;
use crate::thread_exit::{join_by, THREAD_EXIT_PATIENCE};
use crate::virtio::{DeviceInfo, NetDeviceInfo, ShareDeviceInfo, VsockDeviceInfo};
use crate::vm::VmError;

/// How long [`VmHandle::pause`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    memory: Arc<GuestMemory>,
    // Declared last: the VM and KVM fds are closed only after the threads using them are joined
    // (in Drop) and the fields above are dropped.
    _vm: VmFd,
    _kvm: Kvm,
}

impl VmHandle {
    pub(crate) fn new(
        kvm: Kvm,
        vm: VmFd,
        memory: Arc<GuestMemory>,
        lifecycle: Arc<Lifecycle>,
        console: Option<ConsoleRing>,
        devices: DeviceInfo,
        event_loop: Option<EventLoop>,
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
            memory,
            _vm: vm,
            _kvm: kvm,
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
