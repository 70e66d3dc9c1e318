//! `sge_virtualizer run`: run one command in a fresh microVM with its stdio relayed live,
//! signals forwarded to it, and its exit code as ours (128+N when killed by signal N).

use std::path::PathBuf;

use anyhow::Context;
use guest_agent::protocol::Spawn;
use signal_hook::consts::signal::{SIGCONT, SIGHUP, SIGINT, SIGTERM, SIGTSTP, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use shepherd::guest_image;
use shepherd::launch::{launch, BackendChoice, JobIo, LaunchSpec, StdinSource};

/// Signals relayed to the job's process group.
const FORWARDED: [i32; 7] = [SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGTSTP, SIGCONT];

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u32,
    /// VM backend: auto, embedded or qemu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Guest kernel (uncompressed vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra words for the guest kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Do not forward our stdin; the job reads /dev/null.
    #[arg(short = 'n', long)]
    pub no_stdin: bool,
    /// Print one JSON line of phase timestamps to stderr at the end.
    #[arg(long)]
    pub timings: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the command; returns the exit code for the process.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let image = guest_image::locate(args.kernel.as_deref(), args.initrd.as_deref());
    let run_dir = tempfile::Builder::new()
        .prefix("sge_virtualizer.")
        .tempdir()
        .context("creating the VM's runtime directory")?;
    let term = std::env::var("TERM").unwrap_or_else(|_| "dumb".into());
    let spawn = Spawn {
        argv: args
            .command
            .iter()
            .map(|a| a.clone().into_bytes())
            .collect(),
        env: [
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
            "HOME=/root".into(),
            "USER=root".into(),
            "LOGNAME=root".into(),
            "SHELL=/bin/sh".into(),
            format!("TERM={term}"),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect(),
        cwd: b"/".to_vec(),
        ..Spawn::default()
    };
    let io = JobIo {
        stdin: if args.no_stdin {
            StdinSource::Null
        } else {
            StdinSource::Reader(Box::new(std::io::stdin()))
        },
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
    };
    // Handlers go in before the VM starts so no signal is lost in between.
    let mut signals = Signals::new(FORWARDED).context("installing signal handlers")?;
    let job = launch(
        LaunchSpec {
            kernel: image.kernel,
            initrd: image.initrd,
            backend: args.backend,
            vcpus: args.vcpus,
            mem_mib: args.mem,
            extra_cmdline: args.cmdline,
            spawn,
            run_dir: run_dir.path().to_path_buf(),
            vmm_credentials: None,
        },
        io,
    )?;
    let controller = job.controller();
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for signo in signals.forever() {
            // The job leads an orphaned process group in the guest, for which the kernel
            // discards SIGTSTP; a terminal stop therefore stops the job with SIGSTOP.
            let relayed = if signo == SIGTSTP {
                libc::SIGSTOP
            } else {
                signo
            };
            controller.signal(relayed);
        }
    });
    let result = job.wait();
    handle.close();
    let _ = forwarder.join();
    if std::env::var_os("SGE_VIRTUALIZER_KEEP_RUNDIR").is_some() {
        // For debugging: keep the console log and backend logs.
        eprintln!("sge_virtualizer: kept {}", run_dir.keep().display());
    }
    let outcome = result?;
    if args.timings {
        eprintln!("{}", serde_json::to_string(&outcome.timings)?);
    }
    Ok(outcome.shell_exit_code())
}
