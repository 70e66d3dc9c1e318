//! A synthetic virtio-fs driver for the benchmark: one [`FsDevice`] over a host directory, its
//! request queue in guest memory, and FUSE requests posted the way the Linux virtio-fs driver
//! lays them out (headers and arguments in their own descriptors, file data in page-sized
//! descriptors), one request per notification. No guest kernel runs: what is timed is the
//! device (chain validation, gather, scatter, used ring, interrupt eventfd) and the server.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::irq_trigger::IrqTrigger;
use vmm::fuse::{FuseServer, MAX_WRITE};
use vmm::memory::{create_guest_memory, GuestMemory};
use vmm::virtio::device::VirtioDevice;
use vmm::virtio::fs::FsDevice;
use vmm::virtio::interrupt::InterruptLine;

/// FUSE opcodes (`fuse_opcode` in linux/fuse.h) that the mount's server counts too; the others
/// are next to the one method that sends them.
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const ROOT_NODE: u64 = 1;

/// Descriptors per queue: room for a header, arguments and 32 data pages per chain.
const QUEUE_SIZE: u16 = 64;
const PAGE: usize = 4096;
/// Per queue: descriptor table, available ring, used ring (guest-physical).
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x5000, 0x6000, 0x7000)];
const REQUEST_QUEUE: usize = 1;
/// The request's header and arguments, then its data pages (a WRITE's payload).
const IN_HEADER: u64 = 0x10000;
const IN_DATA: u64 = IN_HEADER + 0x10000;
/// The reply's header, a page for small reply bodies, then its data pages (a READ's bytes).
const OUT_HEADER: u64 = IN_DATA + (MAX_WRITE as usize + PAGE) as u64;
const OUT_BODY: u64 = OUT_HEADER + PAGE as u64;
const OUT_DATA: u64 = OUT_BODY + PAGE as u64;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// Descriptor flags: another descriptor follows; the device writes this buffer.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// What the device wrote back for one request.
struct Reply {
    error: i32,
    used: usize,
}

pub struct FsDriver {
    mem: Arc<GuestMemory>,
    dev: FsDevice,
    avail_idx: u16,
    unique: u64,
    chain: Vec<(u64, u32, u16)>,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl FsDriver {
    /// A device serving `root` read-write, activated, with the FUSE session initialised.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let server = FuseServer::new(root, false).context("FuseServer::new")?;
        let mut dev = FsDevice::new("bench", server)?;
        let mem = Arc::new(create_guest_memory(2)?);
        let queues = RINGS
            .iter()
            .map(|&(desc, avail, used)| {
                let mut q = Queue::new(QUEUE_SIZE)?;
                q.set_size(QUEUE_SIZE);
                q.set_desc_table_address(Some(desc as u32), Some(0));
                q.set_avail_ring_address(Some(avail as u32), Some(0));
                q.set_used_ring_address(Some(used as u32), Some(0));
                q.set_ready(true);
                Ok(q)
            })
            .collect::<Result<Vec<_>, virtio_queue::Error>>()?;
        let irq = Arc::new(InterruptLine::new(IrqTrigger::new()?));
        dev.activate(mem.clone(), queues, irq, 0)
            .map_err(|e| anyhow::anyhow!("activating the device: {}", e.0))?;
        let mut driver = Self {
            mem,
            dev,
            avail_idx: 0,
            unique: 0,
            chain: Vec::new(),
        };
        driver.init()?;
        Ok(driver)
    }

    fn init(&mut self) -> anyhow::Result<()> {
        const FUSE_INIT: u32 = 26;
        let mut args = Vec::new();
        // Protocol 7.31, readahead of MAX_WRITE, no optional flags.
        for v in [7u32, 31, MAX_WRITE, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        let r = self.call(FUSE_INIT, 0, &args, 0, PAGE, 0)?;
        ensure!(r.error == 0, "INIT failed: {}", r.error);
        Ok(())
    }

    /// Posts one request: header + `args` in two readable descriptors, then `data_in` bytes
    /// of the (pre-filled) data pages; the reply lands in a header descriptor, `body_out`
    /// bytes of small-body buffer and `data_out` bytes of data pages.
    fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        data_in: usize,
        body_out: usize,
        data_out: usize,
    ) -> anyhow::Result<Reply> {
        self.unique += 2;
        let len = (IN_HEADER_LEN + args.len() + data_in) as u32;
        let mut header = [0u8; IN_HEADER_LEN];
        header[0..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&opcode.to_le_bytes());
        header[8..16].copy_from_slice(&self.unique.to_le_bytes());
        header[16..24].copy_from_slice(&nodeid.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(IN_HEADER))?;
        let args_at = IN_HEADER + IN_HEADER_LEN as u64;
        self.mem.write_slice(args, GuestAddress(args_at))?;

        self.chain.clear();
        self.chain.push((IN_HEADER, IN_HEADER_LEN as u32, 0));
        if !args.is_empty() {
            self.chain.push((args_at, args.len() as u32, 0));
        }
        push_pages(&mut self.chain, IN_DATA, data_in, 0);
        self.chain
            .push((OUT_HEADER, OUT_HEADER_LEN as u32, DESC_WRITE));
        if body_out > 0 {
            self.chain.push((OUT_BODY, body_out as u32, DESC_WRITE));
        }
        push_pages(&mut self.chain, OUT_DATA, data_out, DESC_WRITE);
        let used = self.post()? as usize;
        ensure!(
            used >= OUT_HEADER_LEN,
            "opcode {opcode}: reply of {used} bytes"
        );
        let mut out = [0u8; OUT_HEADER_LEN];
        self.mem.read_slice(&mut out, GuestAddress(OUT_HEADER))?;
        let error = i32::from_le_bytes(out[4..8].try_into()?);
        ensure!(le_u64(&out, 8) == self.unique, "reply to another request");
        Ok(Reply { error, used })
    }

