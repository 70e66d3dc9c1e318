//! Where the embedded VMM's time goes with the tiny guest: the child process
//! (`bench-vm`) runs under `strace -f -T` and the time spent in each kind of
//! system call is summed per run. strace slows every call down, so the absolute numbers are
//! inflated; the ranking shows what dominates VM set-up and tear-down. `KVM_RUN` includes the
//! guest's own execution.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::context::BenchContext;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::{utc_now, BenchResult};
use crate::tiny_guest::{self, AfterSignal};

/// Calls whose median total is below this are left out of the result.
const MIN_MEDIAN_MS: f64 = 0.2;

/// The key a strace line is summed under, and its duration in ms:
/// `PID HH:MM:SS.ffffff name(args) = ret <secs>`.
pub fn parse_line(line: &str) -> Option<(String, f64)> {
    let dur = line
        .rsplit_once('<')?
        .1
        .strip_suffix('>')?
        .parse::<f64>()
        .ok()?;
    let mut words = line.splitn(3, ' ');
    let (_pid, _time, call) = (words.next()?, words.next()?, words.next()?);
    if call.starts_with("<...") {
        // The second half of an interrupted call: "<... futex resumed>".
        let name = call.strip_prefix("<... ")?.split_whitespace().next()?;
        return Some((name.to_string(), dur * 1000.0));
    }
    let (name, args) = call.split_once('(')?;
    let key = match name {
        "ioctl" => {
            let request = args.split(", ").nth(1)?;
            format!("ioctl {}", request.trim_end_matches(')'))
        }
        "openat" => {
            let path = args.split(", ").nth(1)?;
            format!("openat {path}")
        }
        _ => name.to_string(),
    };
    Some((key, dur * 1000.0))
}

fn one_run(
    guest: &std::path::Path,
    trace: &std::path::Path,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let exe = std::env::current_exe()?;
    let status = Command::new("strace")
        .args(["-f", "-tt", "-T", "-o"])
        .arg(trace)
        .arg(exe.with_file_name("bench-vm"))
        .arg("--guest")
        .arg(guest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running strace (apt-get install strace)")?;
    if !status.success() {
        bail!("strace'd bench-vm failed: {status}");
    }
    let text = std::fs::read_to_string(trace)?;
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        if let Some((key, ms)) = parse_line(line) {
            *sums.entry(key).or_default() += ms;
        }
    }
    Ok(sums)
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    let guest = ctx.work_dir.join("tiny-exit.elf");
    tiny_guest::write(&guest, AfterSignal::Exit)?;
    let trace = ctx.work_dir.join("strace.txt");
    let (g, t) = (guest.as_path(), trace.as_path());
    // Keys are only known after the runs; collect everything, then keep the big ones.
    let all_keys = std::cell::RefCell::new(Vec::<BTreeMap<String, f64>>::new());
    let mut variants = vec![Variant::new("embedded VMM under strace", "ms", || {
        let sums = one_run(g, t)?;
        all_keys.borrow_mut().push(sums);
        Ok(Sample::new())
    })];
    eprintln!("profile: {} warm-up + {} runs", ctx.warmup, ctx.runs);
    let (_, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    let runs = all_keys.into_inner();
    let measured = &runs[runs.len().saturating_sub(ctx.runs)..];
    let mut keys: Vec<&String> = measured.iter().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut series: Vec<crate::results::Series> = keys
        .into_iter()
        .map(|k| crate::results::Series {
            variant: "embedded VMM under strace".into(),
            metric: k.clone(),
            unit: "ms".into(),
            samples: measured
                .iter()
                .map(|m| m.get(k).copied().unwrap_or(0.0))
                .collect(),
        })
        .filter(|s| s.summary().is_some_and(|x| x.median >= MIN_MEDIAN_MS))
        .collect();
    series.sort_by(|a, b| {
        let m = |s: &crate::results::Series| s.summary().map(|x| x.median).unwrap_or(0.0);
        m(b).total_cmp(&m(a))
    });
    Ok(BenchResult {
        id: "profile".into(),
        title: "Embedded VMM: time per system call kind, tiny guest (strace -f -T)".into(),
        command: ctx.reproduce("profile"),
        finished_utc: utc_now(),
        machine: ctx.machine.clone(),
        under_test: format!(
            "the vmm crate as compiled into bench-vm (workspace at {} when run)",
            crate::context::workspace_describe()
        ),
        warmup: ctx.warmup,
        runs: ctx.runs,
        load_average: String::new(),
        series,
        outcomes,
        notes: vec![
            "Each sample: total time inside one kind of system call (ioctls by request, openat \
             by path) over one whole `bench-vm` process booting the tiny guest \
             to its triple fault, all threads. Calls with a median under 0.2 ms are left out."
                .into(),
            "strace makes every system call slower (two ptrace stops each), so these numbers \
             are inflated; use them to rank, and the `boot` table for real times. KVM_RUN \
             includes the guest's own execution; futex/wait time is threads waiting for each \
             other."
                .into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strace_lines() {
        let l =
            "27400 23:29:20.096846 ioctl(4, KVM_SET_USER_MEMORY_REGION, {slot=0}) = 0 <0.006821>";
        let (k, ms) = parse_line(l).unwrap();
        assert_eq!(k, "ioctl KVM_SET_USER_MEMORY_REGION");
        assert!((ms - 6.821).abs() < 1e-9);
        let l =
            "27400 23:29:20.083654 openat(AT_FDCWD, \"/dev/kvm\", O_RDWR|O_CLOEXEC) = 3 <0.004044>";
        assert_eq!(parse_line(l).unwrap().0, "openat \"/dev/kvm\"");
        let l = "27400 23:29:20.108402 close(4)          = 0 <0.007236>";
        assert_eq!(parse_line(l).unwrap().0, "close");
        let l = "27401 23:29:20.107801 <... futex resumed>) = 0 <0.000816>";
        assert_eq!(parse_line(l).unwrap().0, "futex");
        assert!(parse_line("27400 +++ exited with 0 +++").is_none());
    }
}
