//! The virtio-blk device (id 2): one request queue, backed by a host file ([`disk`]); requests
//! are validated and parsed from descriptor chains ([`request`]) and executed by the device
//! ([`device`]); what a snapshot keeps of it ([`state`]).

pub mod device;
pub mod disk;
pub mod request;
pub mod state;

pub use device::{BlockDevice, BlockStats};
pub use disk::{Disk, DiskError, SECTOR_SIZE};
pub use state::BlockState;
