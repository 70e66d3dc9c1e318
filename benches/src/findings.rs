//! "Where the time goes": statements computed from the results for the report, so that the
//! analysis follows the data when the benchmarks are rerun.

use crate::results::BenchResult;

fn median(r: &BenchResult, variant: &str, metric: &str) -> Option<f64> {
    r.series(variant, metric)?.summary().map(|s| s.median)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

/// One line per build of an optimisation result: end to end and the phase that changed most.
pub fn optimisation_summary(r: &BenchResult) -> Vec<String> {
    let variants = r.variants();
    let Some(base) = variants.first() else {
        return Vec::new();
    };
    if median(r, base, "wall").is_none() {
        // A vmm comparison (tiny guest): first instruction and VM gone.
        return variants
            .iter()
            .filter_map(|v| {
                let first = median(r, v, "first_instruction")?;
                let gone = median(r, v, "vm_gone")?;
                let mut line = format!(
                    "{v}: first instruction {} after the fork/exec, VM gone {}",
                    ms(first),
                    ms(gone)
                );
                if v.starts_with("QEMU") {
                    return Some(line);
                }
                if *v != *base {
                    if let (Some(bf), Some(bg)) = (
                        median(r, base, "first_instruction"),
                        median(r, base, "vm_gone"),
                    ) {
                        line.push_str(&format!(
                            " ({:+.0}% and {:+.0}% vs {base})",
                            100.0 * (first - bf) / bf,
                            100.0 * (gone - bg) / bg
                        ));
                    }
                }
                Some(line)
            })
            .collect();
    }
    let phases = crate::job_latency::PHASES;
    // The phase whose median duration differs most between the first and the last build.
    let duration = |v: &str, i: usize| -> Option<f64> {
        let end = median(r, v, phases[i])?;
        let start = phases[..i]
            .iter()
            .rev()
            .find_map(|p| median(r, v, p))
            .unwrap_or(0.0);
        Some(end - start)
    };
    let last = variants.last().copied().unwrap_or(base);
    let changed = (0..phases.len())
        .filter_map(|i| Some((i, (duration(last, i)? - duration(base, i)?).abs())))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i);
    variants
        .iter()
        .filter_map(|v| {
            let wall = median(r, v, "wall")?;
            let mut line = format!("{v}: {} end to end", ms(wall));
            if let Some(i) = changed {
                if let Some(d) = duration(v, i) {
                    let from = phases[..i]
                        .iter()
                        .rev()
                        .find(|p| median(r, v, p).is_some())
                        .copied()
                        .unwrap_or("process start");
                    line.push_str(&format!(", {from} → {} {}", phases[i], ms(d)));
                }
            }
            if *v != *base {
                if let Some(b) = median(r, base, "wall") {
                    line.push_str(&format!(" ({:+.0}% vs {base})", 100.0 * (wall - b) / b));
                }
            }
            Some(line)
        })
        .collect()
}

