use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::image::testing::{self, snapshot, Layer, MTIME};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A staging root `<tmp>/stage/root` (inside a 0700 directory, as imports make it) beside a
/// directory `<tmp>/outside` with a file the layers try to reach.
struct Fixture {
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("stage/root")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/victim"), b"host file\n").unwrap();
        Fixture { tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("stage/root")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// Applies `layers` in order; the warnings, or the first error.
    fn apply(&self, layers: &[Vec<u8>]) -> Result<Vec<String>, UnpackError> {
        let mut staging = Staging::open(&self.root())?;
        for layer in layers {
            staging.apply_layer(&mut layer.as_slice())?;
        }
        staging.finish()
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[test]
fn whiteouts_remove_lower_entries_and_opaque_directories_hide_them_all() {
    let fx = Fixture::new();
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/keep", 0o644, b"keep")
        .file("etc/gone", 0o644, b"gone")
        .dir("etc/gone-dir", 0o755)
        .file("etc/gone-dir/inner", 0o644, b"x")
        .dir("d", 0o755)
        .file("d/a", 0o644, b"a")
        .dir("d/sub", 0o755)
        .file("d/sub/x", 0o644, b"x")
        .finish();
    // The opaque marker comes after some of this layer's own entries in `d`: those stay.
    let upper = Layer::new()
        .whiteout("etc/gone")
        .whiteout("etc/gone-dir")
        .whiteout("etc/never-was")
        .file("d/b", 0o644, b"b")
        .file("d/sub/y", 0o644, b"y")
        .opaque("d")
        .file("d/c", 0o644, b"c")
        .finish();
    fx.apply(&[lower, upper]).unwrap();
    let root = fx.root();
    assert!(exists(&root.join("etc/keep")));
    for gone in ["etc/gone", "etc/gone-dir", "d/a", "d/sub/x"] {
        assert!(!exists(&root.join(gone)), "{gone} should be gone");
    }
    for kept in ["d/b", "d/c", "d/sub/y"] {
        assert!(exists(&root.join(kept)), "{kept} should be there");
    }
    // Whiteout markers themselves are not files of the image.
    assert!(!exists(&root.join("etc/.wh.gone")));
    assert!(!exists(&root.join("d/.wh..wh..opq")));
}

#[test]
fn hard_links_share_an_inode_and_symbolic_links_stay_links() {
    let fx = Fixture::new();
    let layer = Layer::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, b"#!/bin/true\n")
        .hard_link("bin/sh", "bin/busybox")
        .symlink("bin/ls", "busybox")
        .symlink("bin/etc", "/etc")
        .symlink("bin/up", "../../../..")
        .finish();
    fx.apply(&[layer]).unwrap();
    let bin = fx.root().join("bin");
    let busybox = std::fs::metadata(bin.join("busybox")).unwrap();
    let sh = std::fs::metadata(bin.join("sh")).unwrap();
    assert_eq!((busybox.ino(), busybox.nlink()), (sh.ino(), 2));
    for (link, target) in [("ls", "busybox"), ("etc", "/etc"), ("up", "../../../..")] {
        let meta = std::fs::symlink_metadata(bin.join(link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link}");
        assert_eq!(
            std::fs::read_link(bin.join(link)).unwrap(),
            Path::new(target)
        );
        assert_eq!(meta.mtime(), MTIME as i64, "{link}");
    }
}

#[test]
fn modes_owners_times_and_extended_attributes_are_kept() {
    let fx = Fixture::new();
    let layer = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .owned("usr/bin/su", 0o4755, (0, 0), b"su")
        .owned("usr/bin/wall", 0o2755, (0, 5), b"wall")
        .owned("home-file", 0o640, (1234, 5678), b"mine")
        .dir("tmp", 0o1777)
        .file_with_xattrs(
            "caps",
            0o755,
            b"xattrs",
            &[("user.origin", b"oci"), ("trusted.overlay", b"t")],
        )
        .finish();
    let warnings = fx.apply(&[layer]).unwrap();
    let root = fx.root();
    let mode = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("usr/bin/su"), 0o4755);
    assert_eq!(mode("usr/bin/wall"), 0o2755);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("home-file"), 0o640);
    let tmp = std::fs::metadata(root.join("tmp")).unwrap();
    assert_eq!(
        tmp.mtime(),
        MTIME as i64,
        "directory mtimes are applied last"
    );
    let caps = std::fs::metadata(root.join("caps")).unwrap();
    assert_eq!(
        (caps.mtime(), caps.mtime_nsec()),
        (MTIME as i64, 250_000_000)
    );
    if is_root() {
        let home = std::fs::metadata(root.join("home-file")).unwrap();
        assert_eq!((home.uid(), home.gid()), (1234, 5678));
        let wall = std::fs::metadata(root.join("usr/bin/wall")).unwrap();
        assert_eq!(wall.gid(), 5);
    } else {
        eprintln!("SKIPPED: owners: only root sets them");
    }
    match testing::xattr(&root.join("caps"), "user.origin") {
        Some(v) => assert_eq!(v, b"oci"),
        None => assert!(
            warnings.iter().any(|w| w.contains("user.origin")),
            "{warnings:?}"
        ),
    }
    if is_root() {
        match testing::xattr(&root.join("caps"), "trusted.overlay") {
            Some(v) => assert_eq!(v, b"t"),
            None => assert!(
                warnings.iter().any(|w| w.contains("trusted.overlay")),
                "{warnings:?}"
            ),
        }
    }
}

#[test]
fn a_later_layer_replaces_files_directories_and_links() {
    let fx = Fixture::new();
    let lower = Layer::new()
        .dir("a", 0o755)
        .file("a/f", 0o644, b"x")
        .file("b", 0o644, b"old")
        .symlink("c", "b")
        .finish();
    let upper = Layer::new()
        .file("a", 0o600, b"a is a file now")
        .dir("b", 0o700)
        .file("c", 0o644, b"c is no link")
        .finish();
    fx.apply(&[lower, upper]).unwrap();
    let root = fx.root();
    assert_eq!(std::fs::read(root.join("a")).unwrap(), b"a is a file now");
    assert!(std::fs::symlink_metadata(root.join("b")).unwrap().is_dir());
    assert_eq!(std::fs::read(root.join("c")).unwrap(), b"c is no link");
    assert_eq!(std::fs::read(root.join("b")).ok(), None);
}

/// Runs the layers that `make` makes for a fresh fixture; returns the error, and checks that
/// nothing outside the staging root changed and that `/etc` is as it was.
fn refused_with(make: impl Fn(&Fixture) -> Vec<Vec<u8>>) -> UnpackError {
    let fx = Fixture::new();
    let layers = make(&fx);
    let outside_before = snapshot(&fx.outside());
    let etc = |p: &str| {
        let meta = std::fs::symlink_metadata(Path::new("/etc").join(p)).ok()?;
        let content = std::fs::read(Path::new("/etc").join(p)).ok();
        Some((
            meta.mtime(),
            meta.mtime_nsec(),
            meta.nlink(),
            meta.ino(),
            content,
        ))
    };
    let etc_before = (etc("passwd"), etc("shadow"), etc("sge-virtualizer-x"));
    let tmp_before: Vec<_> = std::fs::read_dir(fx.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let err = fx.apply(&layers).expect_err("the layer must be refused");
    assert_eq!(snapshot(&fx.outside()), outside_before, "{err}");
    assert_eq!(
        (etc("passwd"), etc("shadow"), etc("sge-virtualizer-x")),
        etc_before,
        "{err}"
    );
    let tmp_after: Vec<_> = std::fs::read_dir(fx.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(tmp_after, tmp_before, "{err}");
    assert!(!exists(&fx.tmp.path().join("stage/x")), "{err}");
    err
}

fn refused(layers: &[Vec<u8>]) -> UnpackError {
    refused_with(|_| layers.to_vec())
}

#[test]
fn a_path_that_climbs_out_of_the_tree_is_refused() {
    for path in ["../x", "a/../../x", "./../stage/x", "../outside/victim"] {
        let err = refused(&[Layer::new().file(path, 0o644, b"evil").finish()]);
        assert!(err.to_string().contains("`..`"), "{path}: {err}");
    }
}

#[test]
fn an_absolute_path_stays_inside_the_tree() {
    let fx = Fixture::new();
    let victim = fx.outside().join("victim");
    let absolute = victim.display().to_string();
    fx.apply(&[Layer::new().file(&absolute, 0o644, b"inside").finish()])
        .unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file\n");
    let inside = fx.root().join(absolute.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside).unwrap(), b"inside");
}

#[test]
fn a_file_written_through_a_symbolic_link_is_refused() {
    // The link points at a directory outside the tree, by absolute and by relative path.
    for target in [None, Some("../../outside"), Some("/etc")] {
        let err = refused_with(|fx| {
            let outside = fx.outside().display().to_string();
            vec![Layer::new()
                .symlink("link", target.unwrap_or(&outside))
                .file("link/victim", 0o644, b"evil")
                .file("link/passwd", 0o644, b"evil")
                .finish()]
        });
        assert!(
            err.to_string().contains("symbolic link \"link\""),
            "{target:?}: {err}"
        );
    }
    // Also when the link comes in a lower layer, and when it replaces a directory.
    let lower = Layer::new().symlink("etc", "/etc").finish();
    let upper = Layer::new().file("etc/passwd", 0o644, b"evil").finish();
    refused(&[lower, upper]);
    let lower = Layer::new().dir("d", 0o755).finish();
    let upper = Layer::new()
        .symlink("d", "/etc")
        .file("d/sge-virtualizer-x", 0o644, b"evil")
        .finish();
    refused(&[lower, upper]);
    // And for the directory of a whiteout, an opaque marker or a hard link's target.
    for layer in [
        Layer::new()
            .symlink("l", "/etc")
            .whiteout("l/passwd")
            .finish(),
        Layer::new().symlink("l", "/etc").opaque("l").finish(),
        Layer::new()
            .symlink("l", "/etc")
            .hard_link("x", "l/passwd")
            .finish(),
    ] {
        let err = refused(&[layer]);
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
}

#[test]
fn a_hard_link_to_a_file_outside_the_tree_is_refused() {
    for target in ["/etc/shadow", "etc/shadow", "../../../../../../etc/shadow"] {
        let err = refused(&[Layer::new().hard_link("shadow", target).finish()]);
        let text = err.to_string();
        assert!(
            text.contains("not in the image") || text.contains("`..`"),
            "{target}: {text}"
        );
    }
    // A symbolic link to the host file, then a hard link to the symbolic link: the new entry
    // is a second name of the link (inside the tree), not of the host file.
    let fx = Fixture::new();
    let shadow = std::fs::metadata("/etc/shadow").ok().map(|m| m.nlink());
    let layer = Layer::new()
        .symlink("s", "/etc/shadow")
        .hard_link("h", "s")
        .finish();
    fx.apply(&[layer]).unwrap();
    let h = std::fs::symlink_metadata(fx.root().join("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(
        std::fs::metadata("/etc/shadow").ok().map(|m| m.nlink()),
        shadow
    );
}

#[test]
fn device_nodes_are_skipped_with_a_warning() {
    let fx = Fixture::new();
    let layer = Layer::new()
        .dir("dev", 0o755)
        .device("dev/null", tar::EntryType::Char)
        .device("dev/sda", tar::EntryType::Block)
        .raw(
            tar::EntryType::Fifo,
            "dev/initctl",
            0o600,
            (0, 0),
            MTIME,
            None,
            b"",
        )
        .finish();
    let warnings = fx.apply(&[layer]).unwrap();
    assert!(!exists(&fx.root().join("dev/null")));
    assert!(!exists(&fx.root().join("dev/sda")));
    assert!(
        warnings.iter().any(|w| w.contains("dev/null")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("dev/sda")),
        "{warnings:?}"
    );
    let fifo = std::fs::symlink_metadata(fx.root().join("dev/initctl")).unwrap();
    assert!(fifo.file_type().is_fifo());
}

#[test]
fn garbage_instead_of_a_layer_is_an_error() {
    let fx = Fixture::new();
    let mut layer = Layer::new().file("f", 0o644, b"data").finish();
    layer[0..100].fill(b'x');
    assert!(matches!(fx.apply(&[layer]), Err(UnpackError::Read(_))));
}

#[test]
fn pax_times_parse_with_fractions() {
    let t = parse_pax_time("1600000000.5").unwrap();
    assert_eq!((t.tv_sec, t.tv_nsec), (1_600_000_000, 500_000_000));
    let t = parse_pax_time("-1.25").unwrap();
    assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750_000_000));
    assert!(parse_pax_time("x").is_none());
}
