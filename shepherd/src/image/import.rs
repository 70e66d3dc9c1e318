//! Importing an OCI or docker-save image into the store (`image import SOURCE NAME`).
//!
//! The source is opened and its image resolved and checked ([`super::oci`]) before anything
//! in the store changes, so a corrupt or truncated source is refused and leaves the store as
//! it was. Then, holding the image ID's lock and then the name's ([`super::store`]), the layers
//! are applied ([`super::unpack`]) to `root/` in a staging directory `.import-NAME-PID` of the
//! store that only root can reach (mode 0700: the image's setuid files are never reachable on
//! the host), the ext4 file is made from that tree ([`super::ext4`]), and the staging directory
//! is renamed into place with its manifest. A failed import removes its staging directory; one
//! that was killed is removed by the next import of that name.
//!
//! An image is stored once per image ID (the digest of its configuration, which names its
//! layers' contents):
//! * importing it again under the same name is a no-op (after checking the stored file);
//! * importing it under another name makes that name share the stored file (a hard link to the
//!   other name's `rootfs.ext4`, checked first) with its own manifest; removing either name
//!   leaves the other whole;
//! * a name that holds another image (or a debootstrap image) is not replaced.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::format::ImageFormat;
use super::manifest::{ImportedFrom, Manifest};
use super::oci::{Resolved, Source, SourceError};
use super::store::{is_staging_of, ImageStore};
use super::unpack::Staging;
use super::verification::sha256_file;
use super::{validate_name, ImageError, MANIFEST_FILE};

/// The largest release file read to name the image's OS.
const MAX_RELEASE_FILE: u64 = 64 << 10;

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// The image's name in the store.
    pub name: String,
    /// An OCI layout directory, an OCI archive or a docker-save archive.
    pub source: PathBuf,
    /// Which image of a source holding several (a tag or name).
    pub reference: Option<String>,
    /// The root file system's format.
    pub format: ImageFormat,
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The layers were extracted and the image made.
    Imported,
    /// The name already held this image ID, intact.
    AlreadyPresent,
    /// The image ID was already in the store under the named image; the new name shares its
    /// file.
    SharedWith(String),
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    pub manifest: Manifest,
    pub outcome: ImportOutcome,
    /// Entries not imported as they were (device nodes, extended attributes the staging file
    /// system refused).
    pub warnings: Vec<String>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn imported_from(req: &ImportRequest, image: &Resolved) -> ImportedFrom {
    ImportedFrom {
        kind: image.kind.as_str().to_string(),
        // Absolute, so that the record means the same from anywhere.
        path: std::fs::canonicalize(&req.source)
            .or_else(|_| std::path::absolute(&req.source))
            .unwrap_or_else(|_| req.source.clone())
            .display()
            .to_string(),
        reference: image.reference.clone(),
        digest: image.manifest_digest.clone(),
        image_id: image.image_id.clone(),
        env: image.env.clone(),
        working_dir: image.working_dir.clone(),
    }
}

/// Imports `req.source` as image `req.name` into `store`.
pub fn import(store: &ImageStore, req: &ImportRequest) -> Result<Imported, ImageError> {
    validate_name(&req.name)?;
    let name = &req.name;
    let fail = |detail: String| ImageError::Build {
        name: name.clone(),
        detail,
    };
    let source_error = |error: SourceError| ImageError::ImportSource {
        name: name.clone(),
        path: req.source.clone(),
        error: Box::new(error),
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            "importing needs root (the image's files keep their owners, and its setuid files \
             must stay unreachable until they are inside the image)"
                .into(),
        ));
    }
    std::fs::create_dir_all(store.dir()).map_err(ImageError::io("creating", store.dir()))?;
    let source = Source::open(&req.source, store.dir()).map_err(source_error)?;
    let image = source
        .resolve(req.reference.as_deref())
        .map_err(source_error)?;
    // The same image ID in the same format: an image's file is one format.
    let holds_it = |m: &Manifest| {
        m.source
            .as_ref()
            .is_some_and(|s| s.image_id == image.image_id)
            && m.file == req.format.file_name()
    };
    // Check every blob before the store changes (not even a lock file), unless this name
    // already holds the image.
    let mut verified = false;
    if !store.manifest(name).is_ok_and(|m| holds_it(&m)) {
        source.verify(&image).map_err(source_error)?;
        verified = true;
    }

    let _id_lock = store.lock_image_id(&image.image_id)?;
    let _lock = store.lock(name)?;
    let final_dir = store.image_dir(name)?;
    if final_dir.join(MANIFEST_FILE).is_file() {
        let existing = store.manifest(name)?;
        if holds_it(&existing) {
            store.verified(name)?;
            return Ok(Imported {
                manifest: existing,
                outcome: ImportOutcome::AlreadyPresent,
                warnings: Vec::new(),
            });
        }
        return Err(ImageError::Exists {
            name: name.clone(),
            origin: existing.origin(),
        });
    }
    let prefix = format!(".import-{name}-");
    if let Ok(entries) = std::fs::read_dir(store.dir()) {
        for entry in entries.filter_map(Result::ok) {
            if is_staging_of(&entry.file_name(), &prefix) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(ImageError::io("removing", &path))?;
            }
        }
    }
    let sharing = store
        .with_image_id(&image.image_id)?
        .into_iter()
        .find(|(other, m)| m.file == req.format.file_name() && store.verified(other).is_ok());
    if sharing.is_none() && !verified {
        source.verify(&image).map_err(source_error)?;
    }

    let staging = store.dir().join(format!("{prefix}{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(ImageError::io("creating", &staging))?;
    let result = match sharing {
        Some((other, manifest)) => share(store, req, &image, &other, &manifest, &staging),
        None => build(&source, req, &image, &staging),
    }
    .and_then(|(manifest, outcome, warnings)| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io("setting the mode of", &staging))?;
        std::fs::rename(&staging, &final_dir)
            .map_err(ImageError::io("moving into place", &staging))?;
        Ok(Imported {
            manifest,
            outcome,
            warnings,
        })
    });
    if result.is_err() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!("removing {}: {e}", staging.display());
        }
    }
    result
}

