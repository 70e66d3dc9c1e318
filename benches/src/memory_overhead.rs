//! Benchmark 3: VMM memory overhead — resident memory minus resident guest RAM, once the guest
//! has booted: the embedded VMM and QEMU microvm with the tiny halting guest, and the whole QEMU
//! backend (shepherd + QEMU + vhost-device-vsock) with the real Linux guest running a job.

use std::io::BufRead;

use anyhow::{bail, Context};

use crate::context::BenchContext;
use crate::embedded_vm;
use crate::interleave::{run_interleaved, Variant};
use crate::proc_memory::{children, comm, resident_split, ResidentSplit};
use crate::qemu_microvm::{self, Accel};
use crate::results::BenchResult;
use crate::shepherd_run;
use crate::tiny_guest::{self, AfterSignal};

use crate::vm_child::SETTLE;
const MEM_MIB: u32 = 128;
/// QEMU's guest RAM mapping (memory-backend-memfd with id `mem`).
const QEMU_GUEST_MARKER: &str = "memfd:mem";
const MIB: f64 = 1024.0 * 1024.0;
/// The embedded child's resident memory by kind (crate::proc_memory::rss_by_kind) as metrics.
const KIND_METRICS: [(&str, &str); 7] = [
    ("executable", "rss_executable"),
    ("shared libraries", "rss_shared_libraries"),
    ("heap", "rss_heap"),
    ("main stack", "rss_main_stack"),
    ("KVM vCPU mappings", "rss_kvm_vcpu_mappings"),
    (
        "anonymous (incl. guest RAM, thread stacks)",
        "rss_anonymous_without_guest_ram",
    ),
    ("other", "rss_other"),
];

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn qemu_tiny(guest: &std::path::Path, accel: Accel) -> anyhow::Result<ResidentSplit> {
    let mut child = qemu_microvm::spawn(guest, accel, MEM_MIB)?;
    let measured = qemu_microvm::wait_first_byte(&mut child).and_then(|_| {
        std::thread::sleep(SETTLE);
        resident_split(child.id(), QEMU_GUEST_MARKER)
    });
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// The whole QEMU backend with the Linux guest, measured while the job sleeps.
fn qemu_backend_job(ctx: &BenchContext) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let mut shepherd = shepherd_run::spawn(
        &ctx.under_test,
        "qemu",
        &["/bin/sh", "-c", "echo ready; exec sleep 30"],
    )?;
    let pid = shepherd.id();
    let result = (|| {
        let out = shepherd.stdout.take().context("no stdout pipe")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the job did not start (stdout {line:?})");
        }
        std::thread::sleep(SETTLE);
        let own = resident_split(pid, "\u{0}")?;
        let (mut qemu, mut vhost) = (ResidentSplit::default(), ResidentSplit::default());
        for child in children(pid) {
            match comm(child).as_str() {
                "qemu-system-x86" => qemu = resident_split(child, QEMU_GUEST_MARKER)?,
                "vhost-device-vs" => vhost = resident_split(child, "\u{0}")?,
                _ => {}
            }
        }
        if qemu.total_bytes == 0 {
            bail!("no qemu-system-x86_64 child of the shepherd found");
        }
        let overhead = own.overhead_bytes() + qemu.overhead_bytes() + vhost.overhead_bytes();
        Ok(vec![
            ("overhead", mib(overhead)),
            ("guest_ram_resident", mib(qemu.guest_bytes)),
            ("shepherd_rss", mib(own.total_bytes)),
            ("qemu_overhead", mib(qemu.overhead_bytes())),
            ("vhost_device_vsock_rss", mib(vhost.total_bytes)),
        ])
    })();
    // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let _ = shepherd.wait();
    result
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    let guest = ctx.work_dir.join("tiny-halt.elf");
    tiny_guest::write(&guest, AfterSignal::Halt)?;
    let g = guest.as_path();
    let with_shepherd = ctx.require_shepherd();
    let mut variants = vec![
        Variant::new("embedded (tiny guest)", "MiB", || {
            let (_, r, _) = embedded_vm::run_child(g, MEM_MIB, true)?;
            let (Some(rss), Some(guest)) = (r.process_rss_bytes, r.guest_ram_resident_bytes) else {
                bail!("the child reported no memory usage");
            };
            let mut sample = vec![
                ("overhead", mib(rss.saturating_sub(guest))),
                ("guest_ram_resident", mib(guest)),
            ];
            for (kind, bytes) in &r.rss_by_kind {
                if let Some((_, metric)) = KIND_METRICS.iter().find(|(k, _)| k == kind) {
                    // Guest RAM is anonymous memory; count only the rest.
                    let b = if kind.starts_with("anonymous") {
                        bytes.saturating_sub(guest)
                    } else {
                        *bytes
                    };
                    sample.push((metric, mib(b)));
                }
            }
            Ok(sample)
        }),
        Variant::new("QEMU microvm, KVM (tiny guest)", "MiB", || {
            let s = qemu_tiny(g, Accel::Kvm)?;
            Ok(vec![
                ("overhead", mib(s.overhead_bytes())),
                ("guest_ram_resident", mib(s.guest_bytes)),
            ])
        }),
        Variant::new("QEMU microvm, TCG (tiny guest)", "MiB", || {
            let s = qemu_tiny(g, Accel::Tcg)?;
            Ok(vec![
                ("overhead", mib(s.overhead_bytes())),
                ("guest_ram_resident", mib(s.guest_bytes)),
            ])
        }),
    ];
    if with_shepherd.is_ok() {
        variants.push(Variant::new(
            "QEMU backend, TCG (Linux guest, job running)",
            "MiB",
            || qemu_backend_job(ctx),
        ));
    }
    eprintln!(
        "memory: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let mut notes = vec![
        format!(
            "overhead = resident set (sum of Rss over /proc/PID/smaps) minus the guest RAM pages \
             resident on the host, {} ms after the guest signalled; guest RAM {MEM_MIB} MiB, 1 vCPU.",
            SETTLE.as_millis()
        ),
        "Embedded: a fresh `bench-vm --hold` process (benches/src/vm_child_main.rs: the vmm \
         crate, serde_json and the Rust runtime, nothing else) reads \
         vmm::VmHandle::memory_usage (VmRSS minus mincore of the guest mapping) and its own \
         /proc/self/smaps, split by kind (rss_*). QEMU: guest RAM = Rss of the memfd:mem \
         mapping."
            .into(),
        "Rss counts shared library pages in full (as Firecracker's memory test does); a Linux \
         guest would touch more guest RAM but that is excluded by definition."
            .into(),
    ];
    match with_shepherd {
        Ok(()) => notes.push(
            "QEMU backend: `sge_virtualizer run --backend qemu` with the real guest (TCG), \
             measured while the job sleeps: shepherd Rss + QEMU Rss without guest RAM + \
             vhost-device-vsock Rss."
                .into(),
        ),
        Err(e) => notes.push(format!(
            "QEMU backend with the Linux guest not measured: {e:#}"
        )),
    }
    Ok(BenchResult::measured(
        ctx,
        "memory",
        "VMM memory overhead after boot",
        series,
        outcomes,
        notes,
    ))
}