    /// Writes `self.chain` into the descriptor table, makes it available, notifies the device
    /// and returns the used length.
    fn post(&mut self) -> anyhow::Result<u32> {
        let m = self.mem.as_ref();
        let (desc, avail, used) = RINGS[REQUEST_QUEUE];
        let last = self.chain.len() - 1;
        for (i, &(addr, len, flags)) in self.chain.iter().enumerate() {
            let d = desc + 16 * i as u64;
            let flags = if i == last { flags } else { flags | DESC_NEXT };
            m.write_obj(addr, GuestAddress(d))?;
            m.write_obj(len, GuestAddress(d + 8))?;
            m.write_obj(flags, GuestAddress(d + 12))?;
            m.write_obj(i as u16 + 1, GuestAddress(d + 14))?;
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        m.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(avail + 2))?;
        self.dev
            .queue_notified(REQUEST_QUEUE)
            .map_err(|e| anyhow::anyhow!("device fault: {}", e.0))?;
        let used_idx: u16 = m.read_obj(GuestAddress(used + 2))?;
        ensure!(used_idx == self.avail_idx, "the chain was not returned");
        Ok(m.read_obj(GuestAddress(used + 4 + 8 * slot + 4))?)
    }

    /// Fills the request data pages (what a guest's WRITE sends) with `byte`.
    pub fn fill_write_pages(&self, byte: u8) -> anyhow::Result<()> {
        let page = vec![byte; MAX_WRITE as usize];
        Ok(self.mem.write_slice(&page, GuestAddress(IN_DATA))?)
    }

    /// LOOKUP of `name` in the root; the node id.
    pub fn lookup(&mut self, name: &str) -> anyhow::Result<u64> {
        const FUSE_LOOKUP: u32 = 1;
        let mut args = name.as_bytes().to_vec();
        args.push(0);
        let r = self.call(FUSE_LOOKUP, ROOT_NODE, &args, 0, PAGE, 0)?;
        ensure!(r.error == 0, "LOOKUP {name}: {}", r.error);
        // fuse_entry_out starts with the node id.
        let mut id = [0u8; 8];
        self.mem.read_slice(&mut id, GuestAddress(OUT_BODY))?;
        Ok(u64::from_le_bytes(id))
    }

    /// OPEN of `nodeid` with open(2) `flags`; the file handle.
    pub fn open(&mut self, nodeid: u64, flags: i32) -> anyhow::Result<u64> {
        const FUSE_OPEN: u32 = 14;
        let mut args = (flags as u32).to_le_bytes().to_vec();
        args.extend_from_slice(&[0u8; 4]);
        let r = self.call(FUSE_OPEN, nodeid, &args, 0, PAGE, 0)?;
        ensure!(r.error == 0, "OPEN: {}", r.error);
        let mut fh = [0u8; 8];
        self.mem.read_slice(&mut fh, GuestAddress(OUT_BODY))?;
        Ok(u64::from_le_bytes(fh))
    }

    /// GETATTR of `nodeid` (no file handle).
    pub fn getattr(&mut self, nodeid: u64) -> anyhow::Result<()> {
        const FUSE_GETATTR: u32 = 3;
        let r = self.call(FUSE_GETATTR, nodeid, &[0u8; 16], 0, PAGE, 0)?;
        ensure!(r.error == 0, "GETATTR: {}", r.error);
        Ok(())
    }

    /// READ of `size` bytes at `offset`; the bytes read.
    pub fn read(&mut self, fh: u64, offset: u64, size: usize) -> anyhow::Result<usize> {
        let mut args = [0u8; 40];
        args[0..8].copy_from_slice(&fh.to_le_bytes());
        args[8..16].copy_from_slice(&offset.to_le_bytes());
        args[16..20].copy_from_slice(&(size as u32).to_le_bytes());
        let r = self.call(FUSE_READ, 0, &args, 0, 0, size)?;
        ensure!(r.error == 0, "READ: {}", r.error);
        Ok(r.used - OUT_HEADER_LEN)
    }

    /// WRITE of `size` bytes of the data pages at `offset`; the bytes written.
    pub fn write(&mut self, fh: u64, offset: u64, size: usize) -> anyhow::Result<usize> {
        let mut args = [0u8; 40];
        args[0..8].copy_from_slice(&fh.to_le_bytes());
        args[8..16].copy_from_slice(&offset.to_le_bytes());
        args[16..20].copy_from_slice(&(size as u32).to_le_bytes());
        let r = self.call(FUSE_WRITE, 0, &args, size, PAGE, 0)?;
        ensure!(r.error == 0, "WRITE: {}", r.error);
        let mut written = [0u8; 4];
        self.mem.read_slice(&mut written, GuestAddress(OUT_BODY))?;
        let written = u32::from_le_bytes(written) as usize;
        if written != size {
            bail!("WRITE wrote {written} of {size} bytes");
        }
        Ok(written)
    }
}

/// Appends `len` bytes at `start` as page-sized descriptors with `flags`.
fn push_pages(chain: &mut Vec<(u64, u32, u16)>, start: u64, len: usize, flags: u16) {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PAGE);
        chain.push((start + at as u64, n as u32, flags));
        at += n;
    }
}
