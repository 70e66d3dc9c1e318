//! Renders `benches/REPORT.md` (and the phase chart) from `benches/results/*.json`. Every number
//! in the report comes from those files; nothing is typed in by hand.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::chart::{self, Bar};
use crate::job_latency::PHASES;
use crate::machine::MachineInfo;
use crate::results::{utc_now, BenchResult};
use crate::stats::Summary;

/// The benchmarks in report order.
pub const IDS: [&str; 15] = [
    "boot",
    "job",
    "memory",
    "memory-return",
    "nested",
    "relay",
    "signal",
    "gridengine",
    "profile",
    "kvm",
    "fs",
    "images",
    "network",
    "nested-boot",
    "nested-checkpoint",
];
const CHART_FILE: &str = "phases.png";

/// What to optimise next and what this machine cannot show; the evidence is in the sections
/// above (no figures here, so the text stays true when the numbers are regenerated).
const SUGGESTIONS: &str = "\
## What to optimise next (owners: vmm/, shepherd/, guest-agent/)

* **Embedded VMM set-up: guest RAM registered before the IRQ chip** \
  (`benches/patches/vmm-register-ram-before-irqchip.patch`, measured in Optimisations; the vmm \
  crate adopted it in 5b3956a, so sections 1, 3, 6 and 7 measure it when rerun from a tree \
  that has it). On this host KVM_SET_USER_MEMORY_REGION is expensive when it follows \
  KVM_CREATE_IRQCHIP/PIT2 and cheap when it comes first. Re-measure on a hardware-KVM host, \
  where the order may not matter.
* **Embedded VMM tear-down** (section 1: exit_seen → vm_gone; section 7: closing the VM fd is \
  nearly all of it, it varies widely from run to run on this host, and registering RAM first \
  can move time from set-up to tear-down). Take it off the job's critical path: the \
  shepherd can report the exit status first and drop the `VmHandle` afterwards (or on a helper \
  thread). Also start the VM (`Vm::start`) in parallel with the shepherd's host-side work \
  (prolog, pe_start, output files) instead of after it. On cgroup v2 hosts with Linux 6.1+, \
  apply Firecracker's `favordynmods` advice before measuring KVM costs inside job cgroups.
