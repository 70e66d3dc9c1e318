//! `sge_virtualizer check`: whether this host can run jobs in VMs, queue by queue, with the fix
//! for each problem; or, with `--load-sensor`, the same answer as a Grid Engine load sensor's
//! `vm_ready` value for this host.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use shepherd::host_check::{self, SettingsSource};

#[derive(Args)]
pub struct CheckArgs {
    /// A queue to check (repeatable); default: every queue the settings name, and the defaults.
    #[arg(long = "queue", value_name = "NAME")]
    queues: Vec<String>,
    /// The settings file (default: $SGE_VIRTUALIZER_CONFIG, else /etc/sge_virtualizer.toml).
    #[arg(long, value_name = "PATH")]
    settings: Option<PathBuf>,
    /// Speak Grid Engine's load sensor protocol on stdin/stdout: report `vm_ready` (1 or 0)
    /// for this host each time execd asks, until it says `quit`.
    #[arg(long)]
    load_sensor: bool,
}

pub fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let source = match &args.settings {
        Some(path) => SettingsSource {
            path: path.clone(),
            required: true,
        },
        None => SettingsSource::from_env(),
    };
    if args.load_sensor {
        return load_sensor(&source, &args.queues);
    }
    let problems = host_check::check(&source, &args.queues);
    if problems.is_empty() {
        println!("sge_virtualizer check: this host can run jobs in VMs");
        return Ok(0);
    }
    for p in &problems {
        println!("{p}");
    }
    println!(
        "sge_virtualizer check: {} problem(s); jobs in the queues named fail until fixed",
        problems.len()
    );
    Ok(1)
}

/// The load sensor loop: execd writes a line (empty) for each report and `quit` to stop.
fn load_sensor(source: &SettingsSource, queues: &[String]) -> anyhow::Result<i32> {
    let host = nix::unistd::gethostname()
        .context("gethostname")?
        .to_string_lossy()
        .into_owned();
    // Grid Engine names hosts without their domain unless the cell says otherwise.
    let host = host.split('.').next().unwrap_or(&host).to_string();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut told = Vec::new();
    for line in stdin.lock().lines() {
        if line?.trim() == "quit" {
            break;
        }
        let problems = host_check::check(source, queues);
        // execd asks every load_report_time: log a change, not every report.
        if problems != told {
            for p in &problems {
                tracing::warn!("{p}");
            }
            told = problems.clone();
        }
        let ready = u8::from(problems.is_empty());
        write!(out, "begin\n{host}:vm_ready:{ready}\nend\n")?;
        out.flush()?;
    }
    Ok(0)
}
