use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::image::ext4;
use crate::image::oci::SourceKind;
use crate::image::testing::{self, describe_tree, snapshot, Layer};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Two layers that use everything an import keeps: whiteouts, an opaque directory, hard and
/// symbolic links, setuid and setgid modes, owners, extended attributes, mtimes.
fn layers() -> Vec<Vec<u8>> {
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/hello", 0o644, b"hello from an imported image\n")
        .file("etc/os-release", 0o644, b"ID=testos\nVERSION_ID=\"1.2\"\n")
        .file("etc/obsolete", 0o644, b"old")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", 0o755, b"tool")
        .hard_link("usr/bin/tool-alias", "usr/bin/tool")
        .symlink("usr/bin/sh", "/bin/busybox")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/stale", 0o644, b"stale")
        .finish();
    let upper = Layer::new()
        .whiteout("etc/obsolete")
        .dir("var/cache", 0o755)
        .opaque("var/cache")
        .file("var/cache/fresh", 0o644, b"fresh")
        .owned("usr/bin/su", 0o4755, (0, 0), b"su")
        .owned("usr/bin/wall", 0o2755, (0, 5), b"wall")
        .owned("home", 0o750, (1000, 1000), b"")
        .file_with_xattrs("usr/bin/ping", 0o755, b"ping", &[("user.note", b"kept")])
        .dir("tmp", 0o1777)
        .finish();
    vec![lower, upper]
}

struct Forms {
    tmp: tempfile::TempDir,
}

