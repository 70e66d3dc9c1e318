//! What a caller asks for: [`VmConfig`] (kernel, initrd, command line, memory, vCPUs, console,
//! vsock, disks, shared directories, the balloon, the identity of the VMM's threads, seccomp,
//! CPU features to hide).

use std::path::PathBuf;

use crate::cpu::CpuFeature;
use crate::credentials::ThreadCredentials;
use crate::devices::console::SerialSink;

/// Command line used when the caller gives none: serial console, reset through the i8042
/// (`reboot=k`, which ends the VM), reboot on panic, no PCI, no modules, and a quiet i8042 probe.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Most vCPUs a VM may have (the MP table's room).
pub const MAX_VCPUS: u8 = crate::boot::mptable::MAX_CPUS;

/// The host side of the virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 are reserved).
    pub guest_cid: u64,
    /// Base path of the host Unix sockets (hybrid vsock): the VMM listens on `uds_path` for
    /// host-initiated connections (`CONNECT <port>\n`, answered `OK <host_port>\n`) and connects
    /// guest-initiated connections to port P to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A virtio-blk disk backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image; its size is rounded down to whole 512-byte sectors.
    pub path: PathBuf,
    /// Open it read-only and offer VIRTIO_BLK_F_RO (writes are answered IOERR).
    pub read_only: bool,
}

/// A host directory served to the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The tag the guest mounts it by (`mount -t virtiofs <tag> <dir>`), 1 to 36 bytes.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    /// Modifying requests are answered EROFS.
    pub read_only: bool,
}

/// A microVM to start.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` (preferred) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends a `virtio_mmio.device=` entry per virtio device.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]), one host thread each.
    pub vcpus: u8,
    /// The virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order: the guest sees `/dev/vda`, `/dev/vdb`...
    pub disks: Vec<DiskConfig>,
    /// Host directories served over virtio-fs, after the disks.
    pub shares: Vec<ShareConfig>,
    /// The identity the VMM's threads (vCPUs, event loop, file servers) take before they run
    /// guest code; the caller's other threads keep theirs. `None` keeps the caller's. File
    /// servers open their directories with it, so the guest reaches exactly what this user can.
    pub run_as: Option<ThreadCredentials>,
    /// Where the serial console goes.
    pub serial: SerialSink,
    /// Install the seccomp filters on the VMM and vCPU threads (see [`crate::seccomp`]).
    pub seccomp: bool,
    /// CPU features hidden from the guest's CPUID. Empty by default; only for hosts whose KVM
    /// cannot emulate them.
    pub hidden_cpu_features: Vec<CpuFeature>,
    /// An open `/dev/kvm` to use instead of opening it: a VMM process that runs as a user who
    /// may not open the device gets it from its privileged parent. `None`: open it.
    pub kvm_device: Option<std::sync::Arc<std::fs::File>>,
    /// A virtio-balloon device with free page reporting ([`crate::virtio::balloon`]), after all
    /// other virtio devices: memory the guest frees goes back to the host a few seconds later
    /// (the guest kernel needs `CONFIG_VIRTIO_BALLOON` and `CONFIG_PAGE_REPORTING`; without
    /// them the device is simply unused). The host never asks the guest to inflate. It takes
    /// one virtio slot and GSI, and gives a VM without other virtio devices a VMM thread.
    pub balloon: bool,
}

impl VmConfig {
    /// A VM with 128 MiB, one vCPU, [`DEFAULT_CMDLINE`], no console, no vsock, no disks, no
    /// shares, the balloon, the caller's identity, seccomp on.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            mem_mib: 128,
            vcpus: 1,
            vsock: None,
            disks: Vec::new(),
            shares: Vec::new(),
            run_as: None,
            serial: SerialSink::Discard,
            seccomp: true,
            hidden_cpu_features: Vec::new(),
            kvm_device: None,
            balloon: true,
        }
    }
}
