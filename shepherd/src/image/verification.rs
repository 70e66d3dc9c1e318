//! Checking an image file against its manifest.
//!
//! A full check hashes the whole file (a second or so for a few hundred MiB). After a full
//! check succeeds, a record of the file's identity (device, inode, size, modification and
//! change times) is kept next to it when the store is writable; while the file still has that
//! identity the hash is not recomputed. Any write to the file changes its change time, which
//! no unprivileged process can set back, so a modified file is always hashed again. (A file
//! changed within the last [`SETTLE`] is not recorded: time stamps come from a coarse clock, so
//! a write in the same tick as the check could otherwise keep the recorded change time.)

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::manifest::Manifest;
use super::ImageError;

/// The record of the last full check, in the image's directory.
pub const RECORD_FILE: &str = "verified.json";

/// How long ago a file must have last changed for its check to be recorded.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The identity of a file as `stat` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata, sha256: &str) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            sha256: sha256.to_string(),
        }
    }
}

/// SHA-256 of the file at `path`, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(ImageError::io("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(ImageError::io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// How a check concluded that the file is intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The whole file was hashed.
    Hashed,
    /// The file is unchanged since its last full check.
    Unchanged,
}

/// Checks `image` (in directory `dir`) against `manifest`.
pub fn verify(dir: &Path, image: &Path, manifest: &Manifest) -> Result<Verified, ImageError> {
    let corrupt = |detail: String| ImageError::Corrupt {
        name: manifest.name.clone(),
        detail,
    };
    let meta = std::fs::metadata(image)
        .map_err(|e| corrupt(format!("image file {}: {e}", image.display())))?;
    if !meta.is_file() {
        return Err(corrupt(format!(
            "{} is not a regular file",
            image.display()
        )));
    }
    if meta.size() != manifest.size {
        return Err(corrupt(format!(
            "{} is {} bytes, the manifest says {}",
            image.display(),
            meta.size(),
            manifest.size
        )));
    }
    let record_path = dir.join(RECORD_FILE);
    let recorded: Option<FileIdentity> = std::fs::read(&record_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    if recorded.as_ref() == Some(&FileIdentity::of(&meta, &manifest.sha256)) {
        return Ok(Verified::Unchanged);
    }
    let actual = sha256_file(image)?;
    if actual != manifest.sha256 {
        return Err(corrupt(format!(
            "SHA-256 of {} is {actual}, the manifest says {}",
            image.display(),
            manifest.sha256
        )));
    }
    // Best effort: an unwritable store only costs a full check next time.
    let settled = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|now| {
            let changed_ns =
                i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
            now.as_nanos() as i128 - changed_ns > SETTLE.as_nanos() as i128
        })
        .unwrap_or(false);
    if !settled {
        return Ok(Verified::Hashed);
    }
    if let Ok(text) = serde_json::to_vec(&FileIdentity::of(&meta, &actual)) {
        let tmp = dir.join(format!(".{RECORD_FILE}.{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &record_path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(Verified::Hashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(contents: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.ext4");
        std::fs::write(&image, contents).unwrap();
        let manifest = Manifest {
            name: "t".into(),
            suite: "bullseye".into(),
            mirror: String::new(),
            variant: "minbase".into(),
            file: "rootfs.ext4".into(),
            fstype: "ext4".into(),
            size: contents.len() as u64,
            sha256: sha256_file(&image).unwrap(),
            created: String::new(),
            os_version: None,
            source: None,
        };
        (dir, image, manifest)
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        let (_dir, image, _) = setup(b"abc");
        assert_eq!(
            sha256_file(&image).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_intact_file_is_hashed_once_then_recognised() {
        let (dir, image, manifest) = setup(b"an image");
        // Freshly written: checked, but not recorded yet.
        assert_eq!(
            verify(dir.path(), &image, &manifest).unwrap(),
            Verified::Hashed
        );
        std::thread::sleep(SETTLE + std::time::Duration::from_millis(100));
        assert_eq!(
            verify(dir.path(), &image, &manifest).unwrap(),
            Verified::Hashed
        );
        assert_eq!(
            verify(dir.path(), &image, &manifest).unwrap(),
            Verified::Unchanged
        );
    }

    #[test]
    fn a_changed_byte_is_found_even_after_a_good_check() {
        let (dir, image, manifest) = setup(b"an image");
        std::thread::sleep(SETTLE + std::time::Duration::from_millis(100));
        assert_eq!(
            verify(dir.path(), &image, &manifest).unwrap(),
            Verified::Hashed
        );
        // Same size, one byte different, modification time restored: the change time moves.
        let before = std::fs::metadata(&image).unwrap().modified().unwrap();
        std::fs::write(&image, b"an imagE").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_modified(before)
            .unwrap();
        assert!(matches!(
            verify(dir.path(), &image, &manifest),
            Err(ImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_truncated_file_is_corrupt() {
        let (dir, image, manifest) = setup(b"an image");
        std::fs::write(&image, b"an").unwrap();
        let err = verify(dir.path(), &image, &manifest).unwrap_err();
        assert!(err.to_string().contains("is 2 bytes"), "{err}");
    }
}
