//! What the VMM creates on the host by path (the console log, the vsock listener) is never
//! created through a symlink: a VMM started by root in a directory another user can write must
//! not overwrite the file that user's symlink points at.

mod common;

use std::path::Path;

use common::{build_guest, kvm_available, tiny_config};
use vmm::{SerialSink, Vm, VsockConfig};

/// A root-owned file and a symlink to it planted under `name` in `dir`.
fn plant(dir: &Path, name: &str) -> std::path::PathBuf {
    let victim = dir.join(format!("{name}.victim"));
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
    victim
}

#[test]
fn a_planted_console_log_symlink_is_not_written_through() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let victim = plant(dir.path(), "console.log");
    let mut config = tiny_config(&build_guest("hello"));
    config.serial = SerialSink::File {
        path: dir.path().join("console.log"),
        max_bytes: 1 << 20,
    };
    if let Ok(vm) = Vm::start(config) {
        vm.wait_timeout(std::time::Duration::from_secs(60));
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_planted_vsock_socket_symlink_is_neither_followed_nor_removed_through() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let victim = plant(dir.path(), "v.sock");
    let mut config = tiny_config(&build_guest("hello"));
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    let started = Vm::start(config);
    assert!(
        started.is_err(),
        "listened on a path someone else's symlink holds"
    );
    drop(started);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}
