//! Making an image's file: an ext4 file system made from a directory tree with
//! `mkfs.ext4 -d` (no loop mount, no journal), sized from the tree. Also finding and running
//! the external programs that the image builders use, with their output in a log.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::backend::qemu::find_program;

/// Finds the program `name` in the sbin directories (`$SGE_VIRTUALIZER_<NAME>` overrides).
pub(super) fn program(name: &str) -> Result<PathBuf, String> {
    let sbin = [
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/sbin"),
        PathBuf::from("/usr/bin"),
    ];
    let var = format!(
        "SGE_VIRTUALIZER_{}",
        name.to_uppercase().replace(['.', '-'], "_")
    );
    find_program(name, &var, &sbin).ok_or_else(|| format!("{name} not found (${var} overrides)"))
}

/// The last `n` non-empty lines of a file, joined for an error message.
pub(super) fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Bytes an ext4 file system needs for the tree at `root`, with room to spare.
fn estimate_size(root: &Path) -> std::io::Result<u64> {
    const BLOCK: u64 = 4096;
    let mut total: u64 = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += 256; // inode
            if meta.is_dir() {
                total += BLOCK;
                stack.push(entry.path());
            } else if meta.is_file() || (meta.file_type().is_symlink() && meta.size() > 60) {
                total += meta.size().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    // A quarter more for metadata and a little free space for the overlay's copy-ups to be
    // unnecessary; rounded to 4 MiB.
    let mib4 = 4 << 20;
    Ok((total + total / 4 + (32 << 20)).div_ceil(mib4) * mib4)
}

/// Runs `cmd` with its output in `log`; on failure, the error names `what` and the log's tail.
pub(super) fn run_logged(mut cmd: Command, log: &Path, what: &str) -> Result<(), String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status}): {}", log_tail(log, 6)))
    }
}

/// Makes the ext4 file system `image` (labelled `name`) from the tree at `root`, growing it
/// when the estimate was short; returns its size in bytes.
pub(super) fn make_ext4(name: &str, root: &Path, image: &Path, log: &Path) -> Result<u64, String> {
    let mkfs = program("mkfs.ext4")?;
    let mut size = estimate_size(root).map_err(|e| format!("measuring {}: {e}", root.display()))?;
    let label: String = name.chars().take(16).collect();
    for attempt in 0..3 {
        let _ = std::fs::remove_file(image);
        let file = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
        file.set_len(size)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        drop(file);
        let mut cmd = Command::new(&mkfs);
        // No journal: the image is only ever mounted read-only, and a clean file system can
        // never need journal recovery (which a read-only device could not do).
        cmd.args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-m",
            "0",
            "-O",
            "^has_journal",
        ])
        .args(["-L", &label, "-E", "root_owner=0:0", "-d"])
        .arg(root)
        .arg(image);
        match run_logged(cmd, log, "mkfs.ext4") {
            Ok(()) => return Ok(size),
            Err(e) if attempt < 2 => {
                tracing::info!("mkfs.ext4 with {size} bytes failed ({e}); growing the image");
                size += size / 2;
            }
            Err(e) => return Err(e),
        }
    }
    Err("mkfs.ext4 did not fit the tree".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_estimate_covers_the_tree_with_room() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/big"), vec![1u8; 3 << 20]).unwrap();
        let size = estimate_size(tmp.path()).unwrap();
        assert!(size >= (3 << 20) + (32 << 20), "{size}");
        assert_eq!(size % (4 << 20), 0);
    }
}