* **QEMU backend end of job** (section 2: job_exited → vm_gone, and its p90). After the Ack the \
  shepherd waits for the agent to close the vsock connection, then 50 ms, then kills QEMU. \
  If the close is slow to arrive (a suspect: vhost-device-vsock's close/half-close handling; \
  not measured here), the job's end waits for it. An explicit final frame from the agent after it has synced (instead of \
  relying on the connection close, as the architecture's wire-protocol rules ask) would bound \
  this phase.
* **Relay throughput** (section 4a: relayed vs /dev/null). The relay path costs several times \
  the guest's own work. Larger frames (MAX_DATA_CHUNK), fewer wake-ups in the agent's output \
  pump and the shepherd's writer, and measuring vhost-device-vsock's own CPU share would tell \
  which hop limits it.
* **Guest kernel boot under TCG: add `noapictimer` to the QEMU backend's command line when it \
  runs with TCG** (Optimisations: measured with `run --cmdline noapictimer`, same build, \
  interleaved). Under TCG the kernel calibrates the local APIC timer for a long stretch of its \
  boot; with the PIT as clock event device it skips that. Keep it TCG-only (hardware KVM with \
  the TSC-deadline timer skips the calibration anyway, and a per-CPU timer is better there).
* **Guest kernel boot in general** (section 2: guest_kernel_boot; section 12 on real KVM). \
  With the TSC-deadline CPUID bit (760cdbb; guest_init 1353 → 763 ms in efd8293's run of \
  section 12) the embedded VMM presents what Firecracker presents: the same kernel log line for \
  line, the same VM exits by reason and count (kvm_exit, kvm_pio and kvm_msr hist triggers in \
  the nested host: 8,154 and 8,450 exits from VMM start to the guest's reset in one pair of \
  runs, the same reasons, ports and MSRs). The guest image was then trimmed (section 12's \
  baseline is the image before): no ORC unwinder (1.5 MB of tables the VMM loaded; building \
  their lookup table took about 10 ms of guest clock in the nested host), no 4 MiB of padding \
  around the entry text (patch 0002; poisoning and freeing half of it took about 28 ms), no \
  SLUB debugging, the agent without symbols (initramfs 3.7 → 3.5 MB). The VMM loads 5.6 MB \
  instead of 11.6 (VM created → first vCPU run −45 %, wall −6 %) and the guest has 6 MB more \
  RAM (115,704 K of 128 MiB available instead of 109,332 K). The guest clock did not fall: it \
  rose by about 9 % in two runs, because pages the VMM no longer writes are now first touched \
  by the guest, and in the nested host a first touch (a nested page fault served by emulated \
  KVM) is what most of the guest's boot costs: zeroing struct pages (2 MiB for 128 MiB), the \
  2 MiB first per-CPU chunk (memblock zeroes it; `percpu_alloc=page` would avoid that at a TLB \
  cost on every per-CPU access, not taken), unpacking and freeing the initramfs. Going below \
  means touching less memory at boot, or backing guest RAM so that a first touch is cheap.
* **virtio-fs data path** (section 8: READ and WRITE through the device against pread and \
  pwrite of the same bytes). A READ zero-fills the server's reply buffer, preads into it and the \
  device then copies the reply into the guest's buffers; a WRITE is first gathered from guest \
  memory into a zero-filled buffer (`ValidChain::gather_readable`), then pwritten. Reading and \
  writing straight between the file and the chain's guest buffers (preadv / pwritev over the \
  descriptors' host addresses) would save a copy and a memset per request. Per request, the \
  device also signals the interrupt eventfd once (a system call each time a driver asks for \
  notification).

## What could not be measured here, and why

* Everything that needs a Linux user space under the embedded VMM: the job's first \
  instruction ≤ 15 ms target, the embedded backend's end-to-end phases, relay throughput and \
  signal latency with the embedded backend. This host's /dev/kvm has no vmx/svm: guest ring-0 \
  code is emulated in software (see Machine); per shared/reference/kvm-on-these-machines.md a \
  Linux guest then needs minutes to reach init and its first system call faults. The harness measures those variants automatically on a host \
  where `vmm::kvm_can_run_linux()` says yes.
* One-way signal latency: the guest clock is not synchronised with the host's (and runs at \
  TCG's pace); section 4b gives the round trip instead.
* Hardware-KVM numbers for QEMU: QEMU's `-accel kvm` here runs on the same software-emulated \
  KVM, so its firmware and PVH entry run slowly too; section 1 labels both QEMU accelerators.
* Grid Engine with the embedded backend (section 5 uses the QEMU backend here, for the same \
  reason). On a shared cell the benchmark refuses to switch `shepherd_cmd` while other users' \
  jobs run, checks with a probe job that execd starts jobs through the new value, restores the \
  old value afterwards, and says in section 5 when it could not measure.
";

pub(crate) fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub(crate) fn median(r: &BenchResult, variant: &str, metric: &str) -> Option<f64> {
    r.series(variant, metric)?.summary().map(|s| s.median)
}

/// Text for a table cell: a `|` in it (a shell pipe in a variant's name) would end the cell.
pub(crate) fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The table of every series of a result.
fn series_table(out: &mut String, r: &BenchResult) {
    out.push_str("| variant | metric | unit | median | p10 | p90 | min | max | n |\n");
    out.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|\n");
    for s in &r.series {
        if let Some(Summary {
            n,
            median,
            p10,
            p90,
            min,
            max,
        }) = s.summary()
        {
            let _ = writeln!(
                out,
                "| {} | {} | {} | **{}** | {} | {} | {} | {} | {n} |",
                cell(&s.variant),
                s.metric,
                s.unit,
                fmt(median),
                fmt(p10),
                fmt(p90),
                fmt(min),
                fmt(max)
            );
        }
    }
    let failures: Vec<_> = r.outcomes.iter().filter(|o| o.failed > 0).collect();
    if !failures.is_empty() {
        out.push_str("\nFailed runs:\n\n");
        for o in failures {
            let _ = writeln!(
                out,
                "* {}: {} of {} failed; first error: `{}`",
                o.variant,
                o.failed,
                o.failed + o.ok,
                o.errors.first().map(String::as_str).unwrap_or("?")
            );
        }
    }
}

fn machine_section(out: &mut String, m: &MachineInfo) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    out.push_str("## Machine\n\n| | |\n|---|---|\n");
    let _ = writeln!(out, "| CPU | {} ({} cores) |", m.cpu_model, m.cores);
    let _ = writeln!(out, "| memory | {:.1} GiB |", m.mem_total_gib);
    let _ = writeln!(out, "| OS, kernel | {}, {} |", m.os, m.kernel);
    let _ = writeln!(
        out,
        "| CPU flags vmx / svm | {} / {} |",
        yes(m.vmx),
        yes(m.svm)
    );
    let _ = writeln!(
        out,
        "| /dev/kvm, KVM modules | {}, {} |",
        yes(m.dev_kvm),
        m.kvm_modules.join(", ")
    );
    let _ = writeln!(out, "| embedded VMM probe | {} |", m.kvm_probe);
    let _ = writeln!(out, "| QEMU | {} |", m.qemu_version);
    out.push('\n');
    if m.hardware_kvm() {
        out.push_str("Hardware virtualization is present: KVM numbers are hardware numbers.\n\n");
    } else {
        out.push_str(
            "**Hardware KVM is absent on this machine.** `/dev/kvm` is there, but without \
             vmx/svm it emulates guest kernel (ring-0) code in software (the probe above gives its speed), \
             so a Linux guest cannot get to user space under KVM here. What this \
             report can measure honestly: the embedded VMM's own set-up, exit and memory cost \
             with a tiny guest of a few instructions (where the emulation adds little), QEMU \
             microvm with the same guest under both KVM and TCG, and the whole job path with \
             the QEMU backend under TCG (software CPU emulation; every guest-side phase is \
             slower than it would be on hardware). Targets stated for hardware KVM are shown \
             as not measurable here.\n\n",
        );
    }
}

