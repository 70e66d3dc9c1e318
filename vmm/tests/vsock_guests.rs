//! The virtio-vsock device driven by tiny test guests with their own virtio-mmio driver
//! (tests/guests/virtio_vsock.inc): guest-initiated connections to `<uds>_<port>`, data both ways
//! across many credit windows, clean shutdown, host-initiated `CONNECT`, and hostile chains.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use common::{build_guest, kvm_available, tiny_config};
use vmm::{ExitReason, Vm, VmHandle, VsockConfig};

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn vsock_vm(guest: &str, uds: &Path) -> VmHandle {
    let mut config = tiny_config(&build_guest(guest));
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds.to_owned(),
    });
    Vm::start(config).unwrap()
}

fn console(vm: &VmHandle) -> String {
    String::from_utf8_lossy(&vm.console_output().unwrap()).into_owned()
}

fn accept_with_timeout(listener: &UnixListener, vm: &VmHandle) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline && vm.exit_reason().is_none(),
                    "guest never connected; console: {}",
                    console(vm)
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn guest_connection_reaches_host_listener_and_echoes_many_credit_windows() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let vm = vsock_vm("vsock_echo", &uds);
    let stream = accept_with_timeout(&listener, &vm);
    stream.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();

    // 96 KiB through a guest that advertises 8 KiB of buffer: 12+ credit windows.
    let payload: Vec<u8> = (0..96 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut writer = stream.try_clone().unwrap();
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        // Half-close: the guest sees SHUTDOWN(SEND) and closes its side.
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    (&stream).read_to_end(&mut echoed).unwrap(); // EOF once the guest closed and got its RST
    sender.join().unwrap();
    assert_eq!(echoed.len(), payload.len(), "console: {}", console(&vm));
    assert!(echoed == payload, "echoed data differs");

    assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::GuestReset));
    assert_eq!(console(&vm), "ECHO DONE\n");
    let vsock = vm.vsock().unwrap();
    assert_eq!(vsock.malformed_chains(), 0);
    // At least one RW per 4 KiB each way, plus the guest's credit updates.
    assert!(
        vsock.rx_packets() >= 24 && vsock.tx_packets() >= 48,
        "{vsock:?}"
    );
}

#[test]
fn host_connect_reaches_a_guest_listener() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let vm = vsock_vm("vsock_listen", &uds);
    let mut stream = UnixStream::connect(&uds).unwrap();
    stream.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    stream.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert_eq!(ok, "OK 1073741824\n", "console: {}", console(&vm));
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    assert_eq!(hello, "hello from guest\n");
    stream.write_all(b"ping from host\n").unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap(); // EOF: the guest closed the connection
    assert!(rest.is_empty());
    assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::GuestReset));
    assert_eq!(console(&vm), "ping from host\nLISTEN DONE\n");
    assert!(vm.vsock().unwrap().driver_ok());
}

#[test]
fn malformed_chains_are_dropped_and_a_broken_queue_needs_reset() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_5001", uds.display())).unwrap();
    let vm = vsock_vm("vsock_malformed", &uds);
    let _conn = accept_with_timeout(&listener, &vm);
    assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::GuestReset));
    assert_eq!(console(&vm), "CONNECTED\nNEEDS_RESET\n");
    let vsock = vm.vsock().unwrap();
    assert_eq!(vsock.malformed_chains(), 4, "{vsock:?}");
    assert!(vsock.needs_reset());
}
