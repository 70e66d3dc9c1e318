//! `qemu-system-x86_64 -M microvm` booting the tiny test guest: the QEMU side of the
//! boot-latency and memory comparisons. Same machine options as the shepherd's QEMU backend
//! (microvm without ACPI, memfd guest RAM, no default devices, `-no-reboot`), with the serial
//! port on stdout so the harness sees the guest's first byte.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::clock::{monotonic_ns, ms_between};

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Starts QEMU on `guest` with `mem_mib` of RAM; stdout is the guest's serial port.
pub fn spawn(guest: &Path, accel: Accel, mem_mib: u32) -> anyhow::Result<Child> {
    let mem = format!("{mem_mib}M");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel.name()])
        .args(["-M", "microvm,acpi=off,memory-backend=mem"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .args(["-m", &mem, "-smp", "1"])
        // `max` is the host CPU under KVM; this KVM cannot set MSR 0x10a (arch-capabilities).
        .args(match accel {
            Accel::Kvm => ["-cpu", "host,-arch-capabilities"],
            Accel::Tcg => ["-cpu", "max"],
        })
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(guest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("starting qemu-system-x86_64")
}

/// Reads the child's stdout until the guest's first serial byte; returns when it arrived.
pub fn wait_first_byte(child: &mut Child) -> anyhow::Result<u64> {
    let Some(out) = child.stdout.as_mut() else {
        bail!("qemu's stdout is not a pipe");
    };
    let mut byte = [0u8; 1];
    match out.read(&mut byte) {
        Ok(1) => Ok(monotonic_ns()),
        Ok(_) => bail!("qemu closed the serial port before the guest wrote to it"),
        Err(e) => Err(e).context("reading qemu's serial output"),
    }
}

/// Drains and waits for QEMU; fails unless it ended cleanly (the guest's triple fault with
/// `-no-reboot` is a clean end).
pub fn wait_exit(mut child: Child) -> anyhow::Result<u64> {
    let mut rest = Vec::new();
    if let Some(out) = child.stdout.as_mut() {
        let _ = out.read_to_end(&mut rest);
    }
    let status = child.wait().context("waiting for qemu")?;
    let gone = monotonic_ns();
    if !status.success() {
        let mut err = String::new();
        if let Some(e) = child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("qemu exited with {status}: {}", err.trim());
    }
    Ok(gone)
}

/// One boot of the exiting guest: (first instruction, VM gone) in ms since the spawn.
pub fn boot_once(guest: &Path, accel: Accel, mem_mib: u32) -> anyhow::Result<(f64, f64)> {
    let start = monotonic_ns();
    let mut child = spawn(guest, accel, mem_mib)?;
    let first = match wait_first_byte(&mut child) {
        Ok(t) => t,
        Err(e) => {
            let _ = child.kill();
            let _ = wait_exit(child);
            return Err(e);
        }
    };
    let gone = wait_exit(child)?;
    Ok((ms_between(start, first), ms_between(start, gone)))
}
