//! The manifest of one image: what it was built from, and the size and checksum its file must
//! have.

use std::path::Path;

use super::ImageError;

/// `manifest.json` of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The image's name (its directory in the store).
    pub name: String,
    /// The Debian suite it was bootstrapped from (`bullseye`, `bookworm`, ...).
    pub suite: String,
    /// The mirror debootstrap used.
    pub mirror: String,
    /// debootstrap `--variant`.
    pub variant: String,
    /// The image file, relative to the image's directory.
    pub file: String,
    /// Its file system type, as the guest mounts it.
    pub fstype: String,
    /// Size of the image file in bytes.
    pub size: u64,
    /// SHA-256 of the image file, lower-case hex.
    pub sha256: String,
    /// When it was built, RFC 3339 UTC.
    pub created: String,
    /// `/etc/debian_version` inside the image, when it has one.
    #[serde(default)]
    pub os_version: Option<String>,
}

impl Manifest {
    /// Reads and checks the manifest at `path` for the image `name`.
    pub fn load(name: &str, path: &Path) -> Result<Self, ImageError> {
        let bad = |detail: String| ImageError::Manifest {
            name: name.to_string(),
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.name != name {
            return Err(bad(format!("it names image {:?}", manifest.name)));
        }
        if manifest.file.contains('/') || manifest.file.starts_with('.') || manifest.file.is_empty()
        {
            return Err(bad(format!("bad image file name {:?}", manifest.file)));
        }
        if manifest.sha256.len() != 64 || !manifest.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("bad sha256 {:?}", manifest.sha256)));
        }
        Ok(manifest)
    }

    /// Writes the manifest to `path` (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<(), ImageError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ImageError::Manifest {
            name: self.name.clone(),
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(ImageError::io("writing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(ImageError::io("renaming", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "bullseye".into(),
            suite: "bullseye".into(),
            mirror: "http://deb.debian.org/debian".into(),
            variant: "minbase".into(),
            file: "rootfs.ext4".into(),
            fstype: "ext4".into(),
            size: 1 << 20,
            sha256: "ab".repeat(32),
            created: "2026-11-25T23:00:00Z".into(),
            os_version: Some("11.11".into()),
        }
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        sample().save(&path).unwrap();
        assert_eq!(Manifest::load("bullseye", &path).unwrap(), sample());
    }

    #[test]
    fn a_manifest_for_another_name_or_with_a_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        sample().save(&path).unwrap();
        assert!(Manifest::load("other", &path).is_err());
        let mut m = sample();
        m.file = "../../etc/shadow".into();
        m.save(&path).unwrap();
        assert!(Manifest::load("bullseye", &path).is_err());
        let mut m = sample();
        m.sha256 = "zz".into();
        m.save(&path).unwrap();
        assert!(Manifest::load("bullseye", &path).is_err());
    }
}
