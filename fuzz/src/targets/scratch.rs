//! The host side of a case: a scratch directory (removed when the case ends) holding what the
//! devices under test are backed by — the vsock muxer's socket, a disk image, a shared
//! directory with files, a subdirectory and symlinks that point out of it — and a sentinel
//! directory outside the share that no guest request may change.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Once;

use tempfile::TempDir;

/// Bytes of the sentinel file outside the share.
const SECRET: &[u8] = b"outside the share\n";

/// Largest file a case may make (RLIMIT_FSIZE): WRITE, SETATTR and FALLOCATE from the guest
/// can ask for any size, and a fuzzer finds the large ones; beyond this they get EFBIG.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// A case's scratch directory.
pub struct Scratch {
    dir: TempDir,
}

impl Scratch {
    /// A new, empty scratch directory (under `$TMPDIR`).
    pub fn new() -> Self {
        limit_file_sizes();
        Self {
            dir: tempfile::tempdir().expect("a scratch directory"),
        }
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates a disk image of `sectors` sectors whose bytes are a function of their offset.
    pub fn disk(&self, sectors: u64) -> PathBuf {
        let path = self.path("disk.img");
        std::fs::write(&path, disk_pattern(sectors)).expect("a disk image");
        path
    }

    /// Creates the shared directory and the sentinel beside it; returns the share's path.
    /// Inside: `file` (some bytes), `dir/inner`, `empty/`, `up -> ..`, `out -> ../outside`,
    /// `abs -> <absolute path of outside>`, `self -> .`.
    pub fn share(&self) -> PathBuf {
        let share = self.path("share");
        let outside = self.path("outside");
        std::fs::create_dir_all(share.join("dir")).expect("share");
        std::fs::create_dir_all(share.join("empty")).expect("share");
        std::fs::create_dir_all(&outside).expect("sentinel directory");
        std::fs::write(outside.join("secret"), SECRET).expect("sentinel");
        std::fs::write(share.join("file"), b"0123456789abcdef").expect("share");
        std::fs::write(share.join("dir/inner"), b"inner").expect("share");
        symlink("..", share.join("up")).expect("share");
        symlink("../outside", share.join("out")).expect("share");
        symlink(&outside, share.join("abs")).expect("share");
        symlink(".", share.join("self")).expect("share");
        share
    }

    /// Panics if anything outside the share changed: the sentinel's bytes, the sentinel
    /// directory's entries, or the scratch directory's entries.
    pub fn assert_outside_unchanged(&self) {
        let outside = self.path("outside");
        let secret = std::fs::read(outside.join("secret"));
        assert_eq!(
            secret.as_deref().ok(),
            Some(SECRET),
            "the sentinel outside the share changed"
        );
        assert_eq!(
            entries(&outside),
            vec!["secret".to_string()],
            "files appeared outside the share"
        );
        let mut top = entries(self.dir.path());
        top.retain(|n| n != "disk.img" && !n.starts_with("v.sock"));
        assert_eq!(
            top,
            vec!["outside".to_string(), "share".to_string()],
            "files appeared beside the share"
        );
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// The initial bytes of a disk of `sectors` sectors.
pub fn disk_pattern(sectors: u64) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Caps the size of files this process makes, once; a write past the cap then fails with EFBIG
/// instead of raising SIGXFSZ.
fn limit_file_sizes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system calls on a valid rlimit; ignoring SIGXFSZ and lowering the soft
        // limit affect only this (fuzzing or test) process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_cur.min(MAX_FILE_BYTES);
                libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            }
        }
    });
}
