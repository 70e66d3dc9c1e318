//! `sge_virtualizer run`: run one command in a fresh microVM with its stdio relayed live,
//! signals forwarded to it, and its exit code as ours (128+N when killed by signal N).

use std::path::PathBuf;

use anyhow::Context;
use guest_agent::protocol::{Spawn, SpawnStage};
use signal_hook::consts::signal::{SIGCONT, SIGHUP, SIGINT, SIGTERM, SIGTSTP, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use shepherd::checkpoint::taker::{regular_file, AfterCheckpoint};
use shepherd::guest_image;
use shepherd::guest_ram::{self, GuestRam, JobMemoryRequest, RamPolicy};
use shepherd::host_memory;
use shepherd::image::store_dir;
use shepherd::launch::{
    launch_in, BackendChoice, CheckpointPlan, ImageChoice, JobError, JobFilesystems, JobIo,
    LaunchSpec, StdinSource, VmmCredentials,
};
use shepherd::network::policy::{NetworkMode, NetworkTable};
use shepherd::network::NetworkSetting;
use shepherd::settings::{DEFAULT_MEMORY_RESERVE_MIB, DEFAULT_VMM_OVERHEAD_MIB};
use shepherd::shared_dirs::SharedDir;

/// Signals relayed to the job's process group.
const FORWARDED: [i32; 7] = [SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGTSTP, SIGCONT];

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB (default: the host's memory less a 1 GiB reserve and the VMM's
    /// overhead, as a host process could use; backed only as the guest touches it).
    #[arg(long)]
    pub mem: Option<u32>,
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
    /// Run the command in this OS image (see `image list`) instead of the initramfs.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// Image store directory (default: $SGE_VIRTUALIZER_IMAGES, else
    /// /var/lib/sge_virtualizer/images).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Share a host directory into the guest at the same path (repeatable).
    #[arg(long = "share", value_name = "PATH")]
    pub shares: Vec<PathBuf>,
    /// Working directory of the command; it is shared into the guest (default: /, not shared).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Run the command as this user (needs root): its uid, gid, groups and HOME in the guest;
    /// the VM and its file server run as the user too, so host permissions apply on shares.
    /// Without it the command runs as root in the guest, or, with shared directories and a
    /// caller who is not root, as the caller.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// The job's network: `host-user` (the caller's, or --user's, outbound access through
    /// passt, as a host process has) or `none` (no network device).
    #[arg(long, default_value = "host-user", value_parser = ["host-user", "none"])]
    pub network: String,
    /// Let the job reach only this destination (repeatable): `ADDRESS[/PREFIX]:PORTS` or
    /// `HOST:PORTS`, ports `N`, `N-M` or `*`, optionally `/tcp` or `/udp`. Every other
    /// connection is refused.
    #[arg(long = "allow", value_name = "HOST:PORTS")]
    pub allow: Vec<String>,
    /// With --allow: no name resolution either (DNS can carry data out).
    #[arg(long)]
    pub no_dns: bool,
    /// Forward this TCP port of the host to the same port in the guest (repeatable).
    #[arg(long = "inbound-tcp", value_name = "PORT")]
    pub inbound_tcp: Vec<u16>,
    /// Forward this UDP port of the host to the same port in the guest (repeatable).
    #[arg(long = "inbound-udp", value_name = "PORT")]
    pub inbound_udp: Vec<u16>,
    /// Keep checkpoints of the job in this directory (created, mode 0700). SIGUSR2 to `run`
    /// then checkpoints the job and stops its VM (exit status 99) instead of being forwarded;
    /// `--restore` goes on from there. Needs the embedded VMM and `--network none`.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// With --checkpoint-dir: also checkpoint every SECS seconds while the job runs on.
    #[arg(long, value_name = "SECS", requires = "checkpoint_dir")]
    pub checkpoint_interval: Option<u64>,
    /// Go on from the latest checkpoint in --checkpoint-dir instead of starting the command:
    /// give the same VM options (--mem, --vcpus, --share, --cwd, --image) as the checkpointed
    /// run. stdout and stderr files are cut back to where the checkpoint left them, so append
    /// to them (>>).
    #[arg(long, requires = "checkpoint_dir")]
    pub restore: bool,
    /// The command and its arguments (none with --restore: the job runs already).
    #[arg(trailing_var_arg = true, required_unless_present = "restore")]
    pub command: Vec<String>,
}

/// `run`'s exit status when the job was checkpointed and its VM stopped (as a Grid Engine job
/// asks to be re-queued).
pub const CHECKPOINTED_EXIT: i32 = 99;

/// The account `--user` names (a name or a numeric uid).
fn job_user(name: &str) -> anyhow::Result<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("--user needs root");
    }
    let by_name = nix::unistd::User::from_name(name)?;
    let by_uid = || -> anyhow::Result<Option<nix::unistd::User>> {
        match name.parse::<u32>() {
            Ok(uid) => Ok(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(
                uid,
            ))?),
            Err(_) => Ok(None),
        }
    };
    match by_name {
        Some(u) => Ok(u),
        None => by_uid()?.with_context(|| format!("no such user: {name}")),
    }
}

