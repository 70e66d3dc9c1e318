//! `sge-vm-agent`: PID 1 of the sge_virtualizer guest.
//!
//! As PID 1 it mounts the basic file systems, connects to the host over vsock (CID 2, port
//! [`AGENT_VSOCK_PORT`]), runs the job it is sent and ends the VM. For tests it also runs as an
//! ordinary process: `sge-vm-agent --unix PATH` connects to a Unix socket instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use guest_agent::agent::{self, clock_ns, AgentConfig, Endpoint, Outcome};
use guest_agent::protocol::{AGENT_VSOCK_PORT, HOST_CID};
use nix::time::ClockId;

fn usage() -> ExitCode {
    eprintln!("usage: sge-vm-agent [--unix PATH | --vsock-port PORT]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let start_boottime_ns = clock_ns(ClockId::CLOCK_BOOTTIME);
    let start_realtime_ns = clock_ns(ClockId::CLOCK_REALTIME);
    let pid1 = std::process::id() == 1;
    if pid1 {
        agent::pid1::signal_boot_timer();
    }

    let mut endpoint = Endpoint::Vsock {
        cid: HOST_CID,
        port: AGENT_VSOCK_PORT,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--unix", Some(p)) => endpoint = Endpoint::Unix(PathBuf::from(p)),
            ("--vsock-port", Some(p)) => match p.parse() {
                Ok(port) => {
                    endpoint = Endpoint::Vsock {
                        cid: HOST_CID,
                        port,
                    }
                }
                Err(_) => return usage(),
            },
            // The kernel passes unknown command-line words to init; ignore them as PID 1.
            _ if pid1 => {}
            _ => return usage(),
        }
    }

    if pid1 {
        for problem in agent::pid1::mount_basics()
            .into_iter()
            .chain(agent::pid1::overcommit_like_the_host())
        {
            eprintln!("sge-vm-agent: {problem}");
        }
        std::env::set_var("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    }

    let config = AgentConfig {
        endpoint,
        connect_patience: Duration::from_secs(if pid1 { 20 } else { 10 }),
        pid1,
        start_boottime_ns,
        start_realtime_ns,
    };
    let result = agent::run(&config);
    let code = match &result {
        Ok(Outcome::JobEnded { .. }) | Ok(Outcome::SpawnFailed) => 0,
        Ok(Outcome::HostGone(why)) => {
            eprintln!("sge-vm-agent: host gone: {why}");
            1
        }
        Err(e) => {
            eprintln!("sge-vm-agent: {e}");
            1
        }
    };
    if pid1 {
        agent::pid1::end_vm();
    }
    ExitCode::from(code)
}
