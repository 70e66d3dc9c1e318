//! Benchmark 7: what this host's KVM itself costs for the steps every VMM takes to create and
//! destroy a one-vCPU VM, each timed on its own — the floor under the embedded VMM's set-up and
//! tear-down in section 1 on this host (any VMM pays these). Same sequence and sizes as the
//! vmm crate: open /dev/kvm, KVM_CREATE_VM + TSS + in-kernel IRQ chip + PIT, 128 MiB of guest
//! RAM registered, one vCPU with the supported CPUID, then closing everything.

use std::time::Instant;

use anyhow::{bail, Context};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::context::BenchContext;
use crate::embedded_vm;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::{utc_now, BenchResult};
use crate::tiny_guest::{self, AfterSignal};

const MEM_BYTES: usize = 128 << 20;
/// The variant names (the report's findings look them up).
pub const KVM_ONLY: &str = "host KVM primitives only (no VMM)";
pub const KVM_REGION_FIRST: &str =
    "host KVM primitives only, guest RAM registered before the IRQ chip";
pub const EMBEDDED: &str = "embedded VMM, tiny guest (in-process)";
/// The vmm crate's TSS address (layout::KVM_TSS_ADDR).
const TSS_ADDR: usize = 0xfffb_d000;
/// `KVM_PIT_SPEAKER_DUMMY`.
const PIT_SPEAKER_DUMMY: u32 = 1;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Anonymous guest RAM, unmapped on drop.
struct GuestRam(*mut libc::c_void);

impl GuestRam {
    fn new() -> anyhow::Result<Self> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap of guest RAM: {}", std::io::Error::last_os_error());
        }
        Ok(GuestRam(p))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by GuestRam::new with this length and is unmapped
        // once, after the VM that used it is gone (drop order in `one_vm`).
        unsafe { libc::munmap(self.0, MEM_BYTES) };
    }
}

/// Whether guest RAM is registered after the in-kernel IRQ chip and PIT (the vmm crate's
/// order) or right after KVM_CREATE_VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionOrder {
    AfterIrqchip,
    BeforeIrqchip,
}

fn one_vm(order: RegionOrder) -> anyhow::Result<Sample> {
    let t = Instant::now();
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let open = ms_since(t);

    let t = Instant::now();
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let create_vm = ms_since(t);

    let t = Instant::now();
    let ram = GuestRam::new()?;
    let mmap = ms_since(t);

    let irqchip_step = || -> anyhow::Result<f64> {
        let t = Instant::now();
        vm.set_tss_address(TSS_ADDR).context("KVM_SET_TSS_ADDR")?;
        vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        vm.create_pit2(kvm_pit_config {
            flags: PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .context("KVM_CREATE_PIT2")?;
        Ok(ms_since(t))
    };
    let region_step = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: ram.0 as u64,
        };
        // SAFETY: the region is our live anonymous mapping of exactly memory_size bytes, and
        // it outlives the VM (dropped after `vm` below).
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        Ok(ms_since(t))
    };
    let (irqchip, memory_region) = match order {
        RegionOrder::AfterIrqchip => {
            let i = irqchip_step()?;
            (i, region_step()?)
        }
        RegionOrder::BeforeIrqchip => {
            let r = region_step()?;
            (irqchip_step()?, r)
        }
    };

    let t = Instant::now();
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let create_vcpu = ms_since(t);

    let t = Instant::now();
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let cpuid_ms = ms_since(t);

    let t = Instant::now();
    drop(vcpu);
    let close_vcpu = ms_since(t);
    let t = Instant::now();
    drop(vm);
    let close_vm = ms_since(t);
    let t = Instant::now();
    drop(ram);
    let munmap = ms_since(t);
    drop(kvm);

    Ok(vec![
        ("open_dev_kvm", open),
        ("create_vm", create_vm),
        ("tss_irqchip_pit", irqchip),
        ("mmap_guest_ram", mmap),
        ("set_user_memory_region", memory_region),
        ("create_vcpu", create_vcpu),
        ("get_and_set_cpuid", cpuid_ms),
        ("close_vcpu", close_vcpu),
        ("close_vm", close_vm),
        ("munmap_guest_ram", munmap),
        (
            "set_up_total",
            open + create_vm + irqchip + mmap + memory_region + create_vcpu + cpuid_ms,
        ),
        ("tear_down_total", close_vcpu + close_vm + munmap),
    ])
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    let guest = ctx.work_dir.join("tiny-exit.elf");
    tiny_guest::write(&guest, AfterSignal::Exit)?;
    let g = guest.as_path();
    let mut variants = vec![
        Variant::new(KVM_ONLY, "ms", || one_vm(RegionOrder::AfterIrqchip)),
        Variant::new(KVM_REGION_FIRST, "ms", || {
            one_vm(RegionOrder::BeforeIrqchip)
        }),
        Variant::new(EMBEDDED, "ms", || {
            let b = embedded_vm::boot_in_process(g, (MEM_BYTES >> 20) as u32)?;
            Ok(vec![
                ("set_up_total", b.first_vcpu_run),
                ("tear_down_total", b.vm_gone - b.exit_seen),
            ])
        }),
    ];
    eprintln!("kvm: {} warm-up + {} runs", ctx.warmup, ctx.runs);
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    Ok(BenchResult {
        id: "kvm".into(),
        title: "Host KVM primitives: create and destroy a VM, step by step".into(),
        command: ctx.reproduce("kvm"),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: format!(
            "this host's /dev/kvm (modules: {}); the vmm crate as compiled into this \
             bench-report (workspace at {} when run)",
            ctx.machine.kvm_modules.join(", "),
            crate::context::workspace_describe()
        ),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes: vec![
            "Each step timed alone with the monotonic clock, in this process, with kvm-ioctls; \
             no guest code runs. set_up_total and tear_down_total are the sums: what a VMM \
             pays on this host for these steps, in this order, before the first KVM_RUN and \
             after the guest stops."
                .into(),
            "The second KVM-only variant registers guest RAM right after KVM_CREATE_VM, before \
             the TSS, IRQ chip and PIT (the vmm crate does it after them): does the order \
             change what each step costs?"
                .into(),
            "Interleaved with the embedded VMM booting the tiny guest with the same RAM: its \
             set_up_total = Vm::start → first KVM_RUN, tear_down_total = exit noticed → \
             VmHandle dropped (as in section 1)."
                .into(),
        ],
    })
}
