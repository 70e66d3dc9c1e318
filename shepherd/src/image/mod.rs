//! OS images: root file systems that jobs run in, kept in a store directory.
//!
//! Each image is a directory `<store>/<name>/` holding `rootfs.ext4` (an ext4 file system,
//! attached to the guest read-only as virtio-blk; the agent puts a tmpfs overlay over it and
//! switches root into it) and `manifest.json` (suite or import source, size, SHA-256, creation
//! time). Before a job uses an image its checksum is verified, so a corrupted image fails the
//! job with a clear error before any VM starts.
//!
//! * [`store`]: listing, resolving, verifying and removing images.
//! * [`manifest`]: the manifest record.
//! * [`verification`]: checksums and the record of the last full check.
//! * [`debootstrap`]: building an image from a Debian suite without loop mounts.
//! * [`oci`]: reading an OCI image layout, OCI archive or docker-save archive, digests checked.
//! * [`unpack`]: applying image layers to a private staging tree without following links.
//! * [`import`]: importing such an image into the store.
//! * [`ext4`]: making an image's ext4 file from a tree.
//! * [`selection`]: which image a job runs in (its queue's, or one it may ask for).

pub mod debootstrap;
mod erofs;
pub mod ext4;
pub mod format;
pub mod image_env;
pub mod import;
pub mod manifest;
pub mod oci;
pub mod selection;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod unpack;
pub mod verification;

use std::path::PathBuf;

pub use manifest::Manifest;
pub use store::{ImageStore, VerifiedImage};

/// The store directory when none is configured.
pub const DEFAULT_STORE: &str = "/var/lib/sge_virtualizer/images";
/// Environment variable that overrides [`DEFAULT_STORE`].
pub const STORE_ENV: &str = "SGE_VIRTUALIZER_IMAGES";
/// The image file inside an image's directory.
pub const IMAGE_FILE: &str = "rootfs.ext4";
/// The manifest inside an image's directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Longest accepted image name.
pub const MAX_NAME_LEN: usize = 64;

/// The store directory: `explicit`, else `$SGE_VIRTUALIZER_IMAGES`, else [`DEFAULT_STORE`].
pub fn store_dir(explicit: Option<&std::path::Path>) -> PathBuf {
    explicit
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(STORE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
}

/// Why an image cannot be used, built or removed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "invalid image name {0:?}: use 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
         not starting with '.'"
    )]
    InvalidName(String),
    #[error("unknown OS image {name:?} in {store} (available: {available})")]
    Unknown {
        name: String,
        store: PathBuf,
        available: String,
    },
    #[error(
        "OS image {name:?} may not be requested by jobs here ({}; allowed: {allowed})",
        selection::JOB_IMAGE_VAR
    )]
    NotAllowed { name: String, allowed: String },
    #[error("OS image {name:?} is corrupted: {detail}")]
    Corrupt { name: String, detail: String },
    #[error("OS image {name:?}: manifest {path}: {detail}")]
    Manifest {
        name: String,
        path: PathBuf,
        detail: String,
    },
    #[error("OS image {name:?} already exists ({origin}); remove it first with `image rm`")]
    Exists { name: String, origin: String },
    #[error("OS image {name:?} is in use by a running job; remove it once no job uses it")]
    InUse { name: String },
    #[error("OS image {name:?} is being removed")]
    Removing { name: String },
    #[error("building OS image {name:?}: {detail}")]
    Build { name: String, detail: String },
    #[error("importing OS image {name:?} from {}: {error}", path.display())]
    ImportSource {
        name: String,
        path: PathBuf,
        error: Box<oci::SourceError>,
    },
    #[error("importing OS image {name:?}: layer {layer} of {layers} ({digest}): {error}")]
    Unpack {
        name: String,
        /// 1-based.
        layer: usize,
        layers: usize,
        digest: String,
        error: Box<unpack::UnpackError>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ImageError::Io { what, path, source }
    }
}

/// Checks an image name: it becomes a directory name in the store.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_plain_directory_names_are_accepted() {
        for ok in ["bullseye", "deb-11.x_test", "a", &"x".repeat(MAX_NAME_LEN)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_that_could_escape_the_store_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(
                matches!(validate_name(bad), Err(ImageError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }
}
