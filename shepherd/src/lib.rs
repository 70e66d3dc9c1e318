//! sge_virtualizer: a Grid Engine shepherd that runs each job in its own KVM microVM.
//!
//! * [`launch`]: run one job in a fresh microVM (the entry point for `run` and for the shepherd).
//! * `backend`: the VM backends (QEMU now; the embedded VMM slots in beside it).
//! * [`guest_image`]: where the guest kernel and initramfs are.
//! * [`timings`]: phase timestamps.

mod agent_session;
pub mod backend;
pub mod guest_image;
mod job_control;
pub mod launch;
pub mod settings;
pub mod sge;
pub mod timings;
