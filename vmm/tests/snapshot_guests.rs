//! Snapshots of running tiny guests (tests/guests/counter*.S) and their restore, under KVM: a
//! counting guest snapshotted mid-run resumes in a new process from the next number, with no
//! gap and no repeat; two vCPUs both resume; damaged, foreign or incompatible snapshot files are
//! refused with the error that names the problem; a guest driving the virtio-balloon through its
//! queues resumes them where they were; a guest connected over vsock is told of the transport
//! reset and connects again. (Arbitrary bytes are the parser's unit tests'
//! and the `snapshot_file` fuzz target's.)

mod common;

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{build_guest, kvm_available, run_child_test, skipped, tiny_config};
use vmm::snapshot::format::{self, Header, SectionKind};
use vmm::snapshot::{cpu_compat, SnapshotError};
use vmm::{DiskConfig, ExitReason, Vm, VmConfig, VmError, VmHandle, VsockConfig};

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment of the child process that restores a snapshot (see `restore_child`).
const CHILD_SNAPSHOT: &str = "VMM_SNAPSHOT_TEST_RESTORE";
const CHILD_KERNEL: &str = "VMM_SNAPSHOT_TEST_KERNEL";
const CHILD_OUTPUT: &str = "VMM_SNAPSHOT_TEST_OUTPUT";
const CHILD_LINES: &str = "VMM_SNAPSHOT_TEST_LINES";

/// The tiny-guest configuration, balloon included (the first virtio device, in slot 0: driven
/// by counter_balloon.S, left alone by the other guests).
fn config(guest: &Path, vcpus: u8) -> VmConfig {
    let mut c = tiny_config(guest);
    c.vcpus = vcpus;
    assert!(c.balloon);
    c
}

fn console(vm: &VmHandle) -> String {
    String::from_utf8_lossy(&vm.console_output().unwrap_or_default()).into_owned()
}

/// The complete lines of `text` (a trailing partial line is left out).
fn complete_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop();
    lines
}

/// The counter of each complete line (its first word).
fn numbers(text: &str) -> Vec<u64> {
    complete_lines(text)
        .iter()
        .map(|l| {
            l.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a counter line: {l:?} in {text:?}"))
        })
        .collect()
}

fn wait_for_lines(vm: &VmHandle, at_least: usize) {
    wait_until(vm, |c| complete_lines(c).len() >= at_least);
}

