//! OS images and shared directories end to end: `sge_virtualizer image`
//! builds Debian images with debootstrap (cached in the image store: building twice is a
//! no-op), and `sge_virtualizer run --image NAME --cwd DIR --user USER` runs a real guest that
//! switches root into the image with the job's working directory shared from the host.
//!
//! Needs root (debootstrap, and `--user` to run the job and its VM as another user) and the
//! Debian mirror for the first build; a test that cannot have them prints `SKIPPED: <why>`.
//! The store is `$SGE_VIRTUALIZER_IMAGES`, else the default `/var/lib/sge_virtualizer/images`.
//!
//! The image and cwd tests run for both backends (`qemu::*`: 9p from QEMU's server;
//! `embedded::*`: virtio-fs from the VMM's own FUSE server); the embedded ones need hardware
//! virtualization and print `SKIPPED embedded::<test>` with the reason where there is none.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::{guest_image_dir, guest_run, report_skip, sge_virtualizer_bin};

/// Where a job user's VM helpers can be executed from (not root's ~/.cargo/bin).
const SHARED_VHOST_VSOCK: &str = "/usr/local/bin/vhost-device-vsock";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn store_dir() -> PathBuf {
    std::env::var_os("SGE_VIRTUALIZER_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/sge_virtualizer/images"))
}

/// Messages with which debootstrap reports that it cannot reach the mirror.
const MIRROR_UNREACHABLE: [&str; 6] = [
    "Failed getting release file",
    "Couldn't download",
    "Temporary failure resolving",
    "Could not resolve",
    "Network is unreachable",
    "Connection refused",
];

