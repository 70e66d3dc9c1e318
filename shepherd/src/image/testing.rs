//! Test images made from local bytes: layer tars (including hostile ones that the `tar`
//! crate's own path checks would not write), and the same image as an OCI layout directory, an
//! OCI archive and a docker-save archive. Only for tests.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::oci::host_architecture;

/// The mtime that test entries get unless they say otherwise.
pub const MTIME: u64 = 1_600_000_000;

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One layer's tar stream, entry by entry.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry whose name is `path` byte for byte (`../x`, `/etc/x` included).
    #[allow(clippy::too_many_arguments)]
    pub fn raw(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        owner: (u64, u64),
        mtime: u64,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len(), "test path too long: {path}");
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        if let Some(link) = link {
            h.set_link_name_literal(link).unwrap();
        }
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.raw(
            tar::EntryType::Directory,
            path,
            mode,
            (0, 0),
            MTIME,
            None,
            b"",
        )
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(
            tar::EntryType::Regular,
            path,
            mode,
            (0, 0),
            MTIME,
            None,
            data,
        )
    }

    pub fn owned(&mut self, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> &mut Self {
        self.raw(
            tar::EntryType::Regular,
            path,
            mode,
            owner,
            MTIME,
            None,
            data,
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            tar::EntryType::Symlink,
            path,
            0o777,
            (0, 0),
            MTIME,
            Some(target),
            b"",
        )
    }

    pub fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            tar::EntryType::Link,
            path,
            0o644,
            (0, 0),
            MTIME,
            Some(target),
            b"",
        )
    }

    /// A whiteout of `path` (`dir/.wh.name`).
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, 0o644, b"")
    }

    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    pub fn device(&mut self, path: &str, kind: tar::EntryType) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        self.builder.append(&h, &b""[..]).unwrap();
        self
    }

    /// A regular file with extended attributes (PAX `SCHILY.xattr.*`) and an mtime with
    /// nanoseconds.
    pub fn file_with_xattrs(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let keys: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        let mtime = format!("{MTIME}.25");
        let mut records: Vec<(&str, &[u8])> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        records.push(("mtime", mtime.as_bytes()));
        self.builder.append_pax_extensions(records).unwrap();
        self.file(path, mode, data)
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// The configuration of an image of `layers` (uncompressed tars).
pub fn config(layers: &[Vec<u8>], architecture: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "WorkingDir": "/work"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    hex
}

/// What an OCI layout was made of.
pub struct Layout {
    pub manifest_hex: String,
    pub config_hex: String,
    /// Hex digests of the layer blobs, bottom first.
    pub layer_hex: Vec<String>,
}

/// Writes an OCI image layout of `images` (each: its layers and its ref name) into `dir`;
/// layers gzip-compressed when `compress`.
pub fn oci_layout_of(dir: &Path, images: &[(&[Vec<u8>], &str)], compress: bool) -> Vec<Layout> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut made = Vec::new();
    let mut descriptors = Vec::new();
    for (layers, reference) in images {
        let config_bytes = config(layers, host_architecture());
        let config_hex = put_blob(dir, &config_bytes);
        let mut layer_hex = Vec::new();
        let mut layer_descs = Vec::new();
        for layer in layers.iter() {
            let blob = if compress { gzip(layer) } else { layer.clone() };
            let hex = put_blob(dir, &blob);
            layer_descs.push(serde_json::json!({
                "mediaType": if compress {
                    "application/vnd.oci.image.layer.v1.tar+gzip"
                } else {
                    "application/vnd.oci.image.layer.v1.tar"
                },
                "digest": format!("sha256:{hex}"),
                "size": blob.len(),
            }));
            layer_hex.push(hex);
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_hex}"),
                "size": config_bytes.len(),
            },
            "layers": layer_descs,
        }))
        .unwrap();
        let manifest_hex = put_blob(dir, &manifest);
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }));
        made.push(Layout {
            manifest_hex,
            config_hex,
            layer_hex,
        });
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": descriptors});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    made
}

/// A tar of everything in `dir` (an OCI archive of a layout).
pub fn tar_of_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

/// A `docker save` archive (the format before Docker 25, and podman's docker-archive) of
/// `layers`, tagged `tag`.
pub fn docker_archive(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let config_bytes = config(layers, host_architecture());
    let config_name = format!("{}.json", sha256_hex(&config_bytes));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut paths = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{}/layer.tar", sha256_hex(format!("layer{i}").as_bytes()));
        add(&path, layer);
        paths.push(path);
    }
    add(&config_name, &config_bytes);
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [tag],
        "Layers": paths,
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.into_inner().unwrap()
}

/// Everything about a tree that an import must keep, one line per entry, sorted: path, type,
/// mode, owner, mtime, size, content digest or link target, hard-link group, user xattrs.
pub fn describe_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut inodes: Vec<u64> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_dir() {
                stack.push(rel.clone());
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else {
                let group = match inodes.iter().position(|i| *i == meta.ino()) {
                    Some(i) => i,
                    None => {
                        inodes.push(meta.ino());
                        inodes.len() - 1
                    }
                };
                let links = if meta.nlink() > 1 {
                    format!(" link-group {group}")
                } else {
                    String::new()
                };
                format!("file {}{links}", sha256_hex(&std::fs::read(&path).unwrap()))
            };
            let mtime = format!(" mtime {}.{}", meta.mtime(), meta.mtime_nsec());
            let xattrs: Vec<String> = xattr_names(&path)
                .into_iter()
                .filter(|n| n.starts_with("user.") || n.starts_with("trusted."))
                .collect();
            out.push(format!(
                "{} {what} mode {:o} owner {}:{}{mtime} xattrs {xattrs:?}",
                rel.display(),
                meta.mode(),
                meta.uid(),
                meta.gid(),
            ));
        }
    }
    out.sort();
    out
}

fn xattr_names(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::llistxattr(path, &mut buf[..]) {
        Ok(n) => buf[..n]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The value of extended attribute `name` of `path` (not following a link).
pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Names, sizes, modes and mtimes of everything under `dir`, to show that nothing changed.
pub fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.push(format!(
                "{} {} {:o} {}.{} {}",
                path.display(),
                meta.len(),
                meta.mode(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.nlink()
            ));
        }
    }
    out.sort();
    out
}
