//! Checkpoints of a running job: its VM's snapshot and where its agent session stood, in a
//! directory of the job user's, and the way back from them.
//!
//! What each submodule owns:
//!
//! * [`record`]: the session's side of a checkpoint as a plain serde type, next to the VM's
//!   snapshot file.
//! * [`store`]: the checkpoint directory: one subdirectory per checkpoint, published by
//!   renaming `latest`, so a crash while writing never leaves a half checkpoint as the latest.
//! * [`taker`]: taking one from a running VM and session, and, for a restore, cutting the job's
//!   output files back to the checkpoint.
//!
//! Everything here runs in the VMM process, as the job user: the root shepherd writes nothing
//! in a checkpoint directory.

pub mod record;
pub mod store;
pub mod taker;

pub use record::CheckpointRecord;
pub use store::{CheckpointDir, CheckpointError};
pub use taker::{CheckpointReport, Checkpointer};