impl Forms {
    /// The image of `layers()` as an OCI layout (plain and gzip layers), an OCI archive, a
    /// gzip-compressed OCI archive and a docker-save archive.
    fn new() -> Forms {
        let tmp = tempfile::tempdir().unwrap();
        let layers = layers();
        testing::oci_layout_of(&tmp.path().join("layout"), &[(&layers, "app:1")], false);
        testing::oci_layout_of(&tmp.path().join("layout-gz"), &[(&layers, "app:1")], true);
        let archive = testing::tar_of_dir(&tmp.path().join("layout-gz"));
        std::fs::write(tmp.path().join("oci.tar"), &archive).unwrap();
        std::fs::write(tmp.path().join("oci.tar.gz"), testing::gzip(&archive)).unwrap();
        std::fs::write(
            tmp.path().join("docker.tar"),
            testing::docker_archive(&layers, "app:1"),
        )
        .unwrap();
        Forms { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// Resolves, verifies and applies `source` into a fresh tree; the tree's description.
fn extract(source: &Path) -> (Resolved, Vec<String>) {
    let scratch = tempfile::tempdir().unwrap();
    let source = Source::open(source, scratch.path()).unwrap();
    let image = source.resolve(None).unwrap();
    source.verify(&image).unwrap();
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut tree = Staging::open(&root).unwrap();
    for layer in &image.layers {
        let mut stream = source.layer(layer).unwrap();
        tree.apply_layer(&mut stream).unwrap();
        stream.finish(layer).unwrap();
    }
    tree.finish().unwrap();
    (image, describe_tree(&root))
}

#[test]
fn every_source_form_gives_the_same_image_and_tree() {
    let forms = Forms::new();
    let (oci, tree) = extract(&forms.path("layout"));
    assert_eq!(oci.kind, SourceKind::OciLayout);
    assert!(oci.manifest_digest.is_some());
    assert_eq!(oci.reference.as_deref(), Some("app:1"));
    assert_eq!(oci.env, ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]);
    assert_eq!(oci.working_dir.as_deref(), Some("/work"));
    let expect = |line: &str| {
        assert!(
            tree.iter().any(|l| l.starts_with(line)),
            "{line:?} not in {tree:#?}"
        )
    };
    expect("usr/bin/su file");
    assert!(tree
        .iter()
        .any(|l| l.starts_with("usr/bin/su ") && l.contains("mode 104755")));
    assert!(tree
        .iter()
        .any(|l| l.starts_with("usr/bin/wall ") && l.contains("mode 102755")));
    assert!(tree
        .iter()
        .any(|l| l.starts_with("tmp ") && l.contains("mode 41777")));
    assert!(tree
        .iter()
        .any(|l| l.starts_with("usr/bin/tool ") && l.contains("link-group")));
    expect("usr/bin/sh -> /bin/busybox");
    expect("var/cache/fresh");
    assert!(!tree.iter().any(|l| l.starts_with("var/cache/stale")));
    assert!(!tree.iter().any(|l| l.starts_with("etc/obsolete")));
    if is_root() {
        assert!(tree
            .iter()
            .any(|l| l.starts_with("home ") && l.contains("owner 1000:1000")));
    }
    for form in ["layout-gz", "oci.tar", "oci.tar.gz", "docker.tar"] {
        let (image, other) = extract(&forms.path(form));
        assert_eq!(other, tree, "{form}");
        assert_eq!(image.image_id, oci.image_id, "{form}");
        assert_eq!(image.env, oci.env, "{form}");
        assert_eq!(image.working_dir, oci.working_dir, "{form}");
        match form {
            "docker.tar" => {
                assert_eq!(image.kind, SourceKind::DockerArchive);
                assert_eq!(image.manifest_digest, None);
            }
            "layout-gz" => assert_eq!(image.kind, SourceKind::OciLayout),
            _ => assert_eq!(image.kind, SourceKind::OciArchive, "{form}"),
        }
    }
}

/// The store's contents, lock files and staging directories included.
fn store_contents(store: &ImageStore) -> Vec<String> {
    if store.dir().exists() {
        snapshot(store.dir())
    } else {
        Vec::new()
    }
}

fn request(name: &str, source: &Path) -> ImportRequest {
    ImportRequest {
        name: name.into(),
        source: source.to_path_buf(),
        reference: None,
        format: ImageFormat::Ext4,
    }
}

/// Imports `source` into a store that holds one image already; expects it to be refused with
/// an error that says `says`, and the store to be as it was.
fn refused_and_store_unchanged(source: &Path, says: &str) {
    if !is_root() {
        eprintln!("SKIPPED: import needs root");
        return;
    }
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path());
    std::fs::create_dir(store_dir.path().join("existing")).unwrap();
    std::fs::write(store_dir.path().join("existing/rootfs.ext4"), b"x").unwrap();
    let before = store_contents(&store);
    let err = import(&store, &request("new", source)).expect_err("must be refused");
    assert!(err.to_string().contains(says), "{err}");
    assert_eq!(store_contents(&store), before, "{err}");
}

#[test]
fn a_corrupt_blob_is_refused_and_the_store_is_unchanged() {
    let forms = Forms::new();
    let layout = forms.path("layout");
    let made = testing::oci_layout_of(&layout, &[(&layers(), "app:1")], false);
    let blob = layout.join("blobs/sha256").join(&made[0].layer_hex[1]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x20;
    std::fs::write(&blob, &bytes).unwrap();
    refused_and_store_unchanged(&layout, "SHA-256 mismatch");

    // The same in a docker-save archive, whose layers have no digest but their diff_id.
    let mut archive = std::fs::read(forms.path("docker.tar")).unwrap();
    let needle = b"hello from an imported image";
    let at = archive
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    archive[at] = b'j';
    std::fs::write(forms.path("docker.tar"), &archive).unwrap();
    refused_and_store_unchanged(&forms.path("docker.tar"), "SHA-256 mismatch");
}

#[test]
fn a_truncated_archive_is_refused_and_the_store_is_unchanged() {
    let forms = Forms::new();
    for form in ["oci.tar", "docker.tar", "oci.tar.gz"] {
        let bytes = std::fs::read(forms.path(form)).unwrap();
        for keep in [bytes.len() / 2, bytes.len() * 9 / 10, 700] {
            let cut = forms.path(&format!("cut-{keep}-{form}"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            if !is_root() {
                eprintln!("SKIPPED: import needs root");
                return;
            }
            let store_dir = tempfile::tempdir().unwrap();
            let store = ImageStore::new(store_dir.path());
            let err = import(&store, &request("new", &cut)).expect_err("truncated");
            let text = err.to_string();
            assert!(
                ["truncated", "missing", "not an OCI image layout"]
                    .iter()
                    .any(|s| text.contains(s)),
                "{form} cut at {keep}: {text}"
            );
            assert_eq!(store_contents(&store), Vec::<String>::new(), "{text}");
        }
    }
}

#[test]
fn a_docker_config_that_does_not_match_its_name_is_refused() {
    let forms = Forms::new();
    let mut archive = std::fs::read(forms.path("docker.tar")).unwrap();
    let needle = b"LANG=C.UTF-8";
    let at = archive
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    archive[at + 5] = b'D';
    std::fs::write(forms.path("docker.tar"), &archive).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let source = Source::open(&forms.path("docker.tar"), scratch.path()).unwrap();
    let err = source.resolve(None).unwrap_err();
    assert!(matches!(err, SourceError::Digest { .. }), "{err}");
}

#[test]
fn a_source_with_several_images_needs_a_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let a = vec![Layer::new().file("a", 0o644, b"a").finish()];
    let b = vec![Layer::new().file("b", 0o644, b"b").finish()];
    let made = testing::oci_layout_of(tmp.path(), &[(&a, "a:1"), (&b, "b:1")], false);
    let source = Source::open(tmp.path(), tmp.path()).unwrap();
    let err = source.resolve(None).unwrap_err().to_string();
    assert!(
        err.contains("choose one with --ref") && err.contains("a:1, b:1"),
        "{err}"
    );
    let image = source.resolve(Some("b:1")).unwrap();
    assert_eq!(image.image_id, format!("sha256:{}", made[1].config_hex));
    assert_eq!(
        image.manifest_digest,
        Some(format!("sha256:{}", made[1].manifest_hex))
    );
    let err = source.resolve(Some("c:1")).unwrap_err().to_string();
    assert!(err.contains("no image named \"c:1\""), "{err}");
}

#[test]
fn an_image_for_another_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![Layer::new().file("a", 0o644, b"a").finish()];
    testing::oci_layout_of(tmp.path(), &[(&layers, "a")], false);
    // Rewrite the configuration for another architecture, with the digests to match.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("index.json")).unwrap()).unwrap();
    let blobs = tmp.path().join("blobs/sha256");
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(&manifest_hex)).unwrap()).unwrap();
    let config = testing::config(&layers, "riscv64");
    let config_hex = testing::sha256_hex(&config);
    std::fs::write(blobs.join(&config_hex), &config).unwrap();
    manifest["config"]["digest"] = format!("sha256:{config_hex}").into();
    manifest["config"]["size"] = config.len().into();
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_hex = testing::sha256_hex(&manifest);
    std::fs::write(blobs.join(&manifest_hex), &manifest).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "digest": format!("sha256:{manifest_hex}"), "size": manifest.len()}]});
    std::fs::write(tmp.path().join("index.json"), index.to_string()).unwrap();
    let source = Source::open(tmp.path(), tmp.path()).unwrap();
    let err = source.resolve(None).unwrap_err().to_string();
    assert!(err.contains("linux/riscv64"), "{err}");
}