/// Builds (or finds) image `name` from `suite` in the store. `None`: the test must skip.
fn ensure_image(suite: &str, name: &str) -> Option<Output> {
    if !is_root() {
        report_skip("image_e2e", "building an OS image needs root (debootstrap)");
        return None;
    }
    let out = Command::new(sge_virtualizer_bin())
        .args(["image", "build", "--debootstrap", suite, name, "--store"])
        .arg(store_dir())
        .output()
        .expect("run sge_virtualizer image build");
    if out.status.success() {
        return Some(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if MIRROR_UNREACHABLE.iter().any(|m| stderr.contains(m)) {
        report_skip(
            "image_e2e",
            &format!("debootstrap cannot reach the Debian mirror: {stderr}"),
        );
        return None;
    }
    panic!("image build {suite} {name} failed: {out:?}");
}

/// The job user: `$SGE_VIRTUALIZER_TEST_USER`, else `sgetest` (made by scripts/sge-cell.sh),
/// else `nobody`.
fn job_user() -> nix::unistd::User {
    let names = std::env::var("SGE_VIRTUALIZER_TEST_USER")
        .ok()
        .into_iter()
        .chain(["sgetest".to_string(), "nobody".to_string()]);
    for name in names {
        if let Ok(Some(u)) = nix::unistd::User::from_name(&name) {
            return u;
        }
    }
    panic!("no job user: set SGE_VIRTUALIZER_TEST_USER");
}

/// A directory owned by `user` for the job to work in.
fn job_dir(user: &nix::unistd::User) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sge-image-e2e.")
        .tempdir()
        .expect("temp dir");
    std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .expect("chown job dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn run_cmd(store: &Path, args: &[&str]) -> Command {
    run_cmd_on("qemu", store, args)
}

fn run_cmd_on(backend: &str, store: &Path, args: &[&str]) -> Command {
    let mut cmd = guest_run(backend);
    cmd.arg("-n")
        .arg("--images")
        .arg(store)
        .args(args)
        .stdin(Stdio::null());
    if Path::new(SHARED_VHOST_VSOCK).is_file() {
        cmd.env("SGE_VIRTUALIZER_VHOST_VSOCK", SHARED_VHOST_VSOCK);
    }
    cmd
}

fn run(store: &Path, args: &[&str]) -> Output {
    run_on("qemu", store, args)
}

fn run_on(backend: &str, store: &Path, args: &[&str]) -> Output {
    run_cmd_on(backend, store, args)
        .output()
        .expect("run sge_virtualizer")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Names and sizes of everything under `dir`, to show that nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), meta.len()));
        }
    }
    out.sort();
    out
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "{out:?}");
    stdout(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A store in a temporary directory with image `name` whose file is `contents` and whose
/// manifest matches it.
fn store_with_image(name: &str, image_file: &Path) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = store.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(image_file, dir.join("rootfs.ext4")).unwrap();
    let manifest = serde_json::json!({
        "name": name,
        "suite": "test",
        "mirror": "",
        "variant": "minbase",
        "file": "rootfs.ext4",
        "fstype": "ext4",
        "size": std::fs::metadata(dir.join("rootfs.ext4")).unwrap().len(),
        "sha256": sha256(&dir.join("rootfs.ext4")),
        "created": "2026-01-01T00:00:00Z",
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    store
}

integration_tests::backend_suite!(
    qemu,
    "qemu",
    [
        a_job_in_a_bullseye_image_sees_debian_11_on_a_debian_12_host,
        a_job_reads_and_writes_its_cwd_on_the_host_as_the_job_user
    ]
);
integration_tests::backend_suite!(
    embedded,
    "embedded",
    [
        a_job_in_a_bullseye_image_sees_debian_11_on_a_debian_12_host,
        a_job_reads_and_writes_its_cwd_on_the_host_as_the_job_user
    ]
);

fn a_job_in_a_bullseye_image_sees_debian_11_on_a_debian_12_host(backend: &str) {
    let host = std::fs::read_to_string("/etc/debian_version").unwrap_or_default();
    if !host.starts_with("12") {
        report_skip(
            "image_e2e",
            &format!("the host is not Debian 12 (/etc/debian_version {host:?})"),
        );
        return;
    }
    let Some(first) = ensure_image("bullseye", "bullseye") else {
        return;
    };
    // Building again is a no-op.
    let again = ensure_image("bullseye", "bullseye").unwrap();
    assert!(
        stdout(&again).contains("already present"),
        "{first:?} / {again:?}"
    );

    let out = run_on(
        backend,
        &store_dir(),
        &[
            "--image",
            "bullseye",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/debian_version; readlink /bin/sh; /lib/x86_64-linux-gnu/libc.so.6 | head -n1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default();
    assert!(version.starts_with("11."), "debian_version {version:?}");
    // The image's own shell and C library, not the initramfs's busybox.
    assert_eq!(lines.next(), Some("dash"), "{text}");
    let libc = lines.next().unwrap_or_default();
    assert!(libc.contains("2.31"), "bullseye's glibc is 2.31: {libc:?}");
}

fn a_job_reads_and_writes_its_cwd_on_the_host_as_the_job_user(backend: &str) {
    if ensure_image("bullseye", "bullseye").is_none() {
        return;
    }
    let user = job_user();
    let dir = job_dir(&user);
    let cwd = dir.path();
    std::fs::write(cwd.join("input.txt"), "hello from the host\n").unwrap();
    std::os::unix::fs::chown(
        cwd.join("input.txt"),
        Some(user.uid.as_raw()),
        Some(user.gid.as_raw()),
    )
    .unwrap();
    std::fs::write(cwd.join("root-only"), "secret\n").unwrap();
    std::fs::set_permissions(
        cwd.join("root-only"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    // `id -un`/`id -gn`: the image does not know the user; the agent adds the host's entries.
    let script = "set -e; id -u; id -g; id -un; id -gn; pwd; tr a-z A-Z < input.txt > output.txt; \
                  mkdir results; echo done > results/status; \
                  if cat root-only 2>/dev/null; then echo READ-ROOT-ONLY; else echo denied; fi";
    let out = run_on(
        backend,
        &store_dir(),
        &[
            "--image",
            "bullseye",
            "--user",
            &user.name,
            "--cwd",
            cwd.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let group = nix::unistd::Group::from_gid(user.gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_default();
    let expected = format!(
        "{}\n{}\n{}\n{group}\n{}\ndenied\n",
        user.uid,
        user.gid,
        user.name,
        cwd.display()
    );
    assert_eq!(stdout(&out), expected, "{out:?}");

    let output = cwd.join("output.txt");
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "HELLO FROM THE HOST\n"
    );
    for created in [output, cwd.join("results"), cwd.join("results/status")] {
        let meta = std::fs::metadata(&created).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (user.uid.as_raw(), user.gid.as_raw()),
            "{} belongs to the job user",
            created.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(cwd.join("root-only")).unwrap(),
        "secret\n"
    );
}

#[test]
fn a_caller_who_is_not_root_shares_its_cwd_as_itself() {
    if ensure_image("bullseye", "bullseye").is_none() {
        return;
    }
    let user = job_user();
    let bin = sge_virtualizer_bin();
    let guest = guest_image_dir();
    // The user must reach the binary, the guest image and the VM helpers.
    let reachable = Command::new("runuser")
        .args(["-u", &user.name, "--", "test", "-x"])
        .arg(&bin)
        .arg("-a")
        .arg("-r")
        .arg(guest.join("vmlinux"))
        .status()
        .is_ok_and(|s| s.success());
    if !reachable {
        println!(
            "SKIPPED: {} cannot execute {} or read {} (runuser missing or private build \
             directories)",
            user.name,
            bin.display(),
            guest.display()
        );
        return;
    }
    let dir = job_dir(&user);
    let cmd = run_cmd(
        &store_dir(),
        &[
            "--image",
            "bullseye",
            "--cwd",
            dir.path().to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "id -u; echo made > made",
        ],
    );
    // Re-run the same command line through runuser as the job user.
    let mut as_user = Command::new("runuser");
    as_user.args(["-u", &user.name, "--", "env"]);
    for (k, v) in cmd.get_envs() {
        if let (k, Some(v)) = (k.to_string_lossy(), v) {
            as_user.arg(format!("{k}={}", v.to_string_lossy()));
        }
    }
    as_user.arg(cmd.get_program()).args(cmd.get_args());
    let out = as_user.stdin(Stdio::null()).output().expect("runuser");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), format!("{}\n", user.uid));
    let meta = std::fs::metadata(dir.path().join("made")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid.as_raw(), user.gid.as_raw())
    );
}

#[test]
fn two_jobs_in_different_images_run_at_the_same_time() {
    if ensure_image("bullseye", "bullseye").is_none()
        || ensure_image("bookworm", "bookworm").is_none()
    {
        return;
    }
    let user = job_user();
    let dir = job_dir(&user);
    let cwd = dir.path().to_str().unwrap().to_string();
    // Each job announces itself and waits (at most 120 s) for the other: both finish only if
    // they ran at the same time.
    let job = |image: &str, me: &str, other: &str| {
        let script = format!(
            "touch {me}; i=0; while [ ! -e {other} ]; do sleep 0.1; i=$((i+1)); \
             [ $i -lt 1200 ] || exit 3; done; cat /etc/debian_version"
        );
        run_cmd(
            &store_dir(),
            &[
                "--image", image, "--user", &user.name, "--cwd", &cwd, "--", "/bin/sh", "-c",
                &script,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sge_virtualizer")
    };
    let a = job("bullseye", "a", "b");
    let b = job("bookworm", "b", "a");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{a:?}");
    assert!(b.status.success(), "{b:?}");
    assert!(stdout(&a).starts_with("11."), "{a:?}");
    assert!(stdout(&b).starts_with("12."), "{b:?}");
}

#[test]
fn an_unknown_image_is_a_clear_error() {
    let store = tempfile::tempdir().unwrap();
    let out = run(
        store.path(),
        &["--image", "no-such-image", "--", "/bin/true"],
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("unknown OS image \"no-such-image\""), "{err}");
    let out = run(store.path(), &["--image", "../etc", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(stderr(&out).contains("invalid image name"), "{out:?}");
}

#[test]
fn a_corrupted_image_is_refused_before_the_vm_and_nothing_changes() {
    let Some(_) = ensure_image("bullseye", "bullseye") else {
        return;
    };
    let store = store_with_image("broken", &store_dir().join("bullseye/rootfs.ext4"));
    let file = store.path().join("broken/rootfs.ext4");
    // Flip one byte in the middle of the file system.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    drop(bytes);
    let user = job_user();
    let cwd = job_dir(&user);
    let before = (snapshot(store.path()), sha256(&file), snapshot(cwd.path()));

    let out = run(
        store.path(),
        &[
            "--image",
            "broken",
            "--user",
            &user.name,
            "--cwd",
            cwd.path().to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "touch ran",
        ],
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("OS image \"broken\" is corrupted"), "{err}");
    assert!(err.contains("SHA-256"), "{err}");
    let after = (snapshot(store.path()), sha256(&file), snapshot(cwd.path()));
    assert_eq!(before, after, "the store or the job's directory changed");
}

#[test]
fn an_image_without_a_file_system_fails_in_the_guest_with_a_clear_error() {
    let blank = tempfile::NamedTempFile::new().unwrap();
    blank.as_file().set_len(4 << 20).unwrap();
    let store = store_with_image("blank", blank.path());
    let out = run(store.path(), &["--image", "blank", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("Filesystems"), "{err}");
    assert!(err.contains("OS image /dev/vda (ext4, read-only)"), "{err}");
}

#[test]
fn image_list_and_rm() {
    let blank = tempfile::NamedTempFile::new().unwrap();
    blank.as_file().set_len(1 << 20).unwrap();
    let store = store_with_image("scratch", blank.path());
    let image = |args: &[&str]| {
        Command::new(sge_virtualizer_bin())
            .arg("image")
            .args(args)
            .arg("--store")
            .arg(store.path())
            .output()
            .unwrap()
    };
    let list = image(&["list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(stdout(&list).trim()).expect("one JSON manifest");
    assert_eq!(manifest["name"], "scratch");
    assert_eq!(manifest["size"], 1 << 20);
    assert!(image(&["verify", "scratch"]).status.success());
    let rm = image(&["rm", "scratch"]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(!store.path().join("scratch").exists());
    assert_eq!(stdout(&image(&["list"])), "");
    let again = image(&["rm", "scratch"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("unknown OS image"), "{again:?}");
}

#[test]
fn image_rm_refuses_an_image_a_running_job_uses() {
    let Some(_) = ensure_image("bullseye", "bullseye") else {
        return;
    };
    let store = store_with_image("held", &store_dir().join("bullseye/rootfs.ext4"));
    let rm = || {
        Command::new(sge_virtualizer_bin())
            .args(["image", "rm", "held", "--store"])
            .arg(store.path())
            .output()
            .unwrap()
    };
    let mut job = run_cmd(
        store.path(),
        &[
            "--image",
            "held",
            "--",
            "/bin/sh",
            "-c",
            "echo up; sleep 8; cat /etc/debian_version",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start sge_virtualizer");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(job.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "up\n", "the job did not start");
    let refused = rm();
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        stderr(&refused).contains("in use by a running job"),
        "{refused:?}"
    );
    let out = job.wait_with_output().unwrap();
    assert!(out.status.success(), "the job: {out:?}");
    assert!(stdout(&out).starts_with("11."), "{out:?}");
    let removed = rm();
    assert!(removed.status.success(), "{removed:?}");
    assert!(!store.path().join("held").exists());
}

#[test]
fn an_unreachable_mirror_is_a_clear_build_error_that_leaves_no_image() {
    if !is_root() {
        report_skip("image_e2e", "building an OS image needs root (debootstrap)");
        return;
    }
    let bin = sge_virtualizer_bin();
    let store = tempfile::tempdir().unwrap();
    // The leftovers of a killed build of the same name, with something still mounted inside
    // (as debootstrap leaves /proc and device bind mounts): detached and removed first.
    let stale = store.path().join(".build-nomirror-999999/root/proc");
    std::fs::create_dir_all(&stale).unwrap();
    let mounted = nix::mount::mount(
        Some("tmpfs"),
        &stale,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .is_ok();
    if !mounted {
        println!("NOTE: cannot mount a tmpfs here; the stale build is checked without a mount");
    }
    // Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    let out = Command::new(bin)
        .args(["image", "build", "--debootstrap", "bullseye", "nomirror"])
        .args(["--mirror", "http://127.0.0.1:9/debian", "--store"])
        .arg(store.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("building OS image \"nomirror\": debootstrap failed"),
        "{err}"
    );
    assert!(err.contains("Failed getting release file"), "{err}");
    let left: Vec<String> = std::fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".nomirror.lock")
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&stale.display().to_string()),
        "the stale mount is still there"
    );
}
