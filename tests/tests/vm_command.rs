//! `sge_virtualizer vm`: the debugging entry to the embedded VMM boots a tiny test guest from
//! the vmm crate's sources, shows its serial output and reports the guest reset.

use std::path::PathBuf;
use std::process::Command;

use integration_tests::{repo_root, report_skip, sge_virtualizer_bin};

fn build_hello_guest() -> PathBuf {
    let src = repo_root().join("vmm/tests/guests");
    let out = std::env::temp_dir().join(format!("vm-command-hello-{}.elf", std::process::id()));
    let status = Command::new("gcc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,--build-id=none",
        ])
        .args(["-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments"])
        .arg(format!("-I{}", src.display()))
        .arg("-T")
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&out)
        .arg(src.join("hello.S"))
        .status()
        .expect("gcc builds the test guest");
    assert!(status.success());
    out
}

#[test]
fn vm_boots_a_tiny_guest_and_reports_its_reset() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        report_skip(
            "vm_boots_a_tiny_guest_and_reports_its_reset",
            "/dev/kvm cannot be opened here",
        );
        return;
    }
    let guest = build_hello_guest();
    let out = Command::new(sge_virtualizer_bin())
        .arg("vm")
        .arg("--kernel")
        .arg(&guest)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&guest);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from the tiny guest"));
    assert!(stderr.contains("guest reset (i8042)"), "{stderr}");
    assert!(stderr.contains("boot timer"), "{stderr}");
}