#[test]
fn a_layout_whose_blob_is_a_symbolic_link_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![Layer::new().file("a", 0o644, b"a").finish()];
    let made = testing::oci_layout_of(tmp.path(), &[(&layers, "a")], false);
    let blob = tmp.path().join("blobs/sha256").join(&made[0].layer_hex[0]);
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::rename(&blob, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &blob).unwrap();
    let source = Source::open(tmp.path(), tmp.path()).unwrap();
    let image = source.resolve(None).unwrap();
    let err = source.verify(&image).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
}

#[test]
fn a_hostile_layer_fails_the_import_and_leaves_nothing_behind() {
    if !is_root() {
        eprintln!("SKIPPED: import needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![Layer::new()
        .symlink("etc", "/etc")
        .file("etc/passwd", 0o644, b"evil")
        .finish()];
    testing::oci_layout_of(&tmp.path().join("layout"), &[(&layers, "evil")], false);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let store = ImageStore::new(tmp.path().join("store"));
    let err = import(&store, &request("evil", &tmp.path().join("layout"))).unwrap_err();
    assert!(matches!(err, ImageError::Unpack { layer: 1, .. }), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(store.names().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// What `debugfs` says about `path` inside ext4 image `file`.
fn debugfs(file: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(file)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_image_is_imported_once_per_image_id() {
    if !is_root() || ext4::program("mkfs.ext4").is_err() {
        eprintln!("SKIPPED: importing into a store needs root and mkfs.ext4");
        return;
    }
    let forms = Forms::new();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path());

    let first = import(&store, &request("app", &forms.path("oci.tar.gz"))).unwrap();
    assert_eq!(first.outcome, ImportOutcome::Imported);
    let m = &first.manifest;
    let from = m.source.as_ref().unwrap();
    assert_eq!(from.kind, "oci-archive");
    assert!(from.path.ends_with("oci.tar.gz"));
    assert!(from.digest.as_deref().unwrap().starts_with("sha256:"));
    assert!(from.image_id.starts_with("sha256:"));
    assert_eq!(from.env, ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]);
    assert_eq!(from.working_dir.as_deref(), Some("/work"));
    assert_eq!(m.os_version.as_deref(), Some("testos 1.2"));
    let image = store.verified("app").unwrap();
    assert_eq!(image.manifest, *m);
    // Nothing but the image and the lock files is left in the store.
    let mut names: Vec<String> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(names[2], "app");
    let mode = std::fs::metadata(store.dir().join("app")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o755);

    // The file system keeps modes, owners, links and contents.
    if Command::new("debugfs").arg("-V").output().is_ok() {
        let su = debugfs(&image.path, "stat /usr/bin/su");
        assert!(su.contains("Mode:  04755"), "{su}");
        let home = debugfs(&image.path, "stat /home");
        assert!(home.contains("User:  1000"), "{home}");
        let tool = debugfs(&image.path, "stat /usr/bin/tool");
        assert!(tool.contains("Links: 2"), "{tool}");
        let hello = debugfs(&image.path, "cat /etc/hello");
        assert_eq!(hello, "hello from an imported image\n");
        let sh = debugfs(&image.path, "stat /usr/bin/sh");
        assert!(
            sh.contains("Type: symlink") && sh.contains("/bin/busybox"),
            "{sh}"
        );
        let ping = debugfs(&image.path, "ea_get /usr/bin/ping user.note");
        assert!(ping.contains("kept"), "{ping}");
    }

    // The same image ID again under the same name: a no-op.
    let again = import(&store, &request("app", &forms.path("oci.tar"))).unwrap();
    assert_eq!(again.outcome, ImportOutcome::AlreadyPresent);
    assert_eq!(again.manifest, *m);

    // Under another name, from another form of the same image: shares the file.
    let second = import(&store, &request("app2", &forms.path("docker.tar"))).unwrap();
    assert_eq!(second.outcome, ImportOutcome::SharedWith("app".into()));
    let two = store.verified("app2").unwrap();
    assert_eq!(two.manifest.source.as_ref().unwrap().kind, "docker-archive");
    assert_eq!(two.manifest.sha256, m.sha256);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&two.path), ino(&image.path));

    // Another image is not put under a name that is taken.
    let tmp = tempfile::tempdir().unwrap();
    let other = vec![Layer::new().file("other", 0o644, b"other").finish()];
    testing::oci_layout_of(tmp.path(), &[(&other, "other")], false);
    let err = import(&store, &request("app", tmp.path())).unwrap_err();
    assert!(matches!(err, ImageError::Exists { .. }), "{err}");
    assert!(
        err.to_string().contains("imported from oci-archive"),
        "{err}"
    );

    // Removing one name leaves the other whole.
    store.remove("app").unwrap();
    store.verified("app2").unwrap();
}

#[test]
fn concurrent_imports_of_one_image_store_it_once() {
    if !is_root() || ext4::program("mkfs.ext4").is_err() {
        eprintln!("SKIPPED: importing into a store needs root and mkfs.ext4");
        return;
    }
    let forms = Forms::new();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path());
    let jobs = [
        ("app", "oci.tar"),
        ("app", "docker.tar"),
        ("app-b", "layout"),
    ];
    let outcomes: Vec<ImportOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(name, form)| {
                let req = request(name, &forms.path(form));
                let store = &store;
                s.spawn(move || import(store, &req).unwrap().outcome)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let built = outcomes
        .iter()
        .filter(|o| **o == ImportOutcome::Imported)
        .count();
    assert_eq!(built, 1, "{outcomes:?}");
    assert_eq!(store.names().unwrap(), ["app", "app-b"]);
    let a = store.verified("app").unwrap();
    let b = store.verified("app-b").unwrap();
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&a.path), ino(&b.path));
    let staging_left = std::fs::read_dir(store.dir())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(".import-"));
    assert!(!staging_left);
}

