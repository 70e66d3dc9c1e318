//! What network a job gets: the setting as an administrator writes it (per host, per queue) and
//! the policy it resolves to for one job.
//!
//! ```toml
//! network = "host-user"   # the default: the job user's own outbound access, as on the host
//! network = "none"        # no network device at all (lo only)
//! # Outsiders' queues: only these destinations; every other connection is refused.
//! network = { allow = ["192.0.2.10:27000", "lic.example.org:1700-1710/tcp"], dns = true }
//! # A job that serves something: these host ports are forwarded to the same guest ports.
//! network = { inbound_tcp = [8080], inbound_udp = [5353] }
//! ```
//!
//! A job may ask for less, never for more: `qsub -v SGE_VM_NETWORK=none` runs it without a
//! network device whatever its queue's setting ([`for_job`]).

use std::net::{Ipv4Addr, ToSocketAddrs};

use vmm::virtio::net::egress_filter::{AllowRule, EgressPolicy, Protocol};

use super::NetworkError;

/// The simple forms of the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// The job user's outbound access through passt (the stock shepherd's behaviour).
    HostUser,
    /// No network device.
    None,
}

/// The table form of the setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkTable {
    /// Destinations the job may reach (`ADDRESS[/PREFIX]:PORTS[/tcp|/udp]`, or a host name in
    /// place of the address, resolved when the job starts). Present: only these; absent: the
    /// job user's outbound access.
    pub allow: Option<Vec<String>>,
    /// Whether an allow-listed job may resolve names through the host's resolver (default
    /// true; DNS can carry data out, so a strict queue turns it off).
    pub dns: Option<bool>,
    /// Host TCP ports forwarded to the same port in the guest (bound as the job user).
    #[serde(default)]
    pub inbound_tcp: Vec<u16>,
    /// Host UDP ports forwarded to the same port in the guest.
    #[serde(default)]
    pub inbound_udp: Vec<u16>,
}

/// `network = ...` in the settings file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum NetworkSetting {
    Mode(NetworkMode),
    Table(NetworkTable),
}

impl Default for NetworkSetting {
    fn default() -> Self {
        NetworkSetting::Mode(NetworkMode::HostUser)
    }
}

/// The network one job gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// No device.
    None,
    /// A device backed by passt.
    Passt(PasstPolicy),
}

/// What passt and the frame filter in front of it let through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PasstPolicy {
    /// `None`: everything the job user may reach; `Some`: only these destinations (and the
    /// resolver, where [`PasstPolicy::dns`] says so).
    pub allow: Option<Vec<AllowRule>>,
    /// Whether the job gets the host's resolver.
    pub dns: bool,
    pub inbound_tcp: Vec<u16>,
    pub inbound_udp: Vec<u16>,
}

impl PasstPolicy {
    /// The frame filter for an allow-list, with the resolver at `dns_address` added when the
    /// policy gives the job DNS. `None` for the job user's full access.
    pub fn egress(&self, dns_address: Option<Ipv4Addr>) -> Option<EgressPolicy> {
        let mut rules = self.allow.clone()?;
        if let (true, Some(dns)) = (self.dns, dns_address) {
            rules.push(AllowRule {
                net: dns,
                prefix_len: 32,
                ports: 53..=53,
                protocol: Protocol::Any,
            });
        }
        Some(EgressPolicy {
            rules,
            served_tcp: self.inbound_tcp.clone(),
            served_udp: self.inbound_udp.clone(),
        })
    }
}

/// The job environment variable by which a job asks for no network (`qsub -v
/// SGE_VM_NETWORK=none`).
pub const JOB_NETWORK_VAR: &str = "SGE_VM_NETWORK";

/// The policy for a job of a queue with `queue`'s setting that asked for `requested` (the value
/// of [`JOB_NETWORK_VAR`], if set): `none` takes its network away; empty or `queue` is the
/// queue's; anything else is the job's error (a job cannot widen its queue's network).
pub fn for_job(
    queue: &NetworkSetting,
    requested: Option<&str>,
) -> Result<NetworkPolicy, NetworkError> {
    match requested.map(str::trim).unwrap_or("") {
        "" | "queue" => queue.resolve(),
        "none" => Ok(NetworkPolicy::None),
        other => Err(NetworkError::JobRequest(format!(
            "{JOB_NETWORK_VAR}={other:?}: a job may only ask for \"none\" (or \"queue\", its \
             queue's network)"
        ))),
    }
}

impl NetworkSetting {
    /// The policy for one job. Host names in an allow-list are resolved now (every address a
    /// name has is allowed); a name that does not resolve is the queue's error, reported with
    /// the entry.
    pub fn resolve(&self) -> Result<NetworkPolicy, NetworkError> {
        match self {
            NetworkSetting::Mode(NetworkMode::None) => Ok(NetworkPolicy::None),
            NetworkSetting::Mode(NetworkMode::HostUser) => Ok(NetworkPolicy::Passt(PasstPolicy {
                dns: true,
                ..PasstPolicy::default()
            })),
            NetworkSetting::Table(t) => {
                let allow = match &t.allow {
                    None => None,
                    Some(entries) => Some(
                        entries
                            .iter()
                            .map(|e| allow_rules(e))
                            .collect::<Result<Vec<_>, _>>()?
                            .into_iter()
                            .flatten()
                            .collect(),
                    ),
                };
                Ok(NetworkPolicy::Passt(PasstPolicy {
                    allow,
                    dns: t.dns.unwrap_or(true),
                    inbound_tcp: t.inbound_tcp.clone(),
                    inbound_udp: t.inbound_udp.clone(),
                }))
            }
        }
    }
}

