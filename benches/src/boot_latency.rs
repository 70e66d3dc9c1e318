//! Benchmark 1: VMM start → first guest instruction → VM gone, with the tiny test guest that
//! signals at once and triple-faults: the embedded VMM (in this process, and in a fresh process
//! so that exec and loading count as they do for QEMU) against QEMU microvm with KVM and TCG.

use crate::context::BenchContext;
use crate::embedded_vm;
use crate::interleave::{run_interleaved, Variant};
use crate::qemu_microvm::{self, Accel};
use crate::results::{utc_now, BenchResult};
use crate::tiny_guest::{self, AfterSignal};

/// Guest RAM of every VM in this comparison (the size Firecracker's numbers use).
const MEM_MIB: u32 = 128;

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    let guest = ctx.work_dir.join("tiny-exit.elf");
    tiny_guest::write(&guest, AfterSignal::Exit)?;
    let g = guest.as_path();
    let mut variants = vec![
        Variant::new("embedded (in-process)", "ms", || {
            let b = embedded_vm::boot_in_process(g, MEM_MIB)?;
            Ok(vec![
                ("vm_created", b.vm_created),
                ("first_vcpu_run", b.first_vcpu_run),
                ("first_instruction", b.first_instruction),
                ("exit_seen", b.exit_seen),
                ("vm_gone", b.vm_gone),
            ])
        }),
        Variant::new("embedded (in-process), 256 MiB", "ms", || {
            let b = embedded_vm::boot_in_process(g, 256)?;
            Ok(vec![
                ("first_vcpu_run", b.first_vcpu_run),
                ("first_instruction", b.first_instruction),
                ("vm_gone", b.vm_gone),
            ])
        }),
        Variant::new("embedded (in-process), 4096 MiB", "ms", || {
            let b = embedded_vm::boot_in_process(g, 4096)?;
            Ok(vec![
                ("first_vcpu_run", b.first_vcpu_run),
                ("first_instruction", b.first_instruction),
                ("vm_gone", b.vm_gone),
            ])
        }),
        Variant::new("embedded (in-process), 65536 MiB", "ms", || {
            let b = embedded_vm::boot_in_process(g, 65536)?;
            Ok(vec![
                ("first_vcpu_run", b.first_vcpu_run),
                ("first_instruction", b.first_instruction),
                ("vm_gone", b.vm_gone),
            ])
        }),
        Variant::new("embedded (fresh process)", "ms", || {
            let (run, first, gone) = embedded_vm::boot_in_child(g, MEM_MIB)?;
            Ok(vec![
                ("first_vcpu_run", run),
                ("first_instruction", first),
                ("vm_gone", gone),
            ])
        }),
        Variant::new("QEMU microvm, KVM", "ms", || {
            let (first, gone) = qemu_microvm::boot_once(g, Accel::Kvm, MEM_MIB)?;
            Ok(vec![("first_instruction", first), ("vm_gone", gone)])
        }),
        Variant::new("QEMU microvm, TCG", "ms", || {
            let (first, gone) = qemu_microvm::boot_once(g, Accel::Tcg, MEM_MIB)?;
            Ok(vec![("first_instruction", first), ("vm_gone", gone)])
        }),
    ];
    eprintln!(
        "boot: tiny guest, {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    Ok(BenchResult {
        id: "boot".into(),
        title: "VMM start to first guest instruction and to VM gone (tiny guest)".into(),
        command: ctx.reproduce("boot"),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: format!(
            "the vmm crate as compiled into this bench-report (workspace at {} when run); QEMU {}",
            crate::context::workspace_describe(),
            ctx.machine.qemu_version
        ),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes: vec![
            format!(
                "Guest: a {}-byte ELF (benches/src/tiny_guest.rs) with {MEM_MIB} MiB of RAM \
                 (the 256 MiB, 4 GiB and 64 GiB variants: guest RAM is mapped lazily, so set-up \
                 and tear-down must not grow with it) and \
                 1 vCPU. It writes the boot-timer port (embedded VMM) and a byte to COM1 (QEMU), \
                 then triple-faults; QEMU enters it through its PVH note (after QEMU's qboot \
                 firmware and pvh.bin option ROM), the embedded VMM at e_entry in 64-bit mode.",
                tiny_guest::elf(AfterSignal::Exit).len()
            ),
            "Guest RAM size: the VMM maps guest RAM with one mmap(MAP_NORESERVE) of 20-40 µs at \
             any size; what grows with it on this host is KVM_SET_USER_MEMORY_REGION inside the \
             host's KVM, which allocates memory-slot metadata per 4 KiB page when it shadows the \
             guest's page tables, as PVM does (strace, 2026-12-06: 0.13 ms for a 128 MiB slot, \
             52 ms for a 60 GiB one). KVM's TDP MMU on hardware hosts allocates that metadata \
             lazily; measure there before reading these numbers as the VMM's."
                .into(),
            "first_instruction: embedded = the VMM's boot-timer timestamp; QEMU = the harness \
             reading the guest's first serial byte from QEMU's stdout pipe (includes one pipe \
             wake-up, tens of µs)."
                .into(),
            "Start: in-process = the call to vmm::Vm::start; fresh process and QEMU = just before \
             fork/exec of the process. vm_gone: in-process = VmHandle dropped (threads joined, \
             fds closed); processes = waitpid returned."
                .into(),
            "Embedded only: vm_created = the VMM's `created` timestamp (after KVM_CREATE_VM, \
             before guest memory), first_vcpu_run = the first KVM_RUN (end of VMM set-up), \
             exit_seen = the VMM noticed the triple fault (KVM_EXIT_SHUTDOWN)."
                .into(),
        ],
    })
}
