//! Imported OS images end to end: `sge_virtualizer image import` turns an OCI archive, made
//! here from local files (the host's static BusyBox; no registry, no network), into an image of
//! the store, and `sge_virtualizer run --image NAME` runs a real guest (QEMU backend) in it
//! that sees the layers applied: whiteouts, hard and symbolic links, setuid modes and owners.
//!
//! Needs root (importing keeps owners) and a static `/bin/busybox`; a test that cannot have
//! them prints `SKIPPED: <why>`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use integration_tests::{guest_image_dir, report_skip, sge_virtualizer_bin};
use sha2::{Digest, Sha256};

/// Where a job user's VM helpers can be executed from (not root's ~/.cargo/bin).
const SHARED_VHOST_VSOCK: &str = "/usr/local/bin/vhost-device-vsock";
const BUSYBOX: &str = "/bin/busybox";
const MTIME: u64 = 1_600_000_000;

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A layer's tar stream.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn entry(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        owner: (u64, u64),
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Layer {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str) -> &mut Layer {
        self.entry(tar::EntryType::Directory, path, 0o755, (0, 0), None, b"")
    }

    fn file(&mut self, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> &mut Layer {
        self.entry(tar::EntryType::Regular, path, mode, owner, None, data)
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Layer {
        self.entry(
            tar::EntryType::Symlink,
            path,
            0o777,
            (0, 0),
            Some(target),
            b"",
        )
    }

    fn hard_link(&mut self, path: &str, target: &str) -> &mut Layer {
        self.entry(tar::EntryType::Link, path, 0o755, (0, 0), Some(target), b"")
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

/// The image's config for `layers` (uncompressed: their digests are their diff IDs).
fn image_config(layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "IMAGE_ONLY=from-image", "HOME=/image-home"],
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// A tar archive of `files` (path, contents).
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut archive = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive.append_data(&mut h, path, &data[..]).unwrap();
    }
    archive.into_inner().unwrap()
}

/// The same image as `docker save` writes it: `manifest.json`, the config, a directory per
/// layer.
fn docker_archive(layers: &[Vec<u8>], reference: &str) -> Vec<u8> {
    let config = image_config(layers);
    let config_name = format!("{}.json", hex(&config));
    let layer_paths: Vec<String> = layers
        .iter()
        .map(|l| format!("{}/layer.tar", hex(l)))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": layer_paths,
    }]))
    .unwrap();
    let mut files = vec![
        ("manifest.json".to_string(), manifest),
        (config_name, config),
    ];
    files.extend(layer_paths.into_iter().zip(layers.iter().cloned()));
    tar_of(&files)
}

/// An OCI archive (a tar of an OCI image layout) of `layers`, tagged `reference`.
fn oci_archive(layers: &[Vec<u8>], reference: &str) -> Vec<u8> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    for layer in layers {
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{}", hex(layer)),
            "size": layer.len(),
        }));
        blobs.push((hex(layer), layer.clone()));
    }
    let config = image_config(layers);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", hex(&config)),
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", hex(&manifest)),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    }))
    .unwrap();
    blobs.push((hex(&config), config));
    blobs.push((hex(&manifest), manifest));
    let mut files = vec![
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_string(), index),
    ];
    files.extend(
        blobs
            .into_iter()
            .map(|(digest, data)| (format!("blobs/sha256/{digest}"), data)),
    );
    tar_of(&files)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn image_cmd(store: &Path, args: &[&str]) -> Output {
    Command::new(sge_virtualizer_bin())
        .arg("image")
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .expect("run sge_virtualizer image")
}

fn run_in(store: &Path, image: &str, script: &str) -> Output {
    run_as_in(store, image, None, script)
}

fn run_as_in(store: &Path, image: &str, user: Option<&str>, script: &str) -> Output {
    let guest = guest_image_dir();
    let mut cmd = Command::new(sge_virtualizer_bin());
    cmd.args(["run", "--backend", "qemu", "-n"]);
    if let Some(user) = user {
        cmd.args(["--user", user]);
    }
    cmd.arg("--kernel")
        .arg(guest.join("vmlinux"))
        .arg("--initrd")
        .arg(guest.join("initramfs.cpio"))
        .arg("--images")
        .arg(store)
        .args(["--image", image, "--", "/bin/sh", "-c", script])
        .stdin(Stdio::null());
    if Path::new(SHARED_VHOST_VSOCK).is_file() {
        cmd.env("SGE_VIRTUALIZER_VHOST_VSOCK", SHARED_VHOST_VSOCK);
    }
    cmd.output().expect("run sge_virtualizer")
}

/// A store directory as the administrator keeps it: root's, readable by all.
fn store() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = tmp.path().join("images");
    (tmp, store)
}

