//! Tasks this shepherd does not virtualize yet (interactive jobs, `qrsh -inherit` PE tasks,
//! checkpointing jobs) go to the stock `sge_shepherd`, exec'd in place: same PID, cwd, signal
//! mask and `argv[0]`, with `-bg` as execd would have passed it.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Whether a queue hands the tasks it cannot virtualize to the stock shepherd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelegationPolicy {
    /// Run them with the stock shepherd, on the host without a VM (the default).
    #[default]
    Stock,
    /// Refuse them as the job's error: for queues of outsiders, where every job must stay in
    /// a VM.
    Never,
}

/// Where the stock shepherd is: `<binary_path>/<arch>/sge_shepherd`, else
/// `<binary_path>/sge_shepherd` (execd's own lookup), with `binary_path` from the cell's
/// `bootstrap` file (default `$SGE_ROOT/bin`).
pub fn stock_shepherd(sge_root: &Path, cell: &str, arch: Option<&str>) -> PathBuf {
    let bootstrap = sge_root.join(cell).join("common/bootstrap");
    let binary_path = std::fs::read_to_string(bootstrap)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("binary_path")).then(|| it.next().map(PathBuf::from))?
            })
        })
        .unwrap_or_else(|| sge_root.join("bin"));
    if let Some(a) = arch {
        let p = binary_path.join(a).join("sge_shepherd");
        if p.is_file() {
            return p;
        }
    }
    binary_path.join("sge_shepherd")
}

/// The stock shepherd for this process's environment (`SGE_ROOT`, `SGE_CELL`, `SGE_ARCH`).
pub fn stock_shepherd_from_env() -> PathBuf {
    let root = std::env::var_os("SGE_ROOT").unwrap_or_else(|| "/var/lib/gridengine".into());
    let cell = std::env::var("SGE_CELL").unwrap_or_else(|_| "default".into());
    let arch = std::env::var("SGE_ARCH").ok();
    stock_shepherd(Path::new(&root), &cell, arch.as_deref())
}

/// Replaces this process with `stock` (`argv0 -bg`). Returns only if the exec failed.
pub fn exec_stock(stock: &Path, argv0: &OsStr) -> std::io::Error {
    let (Ok(path), Ok(arg0)) = (
        CString::new(stock.as_os_str().as_bytes()),
        CString::new(argv0.as_bytes()),
    ) else {
        return std::io::Error::from_raw_os_error(libc::EINVAL);
    };
    let bg = c"-bg";
    match nix::unistd::execv(&path, &[arg0.as_c_str(), bg]) {
        Ok(never) => match never {},
        Err(e) => std::io::Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_path_from_bootstrap() {
        let tmp = tempfile::tempdir().unwrap();
        let common = tmp.path().join("default/common");
        std::fs::create_dir_all(&common).unwrap();
        let bin = tmp.path().join("sbin");
        std::fs::create_dir_all(bin.join("lx-amd64")).unwrap();
        std::fs::write(
            common.join("bootstrap"),
            format!("admin_user sgeadmin\nbinary_path {}\n", bin.display()),
        )
        .unwrap();
        assert_eq!(
            stock_shepherd(tmp.path(), "default", Some("lx-amd64")),
            bin.join("sge_shepherd")
        );
        std::fs::write(bin.join("lx-amd64/sge_shepherd"), "").unwrap();
        assert_eq!(
            stock_shepherd(tmp.path(), "default", Some("lx-amd64")),
            bin.join("lx-amd64/sge_shepherd")
        );
        assert_eq!(
            stock_shepherd(tmp.path(), "nocell", None),
            tmp.path().join("bin/sge_shepherd")
        );
    }

    #[test]
    fn exec_keeps_the_pid_and_passes_bg() {
        // a child exec's a script standing in for the stock shepherd, which reports its argv
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("sge_shepherd");
        let out = tmp.path().join("out");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$$ $*\" > {}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // SAFETY: the child only execs or leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let _ = exec_stock(&fake, OsStr::new("sge_shepherd-7"));
                // SAFETY: _exit ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(9) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                let text = std::fs::read_to_string(&out).unwrap();
                assert_eq!(text, format!("{} -bg\n", child.as_raw()));
            }
        }
        let missing = exec_stock(&tmp.path().join("missing"), OsStr::new("x"));
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }
}
