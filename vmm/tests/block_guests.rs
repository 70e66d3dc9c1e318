//! The virtio-blk device driven by a tiny test guest with its own virtio-mmio driver
//! (tests/guests/blk_read.S): a read of a known sector of a read-only host image, a write the
//! device refuses, and a read past the end of the disk.

mod common;

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
    let mut content = vec![b'A'; 4 * 512];
    content[512..528].copy_from_slice(b"HELLO FROM DISK\n");
    content[1008..1024].copy_from_slice(b"END OF SECTOR 1\n");
    std::fs::write(&image, &content).unwrap();

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
