//! What every benchmark needs: repetitions, a scratch directory, the software under test and the
//! machine description.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use crate::machine::MachineInfo;

/// The sge_virtualizer binary and guest image a benchmark runs, and where they came from.
#[derive(Debug, Clone)]
pub struct UnderTest {
    pub shepherd: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The commit (and subject) they were built from, or a description of the working tree.
    pub revision: String,
    /// Extra guest kernel command-line words (`run --cmdline`), empty for the default.
    pub extra_cmdline: String,
}

impl UnderTest {
    /// A directory made by `benches/build-under-test.sh`: `sge_virtualizer`, `guest/` and
    /// `REVISION`.
    pub fn from_build_dir(dir: &Path) -> UnderTest {
        let revision = std::fs::read_to_string(dir.join("REVISION"))
            .map(|r| format!("commit {}", r.trim()))
            .unwrap_or_else(|_| format!("{} (no REVISION file)", dir.display()));
        UnderTest {
            shepherd: dir.join("sge_virtualizer"),
            kernel: dir.join("guest/vmlinux"),
            initrd: dir.join("guest/initramfs.cpio"),
            revision,
            extra_cmdline: String::new(),
        }
    }

    /// The workspace's own build: `target/release/sge_virtualizer` and `build/guest/`.
    pub fn working_tree(root: &Path) -> UnderTest {
        let describe = describe_tree(root);
        UnderTest {
            shepherd: root.join("target/release/sge_virtualizer"),
            kernel: root.join("build/guest/vmlinux"),
            initrd: root.join("build/guest/initramfs.cpio"),
            revision: format!("working tree at {describe} (target/release, build/guest)"),
            extra_cmdline: String::new(),
        }
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "sge_virtualizer {} with guest {} + {}; {}",
            self.shepherd.display(),
            self.kernel.display(),
            self.initrd.display(),
            self.revision
        )
    }

    /// Fails unless the binary and the guest image exist.
    pub fn require(&self) -> anyhow::Result<()> {
        for (what, p) in [
            ("sge_virtualizer", &self.shepherd),
            ("guest kernel", &self.kernel),
            ("guest initramfs", &self.initrd),
        ] {
            if !p.is_file() {
                bail!("{what} not found at {}", p.display());
            }
        }
        Ok(())
    }
}

pub struct BenchContext {
    pub runs: usize,
    pub warmup: usize,
    /// Scratch files (guests, job output); removed at exit.
    pub work_dir: PathBuf,
    pub under_test: UnderTest,
    /// How the software under test was chosen on the command line (for the reproduce line).
    pub under_test_args: String,
    pub machine: MachineInfo,
}

impl BenchContext {
    /// The command line that reproduces benchmark `id` with these settings.
    pub fn reproduce(&self, id: &str) -> String {
        format!(
            "cargo run --release -p benchmarks -- {id} --runs {} --warmup {}{}",
            self.runs, self.warmup, self.under_test_args
        )
    }

    /// Fails unless the shepherd binary and guest image exist.
    pub fn require_shepherd(&self) -> anyhow::Result<()> {
        self.under_test.require()
    }
}

/// What `git describe --always --dirty` says of the workspace (at run time).
pub fn workspace_describe() -> String {
    describe_tree(&workspace_root())
}

/// `git describe --always` of the repository at `root`, with `-dirty` when tracked files
/// changed: what `git describe --always --dirty` says, without writing the index (which
/// `--dirty` refreshes and rewrites). This may run inside the nested host, on the repository
/// shared read-write over 9p, and a stalled host killed while git rewrote the index once left
/// `.git/index` empty; `git status` under `GIT_OPTIONAL_LOCKS=0` only reads it.
fn describe_tree(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(describe) = git(&["describe", "--always"]) else {
        return String::new();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{describe}-dirty"),
        _ => describe,
    }
}

/// The workspace root: the parent of this package's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