type Staged = (Manifest, ImportOutcome, Vec<String>);

/// Gives the new name the file of image `other`, which holds the same image ID.
fn share(
    store: &ImageStore,
    req: &ImportRequest,
    image: &Resolved,
    other: &str,
    existing: &Manifest,
    staging: &Path,
) -> Result<Staged, ImageError> {
    let from = store.image_dir(other)?.join(&existing.file);
    let to = staging.join(&existing.file);
    std::fs::hard_link(&from, &to).map_err(ImageError::io("linking", &from))?;
    let manifest = Manifest {
        name: req.name.clone(),
        suite: String::new(),
        mirror: String::new(),
        variant: String::new(),
        created: now(),
        source: Some(imported_from(req, image)),
        ..existing.clone()
    };
    manifest.save(&staging.join(MANIFEST_FILE))?;
    Ok((
        manifest,
        ImportOutcome::SharedWith(other.to_string()),
        Vec::new(),
    ))
}

/// Extracts the layers and makes the image file in `staging`.
fn build(
    source: &Source,
    req: &ImportRequest,
    image: &Resolved,
    staging: &Path,
) -> Result<Staged, ImageError> {
    let name = &req.name;
    let fail = |detail: String| ImageError::Build {
        name: name.clone(),
        detail,
    };
    let root = staging.join("root");
    std::fs::create_dir(&root).map_err(ImageError::io("creating", &root))?;
    let unpack_error = |layer: usize, error| ImageError::Unpack {
        name: name.clone(),
        layer: layer + 1,
        layers: image.layers.len(),
        digest: image.layers[layer].shown_digest(),
        error: Box::new(error),
    };
    let mut tree = Staging::open(&root).map_err(|e| fail(e.to_string()))?;
    for (i, layer) in image.layers.iter().enumerate() {
        let source_error = |error| ImageError::ImportSource {
            name: name.clone(),
            path: req.source.clone(),
            error: Box::new(error),
        };
        let mut stream = source.layer(layer).map_err(source_error)?;
        tree.apply_layer(&mut stream)
            .map_err(|e| unpack_error(i, e))?;
        stream.finish(layer).map_err(source_error)?;
    }
    let os_version = os_version(&tree);
    let warnings = tree.finish().map_err(|e| fail(e.to_string()))?;
    let file = staging.join(req.format.file_name());
    let size = req
        .format
        .make(name, &root, &file, &staging.join("mkfs.log"))
        .map_err(fail)?;
    std::fs::remove_dir_all(&root).map_err(ImageError::io("removing", &root))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
        .map_err(ImageError::io("setting the mode of", &file))?;
    let manifest = Manifest {
        name: name.clone(),
        suite: String::new(),
        mirror: String::new(),
        variant: String::new(),
        file: req.format.file_name().into(),
        fstype: req.format.fstype().into(),
        size,
        sha256: sha256_file(&file)?,
        created: now(),
        os_version,
        source: Some(imported_from(req, image)),
    };
    manifest.save(&staging.join(MANIFEST_FILE))?;
    Ok((manifest, ImportOutcome::Imported, warnings))
}

/// The image's OS version: `/etc/debian_version`, else `ID VERSION_ID` of its os-release
/// (read without following links, so a link to `/usr/lib/os-release` is read there).
fn os_version(tree: &Staging) -> Option<String> {
    if let Some(v) = tree.read_file("etc/debian_version", MAX_RELEASE_FILE) {
        return Some(String::from_utf8_lossy(&v).trim().to_string()).filter(|v| !v.is_empty());
    }
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| tree.read_file(p, MAX_RELEASE_FILE))?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
    };
    match (field("ID"), field("VERSION_ID")) {
        (Some(id), Some(version)) => Some(format!("{id} {version}")),
        (Some(id), None) => Some(id),
        (None, version) => version,
    }
}

#[cfg(test)]
mod tests;
