//! Benchmark 4b: signal latency as a round trip — the harness sends SIGUSR1 to the shepherd,
//! which relays it to the job's process group in the guest; the job's shell trap writes a line
//! to stdout, which comes back through the relay; the harness timestamps its arrival. The guest
//! clock is not synchronised with the host's (and runs at TCG's pace), so one-way latency cannot
//! be measured honestly here; the round trip can. The same script run directly on the host,
//! signalled the same way, is the floor.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};
use crate::context::BenchContext;
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::shepherd_run;

/// The job: a shell whose USR1 trap prints a line; `wait` returns at once on a trapped signal.
const SCRIPT: &str = "trap 'echo s' USR1; echo ready; while :; do sleep 100 & wait $!; done";
/// Longest wait for the job to come up (a VM boot under TCG) and for one reply.
const START_PATIENCE: Duration = Duration::from_secs(60);
const REPLY_PATIENCE: Duration = Duration::from_secs(10);

/// A running job that answers SIGUSR1 with a line on stdout.
struct Responder {
    child: Child,
    /// Where the signal goes: the shepherd's pid, or minus the host shell's process group.
    target: libc::pid_t,
    /// Lines from the job's stdout with their arrival time (monotonic ns).
    lines: Receiver<(String, u64)>,
}

impl Responder {
    fn start(mut cmd: Command, target_group: bool) -> anyhow::Result<Responder> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the job")?;
        let out = child.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((line, monotonic_ns())).is_err() {
                    break;
                }
            }
        });
        let pid = child.id() as libc::pid_t;
        let r = Responder {
            child,
            target: if target_group { -pid } else { pid },
            lines,
        };
        match r.lines.recv_timeout(START_PATIENCE) {
            Ok((l, _)) if l == "ready" => Ok(r),
            Ok((l, _)) => bail!("unexpected first line {l:?}"),
            Err(_) => bail!("the job did not print ready within {START_PATIENCE:?}"),
        }
    }

    fn send(&self, signo: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the target is our unreaped child
        // (or its process group).
        unsafe { libc::kill(self.target, signo) };
    }

    /// One round trip in ms.
    fn ping(&self) -> anyhow::Result<Sample> {
        while self.lines.try_recv().is_ok() {}
        let start = monotonic_ns();
        self.send(libc::SIGUSR1);
        match self.lines.recv_timeout(REPLY_PATIENCE) {
            Ok((l, at)) if l == "s" => Ok(vec![("round_trip", ms_between(start, at))]),
            Ok((l, _)) => bail!("unexpected reply {l:?}"),
            Err(_) => bail!("no reply within {REPLY_PATIENCE:?}"),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.send(libc::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    let mut host_cmd = Command::new("/bin/sh");
    host_cmd
        .args(["-c", SCRIPT])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let host = Responder::start(host_cmd, true)?;
    let mut backends = vec![("QEMU backend (TCG)", "qemu")];
    let mut notes = vec![
        format!(
            "Job: `sh -c \"{SCRIPT}\"`. One sample = SIGUSR1 sent to the shepherd (host \
             variant: to the shell's process group) → relayed to the job's process group in \
             the guest → trap runs `echo` → the line comes back over vsock → the harness reads \
             it from the shepherd's stdout pipe."
        ),
        "All samples of a variant come from one running VM (booted once before the warm-up \
         signals); the variants are signalled alternately."
            .into(),
        "This is a round trip, not the one-way signal latency the target names: the guest clock \
         cannot be compared with the host's."
            .into(),
    ];
    if ctx.machine.kvm_can_run_linux {
        backends.push(("embedded backend", "embedded"));
    } else {
        notes.push(
            "Embedded backend not measured: a Linux user space cannot run under this host's KVM."
                .into(),
        );
    }
    let mut vms = Vec::new();
    for (label, backend) in &backends {
        let cmd = shepherd_run::command(&ctx.under_test, backend, &["/bin/sh", "-c", SCRIPT]);
        vms.push((label.to_string(), Responder::start(cmd, false)?));
    }
    let mut variants = vec![Variant::new("host shell (no VM)", "ms", || host.ping())];
    for (label, vm) in &vms {
        variants.push(Variant::new(label.clone(), "ms", move || vm.ping()));
    }
    eprintln!(
        "signal: {} warm-up + {} signals per variant",
        ctx.warmup, ctx.runs
    );
    let (series, outcomes) = run_interleaved(&mut variants, ctx.warmup, ctx.runs);
    drop(variants);
    drop(vms);
    drop(host);
    Ok(BenchResult::measured(
        ctx,
        "signal",
        "Signal round trip: shepherd → job's handler → output back on the host",
        series,
        outcomes,
        notes,
    ))
}
