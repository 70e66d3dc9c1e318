//! Reading an image source for `image import`: an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`), an OCI archive (a tar of such a layout; `docker save`
//! writes one since Docker 25, with a `manifest.json` beside it, and is read as an OCI archive),
//! or a `docker save`/`podman save` archive (`manifest.json` naming a configuration file and
//! layer tars). Archives may be gzip-compressed; they are then decompressed into a scratch file
//! first, because blobs are read from an archive by their offsets.
//!
//! Every byte that decides what the image holds is checked against a SHA-256 digest: OCI
//! indexes, manifests, configurations and layer blobs against the digests (and sizes) of their
//! descriptors, a docker-save configuration against its file name, and every layer's
//! uncompressed tar stream against the configuration's `rootfs.diff_ids` (so a docker-save
//! layer, which has no digest of its own, is checked too, and a blob that changes between the
//! check and its extraction is caught). Blobs of a layout directory are opened below the
//! directory without following symbolic links; names inside archives are only keys to look
//! blobs up by, never paths on the host.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// The largest index, manifest or configuration read into memory.
const MAX_JSON: u64 = 16 << 20;
/// The most links followed to find one member of an archive.
const MAX_LINK_HOPS: usize = 16;
/// The deepest nesting of OCI image indexes followed.
const MAX_INDEX_DEPTH: usize = 4;
/// The OCI annotation with an image's name in a layout (often just its tag).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation with an image's full name that containerd and Docker add.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    OciLayout,
    OciArchive,
    DockerArchive,
}

impl SourceKind {
    /// Its name in manifests and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::OciLayout => "oci-layout",
            SourceKind::OciArchive => "oci-archive",
            SourceKind::DockerArchive => "docker-archive",
        }
    }
}

/// Why a source cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: io::Error,
    },
    #[error(
        "not an OCI image layout (oci-layout and index.json), OCI archive or docker-save \
         archive (manifest.json)"
    )]
    Unrecognised,
    #[error("{0} is missing (a truncated or incomplete archive?)")]
    Missing(String),
    #[error("truncated archive: member {member} ends at byte {end}, the archive has {len} bytes")]
    Truncated { member: String, end: u64, len: u64 },
    #[error("corrupt or truncated archive: {0}")]
    BadArchive(io::Error),
    #[error("{path} has {actual} bytes, its descriptor says {expected} (truncated or corrupt)")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: SHA-256 mismatch: expected {expected}, found {actual} (corrupt or tampered)")]
    Digest {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("{0}")]
    Choice(String),
    #[error("{0}")]
    Unsupported(String),
}

fn invalid(what: impl Into<String>, detail: impl ToString) -> SourceError {
    SourceError::Invalid {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Where its blob is in the source.
    pub member: String,
    /// The blob's own digest (hex), when the source has one (OCI; docker-save archives that
    /// keep layers under `blobs/sha256/`).
    pub digest: Option<String>,
    /// The blob's size from its descriptor.
    pub size: Option<u64>,
    /// The digest of the uncompressed tar stream (hex), from the configuration.
    pub diff_id: String,
}

impl Layer {
    /// Its digest for messages: the blob's, else the uncompressed stream's.
    pub fn shown_digest(&self) -> String {
        format!("sha256:{}", self.digest.as_deref().unwrap_or(&self.diff_id))
    }
}

/// The image chosen in a source, its configuration read and checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub kind: SourceKind,
    /// The OCI manifest's digest, `sha256:<hex>` (none for a docker-save archive).
    pub manifest_digest: Option<String>,
    /// The configuration's digest, `sha256:<hex>`.
    pub image_id: String,
    /// The name it was chosen by or is known by in the source.
    pub reference: Option<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
}

/// An opened source.
pub struct Source {
    kind: SourceKind,
    container: Container,
    /// The decompressed archive, removed when the source is dropped.
    _scratch: Option<tempfile::NamedTempFile>,
}

enum Member {
    /// Offset and size of its data in the archive.
    Data(u64, u64),
    /// A symbolic or hard link to another member.
    Link(String),
}

enum Container {
    Dir(OwnedFd),
    Archive {
        file: File,
        members: HashMap<String, Member>,
    },
}

/// A member of an archive, read with `pread` so that readers do not share a position.
struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside this member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A blob opened for reading.
struct Blob<'a> {
    reader: Box<dyn Read + 'a>,
    len: u64,
}

