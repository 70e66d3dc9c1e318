//! Virtio devices over the MMIO transport: the transport ([`mmio`]), the device interface
//! ([`device`]), interrupts ([`interrupt`]), descriptor-chain validation ([`chain`]), the vsock
//! device ([`vsock`]), the block device ([`block`]), the file-system device ([`fs`]), the
//! balloon device with free page reporting ([`balloon`]), the network device backed by passt
//! ([`net`]), and wiring a device into a VM
//! (`attach_devices`: MMIO window, irqfd, one ioeventfd per queue, the event-loop subscriber,
//! the `virtio_mmio.device=` cmdline entry).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod device;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::cell::LazyCell;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::loader::Cmdline;
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_device::{DeviceMmio, MutDeviceMmio};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::credentials::ThreadCredentials;
use crate::devices::irq_trigger::IrqTrigger;
use crate::event_loop::Subscriber;
use crate::fuse::FuseServer;
use crate::layout;
use crate::memory::GuestMemory;
use interrupt::InterruptLine;
use mmio::MmioTransport;
use vsock::{Muxer, MuxerError, VsockDevice, VsockStats};

/// Errors while attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The vsock muxer could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// A disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] block::DiskError),
    /// The network device could not be set up.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A shared directory could not be served.
    #[error("virtio-fs share {tag}: {message}")]
    Share {
        /// The share's tag.
        tag: String,
        /// What went wrong.
        message: String,
    },
    /// More virtio devices than GSIs to give them.
    #[error("too many virtio devices ({0}); at most {MAX_DEVICES}")]
    TooManyDevices(usize),
    /// A queue could not be created.
    #[error("cannot create a virtqueue: {0}")]
    Queue(virtio_queue::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The MMIO window could not be registered.
    #[error("cannot register the MMIO window: {0}")]
    Bus(String),
    /// The command line entry could not be added.
    #[error("cannot add the device to the command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
}

fn lock(t: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The transport on the MMIO bus (vCPU threads).
struct MmioWindow(Arc<Mutex<MmioTransport>>);

impl DeviceMmio for MmioWindow {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        lock(&self.0).mmio_read(base, offset, data);
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        lock(&self.0).mmio_write(base, offset, data);
    }
}

/// The transport in the event loop (VMM thread): queue ioeventfds and the backend fd.
struct TransportEvents {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    backend_fd: Option<RawFd>,
}

/// Event data tag for the backend fd (queue fds use their index).
const BACKEND_EVENT: u32 = u32::MAX;

impl MutEventSubscriber for TransportEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let tag = events.data();
        if tag == BACKEND_EVENT {
            lock(&self.transport).backend_ready();
        } else if let Some(evt) = self.queue_evts.get(tag as usize) {
            let _ = evt.read();
            lock(&self.transport).notify_queue(tag as usize);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("cannot watch virtio queue {i}: {e:?}");
            }
        }
        if let Some(fd) = self.backend_fd {
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND_EVENT, EventSet::IN)) {
                tracing::error!("cannot watch the virtio backend: {e:?}");
            }
        }
    }
}

/// The vsock device as the VM handle sees it.
#[derive(Clone)]
pub struct VsockDeviceInfo {
    transport: Arc<Mutex<MmioTransport>>,
    stats: Arc<VsockStats>,
    /// Guest physical address of the device's MMIO window.
    pub mmio_base: u64,
    /// The device's GSI.
    pub gsi: u32,
}

impl std::fmt::Debug for VsockDeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDeviceInfo")
            .field("mmio_base", &self.mmio_base)
            .field("gsi", &self.gsi)
            .field("status", &self.status())
            .finish()
    }
}

impl VsockDeviceInfo {
    /// The virtio device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK...).
    pub fn status(&self) -> u32 {
        lock(&self.transport).status()
    }

    /// Whether the guest driver brought the device to DRIVER_OK and it is running.
    pub fn driver_ok(&self) -> bool {
        let t = lock(&self.transport);
        t.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.is_activated()
    }

    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// Descriptor chains dropped as malformed.
    pub fn malformed_chains(&self) -> u64 {
        self.stats.malformed_chains.load(Ordering::Relaxed)
    }

    /// Packets the guest sent.
    pub fn tx_packets(&self) -> u64 {
        self.stats.tx_packets.load(Ordering::Relaxed)
    }

