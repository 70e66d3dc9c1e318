//! `vmm`: an embedded KVM microVM monitor on the rust-vmm crates. It boots a Linux kernel (or any
//! 64-bit ELF) in-process with an 8250 serial console, an i8042 reset line, a boot timer, a
//! virtio-vsock device whose host side is Unix sockets (Firecracker's hybrid-vsock convention),
//! virtio-blk disks backed by host files ([`VmConfig::disks`], read-only or read-write), and
//! virtio-fs devices that share host directories through an in-process FUSE passthrough server
//! ([`VmConfig::shares`], [`fuse`]), and a virtio-balloon device with free page reporting that
//! gives the memory the guest frees back to the host ([`VmConfig::balloon`]), and a virtio-net
//! device whose frames go to and from `passt` over a stream socket the caller hands in
//! ([`VmConfig::net`], [`virtio::net`]), optionally behind an allow-list of destinations
//! ([`EgressPolicy`], enforced by [`virtio::net::filtering_relay`]). It knows nothing about
//! Grid Engine.
//!
//! # Using it
//!
//! ```no_run
//! use vmm::{Vm, VmConfig, VsockConfig, SerialSink, ExitReason};
//!
//! let mut config = VmConfig::new("/path/to/vmlinux");
//! config.initrd = Some("/path/to/initramfs.cpio".into());
//! config.mem_mib = 256;
//! config.vcpus = 2;
//! config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: "/run/job42/vsock".into() });
//! config.serial = SerialSink::File { path: "/run/job42/console.log".into(), max_bytes: 1 << 20 };
//! let vm = Vm::start(config)?;            // returns once the vCPU threads run
//! // ... talk to the guest agent over <uds_path>_<port> / CONNECT <port> ...
//! let reason: ExitReason = vm.wait();     // or wait_timeout / request_stop / pause / resume
//! println!("VM ended: {reason}; boot timer at {:?}", vm.timestamps().boot_time());
//! # Ok::<(), vmm::VmError>(())
//! ```
//!
//! * [`Vm::start`] builds and starts a VM from a [`VmConfig`]; the [`VmHandle`] it returns
//!   waits ([`VmHandle::wait`], [`VmHandle::wait_timeout`]), stops
//!   ([`VmHandle::request_stop`]), pauses and resumes ([`VmHandle::pause`],
//!   [`VmHandle::resume`]), snapshots ([`VmHandle::snapshot`]), and reports [`Timestamps`],
//!   console output and [`MemoryUsage`]. Dropping it stops the VM.
//! * [`Vm::restore`] builds a VM from a [`VmConfig`] and a snapshot file and runs it from where
//!   the snapshot was taken ([`snapshot`]; every device but writable disks and virtio-net).
//! * [`ExitReason`] says why a VM ended: guest reset (i8042, `reboot=k`), triple fault, system
//!   event, KVM internal error, failed entry, host request, or a VMM thread failure.
//! * [`kvm_can_run_linux`] tells whether this host's KVM can run a Linux guest at useful speed
//!   (for choosing a backend), with the reason as text.
//! * [`BOOT_TIMER_PORT`] / [`BOOT_TIMER_MAGIC`]: the guest agent writes the magic byte to this
//!   I/O port once at start; the host records the time ([`Timestamps::boot_timer`]).
//!
//! # Threads
//!
//! One thread per vCPU (`vcpuN`) and, when there are virtio devices, one VMM thread (`vmm`) that
//! runs the event loop (and serves the shared directories). Each takes [`VmConfig::run_as`]
//! ([`credentials`]: per thread, so a root caller's other threads keep root) and then installs
//! its seccomp filter ([`seccomp`]) before running guest code.
//! vCPUs are kicked out of `KVM_RUN` with the real-time signal `SIGRTMIN +`
//! [`VCPU_KICK_SIGNAL_OFFSET`]; the embedding program must not use it.
//!
//! # Tests
//!
//! `cargo test -p vmm` runs unit tests, the KVM tests with tiny guests assembled from
//! `tests/guests/*.S` (serial, i8042 reset, boot timer, triple fault, stop, pause/resume, several
//! vCPUs, a guest-side virtio-vsock driver against the real device and muxer, hostile chains,
//! a guest-side virtio-blk driver that reads a host image and is refused a write), the FUSE
//! server over `/dev/fuse` with the host kernel's FUSE client (`fuse_passthrough`, as root),
//! the seccomp checks, the backend probe, and
//! `slow_real_kernel_smoke_*` (the project's guest kernel to `Run /init` and vsock DRIVER_OK,
//! and to a virtio-fs root or an ext4 root on virtio-blk from which it executes `/sbin/init`;
//! they print SKIPPED when no kernel is built). `--example boot_footprint` measures the VMM's
//! resident memory after boot. The fuzz targets of the queues, the devices, the muxer and the
//! FUSE server live in the workspace's `fuzz` crate (`scripts/fuzz.sh`).
//!
//! # Module map
//!
//! [`layout`] (guest address map), [`memory`] (guest RAM), [`boot`] (kernel, initrd, zero page,
//! MP table), [`cpu`] (CPUID, MSRs, registers), `vcpu` (threads, exits, kicks), `lifecycle` (run
//! state, exit reasons, timestamps), [`devices`] (serial, i8042, boot timer, console),
//! [`virtio`] (MMIO transport, queues, vsock, block, fs, balloon, net), [`fuse`] (the FUSE passthrough server
//! behind virtio-fs), [`credentials`] (per-thread identity), `event_loop` (the VMM thread),
//! [`seccomp`], [`probe`], [`resources`], [`snapshot`] (snapshot file format, vCPU/VM/device/memory
//! state capture and restore).

pub mod boot;
pub mod config;
pub mod cpu;
pub mod credentials;
pub mod devices;
mod event_loop;
pub mod fuse;
mod handle;
pub mod layout;
mod lifecycle;
pub mod memory;
pub mod probe;
pub mod resources;
pub mod seccomp;
pub mod snapshot;
mod thread_exit;
mod vcpu;
pub mod virtio;
mod vm;

pub use config::{
    DiskConfig, NetConfig, ShareConfig, VmConfig, VsockConfig, DEFAULT_CMDLINE, MAX_VCPUS,
};
pub use cpu::CpuFeature;
pub use credentials::ThreadCredentials;
pub use devices::boot_timer::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
pub use devices::console::SerialSink;
pub use handle::VmHandle;
pub use lifecycle::{ExitReason, Timestamps};
pub use probe::{kvm_can_run_linux, Probe};
pub use resources::MemoryUsage;
pub use snapshot::{SnapshotError, SnapshotInfo};
pub use vcpu::VCPU_KICK_SIGNAL_OFFSET;
pub use virtio::net::egress_filter::{AllowRule, EgressPolicy};
pub use vm::{Vm, VmError};
