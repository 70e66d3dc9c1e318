//! Benchmark 3b: guest memory given back to the host. A 16 GiB guest (mapped lazily) idles,
//! its job then holds 1 GiB (`dd`'s one block) and frees it; the host's resident memory of the
//! VM's processes is sampled throughout: idle, peak, and how soon the freed memory is back
//! (virtio-balloon free page reporting).

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::{BenchContext, UnderTest};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::proc_memory;
use crate::results::BenchResult;
use crate::shepherd_run;

/// Guest RAM of the measured VM.
const GUEST_MIB: u32 = 16384;
/// What the job holds and frees.
const HELD_MIB: u32 = 1000;
/// How long the host may take to get the memory back before the run counts as failed.
const RETURN_PATIENCE: Duration = Duration::from_secs(60);

/// The job: says when it idles, holds `HELD_MIB`, says when it freed it, then waits to be
/// killed.
fn job_script() -> String {
    format!(
        "echo idle; sleep 4; echo holding; \
         dd if=/dev/zero of=/dev/null bs={HELD_MIB}M count=1 2>/dev/null; echo freed; sleep 300"
    )
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One VM: idle RSS, peak, RSS 1 s and 5 s after the job freed its memory, and the time until
/// the RSS was back within 256 MiB of idle.
fn once(ut: &UnderTest, backend: &str) -> anyhow::Result<Sample> {
    let script = job_script();
    let mut cmd = shepherd_run::command_with(
        ut,
        backend,
        &["--mem", &GUEST_MIB.to_string()],
        &["/bin/sh", "-c", &script],
    );
    let mut child = cmd.spawn().context("starting sge_virtualizer")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| {
        let wait_line = |want: &str, patience: Duration| -> anyhow::Result<()> {
            let deadline = Instant::now() + patience;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(l) if l == want => return Ok(()),
                    Ok(_) => {}
                    Err(_) => bail!("the job never said {want:?}"),
                }
            }
        };
        wait_line("idle", Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_secs(3));
        let idle = proc_memory::tree_rss_kib(pid);
        wait_line("holding", Duration::from_secs(30))?;
        let mut peak = idle;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            peak = peak.max(proc_memory::tree_rss_kib(pid));
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l == "freed" => break,
                _ if Instant::now() > deadline => bail!("the job never freed its memory"),
                _ => {}
            }
        }
        let freed = Instant::now();
        let (mut at_1s, mut at_5s, mut back) = (None, None, None);
        while freed.elapsed() < RETURN_PATIENCE && (at_5s.is_none() || back.is_none()) {
            let now = proc_memory::tree_rss_kib(pid);
            let t = freed.elapsed();
            if back.is_none() && now <= idle + (256 << 10) {
                back = Some(t.as_secs_f64());
            }
            if at_1s.is_none() && t >= Duration::from_secs(1) {
                at_1s = Some(now);
            }
            if at_5s.is_none() && t >= Duration::from_secs(5) {
                at_5s = Some(now);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let back = back.context("the freed memory did not come back within 60 s")?;
        Ok(vec![
            ("idle_rss", mib(idle)),
            ("peak_rss", mib(peak)),
            ("rss_1s_after_free", mib(at_1s.unwrap_or(0))),
            ("rss_5s_after_free", mib(at_5s.unwrap_or(0))),
            ("seconds_until_back", back),
        ])
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let mut variants = vec![Variant::new("QEMU backend (TCG)", "MiB or s", || {
        once(&ctx.under_test, "qemu")
    })];
    let mut notes = vec![
        format!(
            "A {GUEST_MIB} MiB guest: the job idles, then holds {HELD_MIB} MiB (dd's one block, \
             filled by one read) and frees it by exiting dd. RSS = VmRSS summed over the \
             shepherd's process tree (the shepherd, its VMM process, QEMU and the vsock \
             daemon), sampled every 100 ms; idle = 3 s after the job started."
        ),
        "seconds_until_back = from the job saying it freed the memory to the tree's RSS being \
         within 256 MiB of idle. The guest reports free blocks of 2 MiB and more after about \
         2 s (Linux's page reporting delay); QEMU punches them out of its memfd, the embedded \
         VMM drops them with madvise(MADV_DONTNEED)."
            .into(),
        "Units: the *_rss metrics in MiB, seconds_until_back in seconds.".into(),
    ];
    if ctx.machine.kvm_can_run_linux {
        variants.push(Variant::new("embedded backend", "MiB or s", || {
            once(&ctx.under_test, "embedded")
        }));
    } else {
        notes.push(format!(
            "Embedded backend not measured here: a Linux user space cannot run under this \
             host's KVM ({}); the nested real-KVM tier runs the same check \
             (run_e2e embedded::a_large_guest_costs_what_it_touches_and_freed_memory_comes_back).",
            ctx.machine.kvm_probe
        ));
    }
    eprintln!(
        "memory-return: {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    Ok(BenchResult::measured(
        ctx,
        "memory-return",
        "Guest memory given back: host RSS of an idle 16 GiB guest, while its job holds 1 GiB, \
         and after the job frees it",
        series,
        outcomes,
        notes,
    ))
}