#[test]
fn a_job_runs_in_an_image_imported_from_an_oci_archive() {
    if !nix::unistd::geteuid().is_root() {
        report_skip("oci_import_e2e", "importing an OS image needs root");
        return;
    }
    let Ok(busybox) = std::fs::read(BUSYBOX) else {
        report_skip(
            "oci_import_e2e",
            "no /bin/busybox to build the test image from",
        );
        return;
    };
    let mut base = Layer::new();
    base.dir("bin")
        .file("bin/busybox", 0o755, (0, 0), &busybox)
        .dir("etc")
        .file(
            "etc/passwd",
            0o644,
            (0, 0),
            b"root:x:0:0:root:/root:/bin/sh\n",
        )
        .file("etc/group", 0o644, (0, 0), b"root:x:0:\n")
        .file(
            "etc/os-release",
            0o644,
            (0, 0),
            b"NAME=\"Rocky Linux\"\nID=rocky\nVERSION_ID=9.3\n",
        )
        .file(
            "etc/hello",
            0o644,
            (0, 0),
            b"hello from an imported image\n",
        )
        .file(
            "etc/obsolete",
            0o644,
            (0, 0),
            b"removed by the next layer\n",
        )
        .file("bin/su-test", 0o4755, (0, 0), b"#!/bin/sh\n")
        .dir("opt")
        .dir("opt/app")
        .file(
            "opt/app/old",
            0o644,
            (0, 0),
            b"replaced with its directory\n",
        )
        .dir("root");
    for applet in [
        "sh", "cat", "stat", "ls", "readlink", "echo", "id", "grep", "dmesg", "find", "sort",
        "xargs",
    ] {
        base.symlink(&format!("bin/{applet}"), "busybox");
    }
    let base = base.finish();
    let top = Layer::new()
        .file("etc/.wh.obsolete", 0o644, (0, 0), b"")
        .hard_link("bin/busybox-again", "bin/busybox")
        .dir("data")
        .file("data/owned", 0o640, (1234, 5678), b"owned\n")
        .dir("opt/app")
        .file("opt/app/.wh..wh..opq", 0o644, (0, 0), b"")
        .file("opt/app/new", 0o600, (42, 43), b"the second layer's\n")
        .symlink("opt/app/link", "../../data/owned")
        .finish();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.oci.tar");
    std::fs::write(&archive, oci_archive(&[base.clone(), top.clone()], "app:1")).unwrap();
    let docker = tmp.path().join("app.docker.tar");
    std::fs::write(&docker, docker_archive(&[base, top], "app:1")).unwrap();
    let (_keep, store) = store();

    let out = image_cmd(&store, &["import", archive.to_str().unwrap(), "app"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("app imported"), "{out:?}");
    let again = image_cmd(&store, &["import", archive.to_str().unwrap(), "app"]);
    assert!(again.status.success(), "{again:?}");
    assert!(stdout(&again).contains("already present"), "{again:?}");
    let list = image_cmd(&store, &["list"]);
    assert!(list.status.success(), "{list:?}");
    let line = stdout(&list);
    assert!(line.starts_with("app "), "{line}");
    assert!(
        line.contains("oci-archive:") && line.contains(" digest "),
        "{line}"
    );
    assert!(image_cmd(&store, &["verify", "app"]).status.success());

    let script = "cat /etc/hello; cat /etc/obsolete 2>/dev/null || echo obsolete gone; \
                  stat -c '%a %u:%g' /bin/su-test /data/owned; \
                  stat -c %h /bin/busybox; readlink /bin/sh; \
                  dmesg | grep -o -m 1 -E 'EXT4-fs \\(vda\\)|erofs: \\(device vda\\)'; echo done";
    let tree = |fstype: &str| {
        format!(
            "hello from an imported image\nobsolete gone\n4755 0:0\n640 1234:5678\n2\n\
             busybox\n{fstype}\ndone\n"
        )
    };
    // EROFS by default.
    let out = run_in(&store, "app", script);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), tree("erofs: (device vda)"), "{out:?}");
    // The same image as ext4 and as lz4-compressed EROFS: the same tree in the guest.
    for (format, mounted) in [
        ("ext4", "EXT4-fs (vda)"),
        ("erofs-lz4", "erofs: (device vda)"),
    ] {
        let name = format!("app-{format}");
        let out = image_cmd(
            &store,
            &[
                "import",
                archive.to_str().unwrap(),
                &name,
                "--format",
                format,
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let fstype = format.split('-').next().unwrap();
        assert!(stdout(&out).contains(&format!(" {fstype} ")), "{out:?}");
        let out = run_in(&store, &name, script);
        assert!(out.status.success(), "{format}: {out:?}");
        assert_eq!(stdout(&out), tree(mounted), "{format}: {out:?}");
    }
    // The `docker save` form of the same image.
    let out = image_cmd(&store, &["import", docker.to_str().unwrap(), "app-docker"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("docker-archive"), "{out:?}");

    // Every entry of the tree as a job sees it (mode, owner, link count, link target), ext4's
    // lost+found aside: exactly the second layer's tree (the opaque directory holds only its
    // entries), the same from either form and in every format.
    let listing = |name: &str| {
        let out = run_in(
            &store,
            name,
            "find / \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp \\) \
             -prune -o -print | grep -v '^/lost+found' | sort | xargs stat -c '%n %a %u:%g %h %N'",
        );
        assert!(out.status.success(), "{name}: {out:?}");
        stdout(&out)
    };
    let reference = listing("app");
    for line in [
        "/opt/app/new 600 42:43 1 /opt/app/new\n",
        "/opt/app/link 777 0:0 1 '/opt/app/link' -> '../../data/owned'\n",
        "/bin/busybox-again 755 0:0 2 /bin/busybox-again\n",
        "/bin/su-test 4755 0:0 1 /bin/su-test\n",
        "/data/owned 640 1234:5678 1 /data/owned\n",
    ] {
        assert!(reference.contains(line), "{line:?} not in {reference}");
    }
    assert!(!reference.contains("/opt/app/old"), "{reference}");
    assert!(!reference.contains("/etc/obsolete"), "{reference}");
    for name in ["app-ext4", "app-erofs-lz4", "app-docker"] {
        assert_eq!(listing(name), reference, "{name}");
    }

    // A user the image has never heard of, in an image that is not Debian: its os-release, the
    // user's name from `id`, the image's Env under the job's (the job's HOME wins).
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let out = run_as_in(
        &store,
        "app",
        Some("nobody"),
        ". /etc/os-release; echo $ID $VERSION_ID; id -un; echo image=$IMAGE_ONLY home=$HOME",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!(
            "rocky 9.3\nnobody\nimage=from-image home={}\n",
            nobody.dir.display()
        ),
        "{out:?}"
    );
}
