//! What every benchmark needs: repetitions, a scratch directory, the shepherd binary, the guest
//! image and the machine description.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::machine::MachineInfo;

pub struct BenchContext {
    pub runs: usize,
    pub warmup: usize,
    /// Scratch files (guests, job output); removed at exit.
    pub work_dir: PathBuf,
    /// `sge_virtualizer` release binary under test.
    pub shepherd: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub machine: MachineInfo,
}

impl BenchContext {
    /// The command line that reproduces benchmark `id` with these settings.
    pub fn reproduce(&self, id: &str) -> String {
        format!(
            "cargo build --release -p shepherd && cargo run --release -p benchmarks -- {id} \
             --runs {} --warmup {}",
            self.runs, self.warmup
        )
    }

    /// Fails unless the shepherd binary and guest image exist.
    pub fn require_shepherd(&self) -> anyhow::Result<()> {
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

/// The workspace root: the parent of this package's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
