//! `sge_virtualizer sge`: the Grid Engine side of OS image scheduling, for the cell's
//! configuration: the load sensor that publishes this host's images (`load_sensor` in
//! sge_conf(5)) and the job submission verifier that turns `-l vm_image=NAME` into what the
//! scheduler and the shepherd read (`jsv_url`, or `qsub -jsv`). Both take no arguments from
//! Grid Engine, so each is configured as a two-line wrapper script (see the man page).

use std::io::{self, BufReader};
use std::path::PathBuf;

use anyhow::Context;

use shepherd::image::{store_dir, ImageStore};
use shepherd::sge::{cpu_class, jsv, load_sensor};

/// Options of `sge`.
#[derive(Debug, clap::Args)]
pub struct SgeArgs {
    #[command(subcommand)]
    pub action: SgeAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum SgeAction {
    /// Publish this host's OS images as the `vm_image` complex and its CPU class as
    /// `vm_cpu_class` (execd's load-sensor protocol on stdin/stdout).
    LoadSensor {
        /// Image store directory (default: $SGE_VIRTUALIZER_IMAGES, else
        /// /var/lib/sge_virtualizer/images).
        #[arg(long)]
        store: Option<PathBuf>,
        /// The host name to report under (default: this host's name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Verify job submissions: `-l vm_image=NAME` becomes the scheduler's pattern and
    /// `SGE_VM_IMAGE=NAME` (the JSV protocol on stdin/stdout).
    Jsv,
}

pub fn run(args: SgeArgs) -> anyhow::Result<i32> {
    match args.action {
        SgeAction::LoadSensor { store, host } => {
            let host = match host {
                Some(h) => h,
                None => nix::unistd::gethostname()
                    .context("this host's name")?
                    .to_string_lossy()
                    .into_owned(),
            };
            let store = ImageStore::new(store_dir(store.as_deref()));
            let images = || match store.list() {
                Ok(listing) => listing
                    .into_iter()
                    .filter(|(_, manifest)| manifest.is_ok())
                    .map(|(name, _)| name)
                    .collect(),
                Err(_) => Vec::new(),
            };
            let class = cpu_class::this_host();
            load_sensor::serve(
                BufReader::new(io::stdin()),
                io::stdout(),
                &host,
                images,
                class.as_deref(),
            )
            .context("load sensor")?;
        }
        SgeAction::Jsv => {
            jsv::serve(BufReader::new(io::stdin()), io::stdout()).context("JSV")?;
        }
    }
    Ok(0)
}