/// Waits (within [`GUEST_TIMEOUT`]) until the console satisfies `done`.
fn wait_until(vm: &VmHandle, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !done(&console(vm)) {
        assert!(
            vm.exit_reason().is_none(),
            "guest stopped: {:?}; console {:?}",
            vm.exit_reason(),
            console(vm)
        );
        assert!(Instant::now() < deadline, "guest stopped counting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The console before the snapshot and after the restore, joined, must count 1, 2, 3... with
/// no gap and no repeat, and the restored part must carry on where the snapshot was taken.
fn assert_continues(before: &str, after: &str) {
    assert!(!after.contains("MISMATCH"), "restored guest: {after:?}");
    let joined = format!("{before}{after}");
    let n = numbers(&joined);
    let expected: Vec<u64> = (1..=n.len() as u64).collect();
    assert_eq!(
        n, expected,
        "before the snapshot: {before:?}\nafter the restore: {after:?}"
    );
    let seen_before = complete_lines(before).len();
    assert!(
        n.len() > seen_before,
        "the restored guest printed nothing new: {after:?}"
    );
}

/// Runs `guest` until it printed `lines` lines, snapshots it to a new file in `dir`, checks the
/// VM stays paused, stops it. Returns the snapshot and the console at the snapshot.
fn snapshot_running_guest(guest: &Path, vcpus: u8, lines: usize, dir: &Path) -> (PathBuf, String) {
    let vm = Vm::start(config(guest, vcpus)).unwrap();
    // With several vCPUs, also until the second has counted (" +" lines): it starts later,
    // seconds later in the nested real-KVM host.
    wait_until(&vm, |c| {
        complete_lines(c).len() >= lines && (vcpus < 2 || c.contains(" +\n"))
    });
    let path = dir.join("vm.snap");
    let info = vm.snapshot(&path).unwrap();
    let before = console(&vm);
    eprintln!(
        "snapshot: {} bytes, {} of {} RAM bytes in {} runs, {} vCPUs, {}",
        info.file_bytes,
        info.memory_bytes_stored,
        info.guest_ram_bytes,
        info.memory_ranges,
        info.vcpus,
        info.build_id
    );
    assert_eq!(info.vcpus, vcpus);
    assert!(info.memory_bytes_stored > 0 && info.memory_bytes_stored < info.guest_ram_bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), info.file_bytes);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(console(&vm), before, "the VM ran after its snapshot");
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    (path, before)
}

/// The child process's part of `a_counting_guest_resumes_in_a_new_process_from_the_next_number`
/// (which runs it with `--ignored`): restores the snapshot it is given, lets it print some lines,
/// and writes its console to a file.
#[test]
#[ignore = "the child process of a_counting_guest_resumes_in_a_new_process_from_the_next_number"]
fn restore_child() {
    let (Some(snap), Some(kernel), Some(out), Some(lines)) = (
        std::env::var_os(CHILD_SNAPSHOT),
        std::env::var_os(CHILD_KERNEL),
        std::env::var_os(CHILD_OUTPUT),
        std::env::var(CHILD_LINES).ok(),
    ) else {
        panic!("run by a_counting_guest_resumes_in_a_new_process_from_the_next_number only");
    };
    let lines: usize = lines.parse().unwrap();
    let vm = Vm::restore(config(Path::new(&kernel), 1), &snap).unwrap();
    wait_for_lines(&vm, lines);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    std::fs::write(out, console(&vm)).unwrap();
}

#[test]
fn a_counting_guest_resumes_in_a_new_process_from_the_next_number() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter");
    let dir = tempfile::tempdir().unwrap();
    let (snap, before) = snapshot_running_guest(&guest, 1, 5, dir.path());

    let out = dir.path().join("restored-console");
    run_child_test(
        "restore_child",
        &[
            (CHILD_SNAPSHOT, snap.as_os_str()),
            (CHILD_KERNEL, guest.as_os_str()),
            (CHILD_OUTPUT, out.as_os_str()),
            (CHILD_LINES, std::ffi::OsStr::new("10")),
        ],
    );
    let after = std::fs::read_to_string(&out).unwrap();
    assert_continues(&before, &after);
}

/// A guest that does little but port I/O (counter_fast.S: a byte out, the UART's IIR in, which
/// clears what it reads): a snapshot lands on or next to a port access, whose instruction KVM
/// completes only on the next `KVM_RUN` (an IN on every KVM, an OUT on hardware KVM; measured on
/// kvm_pvm: about one snapshot in seven finds an IN pending), and the restored guest must
/// neither repeat nor lose one (a repeated IN reads 0xc1 and prints "IIR MISMATCH"); the UART's
/// IER and IIR must come back too. SNAPSHOTS snapshots of one VM, each at a different point, the
/// VM resumed after each (it must go on counting without a gap); then each is restored.
#[test]
fn a_guest_snapshotted_at_its_port_accesses_neither_repeats_nor_loses_one() {
    const SNAPSHOTS: u64 = 40;
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter_fast");
    let dir = tempfile::tempdir().unwrap();
    let big_console = || {
        let mut c = config(&guest, 1);
        c.serial = vmm::SerialSink::Memory { capacity: 16 << 20 };
        c
    };
    let vm = Vm::start(big_console()).unwrap();
    wait_for_lines(&vm, 20);
    let mut snapshots = Vec::new();
    for round in 0..SNAPSHOTS {
        let path = dir.path().join(format!("fast-{round}.snap"));
        vm.snapshot(&path).unwrap();
        snapshots.push((path, console(&vm)));
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_micros(round * 97 % 1000));
    }
    let seen = complete_lines(&console(&vm)).len();
    wait_for_lines(&vm, seen + 20);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert_continues("", &console(&vm));
    drop(vm);

    for (path, before) in snapshots {
        let restored = Vm::restore(big_console(), &path).unwrap();
        wait_for_lines(&restored, 20);
        restored.request_stop();
        assert_eq!(restored.wait(), ExitReason::HostRequest);
        assert_continues(&before, &console(&restored));
    }
}

