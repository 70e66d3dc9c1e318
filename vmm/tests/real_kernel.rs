//! Slow smoke tests with the project's real guest kernel in the embedded VMM:
//!
//! * it boots to "Run /init as init process" on the serial console, and its virtio-vsock driver
//!   brings the device to DRIVER_OK;
//! * without an initramfs, it mounts a host directory served by the VMM's virtio-fs device as
//!   its root (`root=<tag> rootfstype=virtiofs`) and executes `/sbin/init` from it: the kernel's
//!   own FUSE client (INIT, LOOKUP, GETATTR, OPEN, READ) against our device and server, whose
//!   threads run as `nobody` when the test runs as root (as under a Grid Engine shepherd).
//!   Kernel code only, so it runs even where KVM cannot run a Linux user space;
//! * without an initramfs, it mounts an ext4 image on the VMM's read-only virtio-blk disk as
//!   its root (`root=/dev/vda`) and executes `/sbin/init` from it.
//!
//! On hosts whose KVM emulates guest kernel code in software (kvm_pvm, no vmx/svm) this takes
//! minutes and needs workarounds for instructions the emulator lacks: they are applied here
//! only, not in the default product path — `noxsave clearcpuid=smap,smep,popcnt,cx16` on the
//! command line and the same features hidden from CPUID by the VMM (plus the guest kernel's
//! int3 self-test patch, which is the guest image's business).
//!
//! The kernel is `$SGE_VM_KERNEL` or `<workspace>/build/guest/vmlinux` (built by
//! `scripts/build-guest-image.sh`); without one the test prints SKIPPED and passes.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{run_child_test, skipped};

use vmm::{
    CpuFeature, DiskConfig, SerialSink, ShareConfig, Vm, VmConfig, VsockConfig, DEFAULT_CMDLINE,
};

/// Under 10 minutes in CI even on an emulating host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(540);
const INIT_MARKER: &str = "Run /init as init process";

fn guest_kernel() -> Option<PathBuf> {
    let p = std::env::var_os("SGE_VM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/guest/vmlinux")
        });
    p.exists().then_some(p)
}

/// The kernel, where there is one and KVM can be used; says why not otherwise.
fn kernel_and_kvm() -> Option<PathBuf> {
    let Some(kernel) = guest_kernel() else {
        skipped("no guest kernel (set SGE_VM_KERNEL or run scripts/build-guest-image.sh)");
        return None;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skipped("/dev/kvm cannot be opened");
        return None;
    }
    Some(kernel)
}

/// 256 MiB, the console in memory, and the emulator workarounds (see the module docs), with
/// `extra` appended to the command line.
fn emulation_friendly_config(kernel: &std::path::Path, extra: &str) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.cmdline = format!("{DEFAULT_CMDLINE} noxsave clearcpuid=smap,smep,popcnt,cx16 {extra}");
    config.hidden_cpu_features = vec![
        CpuFeature::Xsave,
        CpuFeature::Smap,
        CpuFeature::Smep,
        CpuFeature::Popcnt,
        CpuFeature::Cmpxchg16b,
    ];
    config.mem_mib = 256;
    config.serial = SerialSink::Memory { capacity: 1 << 20 };
    config
}

