//! The `sge_virtualizer` binary.
//!
//! Started by `sge_execd` as `shepherd_cmd` (`argv[0]` `sge_shepherd-<job>`), it acts as the
//! job's shepherd; otherwise it is a command-line tool with subcommands.

mod check_command;
mod image_command;
mod run_command;
mod sge_command;
mod vm_command;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sge_virtualizer",
    version,
    about = "Run Grid Engine jobs in KVM microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh microVM.
    Run(Box<run_command::RunArgs>),
    /// Build, list, verify and remove the OS images jobs run in.
    Image(image_command::ImageArgs),
    /// Boot a VM directly in the embedded VMM (debugging, benchmarks).
    Vm(vm_command::VmArgs),
    /// Check that this host can run jobs in VMs (settings, guest kernel and initramfs, OS
    /// images, backend, directories); exits 1 and prints each problem's fix when it cannot.
    Check(check_command::CheckArgs),
    /// Grid Engine helpers for OS image scheduling: the `vm_image` load sensor and JSV.
    Sge(sge_command::SgeArgs),
}

/// True when execd started us as its shepherd: `shepherd_cmd` is exec'd with `argv[0]`
/// `sge_shepherd-<job_id>` and no arguments.
fn started_by_execd() -> bool {
    std::env::args_os()
        .next()
        .map(|a| {
            std::path::Path::new(&a)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sge_shepherd"))
        })
        .unwrap_or(false)
}

fn main() -> ExitCode {
    shepherd::timings::mark_process_start();
    if started_by_execd() {
        // Grid Engine mode owns its own logging (the active directory's trace file) and must
        // never exit without writing exit_status.
        let code = shepherd::sge::run_as_shepherd();
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SGE_VIRTUALIZER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command::run(*args),
        Command::Image(args) => image_command::run(args),
        Command::Vm(args) => vm_command::run(args),
        Command::Check(args) => check_command::run(args),
        Command::Sge(args) => sge_command::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("sge_virtualizer: {e:#}");
            ExitCode::from(125)
        }
    }
}
