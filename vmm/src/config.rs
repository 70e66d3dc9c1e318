//! What a caller asks for: [`VmConfig`] (kernel, initrd, command line, memory, vCPUs, console,
//! vsock, disks, shared directories, the balloon, the network, the identity of the VMM's threads,
//! seccomp, CPU features to hide).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

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

/// A virtio-net device whose frames go to and from `passt` in its "qemu" mode
/// ([`crate::virtio::net`]).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// A connected stream socket to passt (each frame preceded by its length, 4 bytes big
    /// endian): one end of a socketpair whose other end passt got with `--fd`, or a connection
    /// to passt's `--socket`. An fd, not a path: the caller sets the connection up with its
    /// own rights before the VMM's threads take the job user's identity and their seccomp
    /// filter. Shared (clones of the config share it); the VMM keeps a reference while the VM
    /// runs, and passt sees the end of the stream once every holder has dropped it.
    pub stream: Arc<OwnedFd>,
    /// The guest's MAC address (unicast, not all zero).
    pub mac: [u8; 6],
    /// The MTU announced to the guest (VIRTIO_NET_F_MTU: also the most the guest may set),
    /// [`crate::virtio::net::device::MIN_MTU`]..=[`crate::virtio::net::device::MAX_MTU`].
    /// Without mergeable RX buffers each received frame must fit one of the guest's RX
    /// buffers, which Linux sizes from it; give passt the same value (`--mtu`).
    pub mtu: u16,
}

impl NetConfig {
    /// The device for `stream` and `mac`, with [`crate::virtio::net::device::DEFAULT_MTU`].
    pub fn new(stream: OwnedFd, mac: [u8; 6]) -> Self {
        Self {
            stream: Arc::new(stream),
            mac,
            mtu: crate::virtio::net::device::DEFAULT_MTU,
        }
    }
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
    /// Back guest RAM with transparent huge pages where the host has them
    /// ([`crate::memory::advise_huge_pages`]). Off by default.
    pub huge_pages: bool,
    /// A virtio-balloon device with free page reporting ([`crate::virtio::balloon`]), after all
    /// other virtio devices: memory the guest frees goes back to the host a few seconds later
    /// (the guest kernel needs `CONFIG_VIRTIO_BALLOON` and `CONFIG_PAGE_REPORTING`; without
    /// them the device is simply unused). The host never asks the guest to inflate. It takes
    /// one virtio slot and GSI, and gives a VM without other virtio devices a VMM thread.
    pub balloon: bool,
    /// A virtio-net device backed by passt ([`NetConfig`]), after every other virtio device
    /// (the balloon included), so that it moves no other device's MMIO window or GSI.
    pub net: Option<NetConfig>,
}

impl VmConfig {
    /// A VM with 128 MiB, one vCPU, [`DEFAULT_CMDLINE`], no console, no vsock, no disks, no
    /// shares, the balloon, no network, the caller's identity, seccomp on.
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
            huge_pages: false,
            balloon: true,
            net: None,
        }
    }
}