/// A headline row: (what, target, measured text, verdict).
type Headline = (String, String, String, String);

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "not met" }.into()
}

fn headlines(
    results: &[BenchResult],
    optimisations: &[BenchResult],
    m: &MachineInfo,
) -> Vec<Headline> {
    let get = |id: &str| results.iter().find(|r| r.id == id);
    let mut rows: Vec<Headline> = Vec::new();
    let hw = m.hardware_kvm();
    let job = get("job");
    let embedded_job =
        job.and_then(|r| median(r, "sge_virtualizer, embedded backend", "first_instruction"));
    rows.push((
        "job's first instruction after the shepherd starts (embedded)".into(),
        "≤ 15 ms (hardware KVM)".into(),
        embedded_job
            .map(|v| format!("{} ms", fmt(v)))
            .unwrap_or_else(|| "not measurable here".into()),
        match embedded_job {
            Some(v) if hw => verdict(v <= 15.0),
            Some(_) => "measured without hardware KVM".into(),
            None => "needs vmx/svm".into(),
        },
    ));
    if let Some(boot) = get("boot") {
        let emb = median(boot, "embedded (in-process)", "first_instruction");
        rows.push((
            "VMM set-up to first guest instruction (embedded, in-process)".into(),
            "≤ 2 ms (hardware KVM)".into(),
            emb.map(|v| format!("{} ms", fmt(v)))
                .unwrap_or_else(|| "failed".into()),
            match emb {
                Some(v) if hw => verdict(v <= 2.0),
                Some(v) => format!("{} here (no hardware KVM)", verdict(v <= 2.0)),
                None => "—".into(),
            },
        ));
        for q in ["QEMU microvm, KVM", "QEMU microvm, TCG"] {
            let emb = median(boot, "embedded (fresh process)", "first_instruction");
            let qemu = median(boot, q, "first_instruction");
            if let (Some(e), Some(qv)) = (emb, qemu) {
                rows.push((
                    format!("first instruction: embedded (fresh process) vs {q}"),
                    "≤ 1/5 of QEMU's".into(),
                    format!("{} vs {} ms = 1/{:.1}", fmt(e), fmt(qv), qv / e),
                    verdict(e * 5.0 <= qv),
                ));
            }
        }
    }
    // The vmm change measured against QEMU in one run (compare-vmm --with-qemu).
    if let Some(opt) = optimisations
        .iter()
        .find(|r| r.id == "opt-vmm-ram-before-irqchip")
    {
        let after = opt
            .variants()
            .into_iter()
            .find(|v| v.starts_with("after"))
            .and_then(|v| Some((v, median(opt, v, "first_instruction")?)));
        if let Some((label, e)) = after {
            for q in ["QEMU microvm, KVM", "QEMU microvm, TCG"] {
                if let Some(qv) = median(opt, q, "first_instruction") {
                    rows.push((
                        format!("first instruction: embedded ({label}, fresh process) vs {q}"),
                        "≤ 1/5 of QEMU's".into(),
                        format!("{} vs {} ms = 1/{:.1}", fmt(e), fmt(qv), qv / e),
                        verdict(e * 5.0 <= qv),
                    ));
                }
            }
            if let Some(setup) = median(opt, label, "main_to_first_instruction") {
                rows.push((
                    format!(
                        "VMM set-up to first guest instruction (embedded, {label}; from the \
                         process's main())"
                    ),
                    "≤ 2 ms (hardware KVM)".into(),
                    format!("{} ms", fmt(setup)),
                    format!("{} here (no hardware KVM)", verdict(setup <= 2.0)),
                ));
            }
        }
    }
    if let Some(mem) = get("memory") {
        let emb = median(mem, "embedded (tiny guest)", "overhead");
        rows.push((
            "VMM memory overhead after boot (embedded)".into(),
            "≤ 3 MiB".into(),
            emb.map(|v| format!("{} MiB", fmt(v)))
                .unwrap_or_else(|| "failed".into()),
            emb.map(|v| verdict(v <= 3.0)).unwrap_or_default(),
        ));
    }
    if let Some(relay) = get("relay") {
        for v in relay.variants() {
            if v.contains("(no VM)") || v.contains("(no relay)") {
                continue;
            }
            if let Some(x) = median(relay, v, "throughput") {
                rows.push((
                    format!("output relay guest → host file ({v})"),
                    "≥ 1000 MB/s (hardware KVM)".into(),
                    format!("{} MB/s", fmt(x)),
                    if hw {
                        verdict(x >= 1000.0)
                    } else {
                        format!("{} here (TCG guest)", verdict(x >= 1000.0))
                    },
                ));
            }
        }
    }
    if let Some(sig) = get("signal") {
        for v in sig.variants() {
            if v.contains("(no VM)") {
                continue;
            }
            if let Some(x) = median(sig, v, "round_trip") {
                rows.push((
                    format!("signal → job handler → output back on host ({v})"),
                    "≤ 1 ms (hardware KVM; one way)".into(),
                    format!("{} ms round trip", fmt(x)),
                    if hw {
                        verdict(x <= 1.0)
                    } else {
                        format!("{} here (TCG guest)", verdict(x <= 1.0))
                    },
                ));
            }
        }
    }
    rows
}

