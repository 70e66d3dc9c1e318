//! The fuzz targets: one module per guest-facing parser, each a `run(&[u8])` that plays one
//! case against the real code and panics when a property breaks, and a `seeds()` with a few
//! valid inputs to start from. [`TARGETS`] lists them for the binaries, the tests and
//! scripts/fuzz.sh.

pub mod agent_frames;
pub mod block_request;
pub mod devices;
pub mod fuse_request;
pub mod net_frames;
pub mod scratch;
pub mod snapshot_file;
pub mod virtqueue_chains;
pub mod vsock_packets;

/// A fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name; the binary is `fuzz_<name>`.
    pub name: &'static str,
    /// Plays one case.
    pub run: fn(&[u8]),
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: [Target; 7] = [
    Target {
        name: "virtqueue_chains",
        run: virtqueue_chains::run,
        seeds: virtqueue_chains::seeds,
    },
    Target {
        name: "vsock_packets",
        run: vsock_packets::run,
        seeds: vsock_packets::seeds,
    },
    Target {
        name: "fuse_request",
        run: fuse_request::run,
        seeds: fuse_request::seeds,
    },
    Target {
        name: "block_request",
        run: block_request::run,
        seeds: block_request::seeds,
    },
    Target {
        name: "agent_frames",
        run: agent_frames::run,
        seeds: agent_frames::seeds,
    },
    Target {
        name: "net_frames",
        run: net_frames::run,
        seeds: net_frames::seeds,
    },
    Target {
        name: "snapshot_file",
        run: snapshot_file::run,
        seeds: snapshot_file::seeds,
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