/// `raw` (a member name or link target inside an archive, relative to directory `base`) as a
/// key: `a/b/c` without `.` or empty components. `None` for absolute names and names that
/// climb out of the archive.
fn archive_key(raw: &[u8], base: &str) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    if text.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// The directory part of an archive key.
fn parent_key(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Lists the members of a tar archive. Truncation inside a member is found here; a member
/// missing at the end is found when it is looked up.
fn index_archive(file: &File) -> Result<HashMap<String, Member>, SourceError> {
    let len = file.metadata().map_err(SourceError::BadArchive)?.len();
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive
        .entries_with_seek()
        .map_err(SourceError::BadArchive)?
    {
        let entry = entry.map_err(SourceError::BadArchive)?;
        let Some(key) = archive_key(&entry.path_bytes(), "") else {
            continue;
        };
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (offset, size) = (entry.raw_file_position(), entry.size());
                let end = offset.saturating_add(size);
                if end > len {
                    return Err(SourceError::Truncated {
                        member: key,
                        end,
                        len,
                    });
                }
                Member::Data(offset, size)
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                match archive_key(&target, parent_key(&key)) {
                    Some(target) => Member::Link(target),
                    None => continue,
                }
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default();
                match archive_key(&target, "") {
                    Some(target) => Member::Link(target),
                    None => continue,
                }
            }
            _ => continue,
        };
        members.insert(key, member);
    }
    Ok(members)
}

/// Hex SHA-256 of what `reader` yields.
fn hash_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut reader, &mut HashWriter(&mut hasher))?;
    Ok(hex(&hasher.finalize()))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex part of a `sha256:<hex>` digest (the only algorithm accepted: it names a file).
fn digest_hex(digest: &str) -> Result<String, SourceError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        SourceError::Unsupported(format!(
            "digest {digest:?}: only sha256 digests are supported"
        ))
    })?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex.to_string())
    } else {
        Err(invalid("digest", format!("{digest:?}")))
    }
}

fn blob_path(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

/// The digest a docker-save member is named by: `<hex>.json`, `<hex>.tar`, `<hex>/...` or
/// `blobs/sha256/<hex>`.
fn digest_in_name(key: &str) -> Option<String> {
    let candidates = [
        key.strip_prefix("blobs/sha256/"),
        key.strip_suffix(".json"),
        key.strip_suffix(".tar"),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|h| digest_hex(&format!("sha256:{h}")).is_ok())
        .map(str::to_string)
}

/// The platform guests run: `linux/<GOARCH>`.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Whether image name `name` (from an annotation or a RepoTag) is what `wanted` asks for:
/// equal, or equal once Docker Hub's implicit `docker.io/` and `library/` are dropped.
fn name_matches(name: &str, wanted: &str) -> bool {
    fn short(n: &str) -> &str {
        let n = n.strip_prefix("docker.io/").unwrap_or(n);
        n.strip_prefix("library/").unwrap_or(n)
    }
    name == wanted || short(name) == short(wanted)
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|e| invalid(what, e))
}

#[derive(Debug, serde::Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

impl Descriptor {
    fn names(&self) -> Vec<String> {
        [CONTAINERD_NAME, REF_NAME]
            .iter()
            .filter_map(|k| self.annotations.get(*k).cloned())
            .collect()
    }
}

#[derive(Debug, serde::Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, serde::Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, serde::Deserialize)]
struct ImageManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, serde::Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, serde::Deserialize)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
struct LayoutMarker {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

/// An image manifest found in an index.
struct Candidate {
    hex: String,
    bytes: Vec<u8>,
    names: Vec<String>,
}

/// A layer's tar stream, decompressed, hashed as it is read.
pub struct LayerStream<'a> {
    inner: Box<dyn Read + 'a>,
    hasher: Sha256,
    member: String,
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl LayerStream<'_> {
    /// Reads what is left and checks the whole stream against the layer's `diff_id`.
    pub fn finish(mut self, layer: &Layer) -> Result<(), SourceError> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| SourceError::Io {
            what: "reading",
            path: self.member.clone(),
            error: e,
        })?;
        let actual = hex(&self.hasher.finalize());
        if actual == layer.diff_id {
            Ok(())
        } else {
            Err(SourceError::Digest {
                path: format!("{} (uncompressed)", self.member),
                expected: format!("sha256:{}", layer.diff_id),
                actual: format!("sha256:{actual}"),
            })
        }
    }
}