/// The boot benchmark's phases (section 1), in order.
const BOOT_PHASES: [&str; 4] = [
    "first_vcpu_run",
    "first_instruction",
    "exit_seen",
    "vm_gone",
];

/// Bars of a phase chart: per variant, the successive medians of `phases` (ms since start).
fn phase_bars(job: &BenchResult, phases: &[&str]) -> Vec<Bar> {
    let mut bars = Vec::new();
    for v in job.variants() {
        let mut segments = Vec::new();
        let mut prev = 0.0f64;
        let mut prev_name = "start";
        for &p in phases {
            if let Some(t) = median(job, v, p) {
                segments.push((format!("{prev_name} → {p}"), prev, t.max(prev)));
                prev = t.max(prev);
                prev_name = p;
            }
        }
        if segments.is_empty() {
            if let Some(w) = median(job, v, "wall") {
                segments.push(("fork+exec+wait".to_string(), 0.0, w));
            }
        }
        if !segments.is_empty() {
            bars.push(Bar {
                label: v.to_string(),
                segments,
            });
        }
    }
    bars
}

fn result_section(out: &mut String, number: &str, r: &BenchResult) {
    if number.is_empty() {
        out.push_str("Details:\n\n");
    } else {
        let _ = writeln!(out, "## {number}{}\n", r.title);
    }
    let _ = writeln!(
        out,
        "Measured {} ({} warm-up rounds discarded, {} measured rounds, variants interleaved). \
         Reproduce: `{}`\n",
        r.finished_utc, r.warmup, r.runs, r.command
    );
    if !r.load_average.is_empty() {
        let _ = writeln!(
            out,
            "Load average (1/5/15 min) on the {}-core machine: {} — other work was running; \
             interleaving spreads it over all variants alike.\n",
            r.machine.cores, r.load_average
        );
    }
    if !r.under_test.is_empty() {
        let _ = writeln!(out, "Software: {}\n", r.under_test);
    }
    if !r.series.is_empty() || !r.outcomes.is_empty() {
        series_table(out, r);
        out.push('\n');
    }
    for n in &r.notes {
        let _ = writeln!(out, "* {n}");
    }
    out.push('\n');
}