/// Snapshots a VM of `config` running a counting `guest` at several points, resuming it after
/// each, then restores each snapshot: each restored guest must go on counting from where its
/// snapshot was taken.
fn snapshots_at_several_points_resume(guest: &Path, config: impl Fn() -> VmConfig) {
    const SNAPSHOTS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(config()).unwrap();
    wait_for_lines(&vm, 3);
    let mut snapshots = Vec::new();
    for round in 0..SNAPSHOTS {
        let path = dir.path().join(format!("{round}.snap"));
        vm.snapshot(&path).unwrap();
        snapshots.push((path, console(&vm)));
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_micros(round * 397 % 5000));
    }
    let seen = complete_lines(&console(&vm)).len();
    wait_for_lines(&vm, seen + 5);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert_continues("", &console(&vm));
    drop(vm);

    for (path, before) in snapshots {
        let restored = Vm::restore(config(), &path).unwrap();
        wait_for_lines(&restored, 5);
        restored.request_stop();
        assert_eq!(restored.wait(), ExitReason::HostRequest);
        assert_continues(&before, &console(&restored));
    }
    eprintln!("{SNAPSHOTS} snapshots of {} resumed", guest.display());
}

/// Issue 14, virtio device state: a guest that passes every number through the balloon's
/// deflate queue (counter_balloon.S) is snapshotted at several points and resumed after each,
/// then each snapshot is restored: the device comes back running with the queue where it was,
/// so the guest's used-index check holds and it goes on counting. A snapshot that caught a
/// notification in flight must not lose it (the guest would stop counting).
#[test]
fn a_guest_driving_the_balloon_resumes_its_queue_where_it_was() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter_balloon");
    let vm = Vm::start(config(&guest, 1)).unwrap();
    wait_for_lines(&vm, 1);
    let balloon = vm.balloon().expect("the VM has a balloon");
    assert!(balloon.driver_ok(), "{balloon:?}");
    drop(vm);
    snapshots_at_several_points_resume(&guest, || config(&guest, 1));
}

/// Issue 14, read-only disks: a guest that reads a sector of its disk for every number
/// (counter_blk.S) resumes its request queue after each restore; a restore with a disk of
/// another size, or a writable one, is refused.
#[test]
fn a_guest_reading_its_disk_resumes_and_another_disk_is_refused() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter_blk");
    let dir = tempfile::tempdir().unwrap();
    // Eight sectors, each starting with its number.
    let image = dir.path().join("disk.img");
    let mut bytes = vec![0u8; 8 * 512];
    for (n, sector) in bytes.chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(n as u64).to_le_bytes());
    }
    std::fs::write(&image, &bytes).unwrap();
    let with_disk = |path: &Path, read_only: bool| {
        let mut c = config(&guest, 1);
        c.disks = vec![DiskConfig {
            path: path.to_path_buf(),
            read_only,
        }];
        c
    };
    snapshots_at_several_points_resume(&guest, || with_disk(&image, true));

    let vm = Vm::start(with_disk(&image, true)).unwrap();
    wait_for_lines(&vm, 2);
    let snap = dir.path().join("disk.snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let larger = dir.path().join("larger.img");
    std::fs::write(&larger, [bytes.as_slice(), &[0u8; 512]].concat()).unwrap();
    match Vm::restore(with_disk(&larger, true), &snap) {
        Err(VmError::Snapshot(e @ SnapshotError::InvalidState(_))) => {
            assert!(e.to_string().contains("8 sectors, this one 9"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("restored with another disk"),
    }
    assert!(matches!(
        Vm::restore(with_disk(&image, false), &snap),
        Err(VmError::Snapshot(SnapshotError::UnsupportedDevice(d))) if d == "writable virtio-blk"
    ));
}

/// Accepts one connection on `listener` while `vm` runs, within [`GUEST_TIMEOUT`], and reads
/// from it until `expected` has arrived.
fn accept_and_read(listener: &UnixListener, vm: &VmHandle, expected: &str) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    vm.exit_reason().is_none() && Instant::now() < deadline,
                    "no connection from the guest ({:?}); console {:?}",
                    vm.exit_reason(),
                    console(vm)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the connection ended after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got), expected);
    conn
}

