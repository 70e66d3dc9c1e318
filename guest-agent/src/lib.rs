//! The guest side of sge_virtualizer.
//!
//! * [`protocol`]: the versioned, length-prefixed binary wire protocol spoken between the shepherd
//!   (host) and the agent (guest). Both sides use this module; it knows nothing of KVM or Grid
//!   Engine.
//! * [`agent`]: the agent itself — PID 1 in the guest, or an ordinary process over a Unix socket in
//!   tests — which starts the job, relays its stdio and signals, reaps everything and reports the
//!   exit status and rusage.

pub mod agent;
pub mod protocol;
