//! Benchmark 10: OS image formats. One image (Debian bookworm, the tree of the store's
//! debootstrap-built `bookworm`, as a one-layer `docker save` archive) imported as ext4, EROFS
//! and lz4-compressed EROFS: import time and the image file's size; then `run -- /bin/true` in
//! each and in the initramfs alone (the job's start: shepherd start to job spawned, and to VM
//! gone), with Podman on the same image where Podman is installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::context::{BenchContext, UnderTest};
use crate::interleave::{run_interleaved, Sample, Variant};
use crate::results::BenchResult;
use crate::shepherd_run;

/// The formats `image import --format` knows, as the report names them.
const FORMATS: [(&str, &str); 3] = [
    ("ext4", "ext4 (mkfs.ext4 -d)"),
    ("erofs", "EROFS"),
    ("erofs-lz4", "EROFS, lz4hc"),
];
/// The job that reads much of its image (what a format's compression costs or saves).
const READ_JOB: &str = "tar -cf - /usr/lib 2>/dev/null | wc -c >/dev/null";
/// The store whose debootstrap-built `bookworm` gives the tree.
const STORE: &str = "/var/lib/sge_virtualizer/images";

fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string())
}

fn checked(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bookworm tree as a `docker save` archive in `dir` (made once per run of the bench).
fn bookworm_archive(dir: &Path) -> anyhow::Result<PathBuf> {
    let ext4 = Path::new(STORE).join("bookworm/rootfs.ext4");
    if !ext4.is_file() {
        bail!(
            "no {} (sge_virtualizer image build --debootstrap bookworm bookworm; the host test \
             tier builds it)",
            ext4.display()
        );
    }
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree)?;
    checked(
        Command::new("debugfs")
            .args(["-R", &format!("rdump / {}", tree.display())])
            .arg(&ext4),
        "debugfs rdump",
    )?;
    let archive_dir = dir.join("archive");
    std::fs::create_dir_all(archive_dir.join("layer"))?;
    let layer = archive_dir.join("layer/layer.tar");
    checked(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "-C"])
            .arg(&tree)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
        "tar",
    )?;
    std::fs::remove_dir_all(&tree)?;
    let diff_id = sha256_hex(&layer)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    });
    let config_path = archive_dir.join("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let config_name = format!("{}.json", sha256_hex(&config_path)?);
    std::fs::rename(&config_path, archive_dir.join(&config_name))?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["bench-bookworm:1"],
        "Layers": ["layer/layer.tar"],
    }]);
    std::fs::write(archive_dir.join("manifest.json"), manifest.to_string())?;
    let archive = dir.join("bookworm.docker.tar");
    checked(
        Command::new("tar")
            .arg("-C")
            .arg(&archive_dir)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
        "tar",
    )?;
    std::fs::remove_dir_all(&archive_dir)?;
    Ok(archive)
}

fn image_cmd(ut: &UnderTest, store: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(&ut.shepherd);
    cmd.arg("image").args(args).arg("--store").arg(store);
    cmd
}

/// One import into an empty store: seconds, and the image file's size and disk use in MiB.
fn import_once(
    ut: &UnderTest,
    archive: &Path,
    store: &Path,
    format: &str,
) -> anyhow::Result<Sample> {
    let _ = std::fs::remove_dir_all(store);
    let start = Instant::now();
    checked(
        &mut image_cmd(
            ut,
            store,
            &[
                "import",
                archive.to_str().context("path")?,
                "img",
                "--format",
                format,
            ],
        ),
        "image import",
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("img/manifest.json"))?)?;
    let file = store
        .join("img")
        .join(manifest["file"].as_str().context("no file")?);
    let meta = std::fs::metadata(&file)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(vec![
        ("import_s", seconds),
        ("file_mib", mib(meta.len())),
        (
            "disk_mib",
            mib(std::os::unix::fs::MetadataExt::blocks(&meta) * 512),
        ),
    ])
}

/// One `run -- /bin/true` (in `image` of `store`, or in the initramfs): the phases that say
/// when the job started and when its VM was gone, and the wall time.
fn job_once(ut: &UnderTest, image: Option<(&Path, &str)>, job: &[&str]) -> anyhow::Result<Sample> {
    let store;
    let options = match image {
        Some((dir, name)) => {
            store = dir.display().to_string();
            vec!["--images", store.as_str(), "--image", name]
        }
        None => Vec::new(),
    };
    let start = Instant::now();
    let out = shepherd_run::command_with(ut, "qemu", &options, job)
        .output()
        .context("running sge_virtualizer")?;
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let t = shepherd_run::parse_timings(&String::from_utf8_lossy(&out.stderr))?;
    Ok(vec![
        (
            "job_spawned_ms",
            t.job_spawned_ms.context("no job_spawned_ms in --timings")?,
        ),
        (
            "vm_gone_ms",
            t.vm_gone_ms.context("no vm_gone_ms in --timings")?,
        ),
        ("wall_ms", wall),
    ])
}

