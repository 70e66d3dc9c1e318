//! Target `snapshot_file`: the VMM's snapshot file parser ([`vmm::snapshot::format::parse`]) and
//! memory loader ([`vmm::snapshot::memory::load`]) on hostile files. The first byte picks how the
//! rest is used: as a whole file (mostly stopped by the checksums), or as section payloads that
//! the harness frames with correct lengths and CRCs (with this build's header, or a fuzzed one),
//! so the decoders and the memory-run checks behind the checksums are reached too. Properties:
//! no panic, no allocation beyond the format's bounds, every file that parses re-encodes to one
//! that parses to the same state, memory runs land only inside a 2 MiB guest RAM, and each
//! virtio device state in a file that parses goes into a fresh balloon transport over that RAM
//! ([`vmm::virtio::mmio::MmioTransport::restore_state`]) or is refused, without a panic.

use vmm::snapshot::format::{self, Header};
use vmm::snapshot::vcpu_state::{CpuidEntry, FloatingPoint, VcpuState};
use vmm::snapshot::virtio_state::{DeviceSnapshot, QueueSnapshot, TransportSnapshot};
use vmm::snapshot::vm_state::VmState;

use crate::input::ByteCursor;

/// Guest RAM the loaded memory section goes into.
const RAM_MIB: u64 = 2;

fn header(vcpus: u8) -> Vec<u8> {
    format::encode(&Header {
        build_id: vmm::snapshot::build_id(),
        vcpus,
        guest_ram_bytes: RAM_MIB << 20,
        cpuid: Vec::new(),
    })
    .expect("a header encodes")
}

/// Parses `file`; where it parses, checks the re-encoding and loads its memory section.
fn play(file: &[u8]) {
    let Ok(parsed) = format::parse_bytes(file) else {
        return;
    };
    let memory = &file[parsed.memory.offset as usize..][..parsed.memory.len as usize];
    let again = format::frame_file([
        &format::encode(&parsed.header).expect("a parsed header encodes"),
        &format::encode(&parsed.vm).expect("a parsed VM state encodes"),
        &format::encode(&parsed.vcpus).expect("parsed vCPU states encode"),
        memory,
    ]);
    let reparsed = format::parse_bytes(&again).expect("a re-encoded snapshot parses");
    assert_eq!(reparsed.header, parsed.header);
    assert_eq!(reparsed.vm, parsed.vm);
    assert_eq!(reparsed.vcpus, parsed.vcpus);
    let mem = vmm::memory::create_guest_memory(RAM_MIB).expect("guest RAM");
    if let Ok(stats) = vmm::snapshot::memory::load(&mut &memory[..], parsed.memory.len, &mem) {
        assert!(stats.bytes_stored <= RAM_MIB << 20);
    }
    let mem = std::sync::Arc::new(mem);
    for saved in &parsed.vm.devices.virtio {
        restore_into_balloon(saved, &mem);
    }
}

/// Restores `saved` into a fresh balloon transport; where it is taken, saving again gives it
/// back (the transport keeps what it restored, nothing else). Returns whether it was taken.
fn restore_into_balloon(
    saved: &TransportSnapshot,
    mem: &std::sync::Arc<vmm::memory::GuestMemory>,
) -> bool {
    use vmm::devices::irq_trigger::IrqTrigger;
    use vmm::virtio::interrupt::InterruptLine;
    use vmm::virtio::mmio::MmioTransport;
    let interrupt = InterruptLine::new(IrqTrigger::new().expect("an eventfd"));
    let mut transport = MmioTransport::new(
        Box::new(vmm::virtio::balloon::BalloonDevice::new()),
        mem.clone(),
        std::sync::Arc::new(interrupt),
    )
    .expect("a balloon transport");
    let taken = transport.restore_state(saved).is_ok();
    if taken {
        let again = transport.save_state().expect("a balloon saves its state");
        assert_eq!(again.status, saved.status);
        assert_eq!(again.queues, saved.queues);
        assert_eq!(again.device, saved.device);
    }
    taken
}

/// The snapshot file a case stands for: the mode byte, then a file or the section payloads.
fn file_of(data: &[u8]) -> Vec<u8> {
    let mut input = ByteCursor::new(data);
    match input.u8() % 3 {
        0 => input.rest().to_vec(),
        mode => {
            let header = if mode == 1 {
                header(input.u8() % 4)
            } else {
                let n = usize::from(input.u16() % 512);
                input.bytes(n).to_vec()
            };
            let vm_len = usize::from(input.u16() % 2048);
            let vm = input.bytes(vm_len);
            let vcpus_len = usize::from(input.u16() % 8192);
            let vcpus = input.bytes(vcpus_len);
            let memory = input.rest();
            format::frame_file([&header, vm, vcpus, memory])
        }
    }
}