#[test]
fn slow_real_kernel_smoke_boots_to_init_with_vsock_driver_ok() {
    let Some(kernel) = kernel_and_kvm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = emulation_friendly_config(&kernel, "");
    let initrd = kernel.with_file_name("initramfs.cpio");
    config.initrd = initrd.exists().then_some(initrd);
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    let start = Instant::now();
    let vm = Vm::start(config).unwrap();
    let console = || String::from_utf8_lossy(&vm.console_output().unwrap_or_default()).into_owned();
    let mut seen_init = None;
    let mut seen_driver_ok = None;
    while start.elapsed() < BOOT_TIMEOUT && (seen_init.is_none() || seen_driver_ok.is_none()) {
        if seen_init.is_none() && console().contains(INIT_MARKER) {
            seen_init = Some(start.elapsed());
        }
        if seen_driver_ok.is_none() && vm.vsock().unwrap().driver_ok() {
            seen_driver_ok = Some(start.elapsed());
        }
        if let Some(reason) = vm.exit_reason() {
            if seen_init.is_none() || seen_driver_ok.is_none() {
                panic!("guest stopped early ({reason}); console:\n{}", console());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let usage = vm.memory_usage().unwrap();
    eprintln!(
        "real-kernel smoke: process RSS {} KiB, guest RAM resident {} KiB, VMM overhead {} KiB",
        usage.process_rss_bytes / 1024,
        usage.guest_ram_resident_bytes / 1024,
        usage.vmm_overhead_bytes() / 1024
    );
    assert!(usage.guest_ram_resident_bytes <= usage.process_rss_bytes);
    vm.request_stop();
    let reason = vm.wait();
    let text = console();
    eprintln!("real-kernel smoke: init after {seen_init:?}, vsock DRIVER_OK after {seen_driver_ok:?}, end: {reason}");
    assert!(
        seen_driver_ok.is_some(),
        "vsock never reached DRIVER_OK; console:\n{text}"
    );
    assert!(
        seen_init.is_some(),
        "no '{INIT_MARKER}' within {BOOT_TIMEOUT:?}; console:\n{text}"
    );
}

#[test]
fn slow_real_kernel_smoke_mounts_a_virtio_fs_root_and_executes_init_from_it() {
    let Some(kernel) = kernel_and_kvm() else {
        return;
    };
    // A root with an /sbin/init that the kernel finds, opens and reads, but cannot execute
    // (no binary format matches): "... exists but couldn't execute it (error -8)", then a
    // panic, and panic=1 + reboot=k end the VM.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("sbin")).unwrap();
    let init = root.path().join("sbin/init");
    std::fs::write(&init, "not a program\n").unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut config = emulation_friendly_config(&kernel, "root=sgeroot rootfstype=virtiofs ro");
    config.shares = vec![ShareConfig {
        tag: "sgeroot".into(),
        path: root.path().to_path_buf(),
        read_only: true,
    }];
    // As under a Grid Engine shepherd (root): the VMM's threads, and so the file server, run
    // as the job user (here nobody, who owns the root directory).
    // The kernel tries /etc/init next: root's own, mode 0700, which the guest's root may
    // execute but the job user on the host may not open, so the host's answer (EACCES, -13)
    // shows whose identity the server has.
    let as_job_user = nix::unistd::geteuid().is_root();
    if as_job_user {
        const NOBODY: u32 = 65534;
        for path in [root.path(), &root.path().join("sbin"), &init] {
            std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let root_only = root.path().join("etc/init");
        std::fs::write(&root_only, "not a program either\n").unwrap();
        std::fs::set_permissions(
            &root_only,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        config.run_as = Some(vmm::ThreadCredentials {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![NOBODY],
        });
    }
    let start = Instant::now();
    let vm = Vm::start(config).unwrap();
    let console = || String::from_utf8_lossy(&vm.console_output().unwrap_or_default()).into_owned();
    const MOUNTED: &str = "VFS: Mounted root (virtiofs filesystem)";
    const EXECUTED: &str = "/sbin/init exists but couldn't execute it (error -8)";
    let ended = vm.wait_timeout(BOOT_TIMEOUT);
    let text = console();
    let share = &vm.shares()[0];
    eprintln!(
        "real-kernel virtio-fs root: {:?} after {:?}; {} FUSE requests, {} malformed chains",
        ended,
        start.elapsed(),
        share.requests(),
        share.malformed_chains()
    );
    for line in text
        .lines()
        .filter(|l| l.contains("virtiofs") || l.contains("init") && !l.contains("initcall"))
    {
        eprintln!("  console: {line}");
    }
    if ended.is_none() {
        vm.request_stop();
        vm.wait();
    }
    assert!(text.contains(MOUNTED), "no '{MOUNTED}'; console:\n{text}");
    assert!(text.contains(EXECUTED), "no '{EXECUTED}'; console:\n{text}");
    if as_job_user {
        const REFUSED: &str = "/etc/init exists but couldn't execute it (error -13)";
        assert!(text.contains(REFUSED), "no '{REFUSED}'; console:\n{text}");
    }
    // INIT, and at least a LOOKUP of sbin and of init, an OPEN and a READ.
    assert!(share.requests() >= 5, "{share:?}");
    assert_eq!(share.malformed_chains(), 0);
}

#[test]
fn slow_real_kernel_smoke_mounts_an_ext4_root_from_virtio_blk_and_executes_init_from_it() {
    let Some(kernel) = kernel_and_kvm() else {
        return;
    };
    // An ext4 image made as the OS images are (`mkfs.ext4 -d`, no loop mount), with an
    // /sbin/init the kernel finds, reads and cannot execute.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sbin")).unwrap();
    let init = tree.join("sbin/init");
    std::fs::write(&init, "not a program\n").unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = dir.path().join("root.ext4");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("8M")
        .output();
    match mkfs {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("mkfs.ext4 failed: {out:?}"),
        Err(e) => {
            skipped(&format!(
                "mkfs.ext4 cannot run ({e}); e2fsprogs is not installed"
            ));
            return;
        }
    }
    let mut config = emulation_friendly_config(&kernel, "root=/dev/vda rootfstype=ext4 ro");
    config.disks = vec![DiskConfig {
        path: image,
        read_only: true,
    }];
    let start = Instant::now();
    let vm = Vm::start(config).unwrap();
    let ended = vm.wait_timeout(BOOT_TIMEOUT);
    let text = String::from_utf8_lossy(&vm.console_output().unwrap_or_default()).into_owned();
    eprintln!(
        "real-kernel ext4 root on virtio-blk: {ended:?} after {:?}",
        start.elapsed()
    );
    for line in text
        .lines()
        .filter(|l| l.contains("vda") || l.contains("EXT4") || l.contains("/sbin/init"))
    {
        eprintln!("  console: {line}");
    }
    if ended.is_none() {
        vm.request_stop();
        vm.wait();
    }
    const MOUNTED: &str = "VFS: Mounted root (ext4 filesystem) readonly";
    const EXECUTED: &str = "/sbin/init exists but couldn't execute it (error -8)";
    assert!(text.contains(MOUNTED), "no '{MOUNTED}'; console:\n{text}");
    assert!(text.contains(EXECUTED), "no '{EXECUTED}'; console:\n{text}");
}

/// Environment of the child process that restores the real-kernel snapshot (see
/// `real_kernel_restore_child`).
const CHILD_SNAPSHOT: &str = "VMM_REAL_KERNEL_SNAPSHOT";
const CHILD_KERNEL: &str = "VMM_REAL_KERNEL_KERNEL";
const CHILD_OUTPUT: &str = "VMM_REAL_KERNEL_OUTPUT";
const CHILD_SHARE: &str = "VMM_REAL_KERNEL_SHARE";
/// Ticks the restored guest must print, and how long it may take.
const TICKS_AFTER_RESTORE: usize = 10;
const RESTORED_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the ticking guest may take to boot to its third tick, and then to report free
/// memory: with [`RESTORED_TIMEOUT`], well inside the nested tier's 480 s for the group, so a
/// failure shows its console rather than a killed group.
const TICKING_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const REPORT_TIMEOUT: Duration = Duration::from_secs(90);

/// The console of `vm`, for messages.
fn console_text(vm: &vmm::VmHandle) -> String {
    String::from_utf8_lossy(&vm.console_output().unwrap_or_default()).into_owned()
}

/// Waits until the balloon of `vm` has given back more than `more_than` pages on the guest's
/// reports, within `deadline`; panics with the console and the balloon's state otherwise.
fn wait_for_reports(vm: &vmm::VmHandle, deadline: Instant, more_than: u64, when: &str) {
    let balloon = vm.balloon().expect("a balloon");
    while balloon.state().reported_pages <= more_than {
        assert!(
            Instant::now() < deadline && vm.exit_reason().is_none(),
            "no free page report {when} ({:?}): {balloon:?}; console:\n{}",
            vm.exit_reason(),
            console_text(vm)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tag of the ticking guest's share.
const TICK_SHARE: &str = "ticks";

/// A real Linux guest whose init (busybox sh) mounts the host directory `share` (virtio-fs),
/// opens `ticks` there for appending once, and then every 100 ms prints "tick N" on the
/// console and appends "N" through that open file, and every tenth tick writes and removes a
/// 64 MiB file in its tmpfs (memory freed in whole 2 MiB blocks, which free page reporting
/// gives back: what is left free after boot is reported once, not again); with the
/// virtio-balloon and free page reporting, and a virtio-vsock device (host sockets at `uds`)
/// that nothing in the guest uses but its driver. 256 MiB, 1 vCPU, the product's command line
/// (no emulator workarounds: this test needs a KVM that runs Linux).
fn ticking_guest_config(
    kernel: &std::path::Path,
    uds: &std::path::Path,
    share: &std::path::Path,
) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.shares = vec![ShareConfig {
        tag: TICK_SHARE.into(),
        path: share.to_path_buf(),
        read_only: false,
    }];
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds.to_path_buf(),
    });
    config.initrd = Some(kernel.with_file_name("initramfs.cpio"));
    // Free page reporting needs 64 MiB free above the low watermark (32 blocks of 2 MiB).
    config.mem_mib = 256;
    config.serial = SerialSink::Memory { capacity: 1 << 20 };
    assert!(config.balloon);
    config.cmdline = format!(
        "{DEFAULT_CMDLINE} quiet rdinit=/bin/busybox -- sh -c \
         \"mount -t devtmpfs dev /dev; mount -t virtiofs {TICK_SHARE} /mnt; \
         exec 3>>/mnt/ticks; n=0; while :; do n=$((n+1)); echo tick $n; echo $n >&3; \
         if [ $((n % 10)) = 0 ]; then dd if=/dev/zero of=/tmp/f bs=1M count=64 2>/dev/null; \
         rm /tmp/f; fi; usleep 100000; done\""
    );
    config
}

/// The numbers of the complete "tick N" lines of `text`, in order (other console lines, such
/// as kernel messages, are left out).
fn ticks(text: &str) -> Vec<u64> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop();
    lines
        .iter()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick "))
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("bad tick {n:?} in {text:?}"))
        })
        .collect()
}

/// Polls `done` every 100 ms until `deadline`; panics with the console if the VM stops.
fn wait_for(vm: &vmm::VmHandle, deadline: Instant, what: &str, done: impl Fn(&str) -> bool) {
    loop {
        let text = console_text(vm);
        if done(&text) {
            return;
        }
        if let Some(reason) = vm.exit_reason() {
            panic!("guest stopped ({reason}) before {what}; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in time; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The child process's part of `real_kernel_snapshot_resumes_in_a_new_process_with_its_devices`
/// (which runs it with `--ignored`): restores the snapshot, waits for more ticks and for the
/// balloon to report free memory again, and writes the console and the balloon's counters.
#[test]
#[ignore = "the child process of real_kernel_snapshot_resumes_in_a_new_process_with_its_devices"]
fn real_kernel_restore_child() {
    let (Some(snap), Some(kernel), Some(out), Some(share)) = (
        std::env::var_os(CHILD_SNAPSHOT),
        std::env::var_os(CHILD_KERNEL),
        std::env::var_os(CHILD_OUTPUT),
        std::env::var_os(CHILD_SHARE),
    ) else {
        panic!("run by real_kernel_snapshot_resumes_in_a_new_process_with_its_devices only");
    };
    let dir = tempfile::tempdir().unwrap();
    let restored_at = Instant::now();
    let config = ticking_guest_config(
        std::path::Path::new(&kernel),
        &dir.path().join("v.sock"),
        std::path::Path::new(&share),
    );
    let vm = Vm::restore(config, &snap).unwrap();
    let balloon = vm.balloon().expect("a balloon").clone();
    let at_restore = balloon.state();
    wait_for(
        &vm,
        restored_at + RESTORED_TIMEOUT,
        "ticks after the restore",
        |c| ticks(c).len() >= TICKS_AFTER_RESTORE,
    );
    assert!(balloon.driver_ok(), "{balloon:?}");
    // Linux's vsock driver took the transport reset and goes on with the device.
    let vsock = vm.vsock().expect("vsock");
    assert!(vsock.driver_ok() && !vsock.needs_reset(), "{vsock:?}");
    // The guest goes on reporting what it frees (every tenth tick frees 64 MiB).
    wait_for_reports(
        &vm,
        Instant::now() + REPORT_TIMEOUT,
        at_restore.reported_pages,
        "after the restore",
    );
    let after = balloon.state();
    vm.request_stop();
    assert_eq!(vm.wait(), vmm::ExitReason::HostRequest);
    let console = console_text(&vm);
    std::fs::write(
        out,
        format!(
            "{} {} {}\n{console}",
            at_restore.reported_pages,
            after.reported_pages,
            restored_at.elapsed().as_millis()
        ),
    )
    .unwrap();
}

/// Issue 14: a real Linux guest (the project's kernel, busybox as init) with the virtio-balloon
/// and free page reporting running, a vsock driver, and a share on which it keeps a file open
/// for appending, is snapshotted and restored in a new process: its console output and the
/// share's file go on from the next tick (no gap, no repeat; the file through the handle opened
/// before the snapshot), the balloon's driver goes on reporting free memory through the
/// restored queues, and the vsock driver takes the transport reset and keeps its device
/// running. Needs a KVM that runs a Linux user space (the
/// nested real-KVM tier runs it).
#[test]
fn real_kernel_snapshot_resumes_in_a_new_process_with_its_devices() {
    let Some(kernel) = kernel_and_kvm() else {
        return;
    };
    let probe = vmm::probe::kvm_can_run_linux();
    if !probe.usable {
        skipped(&format!(
            "real_kernel_snapshot_resumes_in_a_new_process_with_its_devices: {} (scripts/test.sh \
             runs it on real KVM in a nested host: scripts/test-nested-kvm.sh)",
            probe.reason
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    let vm = Vm::start(ticking_guest_config(
        &kernel,
        &dir.path().join("v.sock"),
        share.path(),
    ))
    .unwrap();
    let deadline = Instant::now() + TICKING_BOOT_TIMEOUT;
    wait_for(&vm, deadline, "three ticks", |c| ticks(c).len() >= 3);
    wait_for_reports(&vm, Instant::now() + REPORT_TIMEOUT, 0, "after boot");
    let balloon = vm.balloon().expect("a balloon").clone();
    let snap = dir.path().join("linux.snap");
    let started = Instant::now();
    let info = vm.snapshot(&snap).unwrap();
    let took = started.elapsed();
    let before = console_text(&vm);
    let at_snapshot = balloon.state();
    vm.request_stop();
    assert_eq!(vm.wait(), vmm::ExitReason::HostRequest);
    eprintln!(
        "real-kernel snapshot: {} bytes ({} of {} RAM bytes in {} runs) in {took:?}; balloon {at_snapshot:?}",
        info.file_bytes, info.memory_bytes_stored, info.guest_ram_bytes, info.memory_ranges
    );

    let out = dir.path().join("restored");
    run_child_test(
        "real_kernel_restore_child",
        &[
            (CHILD_SNAPSHOT, snap.as_os_str()),
            (CHILD_KERNEL, kernel.as_os_str()),
            (CHILD_OUTPUT, out.as_os_str()),
            (CHILD_SHARE, share.path().as_os_str()),
        ],
    );
    let written = std::fs::read_to_string(&out).unwrap();
    let (counters, after) = written.split_once('\n').unwrap();
    eprintln!("real-kernel restore: reported pages at restore, at the end, ms: {counters}");
    let at_restore: u64 = counters.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        at_restore, at_snapshot.reported_pages,
        "the balloon's counters come back with it"
    );
    let joined = format!("{before}{after}");
    let all = ticks(&joined);
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(
        all, expected,
        "before the snapshot:\n{before}\nafter the restore:\n{after}"
    );
    assert!(
        all.len() >= ticks(&before).len() + TICKS_AFTER_RESTORE,
        "{after}"
    );
    // The file the guest kept open on its share went on too: every number once, in order,
    // up to the last tick printed (or the one before, if the VM stopped in between).
    let file = std::fs::read_to_string(share.path().join("ticks")).unwrap();
    let numbers: Vec<u64> = file.lines().map(|l| l.parse().unwrap()).collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "the share's file: {file:?}");
    let last = *all.last().unwrap();
    assert!(
        numbers.len() as u64 + 1 >= last,
        "the file has {} numbers, the console {last}",
        numbers.len()
    );
}