/// The rules of one allow-list entry: an address form as it is, a host name as one rule per
/// IPv4 address it resolves to.
fn allow_rules(entry: &str) -> Result<Vec<AllowRule>, NetworkError> {
    let bad = |reason: String| NetworkError::AllowEntry {
        entry: entry.to_string(),
        reason,
    };
    let parsed = entry.parse::<AllowRule>();
    if let Ok(rule) = parsed {
        return Ok(vec![rule]);
    }
    // NAME:PORTS[/proto]: resolve NAME, then parse each address with the same tail.
    let (name, tail) = entry
        .split_once(':')
        .ok_or_else(|| bad("expected HOST:PORTS".into()))?;
    if name.is_empty()
        || name
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '/')
    {
        // Looks like an address: the parser's own words say what is wrong.
        return Err(bad(parsed
            .err()
            .map(|e| e.kind.to_string())
            .unwrap_or_default()));
    }
    let addresses: Vec<Ipv4Addr> = (name, 0)
        .to_socket_addrs()
        .map_err(|e| bad(format!("{name} does not resolve: {e}")))?
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    if addresses.is_empty() {
        return Err(bad(format!("{name} has no IPv4 address")));
    }
    addresses
        .into_iter()
        .map(|a| {
            format!("{a}:{tail}")
                .parse::<AllowRule>()
                .map_err(|e| bad(e.kind.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Holder {
        network: NetworkSetting,
    }

    fn setting(toml_text: &str) -> NetworkSetting {
        toml::from_str::<Holder>(toml_text).unwrap().network
    }

    #[test]
    fn the_simple_forms() {
        assert_eq!(
            setting("network = \"none\"").resolve().unwrap(),
            NetworkPolicy::None
        );
        let NetworkPolicy::Passt(p) = setting("network = \"host-user\"").resolve().unwrap() else {
            panic!("host-user has a device")
        };
        assert_eq!(p.allow, None);
        assert!(p.dns);
        assert_eq!(p.egress(Some(Ipv4Addr::new(10, 0, 0, 1))), None);
        assert_eq!(
            NetworkSetting::default().resolve().unwrap(),
            NetworkPolicy::Passt(p)
        );
        assert!(toml::from_str::<Holder>("network = \"open\"").is_err());
    }

    #[test]
    fn an_allow_list_with_an_address_and_a_name() {
        let s = setting(
            "network = { allow = [\"192.0.2.10:27000\", \"localhost:1700-1710/tcp\"], dns = false, inbound_tcp = [8080] }",
        );
        let NetworkPolicy::Passt(p) = s.resolve().unwrap() else {
            panic!("an allow-list has a device")
        };
        let rules = p.allow.clone().unwrap();
        assert_eq!(rules[0].net, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(rules[0].ports, 27000..=27000);
        assert!(rules[1..]
            .iter()
            .any(|r| r.net == Ipv4Addr::LOCALHOST && r.ports == (1700..=1710)));
        assert_eq!(p.inbound_tcp, [8080]);
        // dns = false: the resolver is not added.
        let egress = p.egress(Some(Ipv4Addr::new(10, 0, 0, 1))).unwrap();
        assert_eq!(egress.rules, rules);
    }

    #[test]
    fn dns_is_allowed_to_the_resolver_by_default() {
        let s = setting("network = { allow = [\"192.0.2.10:27000\"] }");
        let NetworkPolicy::Passt(p) = s.resolve().unwrap() else {
            panic!("an allow-list has a device")
        };
        let egress = p.egress(Some(Ipv4Addr::new(10, 0, 0, 1))).unwrap();
        assert_eq!(egress.rules.len(), 2);
        assert_eq!(egress.rules[1].net, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(egress.rules[1].ports, 53..=53);
    }

    #[test]
    fn a_job_may_ask_for_less_never_for_more() {
        let queue = NetworkSetting::default();
        let queues = queue.resolve().unwrap();
        assert_eq!(for_job(&queue, None).unwrap(), queues);
        assert_eq!(for_job(&queue, Some(" ")).unwrap(), queues);
        assert_eq!(for_job(&queue, Some("queue")).unwrap(), queues);
        assert_eq!(for_job(&queue, Some("none")).unwrap(), NetworkPolicy::None);
        let none = NetworkSetting::Mode(NetworkMode::None);
        for wider in ["host-user", "all", "{ allow = [] }"] {
            let err = for_job(&none, Some(wider)).unwrap_err();
            assert!(matches!(err, NetworkError::JobRequest(_)), "{wider}: {err}");
        }
    }

    #[test]
    fn bad_entries_are_named() {
        for entry in ["no-port", "192.0.2.300:1", "nonexistent.invalid:80", ":80"] {
            let s = NetworkSetting::Table(NetworkTable {
                allow: Some(vec![entry.to_string()]),
                ..NetworkTable::default()
            });
            let err = s.resolve().unwrap_err().to_string();
            assert!(err.contains(entry), "{err}");
        }
        assert!(toml::from_str::<Holder>("network = { allowed = [] }").is_err());
    }
}
