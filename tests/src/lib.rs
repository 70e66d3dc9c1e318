//! Shared helpers for the integration tests: where the built binaries and the guest image are.
//!
//! The guest image is built by `scripts/setup.sh` (see the README). A test that needs it and
//! does not find it fails with that instruction rather than passing silently.

use std::path::PathBuf;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `sge_virtualizer` binary built alongside the tests (`SGE_VIRTUALIZER_BIN` overrides).
pub fn sge_virtualizer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SGE_VIRTUALIZER_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps; the binary one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("sge_virtualizer");
    assert!(
        bin.is_file(),
        "{} not built: `cargo build -p shepherd` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The guest image directory (`build/guest`), checked to be complete.
pub fn guest_image_dir() -> PathBuf {
    let dir = repo_root().join("build/guest");
    for f in ["vmlinux", "initramfs.cpio"] {
        assert!(
            dir.join(f).is_file(),
            "guest image file {} missing: run scripts/setup.sh first (README)",
            dir.join(f).display()
        );
    }
    dir
}

/// The guest kernel's release string, from the image manifest.
pub fn guest_kernel_release() -> String {
    let manifest = std::fs::read_to_string(guest_image_dir().join("manifest.json"))
        .expect("build/guest/manifest.json");
    let v: serde_json::Value = serde_json::from_str(&manifest).expect("manifest is JSON");
    v["kernel_release"]
        .as_str()
        .expect("manifest has kernel_release")
        .to_string()
}

/// True where hardware virtualization (vmx/svm) is present, so KVM can run a Linux guest.
pub fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Says that a test did not run and why, where it is always seen: straight to the process's
/// stderr, past the test harness's output capture (which hides `eprintln!` of passing tests).
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Whether `backend` can run a Linux guest on this machine; says why not (as `SKIPPED
/// embedded::<test>` with the reason) where it cannot.
pub fn backend_runnable(backend: &str, test: &str) -> bool {
    if backend == "embedded" && !hardware_virtualization() {
        report_skip(
            &format!("embedded::{test}"),
            &format!(
                "no vmx/svm in /proc/cpuinfo, so KVM on this machine emulates guest kernel code \
                 in software and cannot run a Linux user space; the embedded backend's job path \
                 needs hardware virtualization (qemu::{test} ran instead; scripts/test.sh runs \
                 this one on real KVM in a nested host: scripts/test-nested-kvm.sh)"
            ),
        );
        return false;
    }
    true
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (after the command name, which may hold
/// spaces and parentheses).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The tests that run once per backend: `backend_suites!((qemu, "qemu"), (embedded,
/// "embedded"); [test_a, test_b])` makes `qemu::test_a`, `embedded::test_a`, ..., each calling
/// `test_a(backend)` where [`backend_runnable`] says the backend can run here.
#[macro_export]
macro_rules! backend_suites {
    ($(($module:ident, $backend:literal)),*; $tests:tt) => {
        $($crate::backend_suite!($module, $backend, $tests);)*
    };
}

/// One module of [`backend_suites!`].
#[macro_export]
macro_rules! backend_suite {
    ($module:ident, $backend:literal, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    if $crate::backend_runnable($backend, stringify!($test)) {
                        super::$test($backend);
                    }
                }
            )*
        }
    };
}

/// `sge_virtualizer run --backend BACKEND` booting the project's guest image (the kernel and
/// initramfs in [`guest_image_dir`]); the caller adds its options and the command.
pub fn guest_run(backend: &str) -> std::process::Command {
    let dir = guest_image_dir();
    let mut cmd = std::process::Command::new(sge_virtualizer_bin());
    cmd.args(["run", "--backend", backend])
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"));
    cmd
}