/// The configuration of vsock_reconnect.S: vsock (CID 3, host sockets at `uds`) and the
/// balloon, each with state a snapshot captures.
fn vsock_config(guest: &Path, uds: &Path) -> VmConfig {
    let mut c = config(guest, 1);
    c.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds.to_path_buf(),
    });
    c
}

/// Issue 14, vsock: a guest connected to the host over vsock (vsock_reconnect.S) is snapshotted
/// and restored with new host sockets. The connection's host end stayed with the first VMM, so
/// the restored device tells the guest that its connections are gone
/// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, in the buffer the guest left on the event queue), and
/// the guest connects again, to the new listener.
#[test]
fn a_vsock_guest_is_told_of_the_transport_reset_and_connects_again() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("vsock_reconnect");
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let listener = UnixListener::bind(dir.path().join("first_5000")).unwrap();
    let vm = Vm::start(vsock_config(&guest, &first)).unwrap();
    let _conn = accept_and_read(&listener, &vm, "before\n");
    wait_until(&vm, |c| c.contains("CONNECTED\n"));
    let snap = dir.path().join("vsock.snap");
    vm.snapshot(&snap).unwrap();
    let before = console(&vm);
    assert!(!before.contains("RESET"), "{before:?}");
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);

    let second = dir.path().join("second");
    let listener = UnixListener::bind(dir.path().join("second_5000")).unwrap();
    let vm = Vm::restore(vsock_config(&guest, &second), &snap).unwrap();
    let _conn = accept_and_read(&listener, &vm, "after\n");
    wait_until(&vm, |c| c.contains("RECONNECTED\n"));
    assert_eq!(console(&vm), "TRANSPORT RESET\nRECONNECTED\n");
    let vsock = vm.vsock().expect("the restored VM has vsock");
    assert!(vsock.driver_ok() && !vsock.needs_reset(), "{vsock:?}");
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
}

#[test]
fn two_vcpus_resume_in_a_fresh_vm() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter_smp");
    let dir = tempfile::tempdir().unwrap();
    let (snap, before) = snapshot_running_guest(&guest, 2, 8, dir.path());
    assert!(
        before.contains(" +\n"),
        "the second vCPU never counted before the snapshot: {before:?}"
    );

    let vm = Vm::restore(config(&guest, 2), &snap).unwrap();
    let seen = complete_lines(&before).len();
    wait_for_lines(&vm, 12);
    // A restored VM snapshots too; that snapshot restores in its turn.
    let again = dir.path().join("again.snap");
    vm.snapshot(&again).unwrap();
    let after = console(&vm);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert_continues(&before, &after);
    // Lines printed wholly after the restore show the second vCPU counting there too.
    let joined = format!("{before}{after}");
    let restored_lines = &complete_lines(&joined)[seen + 1..];
    assert!(
        restored_lines.iter().any(|l| l.ends_with(" +")),
        "the second vCPU did not count after the restore: {after:?}"
    );

    let vm = Vm::restore(config(&guest, 2), &again).unwrap();
    wait_for_lines(&vm, 4);
    vm.request_stop();
    assert_eq!(vm.wait(), ExitReason::HostRequest);
    assert_continues(&joined, &console(&vm));
}

/// The four sections' payloads of a snapshot file (the file is trusted: one we just wrote).
fn payloads(file: &[u8]) -> Vec<(usize, Vec<u8>)> {
    let mut at = format::PRELUDE_LEN as usize;
    let mut out = Vec::new();
    for _ in SectionKind::ORDER {
        let len = u64::from_le_bytes(file[at + 8..at + 16].try_into().unwrap()) as usize;
        let start = at + format::FRAME_LEN as usize;
        out.push((start, file[start..start + len].to_vec()));
        at = start + len;
    }
    assert_eq!(at, file.len());
    out
}

