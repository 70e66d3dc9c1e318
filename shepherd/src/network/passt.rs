//! passt for one job: its command line from the policy and the host's addressing, started by
//! the root shepherd with the job user's credentials on one end of a socketpair (`--fd`, qemu
//! framing, `--one-off`: it ends when the VM's end closes), and the guest's side of the same
//! plan ([`GuestNetwork`]: address, route, resolver, host name).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use guest_agent::protocol::{GuestNetwork, Ipv4Interface};

use super::link::VmNetwork;
use super::policy::{NetworkPolicy, PasstPolicy};
use super::{HostAddressing, NetworkError};
use crate::backend::helper_process::prepare_helper;
use crate::backend::VmmCredentials;

/// passt's log in the run directory (its stderr; `-q`: errors only).
pub const PASST_LOG: &str = "passt.log";
/// The guest's MAC address (locally administered; passt learns it from the first frame).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The guest's MTU. Ethernet's: a larger one needs big RX buffers in the guest (Linux then
/// gives every RX descriptor 64 KiB of guest memory), which a small job's guest cannot spare.
pub const GUEST_MTU: u16 = 1500;

/// Where set-up installs the passt it builds (`scripts/build-passt.sh`: Debian 12's own passt
/// corrupts TCP streams towards the guest).
pub const BUILT_PASST: &str = "/usr/local/libexec/sge_virtualizer/passt";

/// Where passt is: `$SGE_VIRTUALIZER_PASST`, else set-up's build, else the PATH and /usr/bin.
pub fn locate() -> Option<PathBuf> {
    if std::env::var_os("SGE_VIRTUALIZER_PASST").is_none() && Path::new(BUILT_PASST).is_file() {
        return Some(PathBuf::from(BUILT_PASST));
    }
    crate::backend::qemu::find_program(
        "passt",
        "SGE_VIRTUALIZER_PASST",
        &[PathBuf::from("/usr/bin")],
    )
}

/// passt's arguments for a job (after the program; `fd` is passt's end of the socketpair).
pub fn passt_args(addressing: &HostAddressing, policy: &PasstPolicy, fd: RawFd) -> Vec<String> {
    let mut args: Vec<String> = [
        "--foreground",
        "--one-off",
        "--quiet",
        "--stderr",
        // The guest has no IPv6 stack (see the guest kernel's configuration).
        "--ipv4-only",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--fd".into(), fd.to_string()]);
    args.extend(["--interface".into(), addressing.interface.clone()]);
    args.extend(["--address".into(), addressing.address.to_string()]);
    args.extend(["--netmask".into(), addressing.prefix_len.to_string()]);
    args.extend(["--gateway".into(), addressing.gateway.to_string()]);
    args.extend(["--mtu".into(), GUEST_MTU.to_string()]);
    match dns_address(addressing, policy) {
        Some(dns) => args.extend(["--dns-forward".into(), dns.to_string()]),
        // No resolver in DHCP answers either. (Not `--dns ""`: passt 2025-05-03 exits on it.)
        None => args.extend(["--no-dhcp-dns".into(), "--no-dhcp-search".into()]),
    }
    for (flag, ports) in [
        ("--tcp-ports", &policy.inbound_tcp),
        ("--udp-ports", &policy.inbound_udp),
    ] {
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            args.extend([flag.to_string(), list.join(",")]);
        }
    }
    args
}

/// The address the guest sends DNS queries to: the gateway's, which passt forwards to the
/// host's first resolver. `None` when the host has no resolver or the policy gives no DNS.
pub fn dns_address(addressing: &HostAddressing, policy: &PasstPolicy) -> Option<Ipv4Addr> {
    (policy.dns && addressing.resolver.is_some()).then_some(addressing.gateway)
}

/// The guest's side of the plan: its host name always, eth0 and the resolver where it has a
/// network.
pub fn guest_network(
    hostname: &str,
    plan: Option<(&HostAddressing, &PasstPolicy)>,
) -> GuestNetwork {
    let mut net = GuestNetwork {
        hostname: hostname.as_bytes().to_vec(),
        ..GuestNetwork::default()
    };
    if let Some((a, policy)) = plan {
        net.ipv4 = Some(Ipv4Interface {
            address: a.address.octets(),
            prefix_len: a.prefix_len,
            gateway: a.gateway.octets(),
            mtu: GUEST_MTU.into(),
        });
        net.nameservers = dns_address(a, policy)
            .map(|d| d.octets())
            .into_iter()
            .collect();
        if net.nameservers.is_empty() {
            return net;
        }
        net.search = a.search.iter().map(|d| d.as_bytes().to_vec()).collect();
    }
    net
}

/// The execution host's node name (`uname -n`).
pub fn host_name() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// A running passt, stopped and reaped when dropped.
#[derive(Debug)]
pub struct PasstProcess {
    child: Child,
    /// Its log (stderr), for the last words of a passt that failed.
    log: Option<PathBuf>,
}

impl PasstProcess {
    /// The process id (for traces and tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Once the VM is gone: how passt ended, in words, if it did not end on its own with
    /// success (`--one-off` exits 0 when the VM's end closes), i.e. the job lost its network
    /// (killed by its owner, or failed: its log says why). `None` while it still runs.
    pub fn ended_abnormally(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                let last = self
                    .log
                    .as_deref()
                    .map(crate::run_dir::read_log_tail)
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .and_then(|t| {
                        t.lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .map(|l| format!(": {}", l.trim()))
                    })
                    .unwrap_or_default();
                Some(format!(
                    "the job's network ended before the job: passt (pid {}) {status}{last}",
                    self.child.id()
                ))
            }
            _ => None,
        }
    }
}