/// `podman run --rm IMAGE /bin/true`, where Podman is installed.
fn podman_once(image: &str) -> anyhow::Result<Sample> {
    let start = Instant::now();
    checked(
        Command::new("podman").args(["run", "--rm", "--network=none", image, "/bin/true"]),
        "podman run",
    )?;
    Ok(vec![("wall_ms", start.elapsed().as_secs_f64() * 1000.0)])
}

pub fn run(ctx: &BenchContext) -> anyhow::Result<BenchResult> {
    ctx.require_shepherd()?;
    if !nix_is_root() {
        bail!("importing images needs root");
    }
    let dir = ctx.work_dir.join("image-formats");
    std::fs::create_dir_all(&dir)?;
    let archive = bookworm_archive(&dir)?;
    let ut = &ctx.under_test;
    let archive_mib = std::fs::metadata(&archive)?.len() as f64 / (1 << 20) as f64;

    // Import: each format into its own store, emptied before each sample.
    let mut imports: Vec<Variant> = Vec::new();
    for (format, title) in FORMATS {
        let store = dir.join(format!("import-{format}"));
        let archive = archive.clone();
        imports.push(Variant::new(
            format!("import as {title}"),
            "s or MiB",
            move || import_once(ut, &archive, &store, format),
        ));
    }
    eprintln!(
        "image-formats: imports, {} warm-up + {} runs per format",
        ctx.warmup.min(1),
        ctx.runs.min(5)
    );
    let (mut series, mut outcomes) =
        run_interleaved(&mut imports, ctx.warmup.min(1), ctx.runs.min(5));
    drop(imports);

    // Job start: one store with the image in every format.
    let store = dir.join("jobs");
    let _ = std::fs::remove_dir_all(&store);
    for (format, _) in FORMATS {
        checked(
            &mut image_cmd(
                ut,
                &store,
                &[
                    "import",
                    archive.to_str().context("path")?,
                    &format!("bench-{format}"),
                    "--format",
                    format,
                ],
            ),
            "image import",
        )?;
    }
    let mut jobs = vec![Variant::new(
        "run -- /bin/true, initramfs only",
        "ms",
        || job_once(ut, None, &["/bin/true"]),
    )];
    // `/bin/true`, then a job that reads much of its image (every file under /usr/lib once).
    let image_jobs: [(&str, &[&str]); 2] = [
        ("/bin/true", &["/bin/true"]),
        ("tar -cf - /usr/lib | wc -c", &["/bin/sh", "-c", READ_JOB]),
    ];
    for (label, job) in image_jobs {
        for (format, title) in FORMATS {
            let store = store.clone();
            jobs.push(Variant::new(
                format!("run -- {label}, image as {title}"),
                "ms",
                move || job_once(ut, Some((&store, &format!("bench-{format}"))), job),
            ));
        }
    }
    let mut notes = vec![
        format!(
            "The image: the tree of the store's debootstrap-built bookworm (minbase), dumped \
             with debugfs rdump and packed as a one-layer docker-save archive of {archive_mib:.0} \
             MiB; `image import ARCHIVE NAME --format F` into an empty store, so each sample \
             unpacks the layer and makes the file system (import_s), file_mib = the image file, \
             disk_mib = its blocks on the host."
        ),
        "Job start: `sge_virtualizer run --timings -- /bin/true` with the QEMU backend (TCG \
         here: every guest-side phase is slower than on hardware KVM); job_spawned_ms = from \
         the shepherd's start to the agent's report that the job runs (the image's mount and \
         the overlay included), vm_gone_ms = to the VM's end. The `tar … /usr/lib` job reads \
         every file under /usr/lib of the image once (41 MiB of bookworm minbase, of 86 MiB in all), so its \
         vm_gone_ms is the start plus reading through the format (decompression included)."
            .into(),
    ];
    let podman = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if podman {
        checked(
            Command::new("podman").arg("load").arg("-i").arg(&archive),
            "podman load",
        )?;
        jobs.push(Variant::new(
            "podman run --rm bench-bookworm:1 /bin/true (host)",
            "ms",
            || podman_once("bench-bookworm:1"),
        ));
    } else {
        notes.push(
            "Podman is not installed on this machine: its column is left out (install the \
             Debian package `podman` and rerun for the side-by-side ratio)."
                .into(),
        );
    }
    eprintln!(
        "image-formats: job starts, {} warm-up + {} runs per variant",
        ctx.warmup, ctx.runs
    );
    let (job_series, job_outcomes) = run_interleaved(&mut jobs, ctx.warmup, ctx.runs);
    drop(jobs);
    series.extend(job_series);
    outcomes.extend(job_outcomes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchResult::measured(
        ctx,
        "images",
        "OS image formats: import time, size and job start (ext4, EROFS, EROFS lz4hc; initramfs \
         alone)",
        series,
        outcomes,
        notes,
    ))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
