//! The virtio-balloon device (id 5) with free page reporting: how guest RAM the guest no longer
//! uses goes back to the host. It owns the device itself ([`device`]: queues, features,
//! configuration space), its state as a plain value ([`state`]: [`BalloonState`]), reading which guest-physical ranges a chain gives up
//! ([`ranges`]: reported free ranges, inflated page frame numbers), and dropping the host memory
//! behind such a range ([`discard`]: `madvise(MADV_DONTNEED)` on whole pages inside guest RAM).
//!
//! The host never asks the guest to inflate (the target `num_pages` stays 0): guest RAM is
//! allocated lazily (anonymous memory) and the guest hands back what it frees by reporting it.

pub mod device;
pub mod discard;
pub mod ranges;
pub mod state;

pub use device::BalloonDevice;
pub use state::BalloonState;
