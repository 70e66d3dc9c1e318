//! Building and starting a VM: KVM VM with in-kernel irqchip and PIT, guest RAM, the device
//! buses, the boot image (or, for [`Vm::restore`], a snapshot's memory and state), the vCPUs,
//! and the threads that run them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use linux_loader::loader::Cmdline;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};

use crate::boot::{self, BootError, LoadedKernel};
use crate::config::{VmConfig, MAX_VCPUS};
use crate::cpu::{self, cpuid::Topology, CpuError};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use crate::devices::console::ConsoleLog;
use crate::devices::i8042::I8042;
use crate::devices::irq_trigger::IrqTrigger;
use crate::devices::serial::SerialDevice;
use crate::event_loop::{EventLoop, Subscriber};
use crate::handle::{SnapshotSupport, VmHandle};
use crate::layout;
use crate::lifecycle::Lifecycle;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::seccomp::{self, SeccompError};
use crate::snapshot::vcpu_state::{self, CpuidEntry, VcpuStateCaps};
use crate::snapshot::{self, vm_state, SnapshotError};
use crate::vcpu::{self, Vcpu};
use crate::virtio::{DeviceInfo, VirtioError};

/// Errors while building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is unusable.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// `/dev/kvm` could not be opened or lacks a needed capability.
    #[error("KVM is not usable: {0}")]
    KvmUnavailable(String),
    /// A KVM VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM set-up failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU state set-up failed.
    #[error("vCPU {index}: {source}")]
    Cpu {
        /// The vCPU.
        index: u8,
        /// The error.
        source: CpuError,
    },
    /// A device could not be created or registered.
    #[error("device set-up failed: {0}")]
    Device(String),
    /// A virtio device could not be created.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// A seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A thread could not be started.
    #[error("cannot start a VM thread: {0}")]
    Thread(std::io::Error),
    /// Pause did not complete in time.
    #[error("the vCPUs did not pause within the time limit")]
    PauseTimeout,
    /// The VM is not running (already stopping or stopped).
    #[error("the VM is not running")]
    NotRunning,
    /// A snapshot could not be read or restored.
    #[error("restore failed: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// What the boot vCPU starts: a kernel file, or code given in memory (the calibration probe).
pub(crate) enum KernelImage {
    File(PathBuf),
    RawCode(Vec<u8>),
}

/// Entry point for starting VMs.
pub struct Vm;

impl Vm {
    /// Builds the VM described by `config` and starts its vCPU threads; returns once they run.
    pub fn start(config: VmConfig) -> Result<VmHandle, VmError> {
        let image = KernelImage::File(config.kernel.clone());
        start_vm(&config, image)
    }

    /// Builds a fresh VM from `config` and the snapshot at `snapshot` (written by
    /// [`VmHandle::snapshot`]) and runs it from where the snapshot was taken. Instead of loading
    /// a kernel, it loads the snapshot's guest RAM and the state of its vCPUs, interrupt
    /// controllers, PIT, clock and legacy devices.
    ///
    /// `config` must describe the same machine: the same `mem_mib` and `vcpus`, and the same
    /// virtio devices in the same order (disks of the same size, shares under the same tags),
    /// none of them a writable disk or a network device. Its kernel, initrd, command line and
    /// hidden CPU features are not used (the guest keeps the CPUID it had); its console,
    /// identity, seccomp, `/dev/kvm` and huge-page settings apply to the new VM. The snapshot is refused
    /// before anything runs if its file is damaged, from another VMM build, or needs CPU
    /// features this host's KVM lacks.
    pub fn restore(config: VmConfig, snapshot: impl AsRef<Path>) -> Result<VmHandle, VmError> {
        restore_vm(&config, snapshot.as_ref())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn validate(config: &VmConfig) -> Result<(), VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::InvalidConfig(format!(
            "vcpus must be 1..={MAX_VCPUS}, got {}",
            config.vcpus
        )));
    }
    if let Some(v) = &config.vsock {
        if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
            return Err(VmError::InvalidConfig(format!(
                "guest CID must be 3..=2^32-1, got {}",
                v.guest_cid
            )));
        }
    }
    Ok(())
}