    /// Packets delivered to the guest.
    pub fn rx_packets(&self) -> u64 {
        self.stats.rx_packets.load(Ordering::Relaxed)
    }
}

/// A virtio-fs device as the VM handle sees it.
#[derive(Clone)]
pub struct ShareDeviceInfo {
    transport: Arc<Mutex<MmioTransport>>,
    stats: Arc<fs::FsStats>,
    /// The tag the guest mounts it by.
    pub tag: String,
}

impl std::fmt::Debug for ShareDeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareDeviceInfo")
            .field("tag", &self.tag)
            .field("driver_ok", &self.driver_ok())
            .field("requests", &self.requests())
            .finish()
    }
}

impl ShareDeviceInfo {
    /// Whether the guest driver brought the device to DRIVER_OK and it is running.
    pub fn driver_ok(&self) -> bool {
        let t = lock(&self.transport);
        t.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.is_activated()
    }

    /// FUSE requests served.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Descriptor chains dropped as malformed.
    pub fn malformed_chains(&self) -> u64 {
        self.stats.malformed_chains.load(Ordering::Relaxed)
    }
}

/// The virtio-net device as the VM handle sees it.
#[derive(Clone)]
pub struct NetDeviceInfo {
    transport: Arc<Mutex<MmioTransport>>,
    state: Arc<Mutex<net::NetState>>,
    /// Guest physical address of the device's MMIO window.
    pub mmio_base: u64,
    /// The device's GSI.
    pub gsi: u32,
}

impl std::fmt::Debug for NetDeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDeviceInfo")
            .field("mmio_base", &self.mmio_base)
            .field("gsi", &self.gsi)
            .field("driver_ok", &self.driver_ok())
            .field("state", &self.state())
            .finish()
    }
}

impl NetDeviceInfo {
    /// Whether the guest driver brought the device to DRIVER_OK and it is running.
    pub fn driver_ok(&self) -> bool {
        let t = lock(&self.transport);
        t.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.is_activated()
    }

    /// The device's state (link, counters) as of its last event.
    pub fn state(&self) -> net::NetState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The virtio-balloon device as the VM handle sees it.
#[derive(Clone)]
pub struct BalloonDeviceInfo {
    transport: Arc<Mutex<MmioTransport>>,
}

impl std::fmt::Debug for BalloonDeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonDeviceInfo")
            .field("driver_ok", &self.driver_ok())
            .field("state", &self.state())
            .finish()
    }
}

impl BalloonDeviceInfo {
    /// Whether the guest driver brought the device to DRIVER_OK and it is running.
    pub fn driver_ok(&self) -> bool {
        let t = lock(&self.transport);
        t.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.is_activated()
    }

    /// The device's state: `actual`, the acked features, and the memory given back so far.
    pub fn state(&self) -> balloon::BalloonState {
        match lock(&self.transport).device().save_state() {
            Some(crate::snapshot::virtio_state::DeviceSnapshot::Balloon(s)) => s,
            // Not a balloon's transport: cannot happen (built as one in `attach_devices`).
            _ => balloon::BalloonState::default(),
        }
    }
}

/// What the VM handle keeps of the attached devices.
#[derive(Default)]
pub(crate) struct DeviceInfo {
    pub(crate) vsock: Option<VsockDeviceInfo>,
    pub(crate) shares: Vec<ShareDeviceInfo>,
    pub(crate) net: Option<NetDeviceInfo>,
    pub(crate) balloon: Option<BalloonDeviceInfo>,
    /// Every device's transport, in virtio-mmio slot order (for snapshots).
    pub(crate) transports: VirtioTransports,
}

/// Every virtio device's transport of a VM, in virtio-mmio slot order: what snapshots save and
/// restore.
#[derive(Default)]
pub(crate) struct VirtioTransports(Vec<Arc<Mutex<MmioTransport>>>);

