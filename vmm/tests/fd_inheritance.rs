//! A running VM's descriptors (KVM, event fds, the vsock muxer's sockets, epoll, timers, the
//! console log) are close-on-exec: the embedding shepherd starts prologs, epilogs and control
//! methods (as the job user, or as root) while its VM runs, and none of them may inherit a
//! handle on the VM.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{build_guest, kvm_available, tiny_config};
use vmm::{SerialSink, Vm, VsockConfig};

/// The descriptors a freshly spawned child of this process holds, with what they point at.
fn descriptors_of_a_child() -> BTreeMap<u32, String> {
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `sleep` opens nothing itself: what /proc shows was inherited at exec.
    std::thread::sleep(Duration::from_millis(50));
    let dir = format!("/proc/{}/fd", child.id());
    let fds = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    fds
}

#[test]
fn a_child_started_while_the_vm_runs_inherits_none_of_its_descriptors() {
    if !kvm_available() {
        return;
    }
    // What a child inherits anyway (stdio, anything the test harness left open).
    let before = descriptors_of_a_child();

    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(&build_guest("vsock_listen"));
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    config.serial = SerialSink::File {
        path: dir.path().join("console.log"),
        max_bytes: 1 << 20,
    };
    let vm = Vm::start(config).unwrap();
    let during = descriptors_of_a_child();
    vm.request_stop();
    assert!(vm.wait_timeout(Duration::from_secs(30)).is_some());

    let leaked: Vec<_> = during
        .iter()
        .filter(|(fd, _)| !before.contains_key(fd))
        .collect();
    assert!(leaked.is_empty(), "the child inherited {leaked:?}");
}
