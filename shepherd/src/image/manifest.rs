//! The manifest of one image: what it was built from (a Debian suite, or an imported OCI or
//! docker-save image), and the size and checksum its file must have.

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
    /// `/etc/debian_version` inside the image, when it has one (for imported images without
    /// one: `ID VERSION_ID` of its os-release).
    #[serde(default)]
    pub os_version: Option<String>,
    /// Where an imported image came from; `None` for images built with debootstrap (and in
    /// manifests written before imports existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImportedFrom>,
}

/// The origin of an imported image (`image import`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportedFrom {
    /// `oci-layout`, `oci-archive` or `docker-archive`.
    pub kind: String,
    /// The directory or archive it was imported from (absolute).
    pub path: String,
    /// The name it was chosen by in the source (`--ref`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The image digest: the digest of its OCI image manifest, `sha256:<hex>`. A docker-save
    /// archive without an OCI layout has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The image ID: the digest of its configuration, `sha256:<hex>`. Images with the same ID
    /// have the same file system tree.
    pub image_id: String,
    /// The configuration's `Env` (`KEY=value` strings).
    #[serde(default)]
    pub env: Vec<String>,
    /// The configuration's `WorkingDir`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

impl Manifest {
    /// Where the image came from, for messages: `suite bullseye` or `imported from ...`.
    pub fn origin(&self) -> String {
        match &self.source {
            None => format!("suite {}", self.suite),
            Some(from) => format!(
                "imported from {} {}, image ID {}",
                from.kind, from.path, from.image_id
            ),
        }
    }

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
            source: None,
        }
    }

    fn imported() -> Manifest {
        Manifest {
            suite: String::new(),
            mirror: String::new(),
            variant: String::new(),
            source: Some(ImportedFrom {
                kind: "oci-archive".into(),
                path: "/srv/images/app.tar".into(),
                reference: Some("app:1".into()),
                digest: Some(format!("sha256:{}", "cd".repeat(32))),
                image_id: format!("sha256:{}", "ef".repeat(32)),
                env: vec!["PATH=/usr/bin:/bin".into()],
                working_dir: Some("/work".into()),
            }),
            ..sample()
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
    fn an_imported_image_round_trips_and_an_old_manifest_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        imported().save(&path).unwrap();
        assert_eq!(Manifest::load("bullseye", &path).unwrap(), imported());
        assert!(imported()
            .origin()
            .contains("oci-archive /srv/images/app.tar"));
        // A manifest written before imports existed has no `source`.
        let old = r#"{"name":"bullseye","suite":"bullseye","mirror":"m","variant":"minbase",
            "file":"rootfs.ext4","fstype":"ext4","size":1,"sha256":"SHA","created":""}"#
            .replace("SHA", &"ab".repeat(32));
        std::fs::write(&path, old).unwrap();
        let loaded = Manifest::load("bullseye", &path).unwrap();
        assert_eq!((loaded.source, loaded.os_version), (None, None));
        // And a debootstrap image's manifest does not mention it.
        sample().save(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("source"));
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
