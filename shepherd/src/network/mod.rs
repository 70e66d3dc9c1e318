//! The job's network: what policy applies ([`policy`]), which addresses the guest takes
//! ([`host_addressing`]), passt started for the job as the job user ([`passt`]), and the VMM
//! process's end of the link, with the allow-list filter where the policy has one ([`link`]).
//!
//! Why passt: it turns the guest's frames into ordinary sockets of the job user on the host,
//! so the job's connections are the job user's, subject to the host's firewall rules by uid as
//! a job's under the stock shepherd; it answers ARP, DHCP and DNS itself and needs no root, no
//! TAP device and no bridge, so nothing is left to clean up; it sandboxes itself (namespaces,
//! seccomp) because it parses the guest's traffic. It is started by the root shepherd with the
//! job user's credentials, not by the VMM process, whose seccomp filter refuses the namespace
//! calls passt's sandbox needs.

pub mod host_addressing;
pub mod link;
pub mod passt;
pub mod policy;

pub use host_addressing::HostAddressing;
pub use link::VmNetwork;
pub use passt::{JobNetwork, PASST_LOG};
pub use policy::{NetworkPolicy, NetworkSetting, PasstPolicy};

/// Why the job's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// An allow-list entry that is not `HOST:PORTS[/tcp|/udp]` or whose host does not resolve:
    /// the queue's configuration.
    #[error("network allow-list entry {entry:?}: {reason}")]
    AllowEntry { entry: String, reason: String },
    /// The host's own addressing could not be read.
    #[error("the host's network: {0}")]
    HostAddressing(String),
    /// passt is not installed (or not where `SGE_VIRTUALIZER_PASST` says).
    #[error(
        "passt is not installed (Debian package passt; or set SGE_VIRTUALIZER_PASST), and the job's \
         network policy needs it; set network = \"none\" for queues without a network"
    )]
    PasstMissing,
    /// passt could not be started, or its socket made.
    #[error("cannot start passt: {0}")]
    PasstStart(String),
    /// The job asked for a network its queue does not give (the job's error).
    #[error("{0}")]
    JobRequest(String),
    /// The link in the VMM process (the filter's relay thread) could not be set up.
    #[error("network link: {0}")]
    Link(String),
}
