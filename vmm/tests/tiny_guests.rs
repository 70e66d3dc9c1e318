//! The embedded VMM running tiny test guests (tests/guests/*.S) under KVM: serial console, i8042
//! reset, boot timer, triple fault, host stop, pause/resume, several vCPUs, seccomp.

mod common;

use std::time::{Duration, Instant};

use common::{build_guest, kvm_available, tiny_config};
use vmm::{ExitReason, Vm};

const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn console(vm: &vmm::VmHandle) -> String {
    String::from_utf8_lossy(&vm.console_output().unwrap()).into_owned()
}

#[test]
fn serial_output_is_captured_and_i8042_reset_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("hello");
    let mut config = tiny_config(&guest);
    config.seccomp = false;
    let vm = Vm::start(config).unwrap();
    let reason = vm
        .wait_timeout(GUEST_TIMEOUT)
        .expect("guest did not finish");
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(console(&vm), "hello from the tiny guest\n");
}

#[test]
fn boot_timer_write_is_timestamped() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::start(tiny_config(&build_guest("hello"))).unwrap();
    assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::GuestReset));
    let ts = vm.timestamps();
    let (created, first, timer, exited) = (
        ts.created().unwrap(),
        ts.first_vcpu_run().unwrap(),
        ts.boot_timer().expect("boot timer not recorded"),
        ts.exited().unwrap(),
    );
    assert!(created <= first && first <= timer && timer <= exited);
    assert!(ts.boot_time().unwrap() < GUEST_TIMEOUT);
}

#[test]
fn triple_fault_is_reported_as_guest_shutdown() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::start(tiny_config(&build_guest("triple_fault"))).unwrap();
    assert_eq!(
        vm.wait_timeout(GUEST_TIMEOUT),
        Some(ExitReason::GuestShutdown)
    );
    assert_eq!(console(&vm), "T");
    assert!(vm.timestamps().boot_timer().is_none());
}

#[test]
fn host_request_stops_a_spinning_guest() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::start(tiny_config(&build_guest("ticker"))).unwrap();
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(200)),
        None,
        "ticker never ends"
    );
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

fn wait_for_ticks(vm: &vmm::VmHandle, at_least: usize) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while console(vm).len() < at_least {
        assert!(Instant::now() < deadline, "guest stopped ticking");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_stops_the_vcpus_and_resume_restarts_them() {
    if !kvm_available() {
        return;
    }
    let mut config = tiny_config(&build_guest("ticker"));
    config.vcpus = 2;
    let vm = Vm::start(config).unwrap();
    wait_for_ticks(&vm, 2);
    vm.pause().unwrap();
    let frozen = console(&vm).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console(&vm).len(), frozen, "guest ran while paused");
    vm.resume().unwrap();
    wait_for_ticks(&vm, frozen + 2);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert!(vm.pause().is_err(), "a stopped VM cannot pause");
}

#[test]
fn application_processors_waiting_for_sipi_are_torn_down_on_reset() {
    if !kvm_available() {
        return;
    }
    let mut config = tiny_config(&build_guest("hello"));
    config.vcpus = 4;
    let vm = Vm::start(config).unwrap();
    assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::GuestReset));
    assert_eq!(console(&vm), "hello from the tiny guest\n");
}

#[test]
fn memory_usage_separates_guest_ram_from_the_vmm() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::start(tiny_config(&build_guest("ticker"))).unwrap();
    wait_for_ticks(&vm, 1);
    let u = vm.memory_usage().unwrap();
    eprintln!(
        "tiny guest: process RSS {} KiB, guest RAM resident {} KiB of {} KiB, overhead {} KiB",
        u.process_rss_bytes / 1024,
        u.guest_ram_resident_bytes / 1024,
        u.guest_ram_bytes / 1024,
        u.vmm_overhead_bytes() / 1024
    );
    // The guest touched its boot tables, zero page, stack and code: some pages, not all 16 MiB.
    assert!(u.guest_ram_resident_bytes > 0 && u.guest_ram_resident_bytes < u.guest_ram_bytes);
    assert!(u.guest_ram_resident_bytes <= u.process_rss_bytes);
    vm.request_stop();
    vm.wait();
}

#[test]
fn a_missing_kernel_is_an_error_not_a_panic() {
    let err = Vm::start(vmm::VmConfig::new("/nonexistent/vmlinux"))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("vmlinux") || err.to_string().contains("KVM"),
        "{err}"
    );
    let mut c = vmm::VmConfig::new("/nonexistent/vmlinux");
    c.vcpus = 0;
    assert!(matches!(Vm::start(c), Err(vmm::VmError::InvalidConfig(_))));
}