fn restore_error(guest: &Path, file: &[u8], dir: &Path, name: &str) -> SnapshotError {
    let path = dir.join(name);
    std::fs::write(&path, file).unwrap();
    match Vm::restore(config(guest, 1), &path) {
        Err(VmError::Snapshot(e)) => e,
        Err(e) => panic!("{name}: not a snapshot error: {e}"),
        Ok(_) => panic!("{name}: restored"),
    }
}

#[test]
fn damaged_foreign_and_incompatible_snapshots_are_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter");
    let dir = tempfile::tempdir().unwrap();
    let (snap, _) = snapshot_running_guest(&guest, 1, 2, dir.path());
    let good = std::fs::read(&snap).unwrap();
    let sections = payloads(&good);

    // Truncated anywhere: inside the prelude, a frame, each section, the last byte.
    let mut cuts = vec![0, 5, 12, 20];
    for (start, payload) in &sections {
        cuts.push(start - 3);
        cuts.push(start + payload.len() / 2);
    }
    cuts.push(good.len() - 1);
    for cut in cuts {
        let e = restore_error(&guest, &good[..cut], dir.path(), "cut");
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }

    // A flipped byte in each section.
    for (kind, (start, payload)) in SectionKind::ORDER.into_iter().zip(&sections) {
        let mut bad = good.clone();
        bad[start + payload.len() / 2] ^= 0x40;
        let e = restore_error(&guest, &bad, dir.path(), "flipped");
        assert!(
            matches!(&e, SnapshotError::ChecksumMismatch { section, .. } if *section == kind),
            "{kind}: {e}"
        );
        assert!(e.to_string().contains(&kind.to_string()), "{e}");
    }

    let mut bad = good.clone();
    bad[0] = b'X';
    let e = restore_error(&guest, &bad, dir.path(), "magic");
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = restore_error(&guest, &bad, dir.path(), "version");
    assert!(
        matches!(e, SnapshotError::VersionMismatch { found: 2, .. }),
        "{e}"
    );

    // A header re-encoded (and re-checksummed) with other contents.
    let parsed = format::parse_bytes(&good).unwrap();
    let with_header = |header: &Header| {
        let h = format::encode(header).unwrap();
        format::frame_file([&h, &sections[1].1, &sections[2].1, &sections[3].1])
    };
    assert_eq!(with_header(&parsed.header), good, "re-framing is exact");

    let mut header = parsed.header.clone();
    header.build_id = "vmm 0.0.0 state 0000000000000000".into();
    let e = restore_error(&guest, &with_header(&header), dir.path(), "build");
    assert!(
        matches!(&e, SnapshotError::BuildMismatch { snapshot, .. } if snapshot == &header.build_id),
        "{e}"
    );

    // A CPU feature this host's KVM lacks: the first feature bit missing here.
    let host = cpu_compat::host_supported_cpuid().unwrap();
    let absent = cpu_compat::FEATURE_REGISTERS.iter().find_map(|r| {
        let have = host
            .iter()
            .find(|e| e.function == r.leaf && e.index == r.subleaf)
            .map_or(0, |e| match r.register {
                cpu_compat::Register::Eax => e.eax,
                cpu_compat::Register::Ebx => e.ebx,
                cpu_compat::Register::Ecx => e.ecx,
                cpu_compat::Register::Edx => e.edx,
            });
        let missing = r.mask & !have;
        (missing != 0).then(|| (r, 1u32 << missing.trailing_zeros()))
    });
    match absent {
        None => skipped("this host's KVM supports every CPU feature bit compared"),
        Some((reg, bit)) => {
            let mut header = parsed.header.clone();
            let entry = match header
                .cpuid
                .iter_mut()
                .position(|e| e.function == reg.leaf && e.index == reg.subleaf)
            {
                Some(i) => &mut header.cpuid[i],
                None => {
                    header.cpuid.push(vmm::snapshot::vcpu_state::CpuidEntry {
                        function: reg.leaf,
                        index: reg.subleaf,
                        flags: 0,
                        eax: 0,
                        ebx: 0,
                        ecx: 0,
                        edx: 0,
                    });
                    header.cpuid.last_mut().unwrap()
                }
            };
            match reg.register {
                cpu_compat::Register::Eax => entry.eax |= bit,
                cpu_compat::Register::Ebx => entry.ebx |= bit,
                cpu_compat::Register::Ecx => entry.ecx |= bit,
                cpu_compat::Register::Edx => entry.edx |= bit,
            }
            let e = restore_error(&guest, &with_header(&header), dir.path(), "cpu");
            let SnapshotError::CpuIncompatible(missing) = &e else {
                panic!("{e}")
            };
            assert!(
                missing.iter().any(|m| m.leaf == reg.leaf
                    && m.subleaf == reg.subleaf
                    && m.register == reg.register
                    && m.bits == bit),
                "{e}"
            );
            eprintln!("refused as expected: {e}");
        }
    }

    // Not a regular file: refused, without blocking on a FIFO's open.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    match Vm::restore(config(&guest, 1), &fifo) {
        Err(VmError::Snapshot(e @ SnapshotError::Io { .. })) => {
            assert!(e.to_string().contains("not a regular file"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a FIFO restored"),
    }

    // The configuration must match the snapshot.
    let mut c = config(&guest, 1);
    c.mem_mib = 32;
    assert!(matches!(
        Vm::restore(c, &snap),
        Err(VmError::Snapshot(SnapshotError::ConfigMismatch(_)))
    ));
    let mut c = config(&guest, 1);
    c.balloon = false;
    match Vm::restore(c, &snap) {
        Err(VmError::Snapshot(e @ SnapshotError::ConfigMismatch(_))) => {
            assert!(e.to_string().contains("1 virtio devices"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("restored without the snapshot's balloon"),
    }
    let mut c = config(&guest, 1);
    c.disks = vec![disk_config(dir.path())];
    assert!(matches!(
        Vm::restore(c, &snap),
        Err(VmError::Snapshot(SnapshotError::UnsupportedDevice(d))) if d == "writable virtio-blk"
    ));
}

/// A 4 KiB writable disk in `dir` (a device snapshots do not capture: its contents are not in
/// the snapshot).
fn disk_config(dir: &Path) -> DiskConfig {
    let path = dir.join("disk.img");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    DiskConfig {
        path,
        read_only: false,
    }
}

#[test]
fn snapshots_never_overwrite_and_refuse_devices_they_cannot_capture() {
    if !kvm_available() {
        return;
    }
    let guest = build_guest("counter");
    let dir = tempfile::tempdir().unwrap();

    let mut c = config(&guest, 1);
    c.disks = vec![disk_config(dir.path())];
    let vm = Vm::start(c).unwrap();
    wait_for_lines(&vm, 1);
    let e = vm.snapshot(dir.path().join("disk.snap")).unwrap_err();
    assert!(
        matches!(&e, SnapshotError::UnsupportedDevice(d) if d == "writable virtio-blk"),
        "{e}"
    );
    assert!(!dir.path().join("disk.snap").exists());
    drop(vm);

    let vm = Vm::start(config(&guest, 1)).unwrap();
    wait_for_lines(&vm, 1);
    let existing = dir.path().join("existing");
    std::fs::write(&existing, b"precious").unwrap();
    let e = vm.snapshot(&existing).unwrap_err();
    assert!(matches!(e, SnapshotError::FileExists(_)), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
    let e = vm.snapshot(&link).unwrap_err();
    assert!(matches!(e, SnapshotError::FileExists(_)), "{e}");
    assert!(!dir.path().join("target").exists());
    // The VM was paused by the failed attempts and can resume.
    vm.resume().unwrap();
    let n = complete_lines(&console(&vm)).len();
    wait_for_lines(&vm, n + 1);
    vm.request_stop();
    vm.wait();
    assert!(matches!(
        vm.snapshot(dir.path().join("stopped.snap")),
        Err(SnapshotError::NotRunning)
    ));
}