/// One bullet per finding.
pub fn findings(results: &[BenchResult]) -> Vec<String> {
    let get = |id: &str| results.iter().find(|r| r.id == id);
    let mut out = Vec::new();
    if let Some(boot) = get("boot") {
        let v = "embedded (in-process)";
        if let (Some(run), Some(first), Some(exit), Some(gone)) = (
            median(boot, v, "first_vcpu_run"),
            median(boot, v, "first_instruction"),
            median(boot, v, "exit_seen"),
            median(boot, v, "vm_gone"),
        ) {
            out.push(format!(
                "Embedded VMM, tiny guest (medians): set-up until the first KVM_RUN {}, the \
                 guest's first instructions {}, its exit noticed {} later, tear-down (threads \
                 joined, memory unmapped, VM fd closed) {}. Set-up and tear-down are almost all \
                 of it; the guest itself is a handful of instructions. See 6. for which system \
                 calls they are.",
                ms(run),
                ms(first - run),
                ms(exit - first),
                ms(gone - exit)
            ));
            for size in ["256 MiB", "4096 MiB", "65536 MiB"] {
                let variant = format!("{v}, {size}");
                if let (Some(r), Some(f)) = (
                    median(boot, &variant, "first_vcpu_run"),
                    median(boot, &variant, "first_instruction"),
                ) {
                    let verdict = if (r / run - 1.0).abs() <= 0.25 {
                        "within 25%"
                    } else {
                        "more than 25% apart"
                    };
                    out.push(format!(
                        "Guest RAM size (mapped lazily): set-up with {size} {}, first \
                         instruction {}, against {} and {} with 128 MiB ({verdict}, same run).",
                        ms(r),
                        ms(f),
                        ms(run),
                        ms(first)
                    ));
                }
            }
        }
        if let (Some(fresh), Some(inproc)) = (
            median(boot, "embedded (fresh process)", "first_instruction"),
            median(boot, v, "first_instruction"),
        ) {
            out.push(format!(
                "Starting the VMM in a fresh process costs {} to the first instruction against \
                 {} in-process (exec, dynamic loading, the runtime's start-up).",
                ms(fresh),
                ms(inproc)
            ));
        }
    }
    if let Some(kvm) = get("kvm") {
        let (k, e) = (
            crate::kvm_primitives::KVM_ONLY,
            crate::kvm_primitives::EMBEDDED,
        );
        if let (Some(ks), Some(kt), Some(region), Some(close), Some(es), Some(et)) = (
            median(kvm, k, "set_up_total"),
            median(kvm, k, "tear_down_total"),
            median(kvm, k, "set_user_memory_region"),
            median(kvm, k, "close_vm"),
            median(kvm, e, "set_up_total"),
            median(kvm, e, "tear_down_total"),
        ) {
            out.push(format!(
                "This host's KVM alone (section 7), guest RAM registered after the IRQ chip: {} \
                 to set up a 1-vCPU 128 MiB VM, {} of it in KVM_SET_USER_MEMORY_REGION, and {} \
                 to destroy it, {} of it closing the VM fd. The embedded VMM in the same run: \
                 set-up {}, tear-down {}.",
                ms(ks),
                ms(region),
                ms(kt),
                ms(close),
                ms(es),
                ms(et)
            ));
            let f = crate::kvm_primitives::KVM_REGION_FIRST;
            if let (Some(fs), Some(fr), Some(ft)) = (
                median(kvm, f, "set_up_total"),
                median(kvm, f, "set_user_memory_region"),
                median(kvm, f, "tear_down_total"),
            ) {
                out.push(format!(
                    "Registering guest RAM before the IRQ chip instead (same run): \
                     KVM_SET_USER_MEMORY_REGION {} instead of {}, set-up {} instead of {}, \
                     tear-down {} instead of {}: the order moves time between set-up and \
                     tear-down on this host. See Optimisations for the vmm patch.",
                    ms(fr),
                    ms(region),
                    ms(fs),
                    ms(ks),
                    ms(ft),
                    ms(kt)
                ));
            }
        }
    }
    if let Some(profile) = get("profile") {
        let top: Vec<String> = profile
            .series
            .iter()
            .take(5)
            .filter_map(|s| Some(format!("{} {}", s.metric, ms(s.summary()?.median))))
            .collect();
        if !top.is_empty() {
            out.push(format!(
                "Largest system-call costs of one embedded tiny-guest VM (strace, inflated): {}.",
                top.join(", ")
            ));
        }
    }
    if let Some(nested) = get("nested") {
        let (e, q) = (
            "embedded VMM (nested real KVM)",
            "QEMU microvm, -accel kvm (nested real KVM)",
        );
        if let (Some(ew), Some(qw)) = (median(nested, e, "wall"), median(nested, q, "wall")) {
            let gone =
                |v: &str| Some(median(nested, v, "vm_gone")? - median(nested, v, "job_exited")?);
            let hello = |v: &str| median(nested, v, "agent_hello");
            out.push(format!(
                "Nested real KVM (emulated twice: ratios, not times): embedded {} vs QEMU -accel \
                 kvm {} end to end ({:.2}×); to the agent's hello {} vs {}; job exit → VM gone \
                 {} vs {}.",
                ms(ew),
                ms(qw),
                ew / qw,
                hello(e).map_or("-".into(), ms),
                hello(q).map_or("-".into(), ms),
                gone(e).map_or("-".into(), ms),
                gone(q).map_or("-".into(), ms),
            ));
        }
    }
    if let Some(job) = get("job") {
        for v in job.variants() {
            let Some(wall) = median(job, v, "wall") else {
                continue;
            };
            let phases = crate::job_latency::PHASES;
            let mut prev = (0.0, "process start");
            let mut parts: Vec<(f64, String)> = Vec::new();
            for p in phases {
                if let Some(t) = median(job, v, p) {
                    parts.push((t - prev.0, format!("{} → {p}", prev.1)));
                    prev = (t, p);
                }
            }
            if parts.is_empty() {
                continue;
            }
            parts.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top: Vec<String> = parts
                .iter()
                .take(3)
                .map(|(d, n)| format!("{n} {} ({:.0}%)", ms(*d), 100.0 * d / wall))
                .collect();
            out.push(format!(
                "{v}: {} end to end; largest phases {}.",
                ms(wall),
                top.join(", ")
            ));
        }
        if let Some(boot) = median(
            job,
            "sge_virtualizer, QEMU backend (TCG)",
            "guest_kernel_boot",
        ) {
            out.push(format!(
                "The guest kernel's own boot (guest clock, TCG) takes {} of that; a tuned kernel \
                 on hardware KVM reaches init in about 6 ms (anchor).",
                ms(boot)
            ));
        }
    }
    if let Some(mem) = get("memory") {
        if let (Some(e), Some(q)) = (
            median(mem, "embedded (tiny guest)", "overhead"),
            median(mem, "QEMU microvm, KVM (tiny guest)", "overhead"),
        ) {
            out.push(format!(
                "Memory overhead: embedded {e:.2} MiB, QEMU microvm {q:.1} MiB ({:.0}× more) \
                 with the same guest.",
                q / e
            ));
        }
    }
    if let Some(relay) = get("relay") {
        let relayed = relay
            .variants()
            .into_iter()
            .find(|v| v.contains("host file") && v.contains("QEMU"))
            .and_then(|v| median(relay, v, "throughput"));
        let local = relay
            .variants()
            .into_iter()
            .find(|v| v.contains("/dev/null"))
            .and_then(|v| median(relay, v, "throughput"));
        if let (Some(r), Some(l)) = (relayed, local) {
            out.push(format!(
                "Relay: {r:.0} MB/s through the QEMU backend against {l:.0} MB/s for the same dd \
                 writing to /dev/null inside the guest: the relay path (guest pipe → agent → \
                 vsock → vhost-device-vsock → shepherd → file) costs {:.0}× the guest's own \
                 work under TCG.",
                l / r
            ));
        }
    }
    if let Some(ge) = get("gridengine") {
        let stock = "stock sge_shepherd";
        let virt = ge
            .variants()
            .into_iter()
            .find(|v| v.starts_with("sge_virtualizer"));
        if let (Some(v), Some(s)) = (virt, ge.series(stock, "wall")) {
            if let (Some(vs), Some(sm), Some(vm)) = (
                ge.series(v, "wall"),
                median(ge, stock, "wall"),
                median(ge, v, "wall"),
            ) {
                let slow = |x: &[f64]| x.iter().filter(|w| **w >= 1500.0).count();
                out.push(format!(
                    "Grid Engine: qsub -sync y takes {} with the stock shepherd and {} with \
                     sge_virtualizer (medians); runs of 1.5 s or more: {} of {} against {} of {}. \
                     With the cell's 1 s scheduling interval the wall time comes in steps of \
                     about a second, and the VM's boot mostly fits inside the same step.",
                    ms(sm),
                    ms(vm),
                    slow(&s.samples),
                    s.samples.len(),
                    slow(&vs.samples),
                    vs.samples.len()
                ));
            }
        }
    }
    if let Some(fs) = get("fs") {
        out.extend(file_server_findings(fs));
    }
    if let Some(sig) = get("signal") {
        if let (Some(h), Some(q)) = (
            median(sig, "host shell (no VM)", "round_trip"),
            median(sig, "QEMU backend (TCG)", "round_trip"),
        ) {
            out.push(format!(
                "Signal round trip: {} through the QEMU backend against {} for the same shell \
                 on the host.",
                ms(q),
                ms(h)
            ));
        }
    }
    out
}

