//! The virtio-fs device: a high-priority queue (FORGET requests, never answered) and one request
//! queue, over one [`FuseServer`]. The configuration space holds the tag (36 bytes, NUL-padded)
//! and `num_request_queues` (1). No DAX window is offered, so every byte goes through the
//! queues.
//!
//! Each chain is validated ([`crate::virtio::chain`]); its device-readable part is the FUSE
//! request (at most [`MAX_REQUEST`] bytes), its device-writable part receives the reply. A chain
//! that fails validation, or whose request is too long, is returned unused and counted; a reply
//! that does not fit the driver's buffers is replaced by an EIO reply. Requests are served on the
//! VMM thread, one at a time, with that thread's credentials (the job user's).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};

use super::state::FsState;
use crate::fuse::{error_reply, FuseServer, Handled, SessionState, MAX_REQUEST};
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::DeviceSnapshot;
use crate::virtio::chain::{validate_chain, ValidChain};
use crate::virtio::device::{
    all_queue_states, read_config_bytes, serve_available_chains, DeviceFault, VirtioDevice,
};
use crate::virtio::interrupt::InterruptLine;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The high-priority queue (FORGET, BATCH_FORGET, INTERRUPT), then the (only) request queue;
/// the device serves both the same way.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Longest tag the configuration space holds.
pub const TAG_MAX_LEN: usize = 36;

/// Counters of the device.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Requests handed to the server.
    pub requests: AtomicU64,
    /// Chains returned unused (invalid, or a request over [`MAX_REQUEST`]).
    pub malformed_chains: AtomicU64,
    /// Replies replaced by EIO because the driver's buffers were too small.
    pub oversized_replies: AtomicU64,
}

struct Active {
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    interrupt: Arc<InterruptLine>,
}

/// The virtio-fs device.
pub struct FsDevice {
    config: [u8; TAG_MAX_LEN + 4],
    tag: String,
    server: FuseServer,
    /// A restored snapshot's FUSE session, taken up at activation: on the VMM thread, whose
    /// identity (the job user's) opens its files again.
    restored_session: Option<SessionState>,
    active: Option<Active>,
    stats: Arc<FsStats>,
    request: Vec<u8>,
    reply: Vec<u8>,
}

/// Why a device could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsDeviceError {
    /// The tag is empty or longer than [`TAG_MAX_LEN`] bytes.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    BadTag(String),
}