#[test]
fn each_format_is_its_own_file_and_a_name_keeps_its_format() {
    if !is_root() || ext4::program("mkfs.ext4").is_err() || ext4::program("mkfs.erofs").is_err() {
        eprintln!("SKIPPED: importing into a store needs root, mkfs.ext4 and mkfs.erofs");
        return;
    }
    let forms = Forms::new();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path());
    let as_format = |name: &str, format| ImportRequest {
        format,
        ..request(name, &forms.path("oci.tar"))
    };
    let ext4 = import(&store, &as_format("app", ImageFormat::Ext4)).unwrap();
    // The same image ID as EROFS is a file of its own, not the ext4 one shared.
    let erofs = import(&store, &as_format("app-erofs", ImageFormat::ErofsLz4)).unwrap();
    assert_eq!(erofs.outcome, ImportOutcome::Imported);
    let m = &erofs.manifest;
    assert_eq!(
        (m.fstype.as_str(), m.file.as_str()),
        ("erofs", "rootfs-lz4.erofs")
    );
    assert_ne!(m.sha256, ext4.manifest.sha256);
    let head = std::fs::read(store.verified("app-erofs").unwrap().path).unwrap();
    // The EROFS superblock's magic at offset 1024.
    assert_eq!(head[1024..1028], 0xE0F5_E1E2u32.to_le_bytes());
    // A third name in that format shares the EROFS file.
    let shared = import(&store, &as_format("app-erofs2", ImageFormat::ErofsLz4)).unwrap();
    assert_eq!(
        shared.outcome,
        ImportOutcome::SharedWith("app-erofs".into())
    );
    // A name that holds the image in one format is not quietly another.
    let err = import(&store, &as_format("app", ImageFormat::Erofs)).unwrap_err();
    assert!(matches!(err, ImageError::Exists { .. }), "{err}");
}
