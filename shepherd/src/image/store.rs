//! The image store: one directory per image under the store directory.
//!
//! Builders and importers lock the image's name (`.<name>.lock`); importers also lock the image
//! ID they import (`.sha256:<hex>.lock`, a name no image can have), always in that order: ID,
//! then name. They work in a staging directory `.<verb>-<name>-<pid>` in the store and rename it
//! into place at the end.
//!
//! A job holds its image for its whole life with a shared lock on `.<name>.in-use` (root's,
//! mode 0600: no other user can hold it, or block it); `image rm` takes that lock exclusively
//! without waiting, so it refuses an image a running job uses.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::manifest::Manifest;
use super::verification::{self, Verified};
use super::{validate_name, ImageError, MANIFEST_FILE};

/// A directory of images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// An image whose file matched its manifest when it was resolved.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    pub manifest: Manifest,
    pub check: Verified,
}

/// One entry of [`ImageStore::list`]: an image's name and its manifest, or why that could not
/// be read.
pub type Listing = (String, Result<Manifest, ImageError>);

/// A held lock on one image name (building and removing take it) or image ID (importing).
pub struct ImageLock {
    _lock: Flock<File>,
}

/// A running job's hold on its image: while any is held, `image rm` refuses the image.
#[derive(Debug)]
pub struct ImageInUse {
    lock: Flock<File>,
}

impl ImageInUse {
    /// The descriptor that holds the lock (a forked child that is not the holder closes it).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }
}

/// How long a job waits for an `image rm` in progress (which holds the in-use lock only while it
/// deletes the image's directory) before it gives up.
const IN_USE_WAIT: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });

impl ImageStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of image `name` (which need not exist).
    pub fn image_dir(&self, name: &str) -> Result<PathBuf, ImageError> {
        validate_name(name)?;
        Ok(self.dir.join(name))
    }

    /// The names of the images in the store, sorted (a missing store has none).
    pub fn names(&self) -> Result<Vec<String>, ImageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ImageError::Io {
                    what: "listing",
                    path: self.dir.clone(),
                    source: e,
                })
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok() && self.dir.join(n).join(MANIFEST_FILE).is_file())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The manifest of every image, or why it could not be read.
    pub fn list(&self) -> Result<Vec<Listing>, ImageError> {
        Ok(self
            .names()?
            .into_iter()
            .map(|name| {
                let manifest = Manifest::load(&name, &self.dir.join(&name).join(MANIFEST_FILE));
                (name, manifest)
            })
            .collect())
    }

    /// The manifest of image `name`, or [`ImageError::Unknown`].
    pub fn manifest(&self, name: &str) -> Result<Manifest, ImageError> {
        let dir = self.image_dir(name)?;
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            let available = self.names().unwrap_or_default();
            return Err(ImageError::Unknown {
                name: name.to_string(),
                store: self.dir.clone(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        }
        Manifest::load(name, &path)
    }

    /// Resolves `name` and checks its file against the manifest. Writes nothing but the
    /// record of a successful full check (see [`verification`]).
    pub fn verified(&self, name: &str) -> Result<VerifiedImage, ImageError> {
        let manifest = self.manifest(name)?;
        let dir = self.image_dir(name)?;
        let path = dir.join(&manifest.file);
        let check = verification::verify(&dir, &path, &manifest)?;
        Ok(VerifiedImage {
            name: name.to_string(),
            path,
            manifest,
            check,
        })
    }

    /// Takes the lock for image `name`, waiting for a build or removal in progress. Creates
    /// the store directory when missing.
    pub fn lock(&self, name: &str) -> Result<ImageLock, ImageError> {
        validate_name(name)?;
        self.lock_file(&format!(".{name}.lock"))
    }

    /// Takes the lock for importing image ID `image_id` (`sha256:<hex>`), waiting for another
    /// import of the same ID. Take it before the name's lock.
    pub fn lock_image_id(&self, image_id: &str) -> Result<ImageLock, ImageError> {
        let hex = image_id.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::InvalidName(image_id.to_string()));
        }
        self.lock_file(&format!(".sha256:{hex}.lock"))
    }

    fn lock_file(&self, file_name: &str) -> Result<ImageLock, ImageError> {
        std::fs::create_dir_all(&self.dir).map_err(ImageError::io("creating", &self.dir))?;
        let path = self.dir.join(file_name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io("opening", &path))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
                what: "locking",
                path,
                source: errno.into(),
            })?;
        Ok(ImageLock { _lock: lock })
    }

    /// The images imported from image ID `image_id`, with their manifests.
    pub fn with_image_id(&self, image_id: &str) -> Result<Vec<(String, Manifest)>, ImageError> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|(name, manifest)| Some((name, manifest.ok()?)))
            .filter(|(_, m)| m.source.as_ref().is_some_and(|s| s.image_id == image_id))
            .collect())
    }

    /// Where image `name`'s in-use lock is.
    fn in_use_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.in-use"))
    }

    /// The in-use lock file of image `name`, opened (and created, as root's, mode 0600). `None`
    /// when this process may not open it (a caller who is neither root nor the store's owner).
    fn open_in_use(&self, name: &str) -> Result<Option<File>, ImageError> {
        validate_name(name)?;
        let path = self.in_use_path(name);
        match File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => Ok(Some(file)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(ImageError::Io {
                what: "opening",
                path,
                source: e,
            }),
        }
    }

    /// Marks image `name` as used by a running job until the returned hold is dropped. Waits
    /// (at most [`IN_USE_WAIT`]) for an `image rm` in progress. `None` when this caller cannot
    /// hold it (see [`Self::open_in_use`]): `image rm` then does not know of this job.
    pub fn hold_in_use(&self, name: &str) -> Result<Option<ImageInUse>, ImageError> {
        let Some(mut file) = self.open_in_use(name)? else {
            return Ok(None);
        };
        let deadline = Instant::now() + IN_USE_WAIT;
        loop {
            match self.try_lock_in_use(name, file, FlockArg::LockSharedNonblock)? {
                Ok(lock) => return Ok(Some(ImageInUse { lock })),
                Err(back) if Instant::now() < deadline => {
                    file = back;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => {
                    return Err(ImageError::Removing {
                        name: name.to_string(),
                    })
                }
            }
        }
    }

    /// Locks the in-use file without waiting: `Ok(Err(file))` when the lock is taken.
    fn try_lock_in_use(
        &self,
        name: &str,
        file: File,
        how: FlockArg,
    ) -> Result<Result<Flock<File>, File>, ImageError> {
        match Flock::lock(file, how) {
            Ok(lock) => Ok(Ok(lock)),
            Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
            Err((_, errno)) => Err(ImageError::Io {
                what: "locking",
                path: self.in_use_path(name),
                source: errno.into(),
            }),
        }
    }

    /// Removes image `name`; refuses while a running job holds it ([`Self::hold_in_use`]).
    pub fn remove(&self, name: &str) -> Result<Manifest, ImageError> {
        let _lock = self.lock(name)?;
        let manifest = self.manifest(name)?;
        let dir = self.image_dir(name)?;
        let _unused = match self.open_in_use(name)? {
            Some(file) => {
                match self.try_lock_in_use(name, file, FlockArg::LockExclusiveNonblock)? {
                    Ok(lock) => Some(lock),
                    Err(_) => {
                        return Err(ImageError::InUse {
                            name: name.to_string(),
                        })
                    }
                }
            }
            None => None,
        };
        std::fs::remove_dir_all(&dir).map_err(ImageError::io("removing", &dir))?;
        // The lock file stays: unlinking it while someone waits on it would let a later
        // builder lock a new file and run beside that waiter.
        Ok(manifest)
    }
}

