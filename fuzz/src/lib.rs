//! Coverage-guided fuzz targets for every parser a guest can reach (issue 12, "beyond the
//! list"). Each target is a plain function from bytes to one case run against the real code —
//! the virtio-mmio transport, the devices' queue handling, the vsock muxer, the FUSE server, the
//! agent protocol codec, the virtio-net frame path and its egress filter, and the VM snapshot
//! file parser (a file, not the guest, feeds that one) — with nothing of the code under test
//! replaced. A case that breaks a property panics; AFL++ reports the panic (an
//! abort) as a crash.
//!
//! * [`targets`]: the seven targets and their seed inputs ([`Target`], [`TARGETS`]).
//! * [`guest_driver`]: a synthetic virtio driver (guest RAM in vm-memory, the MMIO set-up
//!   sequence, descriptor tables and rings) that the queue-level targets share.
//! * [`input`]: reading a case's structure from its bytes.
//! * [`driver`]: the `main` of each binary in `src/bin/`: an AFL++ persistent loop when built by
//!   `cargo afl build --features afl` (scripts/fuzz.sh), otherwise a replayer of input files,
//!   a random-input runner and a seed writer, on any toolchain.

pub mod driver;
pub mod guest_driver;
pub mod input;
pub mod targets;

pub use targets::{Target, TARGETS};
