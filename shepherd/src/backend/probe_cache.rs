//! Remembers the KVM capability probe for the life of the host's boot: the probe boots a
//! calibration guest (about 0.3 s where KVM is software-emulated), and the answer cannot change
//! until the host reboots. Keyed by the kernel's boot id; kept in `/run` (a tmpfs, emptied at
//! boot). Any problem with the cache just means probing again.
//!
//! The shepherd (root) reads and writes it, so the cache is used only in a directory that
//! nobody but root or this process's user can change ([`crate::path_trust`]), and neither read
//! nor written through a symlink.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::path_trust;

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    boot_id: String,
    usable: bool,
    reason: String,
}

fn cache_path() -> PathBuf {
    std::env::var_os("SGE_VIRTUALIZER_PROBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/sge_virtualizer/kvm-probe.json"))
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Returns the cached answer for this boot, or runs `probe` and caches its answer.
pub fn cached(probe: impl FnOnce() -> (bool, String)) -> (bool, String) {
    cached_at(&cache_path(), probe)
}

/// Whether the cache's directory may be used: created if missing, and changeable only by root
/// or this process's user.
fn usable_dir(dir: &Path) -> bool {
    let _ = std::fs::create_dir_all(dir);
    path_trust::check_directories(dir, nix::unistd::geteuid().as_raw()).is_ok()
}

fn read_entry(path: &Path) -> Option<Entry> {
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `json` to `path` through a new temporary file and a rename, so a concurrent reader
/// never sees half a file.
fn write_entry(path: &Path, json: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| f.write_all(json.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn cached_at(path: &Path, probe: impl FnOnce() -> (bool, String)) -> (bool, String) {
    let usable = path.parent().is_some_and(usable_dir);
    let id = boot_id();
    if let (true, Some(id), Some(e)) = (usable, &id, read_entry(path).filter(|_| usable)) {
        if &e.boot_id == id {
            return (e.usable, e.reason);
        }
    }
    let (usable_kvm, reason) = probe();
    if let (true, Some(boot_id)) = (usable, id) {
        let entry = Entry {
            boot_id,
            usable: usable_kvm,
            reason: reason.clone(),
        };
        if let Ok(json) = serde_json::to_string(&entry) {
            let _ = write_entry(path, &json);
        }
    }
    (usable_kvm, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache in a directory another user could change is neither read nor written.
    #[test]
    fn a_cache_directory_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("kvm-probe.json");
        let Some(id) = boot_id() else {
            eprintln!("SKIPPED: probe cache test: no boot id");
            return;
        };
        // Planted by another user: an answer, and a symlink where the cache is written.
        std::fs::write(
            &path,
            format!(r#"{{"boot_id":"{id}","usable":true,"reason":"planted"}}"#),
        )
        .unwrap();
        assert_eq!(cached_at(&path, || (false, "probed".into())).1, "probed");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let tmp_name = path.with_extension(format!("tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, tmp_name).unwrap();
        cached_at(&path, || (false, "probed".into()));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn second_call_uses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe.json");
        std::env::set_var("SGE_VIRTUALIZER_PROBE_CACHE", &path);
        let first = cached(|| (false, "measured".into()));
        assert_eq!(first, (false, "measured".to_string()));
        assert!(path.is_file());
        let second = cached(|| panic!("probed twice"));
        assert_eq!(second, first);
        // A different boot id invalidates it.
        std::fs::write(
            &path,
            r#"{"boot_id":"other","usable":true,"reason":"stale"}"#,
        )
        .unwrap();
        assert_eq!(cached(|| (false, "fresh".into())).1, "fresh");
        std::env::remove_var("SGE_VIRTUALIZER_PROBE_CACHE");
    }
}
