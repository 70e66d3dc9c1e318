//! `sge_virtualizer check`: finds each misconfiguration of a host with a clear message and exits
//! non-zero, exits 0 on a correct host, and as a Grid Engine load sensor reports the host's
//! `vm_ready`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::{repo_root, report_skip, sge_virtualizer_bin};

/// A settings file in a root-owned private directory; None (after saying why) where the test
/// cannot run.
fn settings(test: &str, body: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    if !nix::unistd::geteuid().is_root() {
        report_skip(
            test,
            "needs root: the check insists on root-owned guest files",
        );
        return None;
    }
    let guest = repo_root().join("build/guest");
    if !guest.join("vmlinux").is_file() {
        report_skip(test, "no guest image in build/guest (scripts/setup.sh)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.toml");
    let body = body.replace("@GUEST@", &guest.display().to_string());
    let body = body.replace("@DIR@", &dir.path().display().to_string());
    std::fs::write(&path, body).unwrap();
    Some((dir, path))
}

const GOOD: &str = "kernel = \"@GUEST@/vmlinux\"\ninitramfs = \"@GUEST@/initramfs.cpio\"\n\
                    backend = \"qemu\"\nimage_store = \"@DIR@/images\"\n";

fn check(settings: &Path, extra: &[&str]) -> Output {
    Command::new(sge_virtualizer_bin())
        .arg("check")
        .arg("--settings")
        .arg(settings)
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_correct_host_passes() {
    let Some((_dir, path)) = settings("a_correct_host_passes", GOOD) else {
        return;
    };
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn each_misconfiguration_is_named_with_its_fix_and_fails_the_check() {
    let Some((dir, path)) = settings(
        "each_misconfiguration_is_named_with_its_fix_and_fails_the_check",
        &format!(
            "{GOOD}[queues.\"nokernel.q\"]\nkernel = \"@DIR@/missing/vmlinux\"\n\
             [queues.\"garbage.q\"]\nkernel = \"@DIR@/garbage\"\n\
             [queues.\"noimage.q\"]\nimage = \"nosuch\"\n\
             [queues.\"huge.q\"]\nmemory_mib = 67108864\n\
             [queues.\"good.q\"]\nmemory_mib = 512\n"
        ),
    ) else {
        return;
    };
    std::fs::write(dir.path().join("garbage"), b"not a kernel\n").unwrap();
    let out = check(&path, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for needle in [
        "nokernel.q: guest kernel",
        "missing/vmlinux",
        "garbage.q: guest kernel",
        "is not a guest kernel file",
        "noimage.q: the queue's OS image \"nosuch\"",
        "fix: build it",
        "huge.q: guest RAM 67108864 MiB",
        "fix: lower memory_mib",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    assert!(!said.contains("good.q"), "{said}");
    // One queue asked about: only its problems, and a correct queue passes.
    assert_eq!(check(&path, &["--queue", "good.q"]).status.code(), Some(0));
    let out = check(&path, &["--queue", "nokernel.q"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out).contains("garbage.q"));
}

#[test]
fn an_unparsable_or_user_writable_settings_file_fails_the_check() {
    let Some((_dir, path)) = settings(
        "an_unparsable_or_user_writable_settings_file_fails_the_check",
        "kernel = [\n",
    ) else {
        return;
    };
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("bad sge_virtualizer settings"),
        "{}",
        text(&out)
    );
    std::fs::write(
        &path,
        GOOD.replace(
            "@GUEST@",
            &repo_root().join("build/guest").display().to_string(),
        )
        .replace("@DIR@", "/nonexistent"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("can be changed by users other than its owner"),
        "{}",
        text(&out)
    );
}

fn load_sensor(settings: &Path) -> String {
    let mut child = Command::new(sge_virtualizer_bin())
        .args(["check", "--load-sensor", "--settings"])
        .arg(settings)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\n\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn as_a_load_sensor_it_reports_vm_ready_per_host() {
    let Some((dir, good)) = settings("as_a_load_sensor_it_reports_vm_ready_per_host", GOOD) else {
        return;
    };
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let host = host.split('.').next().unwrap().to_string();
    let report = load_sensor(&good);
    assert_eq!(
        report,
        format!("begin\n{host}:vm_ready:1\nend\n").repeat(2),
        "{report}"
    );
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        format!(
            "{}[queues.\"broken.q\"]\nkernel = \"/nonexistent/vmlinux\"\n",
            std::fs::read_to_string(&good).unwrap()
        ),
    )
    .unwrap();
    assert!(load_sensor(&broken).contains(&format!("{host}:vm_ready:0")));
}