/// The virtio-fs file server (section 8) against its direct-host baselines.
fn file_server_findings(r: &BenchResult) -> Vec<String> {
    use crate::file_server as f;
    // (through the server, direct) medians of one metric.
    let pair =
        |metric: &str, v: &str, b: &str| Some((median(r, v, metric)?, median(r, b, metric)?));
    let mut out = Vec::new();
    if let (Some((ga, st)), Some((dr, pr)), Some((drt, prt)), Some((dw, pw))) = (
        pair("us_per_request", f::DEV_GETATTR, f::HOST_FSTATAT),
        pair("us_per_request", f::DEV_READ, f::HOST_PREAD),
        pair("throughput", f::DEV_READ, f::HOST_PREAD),
        pair("throughput", f::DEV_WRITE, f::HOST_PWRITE),
    ) {
        out.push(format!(
            "virtio-fs file server, device + server without a guest (section 8): a GETATTR \
             takes {ga:.2} µs against {st:.2} µs for the host call it makes ({:.2} µs of \
             device and protocol per request); a 128 KiB READ {dr:.1} µs against {pr:.1} µs \
             for pread ({drt:.0} against {prt:.0} MB/s), a 128 KiB WRITE {dw:.0} against \
             {pw:.0} MB/s for pwrite.",
            ga - st
        ));
    }
    if let (Some((mw, dw)), Some((mr, dr))) = (
        pair("write_throughput", f::MOUNT_SEQ, f::DIRECT_SEQ),
        pair("read_throughput", f::MOUNT_SEQ, f::DIRECT_SEQ),
    ) {
        let files = match pair("ops_per_s", f::MOUNT_FILES, f::DIRECT_FILES) {
            Some((m, d)) => format!(
                "; small files {m:.0} against {d:.0} create/stat/unlink operations per second"
            ),
            None => String::new(),
        };
        out.push(format!(
            "The same server behind the host kernel's FUSE client (/dev/fuse mount): 64 MiB \
             written at {mw:.0} MB/s against {dw:.0} MB/s directly ({:.1}× slower), read at \
             {mr:.0} against {dr:.0} MB/s ({:.1}× slower){files}.",
            dw / mw,
            dr / mr
        ));
    }
    out
}
