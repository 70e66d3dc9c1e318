//! Duties of PID 1 in the guest: the file systems a job expects, and ending the VM.

use nix::mount::{mount, MsFlags};

/// The embedded VMM's boot-timer I/O port and magic byte (`vmm::BOOT_TIMER_PORT` /
/// `vmm::BOOT_TIMER_MAGIC`; the shepherd's tests check they agree). Other backends have
/// nothing at this port, and a write there is ignored.
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Tells the VMM that the guest reached user space: one byte to the boot-timer port.
pub fn signal_boot_timer() {
    // SAFETY: ioperm only changes this process's I/O permission bitmap for one port.
    if unsafe { libc::ioperm(BOOT_TIMER_PORT.into(), 1, 1) } != 0 {
        return;
    }
    // SAFETY: a single OUT to the boot-timer port, which ioperm just granted; it touches no
    // memory.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") BOOT_TIMER_PORT,
            in("al") BOOT_TIMER_MAGIC,
            options(nomem, nostack, preserves_flags)
        );
    }
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run. Already-mounted targets are
/// left alone; other failures are reported and the agent goes on (a job may not need them).
pub fn mount_basics() -> Vec<String> {
    let mut problems = Vec::new();
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mount {target}: {e}")),
        }
    }
    // /dev/ptmx must point into the new devpts instance for ptys to work.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    problems
}

/// Lets the job allocate as it could on its host. The guest's RAM is sized below the job's
/// address-space limit (`h_vmem` less the VMM's allowance), so the kernel's default heuristic
/// would refuse a single allocation that the host, with its larger memory, grants; with
/// overcommit always on, the job's own `RLIMIT_AS` decides, as on the host, and memory it
/// touches beyond the guest's is the OOM killer's (reported to the host with the exit).
pub fn overcommit_like_the_host() -> Option<String> {
    std::fs::write("/proc/sys/vm/overcommit_memory", b"1")
        .err()
        .map(|e| format!("vm.overcommit_memory: {e}"))
}

/// Ends the VM: kill everything left, flush file systems, reset. With `reboot=k` the embedded
/// VMM sees the i8042 reset; QEMU started with `-no-reboot` exits.
pub fn end_vm() -> ! {
    // SAFETY: kill(-1) from PID 1 signals every process except init itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot only returns on error; PID 1 exiting panics the kernel, which (panic=-1) also
    // resets the VM.
    std::process::exit(1)
}
