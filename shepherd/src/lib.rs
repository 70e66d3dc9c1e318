//! sge_virtualizer: a Grid Engine shepherd that runs each job in its own KVM microVM.
//!
//! * [`launch`]: run one job in a fresh microVM (the entry point for `run` and for the shepherd).
//! * `backend`: the VM backends (QEMU now; the embedded VMM slots in beside it).
//! * [`guest_image`]: where the guest kernel and initramfs are.
//! * [`guest_sysctl`]: kernel settings the guest takes from its host (`kernel.pid_max`).
//! * [`host_check`]: what jobs on this host need, checked ahead of any job.
//! * [`image`]: OS images jobs run in (store, verification, building with debootstrap).
//! * [`shared_dirs`]: host directories shared into the job's VM.
//! * [`timings`]: phase timestamps.
//! * [`vmm_process`]: the VMM's own process, the job user's, and the root parent's watch on it.

mod agent_protocol;
mod agent_session;
pub mod backend;
pub mod checkpoint;
pub mod guest_image;
pub mod guest_ram;
pub mod guest_sysctl;
pub mod host_check;
pub mod host_memory;
pub mod image;
mod job_control;
pub mod launch;
pub mod network;
mod output_writer;
pub mod path_trust;
pub mod run_dir;
pub mod session_progress;
pub mod settings;
pub mod sge;
pub mod shared_dirs;
pub mod timings;
pub mod vmm_process;