fn open_kvm(device: Option<&std::fs::File>) -> Result<Kvm, VmError> {
    let kvm = match device {
        Some(file) => {
            use std::os::fd::{FromRawFd, IntoRawFd};
            let fd = file
                .try_clone()
                .map_err(|e| VmError::KvmUnavailable(format!("cannot use /dev/kvm: {e}")))?;
            // SAFETY: `fd` is a fresh duplicate of an open /dev/kvm descriptor that nothing
            // else owns; `Kvm` takes it over and closes it.
            unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) }
        }
        None => {
            Kvm::new().map_err(|e| VmError::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?
        }
    };
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::Pit2, "PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmUnavailable(format!("KVM lacks KVM_CAP_{name}")));
        }
    }
    Ok(kvm)
}

/// Adds the interrupt controllers and timer to a new VM.
fn add_irqchip_and_pit(vm: &VmFd) -> Result<(), VmError> {
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(())
}

fn pio_range(base: u16, len: u16) -> Result<PioRange, VmError> {
    PioRange::new(PioAddress(base), len)
        .map_err(|e| VmError::Device(format!("port range {base:#x}: {e:?}")))
}

/// The legacy devices on the port bus, the serial port from `serial_state` where one is given
/// (a restore). Returns the console ring for a memory sink, and the serial port.
fn add_legacy_devices(
    config: &VmConfig,
    vm: &VmFd,
    io: &mut IoManager,
    lifecycle: &Arc<Lifecycle>,
    serial_state: Option<&vm_state::SerialState>,
) -> Result<
    (
        Option<crate::devices::console::ConsoleRing>,
        Arc<SerialDevice>,
    ),
    VmError,
> {
    let (log, ring) = ConsoleLog::open(&config.serial)
        .map_err(|e| VmError::Device(format!("cannot open the serial console sink: {e}")))?;
    let irq = IrqTrigger::new().map_err(|e| VmError::Device(format!("serial irq eventfd: {e}")))?;
    vm.register_irqfd(irq.eventfd(), layout::SERIAL_GSI)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let bus_err = |e| VmError::Device(format!("port bus: {e:?}"));
    let serial = Arc::new(match serial_state {
        None => SerialDevice::new(irq, log),
        Some(state) => SerialDevice::from_state(&state.into(), irq, log)
            .map_err(|e| SnapshotError::InvalidState(format!("the serial port's state: {e:?}")))?,
    });
    io.register_pio(pio_range(layout::SERIAL_PORT_BASE, 8)?, serial.clone())
        .map_err(bus_err)?;
    io.register_pio(
        pio_range(layout::I8042_PORT_BASE, 5)?,
        Arc::new(I8042::new(lifecycle.clone())),
    )
    .map_err(bus_err)?;
    io.register_pio(
        pio_range(BOOT_TIMER_PORT, 1)?,
        Arc::new(BootTimer::new(lifecycle.clone())),
    )
    .map_err(bus_err)?;
    Ok((ring, serial))
}

/// Loads the kernel/initrd and writes the command line, zero page, MP table and boot tables.
fn load_boot_image(
    config: &VmConfig,
    image: KernelImage,
    mem: &GuestMemory,
    cmdline: &str,
) -> Result<LoadedKernel, VmError> {
    let kernel = match image {
        KernelImage::File(path) => boot::load_kernel(mem, &path)?,
        KernelImage::RawCode(code) => boot::kernel::load_raw_code(mem, &code)?,
    };
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(mem, path, kernel.end)?),
        None => None,
    };
    boot::zero_page::write_boot_info(mem, cmdline, kernel.setup_header, initrd)?;
    boot::mptable::write_mptable(mem, config.vcpus)?;
    cpu::long_mode::write_boot_tables(mem).map_err(|source| VmError::Cpu { index: 0, source })?;
    Ok(kernel)
}

/// Creates vCPU `index` and programs its power-on state. Returns it with the CPUID it was
/// given (for snapshots).
fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    index: u8,
    entry: vm_memory::GuestAddress,
) -> Result<(VcpuFd, Vec<CpuidEntry>), VmError> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpu_err = |source| VmError::Cpu { index, source };
    let topo = Topology {
        cpu_index: index,
        vcpus: config.vcpus,
    };
    // What the vCPU is given is recorded for its snapshots (see
    // `snapshot::vcpu_state::capture` on why KVM_GET_CPUID2 is not asked).
    let given = cpu::cpuid::setup_cpuid(kvm, &fd, topo, &config.hidden_cpu_features)
        .map_err(cpu_err)?
        .as_slice()
        .iter()
        .map(CpuidEntry::from)
        .collect();
    cpu::msrs::setup_msrs(&fd).map_err(cpu_err)?;
    cpu::long_mode::setup_sregs(&fd).map_err(cpu_err)?;
    cpu::long_mode::setup_regs(&fd, entry).map_err(cpu_err)?;
    cpu::fpu::setup_fpu(&fd).map_err(cpu_err)?;
    cpu::lapic::setup_lapic(&fd).map_err(cpu_err)?;
    Ok((fd, given))
}

