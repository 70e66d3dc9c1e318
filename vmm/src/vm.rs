//! Building and starting a VM: KVM VM with in-kernel irqchip and PIT, guest RAM, the device
//! buses, the boot image, the vCPUs, and the threads that run them.

use std::path::PathBuf;
use std::sync::Arc;

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
use crate::handle::VmHandle;
use crate::layout;
use crate::lifecycle::Lifecycle;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::seccomp::{self, SeccompError};
use crate::vcpu::{self, Vcpu};
use crate::virtio::VirtioError;

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

/// The legacy devices on the port bus. Returns the console ring for a memory sink.
fn add_legacy_devices(
    config: &VmConfig,
    vm: &VmFd,
    io: &mut IoManager,
    lifecycle: &Arc<Lifecycle>,
) -> Result<Option<crate::devices::console::ConsoleRing>, VmError> {
    let (log, ring) = ConsoleLog::open(&config.serial)
        .map_err(|e| VmError::Device(format!("cannot open the serial console sink: {e}")))?;
    let irq = IrqTrigger::new().map_err(|e| VmError::Device(format!("serial irq eventfd: {e}")))?;
    vm.register_irqfd(irq.eventfd(), layout::SERIAL_GSI)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let bus_err = |e| VmError::Device(format!("port bus: {e:?}"));
    io.register_pio(
        pio_range(layout::SERIAL_PORT_BASE, 8)?,
        Arc::new(SerialDevice::new(irq, log)),
    )
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
    Ok(ring)
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

/// Creates vCPU `index` and programs its power-on state.
fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    index: u8,
    entry: vm_memory::GuestAddress,
) -> Result<VcpuFd, VmError> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpu_err = |source| VmError::Cpu { index, source };
    let topo = Topology {
        cpu_index: index,
        vcpus: config.vcpus,
    };
    cpu::cpuid::setup_cpuid(kvm, &fd, topo, &config.hidden_cpu_features).map_err(cpu_err)?;
    cpu::msrs::setup_msrs(&fd).map_err(cpu_err)?;
    cpu::long_mode::setup_sregs(&fd).map_err(cpu_err)?;
    cpu::long_mode::setup_regs(&fd, entry).map_err(cpu_err)?;
    cpu::fpu::setup_fpu(&fd).map_err(cpu_err)?;
    cpu::lapic::setup_lapic(&fd).map_err(cpu_err)?;
    Ok(fd)
}

pub(crate) fn start_vm(config: &VmConfig, image: KernelImage) -> Result<VmHandle, VmError> {
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
    let console = add_legacy_devices(config, &vm, &mut io, &lifecycle)?;

    let mut cmdline =
        Cmdline::try_from(&config.cmdline, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let virtio = crate::virtio::attach_devices(config, &vm, &mut io, &mem, &mut cmdline)?;
    let cmdline = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .into_string()
        .map_err(|_| VmError::InvalidConfig("command line is not UTF-8".into()))?;

    let kernel = load_boot_image(config, image, &mem, &cmdline)?;
    let vcpu_fds = (0..config.vcpus)
        .map(|i| create_vcpu(&kvm, &vm, config, i, kernel.entry))
        .collect::<Result<Vec<_>, _>>()?;

    let (vcpu_filter, vmm_filter) = if config.seccomp {
        (
            Some(seccomp::vcpu_filter()?),
            Some(seccomp::vmm_thread_filter(!config.shares.is_empty())?),
        )
    } else {
        (None, None)
    };

    let subscribers: Vec<Subscriber> = virtio.subscribers;
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

    let io = Arc::new(io);
    let mut handle = VmHandle::new(
        kvm,
        vm,
        mem,
        lifecycle.clone(),
        console,
        virtio.info,
        event_loop,
    );
    for (index, fd) in vcpu_fds.into_iter().enumerate() {
        let v = Vcpu {
            index: index as u8,
            fd,
            io: io.clone(),
            lifecycle: lifecycle.clone(),
            seccomp: vcpu_filter.clone(),
            run_as: config.run_as.clone(),
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