/// The network setting the options describe.
fn network_setting(args: &RunArgs) -> anyhow::Result<NetworkSetting> {
    let extras = !args.allow.is_empty()
        || args.no_dns
        || !args.inbound_tcp.is_empty()
        || !args.inbound_udp.is_empty();
    if args.network == "none" {
        if extras {
            anyhow::bail!("--network none takes no --allow, --no-dns or --inbound-* options");
        }
        return Ok(NetworkSetting::Mode(NetworkMode::None));
    }
    Ok(NetworkSetting::Table(NetworkTable {
        allow: (!args.allow.is_empty()).then(|| args.allow.clone()),
        dns: Some(!args.no_dns),
        inbound_tcp: args.inbound_tcp.clone(),
        inbound_udp: args.inbound_udp.clone(),
    }))
}

/// Runs the command; returns the exit code for the process.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let network = network_setting(&args)?.resolve()?;
    let image = guest_image::locate(
        args.kernel.as_deref(),
        args.initrd.as_deref(),
        guest_image::Search::BuildTreeFirst,
    );
    let run_dir = tempfile::Builder::new()
        .prefix("sge_virtualizer.")
        .tempdir()
        .context("creating the VM's runtime directory")?;
    let term = std::env::var("TERM").unwrap_or_else(|_| "dumb".into());
    let user = args.user.as_deref().map(job_user).transpose()?;
    let (name, home) = match &user {
        Some(u) => (u.name.clone(), u.dir.display().to_string()),
        None => ("root".to_string(), "/root".to_string()),
    };
    let mut shares: Vec<SharedDir> = args.shares.iter().map(SharedDir::new).collect();
    let cwd = match &args.cwd {
        Some(dir) => {
            let dir = std::path::absolute(dir)
                .with_context(|| format!("working directory {}", dir.display()))?;
            shares.push(SharedDir::new(&dir));
            dir
        }
        None => PathBuf::from("/"),
    };
    let mut spawn = Spawn {
        argv: args
            .command
            .iter()
            .map(|a| a.clone().into_bytes())
            .collect(),
        env: [
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
            format!("HOME={home}"),
            format!("USER={name}"),
            format!("LOGNAME={name}"),
            "SHELL=/bin/sh".into(),
            format!("TERM={term}"),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect(),
        cwd: cwd.into_os_string().into_encoded_bytes(),
        ..Spawn::default()
    };
    let vmm_credentials = match &user {
        Some(u) => {
            let groups =
                nix::unistd::getgrouplist(&std::ffi::CString::new(u.name.as_bytes())?, u.gid)
                    .with_context(|| format!("groups of {}", u.name))?;
            let creds = VmmCredentials {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups: groups.iter().map(|g| g.as_raw()).collect(),
            };
            spawn.uid = creds.uid;
            spawn.gid = creds.gid;
            spawn.groups = creds.groups.clone();
            Some(creds)
        }
        None => {
            // The file server runs as the caller, so with shared directories the job does too
            // (root in the guest is only the default where it changes nothing on the host).
            let uid = nix::unistd::getuid();
            if !shares.is_empty() && !uid.is_root() {
                spawn.uid = uid.as_raw();
                spawn.gid = nix::unistd::getgid().as_raw();
                spawn.groups = nix::unistd::getgroups()
                    .context("supplementary groups")?
                    .iter()
                    .map(|g| g.as_raw())
                    .collect();
                if let Ok(Some(me)) = nix::unistd::User::from_uid(uid) {
                    let keep = |e: &Vec<u8>| {
                        !(e.starts_with(b"HOME=")
                            || e.starts_with(b"USER=")
                            || e.starts_with(b"LOGNAME="))
                    };
                    spawn.env.retain(keep);
                    for (k, v) in [
                        ("HOME", me.dir.display().to_string()),
                        ("USER", me.name.clone()),
                        ("LOGNAME", me.name),
                    ] {
                        spawn.env.push(format!("{k}={v}").into_bytes());
                    }
                }
            }
            None
        }
    };
    let filesystems = JobFilesystems {
        image: args.image.map(|name| ImageChoice {
            store: store_dir(args.images.as_deref()),
            name,
        }),
        shares,
    };
    let io = JobIo {
        stdin: if args.no_stdin {
            StdinSource::Null
        } else {
            StdinSource::Reader(Box::new(std::io::stdin()))
        },
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        stdout_file: regular_file(&std::io::stdout()),
        stderr_file: regular_file(&std::io::stderr()),
    };
    let mem_mib = match args.mem {
        Some(mib) => mib,
        None => {
            let policy = RamPolicy {
                fixed_mib: None,
                max_mib: None,
                reserve_mib: DEFAULT_MEMORY_RESERVE_MIB,
                vmm_overhead_mib: DEFAULT_VMM_OVERHEAD_MIB,
            };
            let ram = GuestRam::choose(
                &policy,
                &JobMemoryRequest::default(),
                host_memory::total_mib(),
            );
            tracing::debug!("{ram}");
            ram.mib
        }
    };
    // Handlers go in before the VM starts so no signal is lost in between.
    let mut signals = Signals::new(FORWARDED).context("installing signal handlers")?;
    let job = launch_in(
        LaunchSpec {
            kernel: image.kernel,
            initrd: image.initrd,
            backend: args.backend,
            vcpus: args.vcpus,
            mem_mib,
            huge_pages: false,
            extra_cmdline: args.cmdline,
            spawn,
            run_dir: run_dir.path().to_path_buf(),
            vmm_credentials,
            network,
            checkpoint: args.checkpoint_dir.as_ref().map(|dir| CheckpointPlan {
                dir: dir.clone(),
                restore: if args.restore {
                    shepherd::launch::RestorePolicy::Latest
                } else {
                    shepherd::launch::RestorePolicy::Boot
                },
            }),
        },
        &filesystems,
        io,
    )?;
    let controller = job.controller();
    let handle = signals.handle();
    let migrates = args.checkpoint_dir.is_some();
    let forwarder = {
        let controller = controller.clone();
        std::thread::spawn(move || {
            for signo in signals.forever() {
                // The job leads an orphaned process group in the guest, for which the kernel
                // discards SIGTSTP; a terminal stop therefore stops the job with SIGSTOP.
                match signo {
                    SIGUSR2 if migrates => controller.checkpoint(AfterCheckpoint::StayPaused),
                    SIGTSTP => controller.signal(libc::SIGSTOP),
                    _ => controller.signal(signo),
                }
            }
        })
    };
    if let Some(secs) = args.checkpoint_interval.filter(|s| *s > 0) {
        let controller = controller.clone();
        // Ends with the process (a request to a VMM process that is gone is dropped).
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(secs));
            controller.checkpoint(AfterCheckpoint::Resume);
        });
    }
    let result = job.wait();
    handle.close();
    let _ = forwarder.join();
    if args.timings {
        // One JSON line per checkpoint asked for: its generation, size and pause.
        for outcome in controller.take_checkpoint_outcomes() {
            eprintln!("{}", serde_json::json!({ "checkpoint": outcome }));
        }
    }
    if std::env::var_os("SGE_VIRTUALIZER_KEEP_RUNDIR").is_some() {
        // For debugging: keep the console log and backend logs.
        eprintln!("sge_virtualizer: kept {}", run_dir.keep().display());
    }
    let outcome = match result {
        Err(JobError::SpawnFailed {
            stage: SpawnStage::Exec,
            errno,
            message,
        }) => {
            eprintln!(
                "sge_virtualizer: {}: {}",
                message.escape_debug(),
                std::io::Error::from_raw_os_error(errno)
            );
            return Ok(command_not_run_exit_code(errno));
        }
        Err(JobError::Migrated { dir, generation }) => {
            eprintln!(
                "sge_virtualizer: the job was checkpointed (checkpoint {generation} in {dir}) and \
                 its VM stopped; go on with: run --checkpoint-dir {dir} --restore and the same VM \
                 options"
            );
            return Ok(CHECKPOINTED_EXIT);
        }
        other => other?,
    };
    if let Some(note) = guest_ram::out_of_memory_note(&outcome.memory) {
        eprintln!("sge_virtualizer: {note}");
    }
    if args.timings {
        eprintln!("{}", serde_json::to_string(&outcome.timings)?);
    }
    Ok(outcome.shell_exit_code())
}

/// The exit code for a command the guest could not execute, as `sh` and `docker run` give it:
/// 127 when it does not exist, 126 when it exists but cannot be executed. (The launcher's own
/// errors exit 125.)
fn command_not_run_exit_code(errno: i32) -> i32 {
    if errno == libc::ENOENT {
        127
    } else {
        126
    }
}
