//! Making an image's file as EROFS: `mkfs.erofs` (erofs-utils) straight from the unpacked tree,
//! read-only by design, packed without free space, optionally lz4-compressed. Owners, modes,
//! setuid bits, hard links, symlinks and extended attributes are the tree's.

use std::path::Path;
use std::process::Command;

use super::ext4::{program, run_logged};

/// Makes the EROFS file system `image` from the tree at `root` (`lz4`: compressed with lz4hc);
/// returns its size in bytes.
pub(super) fn make_erofs(root: &Path, image: &Path, log: &Path, lz4: bool) -> Result<u64, String> {
    let mkfs = program("mkfs.erofs")?;
    let _ = std::fs::remove_file(image);
    let mut cmd = Command::new(mkfs);
    cmd.arg("--quiet");
    if lz4 {
        cmd.arg("-zlz4hc");
    }
    cmd.arg(image).arg(root);
    run_logged(cmd, log, "mkfs.erofs")?;
    std::fs::metadata(image)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", image.display()))
}
