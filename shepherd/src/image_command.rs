//! `sge_virtualizer image`: build, import, list, verify and remove the OS images jobs run in.

use std::path::PathBuf;

use anyhow::Context;

use shepherd::image::debootstrap::{self, BuildOutcome, BuildRequest};
use shepherd::image::format::ImageFormat;
use shepherd::image::import::{self, ImportOutcome, ImportRequest};
use shepherd::image::{store_dir, ImageStore, Manifest};

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
    /// Import an image: an OCI image layout directory, an OCI archive or a `docker save` /
    /// `podman save` archive (plain or gzip). Every blob is checked against its digest. An
    /// image ID already in the store is stored once: under the same name this is a no-op,
    /// under another name that name shares the stored file.
    Import {
        /// The layout directory or archive.
        source: PathBuf,
        /// The image's name.
        name: String,
        /// Which image, where the source holds several (a tag or name, e.g. `app:1`).
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
        /// The root file system's format (benches/REPORT.md compares them).
        #[arg(long, value_enum, default_value_t)]
        format: ImageFormat,
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

/// The first 12 hex digits of a `sha256:<hex>` digest.
fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// One line of `image list`: name, suite (`-` for imports), OS version, size, creation time,
/// file checksum; for imports also the source and the image digest (else the image ID).
fn list_line(m: &Manifest) -> String {
    let suite = if m.suite.is_empty() { "-" } else { &m.suite };
    let mut line = format!(
        "{:<20} {:<10} {:<8} {:>9}  {}  {}",
        m.name,
        suite,
        m.os_version.as_deref().unwrap_or("?"),
        mib(m.size),
        m.created,
        m.sha256.get(..12).unwrap_or(&m.sha256)
    );
    if let Some(from) = &m.source {
        let digest = match &from.digest {
            Some(d) => format!("digest {}", short_digest(d)),
            None => format!("id {}", short_digest(&from.image_id)),
        };
        line.push_str(&format!("  {}:{} {digest}", from.kind, from.path));
    }
    line
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
        ImageAction::Import {
            source,
            name,
            reference,
            format,
        } => {
            let started = std::time::Instant::now();
            eprintln!(
                "importing image {name:?} from {} into {}",
                source.display(),
                store.dir().display()
            );
            let req = ImportRequest {
                name,
                source,
                reference,
                format,
            };
            let done = import::import(&store, &req)?;
            for warning in &done.warnings {
                eprintln!("warning: {warning}");
            }
            let m = &done.manifest;
            let what = match &done.outcome {
                ImportOutcome::Imported => "imported".to_string(),
                ImportOutcome::AlreadyPresent => "already present".to_string(),
                ImportOutcome::SharedWith(other) => {
                    format!("imported (the same image as {other}; stored once)")
                }
            };
            let from = m.source.as_ref();
            println!(
                "{} {what}: {} {}, image ID {}, {}, {} {}, sha256 {} ({:.1} s)",
                m.name,
                from.map_or("?", |f| f.kind.as_str()),
                from.and_then(|f| f.digest.as_deref())
                    .unwrap_or("(no digest)"),
                from.map_or("?", |f| f.image_id.as_str()),
                m.os_version.as_deref().unwrap_or("?"),
                m.fstype,
                mib(m.size),
                m.sha256,
                started.elapsed().as_secs_f64()
            );
        }
        ImageAction::List { json } => {
            for (name, manifest) in store.list()? {
                match (manifest, json) {
                    (Ok(m), true) => println!("{}", serde_json::to_string(&m)?),
                    (Ok(m), false) => println!("{}", list_line(&m)),
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
            println!("removed {} ({})", manifest.name, manifest.origin());
        }
    }
    Ok(0)
}
