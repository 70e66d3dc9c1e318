//! Remembers the KVM capability probe for the life of the host's boot: the probe boots a
//! calibration guest (about 0.3 s where KVM is software-emulated), and the answer cannot change
//! until the host reboots. Keyed by the kernel's boot id; kept in `/run` (a tmpfs, emptied at
//! boot). Any problem with the cache just means probing again.

use std::path::PathBuf;

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
    let path = cache_path();
    let id = boot_id();
    if let (Some(id), Ok(text)) = (&id, std::fs::read_to_string(&path)) {
        if let Ok(e) = serde_json::from_str::<Entry>(&text) {
            if &e.boot_id == id {
                return (e.usable, e.reason);
            }
        }
    }
    let (usable, reason) = probe();
    if let Some(boot_id) = id {
        let entry = Entry {
            boot_id,
            usable,
            reason: reason.clone(),
        };
        if let (Some(dir), Ok(json)) = (path.parent(), serde_json::to_string(&entry)) {
            // Write-then-rename so a concurrent reader never sees half a file.
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let written = std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&tmp, json))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    (usable, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

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
