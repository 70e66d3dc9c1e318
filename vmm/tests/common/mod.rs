//! Helpers shared by the KVM integration tests: assembling the tiny test guests in
//! `tests/guests/` with the system C compiler, deciding whether KVM is usable here, and running
//! one of a test binary's ignored tests in a child process (to restore a snapshot in a fresh
//! process).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Assembles and links `tests/guests/<name>.S` into a 64-bit ELF at 1 MiB; returns its path.
pub fn build_guest(name: &str) -> PathBuf {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{name}.elf"));
    let status = Command::new("gcc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,--build-id=none",
        ])
        .args(["-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments"])
        .arg(format!("-I{}", src_dir.display()))
        .arg("-T")
        .arg(src_dir.join("guest.ld"))
        .arg("-o")
        .arg(&out)
        .arg(src_dir.join(format!("{name}.S")))
        .status()
        .expect("gcc must be installed to build the test guests");
    assert!(status.success(), "assembling {name}.S failed");
    out
}

/// Returns false (and says why) when /dev/kvm cannot be used here.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skipped(&format!("/dev/kvm cannot be opened: {e}"));
            false
        }
    }
}

/// A config for a tiny guest: 16 MiB, one vCPU, console kept in memory.
pub fn tiny_config(guest: &Path) -> vmm::VmConfig {
    let mut c = vmm::VmConfig::new(guest);
    c.mem_mib = 16;
    c.serial = vmm::SerialSink::Memory {
        capacity: 64 * 1024,
    };
    c
}

/// Says that a test did not run and why, straight to the process's stderr: past the test
/// harness's capture, which hides `eprintln!` of passing tests.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// Runs the ignored test `name` of the current test binary alone in a child process, with
/// `envs` added to its environment, and asserts that it passed: how a test restores a snapshot
/// in a process of its own.
pub fn run_child_test(name: &str, envs: &[(&str, &std::ffi::OsStr)]) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(envs.iter().copied())
        .status()
        .unwrap();
    assert!(status.success(), "the child test {name} failed: {status}");
}