/// `reader` decompressed when it starts like gzip; zstd is refused.
fn decompressed<'a>(reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(1 << 16, reader);
    let head = buf.fill_buf()?;
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&ZSTD_MAGIC) {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "zstd-compressed layers are not supported (re-save the image with gzip or no \
             compression)",
        ))
    } else {
        Ok(Box::new(buf))
    }
}

impl Container {
    /// Opens member `path` (`a/b/c`, trusted to have no `..`).
    fn open(&self, path: &str) -> Result<Blob<'_>, SourceError> {
        match self {
            Container::Dir(dir) => {
                let io_err = |error: io::Error| SourceError::Io {
                    what: "opening",
                    path: path.to_string(),
                    error,
                };
                let parts: Vec<&str> = path.split('/').collect();
                let (name, dirs) = parts.split_last().ok_or_else(|| invalid("path", path))?;
                let mut current = rfs::openat(dir, ".", dir_flags(), Mode::empty())
                    .map_err(|e| io_err(e.into()))?;
                for part in dirs {
                    current = open_component(&current, part, dir_flags(), path)?;
                }
                let fd = open_component(
                    &current,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    path,
                )?;
                let file = File::from(fd);
                let meta = file.metadata().map_err(io_err)?;
                if !meta.is_file() {
                    return Err(invalid(path, "not a regular file"));
                }
                Ok(Blob {
                    len: meta.len(),
                    reader: Box::new(file),
                })
            }
            Container::Archive { file, members } => {
                let mut key = path.to_string();
                for _ in 0..MAX_LINK_HOPS {
                    match members.get(&key) {
                        None => return Err(SourceError::Missing(path.to_string())),
                        Some(Member::Link(target)) => key = target.clone(),
                        Some(Member::Data(offset, size)) => {
                            return Ok(Blob {
                                len: *size,
                                reader: Box::new(Section {
                                    file,
                                    pos: *offset,
                                    end: offset + size,
                                }),
                            })
                        }
                    }
                }
                Err(invalid(path, "too many links"))
            }
        }
    }

    fn has(&self, path: &str) -> Result<bool, SourceError> {
        match self.open(path) {
            Ok(_) => Ok(true),
            Err(SourceError::Missing(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens `name` in `dir` with `flags` (which hold `O_NOFOLLOW`).
fn open_component(
    dir: &OwnedFd,
    name: &str,
    flags: OFlags,
    path: &str,
) -> Result<OwnedFd, SourceError> {
    rfs::openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
        Errno::NOENT => SourceError::Missing(path.to_string()),
        Errno::LOOP => invalid(
            path,
            format!("{name} is a symbolic link (blobs are read without following links)"),
        ),
        e => SourceError::Io {
            what: "opening",
            path: path.to_string(),
            error: e.into(),
        },
    })
}

impl Source {
    /// Opens the layout directory or archive at `path`; a compressed archive is decompressed
    /// into a file in `scratch` (a private directory), removed when the source is dropped.
    pub fn open(path: &Path, scratch: &Path) -> Result<Source, SourceError> {
        let io_err = |what: &'static str, p: &Path| {
            let p = p.display().to_string();
            move |error: io::Error| SourceError::Io {
                what,
                path: p,
                error,
            }
        };
        let meta = std::fs::metadata(path).map_err(io_err("reading", path))?;
        if meta.is_dir() {
            let dir = rfs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err("opening", path)(e.into()))?;
            let source = Source {
                kind: SourceKind::OciLayout,
                container: Container::Dir(dir),
                _scratch: None,
            };
            if !(source.container.has("oci-layout")? && source.container.has("index.json")?) {
                return Err(SourceError::Unrecognised);
            }
            source.check_layout_marker()?;
            return Ok(source);
        }
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io_err("reading", path))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("reading", path))?;
        let (file, scratch_file) = if magic[..n].starts_with(&GZIP_MAGIC) {
            let mut tmp = tempfile::Builder::new()
                .prefix(".import-source-")
                .tempfile_in(scratch)
                .map_err(io_err("creating a scratch file in", scratch))?;
            let mut gz = flate2::read::MultiGzDecoder::new(BufReader::new(file));
            io::copy(&mut gz, tmp.as_file_mut()).map_err(SourceError::BadArchive)?;
            let reopened = tmp.reopen().map_err(io_err("reopening", tmp.path()))?;
            (reopened, Some(tmp))
        } else if magic[..n] == ZSTD_MAGIC {
            return Err(SourceError::Unsupported(
                "zstd-compressed archives are not supported (decompress it first)".into(),
            ));
        } else {
            (file, None)
        };
        let members = index_archive(&file)?;
        let container = Container::Archive { file, members };
        let kind = if container.has("oci-layout")? && container.has("index.json")? {
            SourceKind::OciArchive
        } else if container.has("manifest.json")? {
            SourceKind::DockerArchive
        } else {
            return Err(SourceError::Unrecognised);
        };
        let source = Source {
            kind,
            container,
            _scratch: scratch_file,
        };
        if kind == SourceKind::OciArchive {
            source.check_layout_marker()?;
        }
        Ok(source)
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    fn check_layout_marker(&self) -> Result<(), SourceError> {
        let marker: LayoutMarker = parse("oci-layout", &self.read("oci-layout", None, None)?)?;
        if marker.version.starts_with("1.") {
            Ok(())
        } else {
            Err(SourceError::Unsupported(format!(
                "OCI image layout version {}",
                marker.version
            )))
        }
    }

    /// Reads member `path` (at most [`MAX_JSON`] bytes), checking its size and digest when
    /// given.
    fn read(
        &self,
        path: &str,
        hex_digest: Option<&str>,
        size: Option<u64>,
    ) -> Result<Vec<u8>, SourceError> {
        let blob = self.container.open(path)?;
        if let Some(expected) = size.filter(|s| *s != blob.len) {
            return Err(SourceError::Size {
                path: path.to_string(),
                expected,
                actual: blob.len,
            });
        }
        if blob.len > MAX_JSON {
            return Err(invalid(path, format!("{} bytes is too large", blob.len)));
        }
        let mut bytes = Vec::new();
        blob.reader
            .take(MAX_JSON)
            .read_to_end(&mut bytes)
            .map_err(|e| SourceError::Io {
                what: "reading",
                path: path.to_string(),
                error: e,
            })?;
        if let Some(expected) = hex_digest {
            let actual = hex(&Sha256::digest(&bytes));
            if actual != expected {
                return Err(SourceError::Digest {
                    path: path.to_string(),
                    expected: format!("sha256:{expected}"),
                    actual: format!("sha256:{actual}"),
                });
            }
        }
        Ok(bytes)
    }

    /// Chooses the image (by `reference` where the source holds several) and reads its
    /// manifest and configuration.
    pub fn resolve(&self, reference: Option<&str>) -> Result<Resolved, SourceError> {
        match self.kind {
            SourceKind::OciLayout | SourceKind::OciArchive => self.resolve_oci(reference),
            SourceKind::DockerArchive => self.resolve_docker(reference),
        }
    }

    fn resolve_oci(&self, reference: Option<&str>) -> Result<Resolved, SourceError> {
        let index: Index = parse("index.json", &self.read("index.json", None, None)?)?;
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut all_names = Vec::new();
        for desc in &index.manifests {
            let names = desc.names();
            all_names.extend(names.iter().cloned());
            if let Some(wanted) = reference {
                if !names.iter().any(|n| name_matches(n, wanted)) {
                    continue;
                }
            }
            self.collect(desc, &names, 0, &mut candidates)?;
        }
        let arch = host_architecture();
        let listed = || {
            if all_names.is_empty() {
                "none".to_string()
            } else {
                all_names.join(", ")
            }
        };
        let chosen = match (candidates.len(), reference) {
            (1, _) => candidates.remove(0),
            (0, Some(wanted)) => {
                return Err(SourceError::Choice(format!(
                    "no image named {wanted:?} for linux/{arch} (names: {})",
                    listed()
                )))
            }
            (0, None) => {
                return Err(SourceError::Choice(format!(
                    "no image for linux/{arch} in index.json"
                )))
            }
            (n, _) => {
                return Err(SourceError::Choice(format!(
                    "{n} images for linux/{arch} (names: {}): choose one with --ref",
                    listed()
                )))
            }
        };
        let manifest: ImageManifest =
            parse(&blob_path(&chosen.hex), &chosen.bytes).map_err(|e| match e {
                SourceError::Invalid { detail, .. } => {
                    invalid(format!("image manifest {}", chosen.hex), detail)
                }
                e => e,
            })?;
        let config_hex = digest_hex(&manifest.config.digest)?;
        let config_bytes = self.read(
            &blob_path(&config_hex),
            Some(&config_hex),
            Some(manifest.config.size),
        )?;
        let config: ImageConfig = parse("image configuration", &config_bytes)?;
        let diff_ids = check_config(&config, manifest.layers.len())?;
        let layers = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(desc, diff_id)| {
                let hex = digest_hex(&desc.digest)?;
                Ok(Layer {
                    member: blob_path(&hex),
                    digest: Some(hex),
                    size: Some(desc.size),
                    diff_id,
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        let run = config.config.unwrap_or_default();
        Ok(Resolved {
            kind: self.kind,
            manifest_digest: Some(format!("sha256:{}", chosen.hex)),
            image_id: format!("sha256:{config_hex}"),
            reference: reference
                .map(str::to_string)
                .or_else(|| chosen.names.first().cloned()),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            layers,
        })
    }

    /// Adds the image manifests that `desc` leads to (itself, or those of the index it is)
    /// for this platform.
    fn collect(
        &self,
        desc: &Descriptor,
        names: &[String],
        depth: usize,
        out: &mut Vec<Candidate>,
    ) -> Result<(), SourceError> {
        if depth > MAX_INDEX_DEPTH {
            return Err(invalid("index.json", "image indexes nested too deeply"));
        }
        if let Some(p) = &desc.platform {
            if p.os != "linux" || p.architecture != host_architecture() {
                return Ok(());
            }
        }
        let hex = digest_hex(&desc.digest)?;
        let bytes = self.read(&blob_path(&hex), Some(&hex), Some(desc.size))?;
        let value: serde_json::Value = parse(&blob_path(&hex), &bytes)?;
        if value.get("manifests").is_some() {
            let nested: Index = parse(&blob_path(&hex), &bytes)?;
            for d in &nested.manifests {
                let own = d.names();
                let names = if own.is_empty() { names } else { &own };
                self.collect(d, names, depth + 1, out)?;
            }
        } else if value.get("layers").is_some() {
            match out.iter_mut().find(|c| c.hex == hex) {
                Some(seen) => seen.names.extend(names.iter().cloned()),
                None => out.push(Candidate {
                    hex,
                    bytes,
                    names: names.to_vec(),
                }),
            }
        }
        Ok(())
    }

    fn resolve_docker(&self, reference: Option<&str>) -> Result<Resolved, SourceError> {
        let entries: Vec<DockerEntry> =
            parse("manifest.json", &self.read("manifest.json", None, None)?)?;
        let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
        let all_tags: Vec<String> = entries.iter().flat_map(tags).collect();
        let listed = if all_tags.is_empty() {
            "none".to_string()
        } else {
            all_tags.join(", ")
        };
        let mut chosen: Vec<&DockerEntry> = entries
            .iter()
            .filter(|e| reference.is_none_or(|r| tags(e).iter().any(|t| name_matches(t, r))))
            .collect();
        let entry = match (chosen.len(), reference) {
            (1, _) => chosen.remove(0),
            (0, Some(wanted)) => {
                return Err(SourceError::Choice(format!(
                    "no image tagged {wanted:?} in manifest.json (tags: {listed})"
                )))
            }
            (0, None) => return Err(invalid("manifest.json", "it lists no image")),
            (n, _) => {
                return Err(SourceError::Choice(format!(
                    "{n} images in manifest.json (tags: {listed}): choose one with --ref"
                )))
            }
        };
        let config_key = archive_key(entry.config.as_bytes(), "")
            .ok_or_else(|| invalid("manifest.json", format!("Config {:?}", entry.config)))?;
        let config_bytes = self.read(&config_key, None, None)?;
        let config_hex = hex(&Sha256::digest(&config_bytes));
        if let Some(named) = digest_in_name(&config_key).filter(|n| *n != config_hex) {
            return Err(SourceError::Digest {
                path: config_key,
                expected: format!("sha256:{named}"),
                actual: format!("sha256:{config_hex}"),
            });
        }
        let config: ImageConfig = parse("image configuration", &config_bytes)?;
        let diff_ids = check_config(&config, entry.layers.len())?;
        let layers = entry
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(path, diff_id)| {
                let member = archive_key(path.as_bytes(), "")
                    .ok_or_else(|| invalid("manifest.json", format!("layer {path:?}")))?;
                Ok(Layer {
                    digest: member
                        .strip_prefix("blobs/sha256/")
                        .and_then(|h| digest_hex(&format!("sha256:{h}")).ok()),
                    member,
                    size: None,
                    diff_id,
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        let run = config.config.unwrap_or_default();
        Ok(Resolved {
            kind: self.kind,
            manifest_digest: None,
            image_id: format!("sha256:{config_hex}"),
            reference: reference
                .map(str::to_string)
                .or_else(|| tags(entry).first().cloned()),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            layers,
        })
    }

    /// Checks every layer before anything is extracted: its blob's size and digest, or, for a
    /// layer without a digest of its own, its uncompressed stream against its `diff_id`.
    pub fn verify(&self, image: &Resolved) -> Result<(), SourceError> {
        for layer in &image.layers {
            let blob = self.container.open(&layer.member)?;
            if let Some(expected) = layer.size.filter(|s| *s != blob.len) {
                return Err(SourceError::Size {
                    path: layer.member.clone(),
                    expected,
                    actual: blob.len,
                });
            }
            let reading = |error| SourceError::Io {
                what: "reading",
                path: layer.member.clone(),
                error,
            };
            let (actual, expected, shown) = match &layer.digest {
                Some(digest) => (
                    hash_reader(blob.reader).map_err(reading)?,
                    digest,
                    layer.member.clone(),
                ),
                None => (
                    hash_reader(decompressed(blob.reader).map_err(reading)?).map_err(reading)?,
                    &layer.diff_id,
                    format!("{} (uncompressed)", layer.member),
                ),
            };
            if actual != *expected {
                return Err(SourceError::Digest {
                    path: shown,
                    expected: format!("sha256:{expected}"),
                    actual: format!("sha256:{actual}"),
                });
            }
        }
        Ok(())
    }

    /// The uncompressed tar stream of `layer`; [`LayerStream::finish`] checks it.
    pub fn layer(&self, layer: &Layer) -> Result<LayerStream<'_>, SourceError> {
        let blob = self.container.open(&layer.member)?;
        let inner = decompressed(blob.reader).map_err(|e| SourceError::Io {
            what: "reading",
            path: layer.member.clone(),
            error: e,
        })?;
        Ok(LayerStream {
            inner,
            hasher: Sha256::new(),
            member: layer.member.clone(),
        })
    }
}

/// Checks the configuration's platform and layer list; returns its diff IDs (hex).
fn check_config(config: &ImageConfig, layers: usize) -> Result<Vec<String>, SourceError> {
    let arch = host_architecture();
    if let Some(os) = config.os.as_deref().filter(|os| *os != "linux") {
        return Err(SourceError::Unsupported(format!(
            "the image is for {os}; guests run linux/{arch}"
        )));
    }
    if let Some(a) = config.architecture.as_deref().filter(|a| *a != arch) {
        return Err(SourceError::Unsupported(format!(
            "the image is for linux/{a}; guests run linux/{arch}"
        )));
    }
    if config.rootfs.diff_ids.len() != layers {
        return Err(invalid(
            "image configuration",
            format!(
                "{} diff_ids for {layers} layers",
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| digest_hex(d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_keys_that_cannot_leave_the_archive() {
        assert_eq!(
            archive_key(b"./blobs//sha256/ab", "").unwrap(),
            "blobs/sha256/ab"
        );
        assert_eq!(archive_key(b"../x/layer.tar", "y").unwrap(), "x/layer.tar");
        assert_eq!(archive_key(b"../../x", "y"), None);
        assert_eq!(archive_key(b"/etc/passwd", ""), None);
        assert_eq!(archive_key(b".", ""), None);
    }

    #[test]
    fn only_lower_case_sha256_digests_name_blobs() {
        let hex = "ab".repeat(32);
        assert_eq!(digest_hex(&format!("sha256:{hex}")).unwrap(), hex);
        for bad in [
            format!("sha512:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{hex}/x"),
        ] {
            assert!(digest_hex(&bad).is_err(), "{bad}");
        }
        assert_eq!(digest_in_name(&format!("{hex}.json")), Some(hex.clone()));
        assert_eq!(digest_in_name(&format!("blobs/sha256/{hex}")), Some(hex));
        assert_eq!(digest_in_name("config.json"), None);
    }

    #[test]
    fn docker_hub_names_match_with_or_without_their_implicit_prefix() {
        assert!(name_matches("docker.io/library/alpine:3.19", "alpine:3.19"));
        assert!(name_matches("alpine:3.19", "docker.io/library/alpine:3.19"));
        assert!(name_matches("3.19", "3.19"));
        assert!(!name_matches("alpine:3.19", "alpine:3.18"));
    }
}