/// One case.
pub fn run(data: &[u8]) {
    play(&file_of(data));
}

fn vm_state() -> VmState {
    VmState {
        pic_master: vec![0; 512],
        pic_slave: vec![0; 512],
        ioapic: vec![0; 512],
        pit: Default::default(),
        clock: Default::default(),
        devices: vmm::snapshot::vm_state::DeviceState {
            virtio: vec![balloon_state()],
            ..Default::default()
        },
    }
}

/// A running balloon with inflate and deflate queues in the 2 MiB of guest RAM.
fn balloon_state() -> TransportSnapshot {
    let queue = |base: u64, ready: bool| QueueSnapshot {
        max_size: 256,
        next_avail: 3,
        next_used: 3,
        event_idx_enabled: false,
        size: if ready { 16 } else { 256 },
        ready,
        desc_table: if ready { base } else { 0 },
        avail_ring: if ready { base + 0x1000 } else { 0 },
        used_ring: if ready { base + 0x2000 } else { 0 },
    };
    TransportSnapshot {
        device_type: 5,
        status: 15,
        queue_select: 1,
        device_features_select: 1,
        driver_features_select: 1,
        driver_features: 1 << 32,
        config_generation: 0,
        interrupt_status: 1,
        running: true,
        queues: vec![queue(0x10000, true), queue(0x14000, true), queue(0, false)],
        device: DeviceSnapshot::Balloon(Default::default()),
    }
}

fn vcpu_state() -> VcpuState {
    VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        fp: FloatingPoint::Fpu(Box::default()),
        xcrs: None,
        msrs: Vec::new(),
        lapic: vec![0; 1024],
        debug_regs: Default::default(),
        events: Default::default(),
        mp_state: 0,
        cpuid: vec![CpuidEntry {
            function: 0,
            index: 0,
            flags: 0,
            eax: 1,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }],
        tsc_khz: None,
    }
}

/// A memory section with one page at 4 KiB.
fn memory() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(RAM_MIB << 20).to_le_bytes());
    m.extend_from_slice(&4096u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0x1000u64.to_le_bytes());
    m.extend_from_slice(&4096u64.to_le_bytes());
    m.extend(std::iter::repeat_n(0x5a, 4096));
    m
}

/// Valid snapshots in each mode: a whole file, and the same state as framed payloads.
pub fn seeds() -> Vec<Vec<u8>> {
    let vm = format::encode(&vm_state()).expect("encodes");
    let vcpus = format::encode(&vec![vcpu_state()]).expect("encodes");
    let mem = memory();
    let mut whole = vec![0u8];
    whole.extend(format::frame_file([&header(1), &vm, &vcpus, &mem]));
    let payloads = |mode: u8, header: Option<&[u8]>| {
        let mut s = vec![mode];
        match header {
            None => s.push(1),
            Some(h) => {
                s.extend_from_slice(&(h.len() as u16).to_le_bytes());
                s.extend_from_slice(h);
            }
        }
        s.extend_from_slice(&(vm.len() as u16).to_le_bytes());
        s.extend_from_slice(&vm);
        s.extend_from_slice(&(vcpus.len() as u16).to_le_bytes());
        s.extend_from_slice(&vcpus);
        s.extend_from_slice(&mem);
        s
    };
    vec![whole, payloads(1, None), payloads(2, Some(&header(1)))]
}

/// Whether a case's file parses, its memory section loads and its virtio device states restore
/// (for the tests: the harness is not stuck at the checksums).
pub fn parses(data: &[u8]) -> bool {
    let file = file_of(data);
    format::parse_bytes(&file).is_ok_and(|p| {
        let memory = &file[p.memory.offset as usize..];
        let mem = vmm::memory::create_guest_memory(RAM_MIB).expect("guest RAM");
        vmm::snapshot::memory::load(&mut &memory[..], p.memory.len, &mem).is_ok()
            && p.vm
                .devices
                .virtio
                .iter()
                .all(|saved| restore_into_balloon(saved, &std::sync::Arc::new(mem.clone())))
    })
}
