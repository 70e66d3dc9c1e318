//! `sge_virtualizer image`: build, list, verify and remove the OS images jobs run in.

use std::path::PathBuf;

use anyhow::Context;

use shepherd::image::debootstrap::{self, BuildOutcome, BuildRequest};
use shepherd::image::{store_dir, ImageStore};

/// Options of `image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Image store directory (default: $SGE_VIRTUALIZER_IMAGES, else
    /// /var/lib/sge_virtualizer/images).
    #[arg(long, global = true)]
    pub store: Option<PathBuf>,
    #[command(subcommand)]
    pub action: ImageAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageAction {
    /// Build an image from a Debian suite with debootstrap (a no-op when it already exists).
    Build {
        /// The Debian suite to bootstrap (bullseye, bookworm, ...).
        #[arg(long, value_name = "SUITE")]
        debootstrap: String,
        /// The image's name.
        name: String,
        /// Debian mirror.
        #[arg(long, default_value = debootstrap::DEFAULT_MIRROR)]
        mirror: String,
        /// debootstrap variant.
        #[arg(long, default_value = debootstrap::DEFAULT_VARIANT)]
        variant: String,
        /// Extra packages, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// List the images.
    List {
        /// One JSON manifest per line.
        #[arg(long)]
        json: bool,
    },
    /// Check an image's file against its manifest.
    Verify { name: String },
    /// Remove an image.
    Rm { name: String },
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs the action; returns the exit code.
pub fn run(args: ImageArgs) -> anyhow::Result<i32> {
    let store = ImageStore::new(store_dir(args.store.as_deref()));
    match args.action {
        ImageAction::Build {
            debootstrap: suite,
            name,
            mirror,
            variant,
            include,
        } => {
            let started = std::time::Instant::now();
            eprintln!(
                "building image {name:?} from {suite} ({variant}, {mirror}) in {}",
                store.dir().display()
            );
            let req = BuildRequest {
                name,
                suite,
                mirror,
                variant,
                include,
            };
            let (manifest, outcome) = debootstrap::build(&store, &req)?;
            let what = match outcome {
                BuildOutcome::Built => "built",
                BuildOutcome::AlreadyPresent => "already present",
            };
            println!(
                "{} {what}: {} {}, {}, sha256 {} ({:.1} s)",
                manifest.name,
                manifest.suite,
                manifest.os_version.as_deref().unwrap_or("?"),
                mib(manifest.size),
                manifest.sha256,
                started.elapsed().as_secs_f64()
            );
        }
        ImageAction::List { json } => {
            for (name, manifest) in store.list()? {
                match (manifest, json) {
                    (Ok(m), true) => println!("{}", serde_json::to_string(&m)?),
                    (Ok(m), false) => println!(
                        "{:<20} {:<10} {:<8} {:>9}  {}  {}",
                        m.name,
                        m.suite,
                        m.os_version.as_deref().unwrap_or("?"),
                        mib(m.size),
                        m.created,
                        &m.sha256[..12]
                    ),
                    (Err(e), _) => eprintln!("{name}: {e}"),
                }
            }
        }
        ImageAction::Verify { name } => {
            let image = store.verified(&name)?;
            println!("{name}: intact ({:?})", image.check);
        }
        ImageAction::Rm { name } => {
            let manifest = store
                .remove(&name)
                .with_context(|| format!("removing image {name:?}"))?;
            println!("removed {} ({})", manifest.name, manifest.suite);
        }
    }
    Ok(0)
}