/// The phase chart (PNG next to the report) and the table of phase durations of a result whose
/// variants have `--timings` phases.
fn phase_breakdown(
    out: &mut String,
    out_dir: &Path,
    r: &BenchResult,
    phases: &[&str],
    chart_file: &str,
) -> anyhow::Result<()> {
    let bars = phase_bars(r, phases);
    if bars.is_empty() {
        return Ok(());
    }
    match chart::draw_phases(&out_dir.join(chart_file), &r.title, &bars) {
        Ok(()) => {
            let _ = writeln!(out, "![phase breakdown]({chart_file})\n");
        }
        Err(e) => {
            let _ = writeln!(out, "(chart not drawn: {e:#})\n");
        }
    }
    out.push_str("Phase durations (differences of the medians):\n\n");
    out.push_str("| variant | phase | ms |\n|---|---|--:|\n");
    for b in &bars {
        for (name, s, e) in &b.segments {
            let _ = writeln!(out, "| {} | {name} | {} |", b.label, fmt(e - s));
        }
    }
    out.push('\n');
    Ok(())
}

/// The file-server benchmark's medians against their direct-host baselines.
fn ratio_table(out: &mut String, r: &BenchResult) {
    let rows: Vec<String> = crate::file_server::COMPARISONS
        .iter()
        .filter_map(|&(what, variant, baseline, metric, higher_is_better)| {
            let (v, b) = (median(r, variant, metric)?, median(r, baseline, metric)?);
            let unit = r.series(variant, metric).map(|s| s.unit.as_str())?;
            // "slower" reads the same way for rates and for times.
            let slower = if higher_is_better { b / v } else { v / b };
            Some(format!(
                "| {what} | {metric} ({unit}) | {} | {} | {:.2} | {slower:.1}× |",
                fmt(v),
                fmt(b),
                v / b
            ))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "Against the direct-host baselines (medians of the table above; ratio = through the \
         server / direct, slower = how many times the direct path's speed or time):\n\n\
         | comparison | metric | through the server | direct host | ratio | slower |\n\
         |---|---|--:|--:|--:|--:|\n",
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    out.push('\n');
}

/// The network benchmark's medians against the same client run directly on the host.
fn network_ratio_table(out: &mut String, r: &BenchResult) {
    use crate::network::{HOST, RATIO_METRICS};
    let mut rows = Vec::new();
    for v in r.variants().into_iter().filter(|v| *v != HOST) {
        for (metric, what, higher_is_better) in RATIO_METRICS {
            let (Some(x), Some(h)) = (median(r, v, metric), median(r, HOST, metric)) else {
                continue;
            };
            let unit = r.series(v, metric).map(|s| s.unit.as_str()).unwrap_or("");
            // "slower" reads the same way for rates and for times.
            let slower = if higher_is_better { h / x } else { x / h };
            rows.push(format!(
                "| {} | {what} | {metric} ({unit}) | {} | {} | {} | {slower:.1}× |",
                cell(v),
                fmt(x),
                fmt(h),
                fmt(x / h)
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "Against the same client on the host (medians of the table above; ratio = variant / \
         host, slower = how many times the host's time, or the host's rate over the \
         variant's):\n\n\
         | variant | what | metric (unit) | variant | host | ratio | slower |\n\
         |---|---|---|--:|--:|--:|--:|\n",
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    out.push('\n');
}

/// Writes REPORT.md (and the chart) into `out_dir`; returns the report's path.
pub fn write(out_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let results_dir = out_dir.join("results");
    let mut results = Vec::new();
    for id in IDS {
        if let Some(r) = BenchResult::load(&results_dir, id)? {
            results.push(r);
        }
    }
    let mut optimisation_ids: Vec<String> = std::fs::read_dir(&results_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("opt-")?.strip_suffix(".json")?;
                    Some(name.trim_end_matches(".json").to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    optimisation_ids.sort();
    let mut optimisations = Vec::new();
    for id in &optimisation_ids {
        if let Some(r) = BenchResult::load(&results_dir, id)? {
            optimisations.push(r);
        }
    }
    let machine = results
        .first()
        .map(|r| r.machine.clone())
        .unwrap_or_else(MachineInfo::collect);
    let mut out = String::new();
    out.push_str("# sge_virtualizer benchmarks\n\n");
    let _ = writeln!(
        out,
        "Generated by `bench-report report` at {} from `benches/results/*.json` (raw samples). \
         Do not edit by hand: rerun the benchmarks and the report instead. Every comparison \
         below was measured in one run with its variants interleaved (A, B, A, B, …, the \
         starting variant rotating each round), warm-up rounds discarded; medians with the \
         10th–90th percentile spread and min/max.\n",
        utc_now()
    );
    machine_section(&mut out, &machine);
    out.push_str("## Reproduce\n\n```sh\n");
    out.push_str(
        "scripts/setup.sh        # QEMU, vhost-device-vsock, the guest kernel cache (as root)\n",
    );
    out.push_str(
        "# the software under test: sge_virtualizer + guest image of a commit, from git archive\n",
    );
    out.push_str("benches/build-under-test.sh HEAD /work/bench-builds/latest\n");
    out.push_str("cargo run --release -p benchmarks -- all --runs 20 --warmup 2 --under-test /work/bench-builds/latest\n");
    out.push_str(
        "cargo run --release -p benchmarks -- report    # re-render from benches/results/*.json\n",
    );
    out.push_str("```\n\nWithout `--under-test` the workspace's own `target/release/sge_virtualizer` and \
                  `build/guest/` are measured. Single benchmarks: `boot`, `job`, `memory`, `relay`, \
                  `signal`, `gridengine`, `profile`, `kvm`, `fs` (the virtio-fs file server; its /dev/fuse part \
                  needs root), `images`, `network`, and in the nested real-KVM host `nested` and \
                  `nested-boot [--firecracker PATH] [--baseline PATH --baseline-label TEXT]` \
                  (Firecracker built from its own repository, placed under target/); \
                  `compare --name N --title T DIR DIR…` \
                  measures an optimisation across builds of benches/build-under-test.sh, \
                  `compare-vmm … DIR DIR…` one of the vmm crate across builds of \
                  benches/build-bench-vm.sh [PATCH]; `tiny-guest FILE` writes the test guest. The \
                  embedded-VMM sections (1, 3, 6, 7) measure the vmm crate as compiled into \
                  bench-report / bench-vm.\n\n");
    out.push_str(
        "## Targets\n\n| what | target | measured (median) | verdict |\n|---|---|---|---|\n",
    );
    for (what, target, measured, v) in headlines(&results, &optimisations, &machine) {
        let _ = writeln!(out, "| {what} | {target} | {measured} | {v} |");
    }
    out.push_str(
        "\nAnchors (shared/reference/microvm-anchors.md §1): Firecracker promises ≤ 125 ms from \
         start to guest init, ≤ 5 MiB VMM overhead and a VMM ready in 8 CPU-ms; a tuned Linux \
         reaches init in about 6 ms of kernel time; fork+exec of a host process is the floor \
         (about 1 ms).\n\n",
    );
    let found = crate::findings::findings(&results);
    if !found.is_empty() {
        out.push_str("## Where the time goes\n\nComputed from the tables below:\n\n");
        for f in found {
            let _ = writeln!(out, "* {f}");
        }
        out.push('\n');
    }
    let numbering = [
        ("boot", "1. "),
        ("job", "2. "),
        ("memory", "3. "),
        ("memory-return", "3b. "),
        ("relay", "4a. "),
        ("signal", "4b. "),
        ("gridengine", "5. "),
        ("profile", "6. "),
        ("kvm", "7. "),
        ("fs", "8. "),
        ("nested", "9. "),
        ("images", "10. "),
        ("network", "11. "),
        ("nested-boot", "12. "),
        ("nested-checkpoint", "13. "),
    ];
    for r in &results {
        let number = numbering
            .iter()
            .find(|(id, _)| *id == r.id)
            .map(|(_, n)| *n)
            .unwrap_or("");
        result_section(&mut out, number, r);
        if r.id == "job" {
            phase_breakdown(&mut out, out_dir, r, &PHASES, CHART_FILE)?;
        }
        if r.id == "nested" {
            phase_breakdown(&mut out, out_dir, r, &PHASES, "nested.png")?;
        }
        if r.id == "boot" {
            phase_breakdown(&mut out, out_dir, r, &BOOT_PHASES, "boot.png")?;
        }
        if r.id == "fs" {
            ratio_table(&mut out, r);
        }
        if r.id == "network" {
            network_ratio_table(&mut out, r);
        }
        if r.id == crate::boot_phases::ID {
            crate::boot_phases::report(&mut out, out_dir, r)?;
        }
    }
    let missing: Vec<&str> = IDS
        .iter()
        .filter(|id| !results.iter().any(|r| r.id == **id))
        .copied()
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(
            out,
            "Not yet measured (no results file): {}.\n",
            missing.join(", ")
        );
    }
    out.push_str("## Optimisations\n\n");
    if optimisations.is_empty() {
        out.push_str("None measured yet.\n\n");
    }
    for r in &optimisations {
        let _ = writeln!(out, "### {}\n", r.title);
        for line in crate::findings::optimisation_summary(r) {
            let _ = writeln!(out, "* {line}");
        }
        out.push('\n');
        result_section(&mut out, "", r);
        let phases: &[&str] = if r.series.iter().any(|s| s.metric == "agent_hello") {
            &PHASES
        } else {
            &BOOT_PHASES
        };
        phase_breakdown(&mut out, out_dir, r, phases, &format!("{}.png", r.id))?;
    }
    out.push_str(SUGGESTIONS);
    let path = out_dir.join("REPORT.md");
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