/// Whether `file_name` is a staging directory `<prefix><pid>` (a build or import of exactly the
/// name in `prefix`, not of a longer name that starts the same).
pub(crate) fn is_staging_of(file_name: &OsStr, prefix: &str) -> bool {
    file_name
        .to_str()
        .and_then(|n| n.strip_prefix(prefix))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::IMAGE_FILE;

    fn add_image(store: &ImageStore, name: &str, contents: &[u8]) -> Manifest {
        let dir = store.image_dir(name).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(IMAGE_FILE), contents).unwrap();
        let manifest = Manifest {
            name: name.into(),
            suite: "bullseye".into(),
            mirror: String::new(),
            variant: "minbase".into(),
            file: IMAGE_FILE.into(),
            fstype: "ext4".into(),
            size: contents.len() as u64,
            sha256: verification::sha256_file(&dir.join(IMAGE_FILE)).unwrap(),
            created: String::new(),
            os_version: None,
            source: None,
        };
        manifest.save(&dir.join(MANIFEST_FILE)).unwrap();
        manifest
    }

    #[test]
    fn lists_resolves_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        add_image(&store, "b", b"bbb");
        add_image(&store, "a", b"aaa");
        std::fs::create_dir(tmp.path().join("not-an-image")).unwrap();
        assert_eq!(store.names().unwrap(), ["a", "b"]);
        let a = store.verified("a").unwrap();
        assert_eq!(a.path, tmp.path().join("a").join(IMAGE_FILE));
        store.remove("a").unwrap();
        assert_eq!(store.names().unwrap(), ["b"]);
    }

    #[test]
    fn an_image_a_job_holds_is_not_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        add_image(&store, "a", b"aaa");
        let held = store
            .hold_in_use("a")
            .unwrap()
            .expect("the store's owner can hold");
        let second = store
            .hold_in_use("a")
            .unwrap()
            .expect("two jobs can hold one image");
        let err = store.remove("a").unwrap_err();
        assert!(matches!(err, ImageError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by a running job"), "{err}");
        assert_eq!(store.names().unwrap(), ["a"]);
        drop(held);
        assert!(matches!(store.remove("a"), Err(ImageError::InUse { .. })));
        drop(second);
        store.remove("a").unwrap();
        assert!(store.names().unwrap().is_empty());
        let mode = std::fs::metadata(tmp.path().join(".a.in-use"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_job_does_not_wait_for_ever_on_a_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        add_image(&store, "a", b"aaa");
        let file = store.open_in_use("a").unwrap().unwrap();
        let _removing = Flock::lock(file, FlockArg::LockExclusive).unwrap();
        let started = Instant::now();
        let err = store
            .hold_in_use("a")
            .map(|_| ())
            .expect_err("no hold while removing");
        assert!(matches!(err, ImageError::Removing { .. }), "{err}");
        assert!(started.elapsed() >= IN_USE_WAIT);
    }

    #[test]
    fn an_unknown_name_says_what_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        add_image(&store, "bullseye", b"x");
        let err = store.verified("bookworm").unwrap_err();
        assert!(matches!(err, ImageError::Unknown { .. }));
        assert!(err.to_string().contains("available: bullseye"), "{err}");
        assert!(matches!(
            store.verified("../etc"),
            Err(ImageError::InvalidName(_))
        ));
    }

    #[test]
    fn a_corrupted_image_is_refused_and_left_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        add_image(&store, "img", b"good contents");
        let file = tmp.path().join("img").join(IMAGE_FILE);
        std::fs::write(&file, b"evil contents").unwrap();
        let err = store.verified("img").unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"evil contents");
        assert!(!tmp
            .path()
            .join("img")
            .join(verification::RECORD_FILE)
            .exists());
    }

    #[test]
    fn staging_directories_of_a_longer_name_are_not_ours() {
        assert!(is_staging_of(OsStr::new(".build-x-123"), ".build-x-"));
        assert!(!is_staging_of(OsStr::new(".build-x-y-123"), ".build-x-"));
        assert!(!is_staging_of(OsStr::new(".build-x-"), ".build-x-"));
    }

    #[test]
    fn a_missing_store_has_no_images() {
        let store = ImageStore::new("/nonexistent/sge_virtualizer/images");
        assert!(store.names().unwrap().is_empty());
    }
}