impl FsDevice {
    /// A device that offers `server`'s directory under `tag`.
    pub fn new(tag: &str, server: FuseServer) -> Result<Self, FsDeviceError> {
        if tag.is_empty() || tag.len() > TAG_MAX_LEN || tag.contains('\0') {
            return Err(FsDeviceError::BadTag(tag.to_string()));
        }
        let mut config = [0u8; TAG_MAX_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            config,
            tag: tag.to_string(),
            server,
            restored_session: None,
            active: None,
            stats: Arc::new(FsStats::default()),
            request: Vec::new(),
            reply: Vec::new(),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Serves one chain; returns the used length.
    fn serve(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let valid = match validate_chain(chain, mem) {
            Ok(v) => v,
            Err(e) => return self.drop_chain(&e),
        };
        if let Err(e) = valid.gather_readable(mem, MAX_REQUEST, &mut self.request) {
            return self.drop_chain(&e);
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if self.server.handle(&self.request, &mut self.reply) == Handled::NoReply {
            return 0;
        }
        self.write_reply(mem, &valid)
    }

    fn drop_chain(&self, why: &dyn std::fmt::Display) -> u32 {
        self.stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("virtio-fs: dropping a chain: {why}");
        0
    }

    /// Writes the reply into the chain's writable buffers, or an EIO reply when it does not fit
    /// (the guest's request then fails instead of waiting forever).
    fn write_reply(&mut self, mem: &GuestMemory, valid: &ValidChain) -> u32 {
        if self.reply.len() > valid.writable_len() {
            self.stats.oversized_replies.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "virtio-fs: a {}-byte reply does not fit {} bytes of buffers",
                self.reply.len(),
                valid.writable_len()
            );
            error_reply(&self.request, libc::EIO, &mut self.reply);
        }
        match valid.scatter_writable(mem, &self.reply) {
            Ok(n) => n,
            Err(e) => self.drop_chain(&e),
        }
    }

    fn process(&mut self, index: usize) -> Result<(), DeviceFault> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let result = self.process_active(&mut active, index);
        self.active = Some(active);
        result
    }

    fn process_active(&mut self, active: &mut Active, index: usize) -> Result<(), DeviceFault> {
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return Ok(());
        };
        serve_available_chains(queue, &mem, &active.interrupt, |chain| {
            self.serve(&mem, chain)
        })
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        _acked_features: u64,
    ) -> Result<(), DeviceFault> {
        if queues.len() != QUEUE_SIZES.len() || !queues.iter().all(|q| q.ready()) {
            return Err(DeviceFault(
                "the high-priority and the request queue must be set up".into(),
            ));
        }
        if let Some(session) = self.restored_session.take() {
            let report = self.server.restore_session(&session);
            tracing::info!(
                tag = %self.tag,
                ?report,
                "virtio-fs: the snapshot's open files were opened again by path"
            );
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
        self.process(index)
    }

    fn reset(&mut self) {
        // A driver that comes back sends INIT again and looks its files up anew.
        self.active = None;
        self.restored_session = None;
        self.server.reset();
    }

    fn save_state(&self) -> Option<DeviceSnapshot> {
        Some(DeviceSnapshot::Fs(FsState {
            tag: self.tag.clone(),
            session: self.server.save_session(),
        }))
    }

    fn running_queues(&self) -> Vec<Option<QueueState>> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, |a| all_queue_states(&a.queues))
    }

    /// The share in this slot must have the snapshot's tag; its session is taken up when the
    /// device is activated again (on the VMM thread).
    fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), String> {
        match state {
            DeviceSnapshot::Fs(saved) if saved.tag != self.tag => Err(format!(
                "the snapshot's share has tag {:?}, this one {:?}",
                saved.tag, self.tag
            )),
            DeviceSnapshot::Fs(saved) => {
                self.restored_session = Some(saved.session.clone());
                Ok(())
            }
            other => Err(format!(
                "a virtio-fs device cannot take the state of device type {}",
                other.device_type()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index of the high-priority queue.
    const HIPRIO_QUEUE: usize = 0;
    /// Index of the request queue.
    const REQUEST_QUEUE: usize = 1;
    use crate::devices::irq_trigger::IrqTrigger;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    /// Per queue: descriptor table, available ring, used ring.
    const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x5000, 0x6000, 0x7000)];
    const REQ: u64 = 0x10000;
    const OUT: u64 = 0x40000;
    const SIZE: u16 = 16;

    const FUSE_LOOKUP: u32 = 1;
    const FUSE_FORGET: u32 = 2;
    const FUSE_OPEN: u32 = 14;
    const FUSE_READ: u32 = 15;
    const FUSE_INIT: u32 = 26;
    const ROOT: u64 = 1;

    struct Rig {
        mem: Arc<GuestMemory>,
        dev: FsDevice,
        avail: [u16; 2],
        unique: u64,
        dir: tempfile::TempDir,
    }

    /// A FUSE request: `fuse_in_header` then `args`.
    fn request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&(40 + args.len() as u32).to_le_bytes());
        r.extend_from_slice(&opcode.to_le_bytes());
        r.extend_from_slice(&unique.to_le_bytes());
        r.extend_from_slice(&nodeid.to_le_bytes());
        r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extension length, padding
        r.extend_from_slice(args);
        r
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn ready_queues() -> Vec<Queue> {
        RINGS
            .iter()
            .map(|&(desc, avail, used)| {
                let mut q = Queue::new(SIZE).unwrap();
                q.set_size(SIZE);
                q.set_desc_table_address(Some(desc as u32), Some(0));
                q.set_avail_ring_address(Some(avail as u32), Some(0));
                q.set_used_ring_address(Some(used as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect()
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(dir.path().join("input.dat"), data).unwrap();
            let server = FuseServer::new(dir.path(), false).unwrap();
            let mut dev = FsDevice::new("sgejob", server).unwrap();
            let mem = Arc::new(create_guest_memory(2).unwrap());
            let queues = ready_queues();
            let irq = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            dev.activate(mem.clone(), queues, irq, 0).unwrap();
            Self {
                mem,
                dev,
                avail: [0; 2],
                unique: 0,
                dir,
            }
        }

        /// Posts `descs` (addr, len, flags) as one chain on `queue`; returns the used length.
        fn post(&mut self, queue: usize, descs: &[(u64, u32, u16)]) -> u32 {
            let m = self.mem.as_ref();
            let (desc, avail, used) = RINGS[queue];
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let d = desc + 16 * i as u64;
                let flags = if i + 1 == descs.len() {
                    *flags
                } else {
                    *flags | NEXT
                };
                m.write_obj(*addr, GuestAddress(d)).unwrap();
                m.write_obj(*len, GuestAddress(d + 8)).unwrap();
                m.write_obj(flags, GuestAddress(d + 12)).unwrap();
                m.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
            }
            let slot = u64::from(self.avail[queue] % SIZE);
            m.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
                .unwrap();
            self.avail[queue] = self.avail[queue].wrapping_add(1);
            m.write_obj(self.avail[queue], GuestAddress(avail + 2))
                .unwrap();
            self.dev.queue_notified(queue).unwrap();
            let used_idx: u16 = m.read_obj(GuestAddress(used + 2)).unwrap();
            assert_eq!(used_idx, self.avail[queue], "the chain was returned");
            m.read_obj(GuestAddress(used + 4 + 8 * slot + 4)).unwrap()
        }

        /// Sends `opcode` with `args` on the request queue, the reply landing in writable
        /// buffers of `out_lens` bytes at OUT; returns the reply bytes (the used length of them).
        fn call(&mut self, opcode: u32, nodeid: u64, args: &[u8], out_lens: &[u32]) -> Vec<u8> {
            self.unique += 2;
            let req = request(opcode, self.unique, nodeid, args);
            self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
            let mut descs = vec![(REQ, req.len() as u32, 0)];
            let mut at = OUT;
            for &len in out_lens {
                descs.push((at, len, WRITE));
                at += u64::from(len);
            }
            let used = self.post(REQUEST_QUEUE, &descs);
            let mut reply = vec![0u8; used as usize];
            self.mem.read_slice(&mut reply, GuestAddress(OUT)).unwrap();
            if used >= 16 {
                assert_eq!(le32(&reply, 0), used, "header length = used length");
                assert_eq!(le64(&reply, 8), self.unique, "the reply's unique");
            }
            reply
        }

        fn init(&mut self) {
            let mut args = Vec::new();
            for v in [7u32, 31, 128 * 1024, 0] {
                args.extend_from_slice(&v.to_le_bytes());
            }
            let reply = self.call(FUSE_INIT, 0, &args, &[4096]);
            assert_eq!(le32(&reply, 4), 0, "INIT succeeds");
            assert_eq!(le32(&reply, 16), 7, "protocol major 7");
        }
    }

    #[test]
    fn the_configuration_space_holds_the_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FsDevice::new("sgejob", FuseServer::new(dir.path(), true).unwrap()).unwrap();
        let mut config = [0xffu8; 40];
        dev.read_config(0, &mut config);
        assert_eq!(&config[..7], b"sgejob\0");
        assert!(config[6..36].iter().all(|&b| b == 0));
        assert_eq!(le32(&config, 36), 1);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        assert_eq!(dev.device_type(), 26);
        for bad in ["", "a-tag-that-is-much-longer-than-36-bytes", "nul\0"] {
            let server = FuseServer::new(dir.path(), true).unwrap();
            assert!(FsDevice::new(bad, server).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_is_looked_up_opened_and_read_across_several_buffers() {
        let mut rig = Rig::new();
        rig.init();
        let entry = rig.call(FUSE_LOOKUP, ROOT, b"input.dat\0", &[16, 128]);
        assert_eq!(le32(&entry, 4), 0, "LOOKUP succeeds");
        let nodeid = le64(&entry, 16);
        // fuse_attr.size is at 8 in the attr, which starts 40 bytes into fuse_entry_out.
        assert_eq!(le64(&entry, 16 + 40 + 8), 10_000);
        let mut open = Vec::new();
        open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
        open.extend_from_slice(&0u32.to_le_bytes());
        let opened = rig.call(FUSE_OPEN, nodeid, &open, &[16, 16]);
        assert_eq!(le32(&opened, 4), 0, "OPEN succeeds");
        let fh = le64(&opened, 16);
        let mut read = Vec::new();
        read.extend_from_slice(&fh.to_le_bytes());
        read.extend_from_slice(&100u64.to_le_bytes());
        read.extend_from_slice(&8192u32.to_le_bytes());
        read.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
        let data = rig.call(FUSE_READ, nodeid, &read, &[16, 4096, 4096]);
        assert_eq!(le32(&data, 4), 0, "READ succeeds");
        assert_eq!(data.len(), 16 + 8192);
        let expect: Vec<u8> = (100..8292u32).map(|i| (i % 251) as u8).collect();
        assert!(data[16..] == expect[..], "the file's bytes, in order");
        assert_eq!(rig.dev.stats().requests.load(Ordering::Relaxed), 4);
        let _ = &rig.dir;
    }

    #[test]
    fn a_reply_too_big_for_the_buffers_becomes_eio() {
        let mut rig = Rig::new();
        let mut args = Vec::new();
        for v in [7u32, 31, 0, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        let reply = rig.call(FUSE_INIT, 0, &args, &[16]);
        assert_eq!(reply.len(), 16);
        assert_eq!(le32(&reply, 4) as i32, -libc::EIO);
        assert_eq!(rig.dev.stats().oversized_replies.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn forgets_on_the_high_priority_queue_get_no_reply() {
        let mut rig = Rig::new();
        rig.init();
        let forget = request(FUSE_FORGET, 99, 12345, &1u64.to_le_bytes());
        rig.mem.write_slice(&forget, GuestAddress(REQ)).unwrap();
        assert_eq!(rig.post(HIPRIO_QUEUE, &[(REQ, forget.len() as u32, 0)]), 0);
        assert_eq!(rig.dev.stats().malformed_chains.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn after_a_device_reset_the_driver_starts_a_new_session() {
        let mut rig = Rig::new();
        rig.init();
        let entry = rig.call(FUSE_LOOKUP, ROOT, b"input.dat\0", &[144]);
        let nodeid = le64(&entry, 16);
        rig.dev.reset();
        let irq = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        rig.mem
            .write_obj(0u16, GuestAddress(RINGS[1].1 + 2))
            .unwrap();
        rig.dev
            .activate(rig.mem.clone(), ready_queues(), irq, 0)
            .unwrap();
        rig.avail = [0; 2];
        // The old session's node is gone; a new INIT is accepted.
        let stale = rig.call(FUSE_LOOKUP, nodeid, b"x\0", &[144]);
        assert_eq!(le32(&stale, 4) as i32, -libc::EIO, "nothing before INIT");
        rig.init();
        let stale = rig.call(FUSE_LOOKUP, nodeid, b"x\0", &[144]);
        assert_ne!(le32(&stale, 4), 0, "the old node id is not valid any more");
    }

    #[test]
    fn hostile_chains_are_returned_unused() {
        let mut rig = Rig::new();
        // A request longer than the server accepts.
        let used = rig.post(
            REQUEST_QUEUE,
            &[(REQ, MAX_REQUEST as u32 + 1, 0), (OUT, 4096, WRITE)],
        );
        assert_eq!(used, 0);
        // A readable buffer after a writable one.
        let used = rig.post(REQUEST_QUEUE, &[(OUT, 16, WRITE), (REQ, 40, 0)]);
        assert_eq!(used, 0);
        // A buffer outside guest RAM.
        let used = rig.post(
            REQUEST_QUEUE,
            &[(REQ, 40, 0), (0x7fff_0000_0000, 16, WRITE)],
        );
        assert_eq!(used, 0);
        assert_eq!(rig.dev.stats().malformed_chains.load(Ordering::Relaxed), 3);
        // The device still works.
        rig.init();
    }
}