/// What every VM is built on: KVM, the VM with its RAM, irqchip and PIT, and the legacy devices.
struct Base {
    kvm: Kvm,
    vm: VmFd,
    mem: Arc<GuestMemory>,
    lifecycle: Arc<Lifecycle>,
    io: IoManager,
    console: Option<crate::devices::console::ConsoleRing>,
    serial: Arc<SerialDevice>,
}

fn build_base(
    config: &VmConfig,
    serial_state: Option<&vm_state::SerialState>,
) -> Result<Base, VmError> {
    validate(config)?;
    vcpu::install_kick_handler().map_err(|e| {
        VmError::Device(format!("cannot install the vCPU kick signal handler: {e}"))
    })?;
    let lifecycle = Arc::new(Lifecycle::new(usize::from(config.vcpus)));
    lifecycle.timestamps.mark_created();

    let kvm = open_kvm(config.kvm_device.as_deref())?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Guest RAM is registered before the in-kernel IRQ chip: on some KVM implementations
    // (measured: kvm_pvm) the first memslot after KVM_CREATE_IRQCHIP costs milliseconds.
    let mem = Arc::new(memory::create_guest_memory(config.mem_mib)?);
    if config.huge_pages {
        memory::advise_huge_pages(&mem)?;
    }
    memory::register_with_kvm(&vm, &mem)?;
    add_irqchip_and_pit(&vm)?;

    let mut io = IoManager::new();
    let (console, serial) = add_legacy_devices(config, &vm, &mut io, &lifecycle, serial_state)?;
    Ok(Base {
        kvm,
        vm,
        mem,
        lifecycle,
        io,
        console,
        serial,
    })
}