impl VirtioTransports {
    /// Locks every transport, in slot order (the only order anything takes more than one in),
    /// so that no device touches guest RAM or its queues while a snapshot is taken.
    pub(crate) fn lock_all(&self) -> Vec<MutexGuard<'_, MmioTransport>> {
        self.0.iter().map(|t| lock(t)).collect()
    }

    /// Once the VM has stopped and its device thread is gone: resets every device, which ends
    /// what it holds on the host (vsock's host connections, whose owners then read their end;
    /// a share's open files). A transport still locked (by a device thread that never ended,
    /// stuck in a file system) is left alone.
    pub(crate) fn release_devices(&self) {
        for t in &self.0 {
            let mut transport = match t.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => continue,
            };
            transport.device_mut().reset();
        }
    }

    /// On restore, before the VM runs: gives each transport its saved state, in slot order.
    /// Another number of devices than the snapshot's is a configuration mismatch; state a
    /// transport refuses is invalid.
    pub(crate) fn restore(
        &self,
        saved: &[crate::snapshot::virtio_state::TransportSnapshot],
    ) -> Result<(), crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError;
        if saved.len() != self.0.len() {
            return Err(SnapshotError::ConfigMismatch(format!(
                "the snapshot has {} virtio devices, the configuration {}",
                saved.len(),
                self.0.len()
            )));
        }
        for (slot, (t, state)) in self.0.iter().zip(saved).enumerate() {
            lock(t)
                .restore_state(state)
                .map_err(|e| SnapshotError::InvalidState(format!("virtio slot {slot}: {e}")))?;
        }
        Ok(())
    }
}

/// Devices attached to a VM.
pub(crate) struct AttachedDevices {
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) info: DeviceInfo,
}

