//! The virtio-blk device driven by a tiny test guest with its own virtio-mmio driver
//! (tests/guests/blk_read.S): a read of a known sector of a read-only host image, a write the
//! device refuses, and a read past the end of the disk; and a request posted before DRIVER_OK
//! (tests/guests/blk_early.S), served on the VMM thread with the seccomp filters installed.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{build_guest, kvm_available, tiny_config};
use vmm::{DiskConfig, ExitReason, Vm};

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn guest_reads_a_sector_and_writes_to_a_read_only_disk_fail() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let content = write_test_image(&image);

    let mut config = tiny_config(&build_guest("blk_read"));
    config.disks = vec![DiskConfig {
        path: image.clone(),
        read_only: true,
    }];
    let vm = Vm::start(config).unwrap();
    let reason = vm.wait_timeout(GUEST_TIMEOUT);
    let console = String::from_utf8_lossy(&vm.console_output().unwrap()).into_owned();
    assert_eq!(reason, Some(ExitReason::GuestReset), "console: {console}");
    // Status 1 = VIRTIO_BLK_S_IOERR.
    assert_eq!(
        console,
        "HELLO FROM DISK\nEND OF SECTOR 1\nOUT 1\nRANGE 1\nBLK DONE\n"
    );
    assert_eq!(std::fs::read(&image).unwrap(), content);
}

/// Writes the 4-sector test image: 'A's, with marks at the start and end of sector 1.
fn write_test_image(image: &Path) -> Vec<u8> {
    let mut content = vec![b'A'; 4 * 512];
    content[512..528].copy_from_slice(b"HELLO FROM DISK\n");
    content[1008..1024].copy_from_slice(b"END OF SECTOR 1\n");
    std::fs::write(image, &content).unwrap();
    content
}

const EARLY_CHILD_ENV: &str = "VMM_BLK_EARLY_CHILD";

/// Issue 12 item 2: a guest that posts a request before DRIVER_OK. Serving it at activation on
/// the vCPU thread (whose seccomp filter has no `pread64`) killed the whole process with SIGSYS;
/// so the VM runs in a child process (this test re-executed), and the parent checks that the
/// child lived and the request was served.
#[test]
fn a_request_posted_before_driver_ok_is_served_on_the_vmm_thread() {
    if std::env::var_os(EARLY_CHILD_ENV).is_some() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        write_test_image(&image);
        let mut config = tiny_config(&build_guest("blk_early"));
        assert!(config.seccomp, "the filters are what this test is about");
        config.disks = vec![DiskConfig {
            path: image,
            read_only: true,
        }];
        let vm = Vm::start(config).unwrap();
        let reason = vm.wait_timeout(GUEST_TIMEOUT);
        let console = String::from_utf8_lossy(&vm.console_output().unwrap()).into_owned();
        eprintln!("CHILD REASON {reason:?}");
        eprintln!("CHILD CONSOLE {console:?}");
        return;
    }
    if !kvm_available() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_request_posted_before_driver_ok_is_served_on_the_vmm_thread",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EARLY_CHILD_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        None,
        "the VMM process was killed (SIGSYS = {}); child stderr: {stderr}",
        libc::SIGSYS
    );
    assert!(out.status.success(), "child stderr: {stderr}");
    assert!(
        stderr.contains("CHILD REASON Some(GuestReset)"),
        "child stderr: {stderr}"
    );
    assert!(
        stderr.contains(r#"CHILD CONSOLE "EARLY HELLO FROM DISK\nEARLY DONE\n""#),
        "child stderr: {stderr}"
    );
}

#[test]
fn a_missing_disk_image_fails_the_start() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(&build_guest("blk_read"));
    config.disks = vec![DiskConfig {
        path: dir.path().join("missing.img"),
        read_only: true,
    }];
    let err = Vm::start(config).err().unwrap().to_string();
    assert!(err.contains("missing.img"), "{err}");
}