pub(crate) fn start_vm(config: &VmConfig, image: KernelImage) -> Result<VmHandle, VmError> {
    let mut base = build_base(config, None)?;

    let mut cmdline =
        Cmdline::try_from(&config.cmdline, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let virtio =
        crate::virtio::attach_devices(config, &base.vm, &mut base.io, &base.mem, &mut cmdline)?;
    let cmdline = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .into_string()
        .map_err(|_| VmError::InvalidConfig("command line is not UTF-8".into()))?;

    let kernel = load_boot_image(config, image, &base.mem, &cmdline)?;
    let vcpu_fds = (0..config.vcpus)
        .map(|i| create_vcpu(&base.kvm, &base.vm, config, i, kernel.entry))
        .collect::<Result<Vec<_>, _>>()?;
    // Probed on the first snapshot (most VMs never take one), by the thread that takes it.
    let state_caps = Arc::new(OnceLock::new());
    launch(
        config,
        base,
        vcpu_fds,
        virtio.subscribers,
        virtio.info,
        state_caps,
    )
}

/// Builds a VM from `config` and the snapshot at `path`, and starts it (see [`Vm::restore`]).
fn restore_vm(config: &VmConfig, path: &Path) -> Result<VmHandle, VmError> {
    if let Some(device) = snapshot::unsupported_device(config) {
        return Err(SnapshotError::UnsupportedDevice(device.into()).into());
    }
    let (mut file, parsed) = snapshot::read_snapshot_file(path)?;
    let config_ram = config.mem_mib.saturating_mul(1 << 20);
    if parsed.header.vcpus != config.vcpus || parsed.header.guest_ram_bytes != config_ram {
        return Err(SnapshotError::ConfigMismatch(format!(
            "the snapshot has {} vCPUs and {} bytes of RAM, the configuration {} vCPUs and {} bytes",
            parsed.header.vcpus, parsed.header.guest_ram_bytes, config.vcpus, config_ram
        ))
        .into());
    }

    let mut base = build_base(config, Some(&parsed.vm.devices.serial))?;
    // The restoring KVM (through the configured descriptor) must offer every CPU feature the
    // guest saw, before any of the guest's state reaches it.
    let supported = snapshot::cpu_compat::supported_cpuid(&base.kvm)?;
    snapshot::cpu_compat::check(&parsed.header.cpuid, &supported)?;
    for v in &parsed.vcpus {
        snapshot::cpu_compat::check(&v.cpuid, &supported)?;
    }

    // The devices the configuration asks for, in the same slots as when the snapshot was taken
    // (the command line they add is the one the guest booted with, so it is not used again).
    let mut unused_cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let virtio = crate::virtio::attach_devices(
        config,
        &base.vm,
        &mut base.io,
        &base.mem,
        &mut unused_cmdline,
    )?;

    snapshot::load_memory(&mut file, &parsed, &base.mem)?;
    vm_state::restore(&base.vm, &parsed.vm)?;
    // After guest RAM is loaded: a running device's queues must lie in it.
    virtio.info.transports.restore(&parsed.vm.devices.virtio)?;
    if parsed.vm.devices.boot_timer_written {
        base.lifecycle.timestamps.mark_boot_timer();
    }
    let caps = VcpuStateCaps::probe(&base.kvm, &base.vm);
    let mut vcpu_fds = Vec::with_capacity(parsed.vcpus.len());
    for (index, state) in (0u8..).zip(&parsed.vcpus) {
        let fd = base
            .vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu_state::restore(&fd, index, state, &caps)?;
        vcpu_fds.push((fd, state.cpuid.clone()));
    }
    let state_caps = Arc::new(OnceLock::from(caps));
    launch(
        config,
        base,
        vcpu_fds,
        virtio.subscribers,
        virtio.info,
        state_caps,
    )
}

/// Starts the VMM thread (where there are virtio devices) and the vCPU threads. `state_caps`
/// is what KVM offers for capturing vCPU state, shared by the handle (which probes it, on the
/// thread that takes the first snapshot, where it is still empty) and the vCPU threads (whose
/// seccomp filter allows no `/dev/kvm` or VM ioctls).
fn launch(
    config: &VmConfig,
    base: Base,
    vcpu_fds: Vec<(VcpuFd, Vec<CpuidEntry>)>,
    subscribers: Vec<Subscriber>,
    mut devices: DeviceInfo,
    state_caps: Arc<OnceLock<VcpuStateCaps>>,
) -> Result<VmHandle, VmError> {
    let (vcpu_filter, vmm_filter) = if config.seccomp {
        (
            Some(seccomp::vcpu_filter()?),
            Some(seccomp::vmm_thread_filter(!config.shares.is_empty())?),
        )
    } else {
        (None, None)
    };

    let lifecycle = base.lifecycle;
    let event_loop = if subscribers.is_empty() {
        None
    } else {
        Some(
            EventLoop::spawn(
                subscribers,
                vmm_filter,
                config.run_as.clone(),
                lifecycle.clone(),
            )
            .map_err(VmError::Thread)?,
        )
    };

    let io = Arc::new(base.io);
    let support = SnapshotSupport {
        unsupported_device: snapshot::unsupported_device(config),
        virtio: std::mem::take(&mut devices.transports),
        serial: base.serial,
        vcpus: config.vcpus,
        state_caps: state_caps.clone(),
        in_progress: Mutex::new(()),
    };
    let mut handle = VmHandle::new(
        base.kvm,
        base.vm,
        base.mem,
        lifecycle.clone(),
        base.console,
        devices,
        event_loop,
        support,
    );
    for (index, (fd, cpuid)) in vcpu_fds.into_iter().enumerate() {
        let v = Vcpu {
            index: index as u8,
            fd,
            io: io.clone(),
            lifecycle: lifecycle.clone(),
            seccomp: vcpu_filter.clone(),
            run_as: config.run_as.clone(),
            state_caps: state_caps.clone(),
            cpuid,
        };
        let t = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || v.run());
        match t {
            Ok(t) => handle.add_vcpu_thread(t),
            Err(e) => {
                // Tear down the vCPUs already started before reporting.
                lifecycle.request_exit(crate::ExitReason::HostRequest);
                drop(handle);
                return Err(VmError::Thread(e));
            }
        }
    }
    Ok(handle)
}