impl AttachedDevices {
    /// Wires `device` into the next virtio-mmio slot ([`wire_device`]) and keeps its
    /// event-loop subscriber and its transport (for snapshots).
    fn add(
        &mut self,
        device: Box<dyn device::VirtioDevice>,
        vm: &VmFd,
        io: &mut IoManager,
        mem: &Arc<GuestMemory>,
        cmdline: &mut Cmdline,
    ) -> Result<Wired, VirtioError> {
        // At most MAX_DEVICES (checked before any is added), so the slot fits.
        let index = self.info.transports.0.len() as u32;
        let (wired, events) = wire_device(device, index, vm, io, mem, cmdline)?;
        self.info.transports.0.push(wired.transport.clone());
        self.subscribers.push(events);
        Ok(wired)
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VirtioError {
    move |source| VirtioError::Kvm { what, source }
}

/// Most virtio devices a VM may have: one GSI each, up to the IO-APIC's last pin.
pub const MAX_DEVICES: usize = (layout::MAX_LEGACY_GSI - layout::VIRTIO_FIRST_GSI + 1) as usize;

/// Creates the configured virtio devices and wires them into the VM: the vsock device first (if
/// any), then the disks, then the shared directories, in order, then the balloon (if any), then
/// the network device (if any): each added later so that it moves no earlier device's MMIO
/// window or GSI.
pub(crate) fn attach_devices(
    config: &VmConfig,
    vm: &VmFd,
    io: &mut IoManager,
    mem: &Arc<GuestMemory>,
    cmdline: &mut Cmdline,
) -> Result<AttachedDevices, VirtioError> {
    let count = usize::from(config.vsock.is_some())
        + config.disks.len()
        + config.shares.len()
        + usize::from(config.balloon)
        + usize::from(config.net.is_some());
    if count > MAX_DEVICES {
        return Err(VirtioError::TooManyDevices(count));
    }
    let mut attached = AttachedDevices {
        subscribers: Vec::new(),
        info: DeviceInfo::default(),
    };
    if let Some(vc) = &config.vsock {
        let device = VsockDevice::new(vc.guest_cid, Muxer::new(vc.guest_cid, &vc.uds_path)?);
        let stats = device.stats();
        let wired = attached.add(Box::new(device), vm, io, mem, cmdline)?;
        attached.info.vsock = Some(VsockDeviceInfo {
            transport: wired.transport,
            stats,
            mmio_base: wired.base,
            gsi: wired.gsi,
        });
    }
    for (n, disk) in config.disks.iter().enumerate() {
        let device = block::BlockDevice::new(
            block::Disk::open(&disk.path, disk.read_only)?,
            format!("vmm-disk{n}"),
        );
        attached.add(Box::new(device), vm, io, mem, cmdline)?;
    }
    // One descriptor budget for all the VM's shares, sized once before any is open (and not at
    // all for a VM without shares).
    let budget = LazyCell::new(crate::fuse::DescriptorBudget::for_this_process);
    for share in &config.shares {
        let server = open_share(share, config.run_as.as_ref(), budget.clone())?;
        let device = fs::FsDevice::new(&share.tag, server).map_err(|e| VirtioError::Share {
            tag: share.tag.clone(),
            message: e.to_string(),
        })?;
        let stats = device.stats();
        let wired = attached.add(Box::new(device), vm, io, mem, cmdline)?;
        attached.info.shares.push(ShareDeviceInfo {
            transport: wired.transport,
            stats,
            tag: share.tag.clone(),
        });
    }
    if config.balloon {
        let device = balloon::BalloonDevice::new();
        let wired = attached.add(Box::new(device), vm, io, mem, cmdline)?;
        attached.info.balloon = Some(BalloonDeviceInfo {
            transport: wired.transport,
        });
    }
    if let Some(nc) = &config.net {
        let device = net::NetDevice::new(nc)?;
        let state = device.shared_state();
        let wired = attached.add(Box::new(device), vm, io, mem, cmdline)?;
        attached.info.net = Some(NetDeviceInfo {
            transport: wired.transport,
            state,
            mmio_base: wired.base,
            gsi: wired.gsi,
        });
    }
    Ok(attached)
}

/// Opens the file server of `share` with the identity the VMM thread will serve it with: on a
/// short-lived thread that takes `run_as` first, so a directory that user cannot reach is
/// refused here, with its reason, rather than served with the caller's rights.
fn open_share(
    share: &crate::config::ShareConfig,
    run_as: Option<&ThreadCredentials>,
    budget: crate::fuse::DescriptorBudget,
) -> Result<FuseServer, VirtioError> {
    let err = |message: String| VirtioError::Share {
        tag: share.tag.clone(),
        message,
    };
    let open =
        || FuseServer::with_budget(&share.path, share.read_only, budget).map_err(|e| e.to_string());
    match run_as {
        None => open(),
        Some(creds) => creds
            .run_on_own_thread(open)
            .map_err(|e| e.to_string())
            .and_then(|opened| opened),
    }
    .map_err(err)
}

/// A device wired into the VM.
struct Wired {
    transport: Arc<Mutex<MmioTransport>>,
    base: u64,
    gsi: u32,
}

/// Puts `device` in virtio-mmio slot `index`: its irqfd, one ioeventfd per queue, the MMIO
/// window, the `virtio_mmio.device=` command line entry; returns it with its event-loop
/// subscriber.
fn wire_device(
    device: Box<dyn device::VirtioDevice>,
    index: u32,
    vm: &VmFd,
    io: &mut IoManager,
    mem: &Arc<GuestMemory>,
    cmdline: &mut Cmdline,
) -> Result<(Wired, Subscriber), VirtioError> {
    let base = layout::virtio_mmio_addr(index);
    let gsi = layout::VIRTIO_FIRST_GSI + index;
    let backend_fd = device.backend_fd();
    let queue_count = device.queue_max_sizes().len();

    let irq = IrqTrigger::new().map_err(VirtioError::EventFd)?;
    vm.register_irqfd(irq.eventfd(), gsi)
        .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
    let interrupt = Arc::new(InterruptLine::new(irq));
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(device, mem.clone(), interrupt).map_err(VirtioError::Queue)?,
    ));

    let mut queue_evts = Vec::with_capacity(queue_count);
    for q in 0..queue_count {
        let evt = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(VirtioError::EventFd)?;
        vm.register_ioevent(
            &evt,
            &IoEventAddress::Mmio(base + mmio::REG_QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
        queue_evts.push(evt);
    }
    let kicks = queue_evts
        .iter()
        .map(EventFd::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(VirtioError::EventFd)?;
    lock(&transport).set_queue_kicks(kicks);
    let range = MmioRange::new(MmioAddress(base), layout::VIRTIO_MMIO_SIZE)
        .map_err(|e| VirtioError::Bus(format!("{e:?}")))?;
    io.register_mmio(range, Arc::new(MmioWindow(transport.clone())))
        .map_err(|e| VirtioError::Bus(format!("{e:?}")))?;
    cmdline
        .add_virtio_mmio_device(layout::VIRTIO_MMIO_SIZE, GuestAddress(base), gsi, None)
        .map_err(VirtioError::Cmdline)?;

    let events: Subscriber = Box::new(TransportEvents {
        transport: transport.clone(),
        queue_evts,
        backend_fd,
    });
    Ok((
        Wired {
            transport,
            base,
            gsi,
        },
        events,
    ))
}