impl Drop for PasstProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The job's network, decided and (where it has one) started: what the agent is told, what the
/// VMM process attaches, and the passt process the shepherd holds until the job ends.
#[derive(Debug)]
pub struct JobNetwork {
    pub guest: GuestNetwork,
    pub vm: Option<VmNetwork>,
    pub passt: Option<PasstProcess>,
}

impl JobNetwork {
    /// Sets up `policy` for one job: reads the host's addressing, starts passt as `creds` with
    /// its stderr in `log`. A host without an IPv4 default route runs the job without a
    /// network, with a warning: there is nothing passt could reach for it.
    pub fn start(
        policy: &NetworkPolicy,
        creds: Option<&VmmCredentials>,
        log: Option<(File, PathBuf)>,
    ) -> Result<JobNetwork, NetworkError> {
        let hostname = host_name();
        let NetworkPolicy::Passt(policy) = policy else {
            return Ok(JobNetwork {
                guest: guest_network(&hostname, None),
                vm: None,
                passt: None,
            });
        };
        let program = locate().ok_or(NetworkError::PasstMissing)?;
        let addressing = match HostAddressing::of_this_host() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "the job runs without a network");
                return Ok(JobNetwork {
                    guest: guest_network(&hostname, None),
                    vm: None,
                    passt: None,
                });
            }
        };
        let (vm_end, passt_end) =
            UnixStream::pair().map_err(|e| NetworkError::PasstStart(format!("socketpair: {e}")))?;
        let passt_fd = passt_end.as_raw_fd();
        let mut cmd = Command::new(&program);
        cmd.args(passt_args(&addressing, policy, passt_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let log_path = match log {
            Some((file, path)) => {
                cmd.stderr(file);
                Some(path)
            }
            None => {
                cmd.stderr(Stdio::null());
                None
            }
        };
        prepare_helper(&mut cmd, creds, &[passt_fd]);
        let child = cmd
            .spawn()
            .map_err(|e| NetworkError::PasstStart(format!("{}: {e}", program.display())))?;
        // passt has its own copy now; ours must go, or passt would never see the VM's end.
        drop(passt_end);
        tracing::debug!(pid = child.id(), "passt started");
        let egress = policy.egress(dns_address(&addressing, policy));
        Ok(JobNetwork {
            guest: guest_network(&hostname, Some((&addressing, policy))),
            vm: Some(VmNetwork {
                stream: Arc::new(OwnedFd::from(vm_end)),
                mac: GUEST_MAC,
                mtu: GUEST_MTU,
                egress,
            }),
            passt: Some(PasstProcess {
                child,
                log: log_path,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addressing() -> HostAddressing {
        HostAddressing {
            interface: "eth0".into(),
            address: Ipv4Addr::new(192, 0, 2, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            resolver: Some(Ipv4Addr::new(10, 255, 255, 53)),
            search: vec!["example.org".into()],
        }
    }

    #[test]
    fn passt_is_told_the_guests_addressing_and_forwards() {
        let policy = PasstPolicy {
            dns: true,
            inbound_tcp: vec![8080, 8081],
            ..PasstPolicy::default()
        };
        let args = passt_args(&addressing(), &policy, 7).join(" ");
        assert_eq!(
            args,
            "--foreground --one-off --quiet --stderr --ipv4-only --fd 7 --interface eth0 \
             --address 192.0.2.2 --netmask 24 --gateway 192.0.2.1 --mtu 1500 \
             --dns-forward 192.0.2.1 --tcp-ports 8080,8081"
        );
    }

    #[test]
    fn no_dns_without_a_resolver_or_when_the_policy_says_so() {
        let mut a = addressing();
        let mut policy = PasstPolicy {
            dns: false,
            ..PasstPolicy::default()
        };
        assert!(passt_args(&a, &policy, 3)
            .ends_with(&["--no-dhcp-dns".into(), "--no-dhcp-search".into()]));
        assert!(guest_network("n", Some((&a, &policy)))
            .nameservers
            .is_empty());
        policy.dns = true;
        a.resolver = None;
        assert_eq!(dns_address(&a, &policy), None);
    }

    #[test]
    fn the_guest_takes_the_hosts_address_and_asks_the_gateway_for_names() {
        let policy = PasstPolicy {
            dns: true,
            ..PasstPolicy::default()
        };
        let net = guest_network("node7", Some((&addressing(), &policy)));
        assert_eq!(net.hostname, b"node7");
        let v4 = net.ipv4.unwrap();
        assert_eq!(
            (v4.address, v4.prefix_len, v4.gateway, v4.mtu),
            ([192, 0, 2, 2], 24, [192, 0, 2, 1], 1500)
        );
        assert_eq!(net.nameservers, [[192, 0, 2, 1]]);
        assert_eq!(net.search, [b"example.org".to_vec()]);
        let none = guest_network("node7", None);
        assert!(none.ipv4.is_none() && none.nameservers.is_empty());
    }
}
