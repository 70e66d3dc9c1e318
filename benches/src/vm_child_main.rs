//! `bench-vm`: the fresh process in which the benchmarks boot the tiny guest with the embedded
//! VMM (`bench-vm --guest ELF [--mem MiB] [--hold]`). Kept minimal on purpose (no CLI crate, no
//! chart code): its memory is what the embedded-VMM overhead figure reports.

#[allow(dead_code)] // the shared clock helpers; only some are needed here
#[path = "clock.rs"]
mod clock;
#[allow(dead_code)] // only the smaps helpers are used here
#[path = "proc_memory.rs"]
mod proc_memory;
#[path = "vm_child.rs"]
mod vm_child;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let mut guest = None;
    let mut mem = 128u32;
    let mut hold = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--guest") => guest = args.next().map(std::path::PathBuf::from),
            Some("--mem") => {
                mem = args
                    .next()
                    .and_then(|v| v.to_str()?.parse().ok())
                    .context("--mem needs a number of MiB")?
            }
            Some("--hold") => hold = true,
            _ => bail!("usage: bench-vm --guest ELF [--mem MiB] [--hold]"),
        }
    }
    let guest = guest.context("--guest ELF is required")?;
    vm_child::child_main(&guest, mem, hold)
}
