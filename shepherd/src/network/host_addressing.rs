//! The addresses a job's guest gets: the execution host's own, as passt hands them out by
//! default (the host's IPv4 address and prefix on the interface of its default route, and that
//! route's gateway), decided here once so that passt and the guest agent are told the same,
//! and the host's resolvers and search list.
//!
//! Under passt the guest's address is the host's: a connection the job makes leaves the host
//! from the host's address, as the job's would as a host process, and connections to the
//! gateway's address reach the host itself (passt maps them to the host's loopback).

use std::net::Ipv4Addr;

use super::NetworkError;

/// The guest's IPv4 set-up and resolvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddressing {
    /// The host interface of the default route (passt's outbound interface).
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The host's first IPv4 resolver, if it has one (passt forwards the guest's queries to
    /// it; the guest asks the gateway's address).
    pub resolver: Option<Ipv4Addr>,
    /// The host's search list.
    pub search: Vec<String>,
}

impl HostAddressing {
    /// Reads this host's routes, interface addresses and `/etc/resolv.conf`.
    pub fn of_this_host() -> Result<HostAddressing, NetworkError> {
        let routes = std::fs::read_to_string("/proc/net/route")
            .map_err(|e| NetworkError::HostAddressing(format!("/proc/net/route: {e}")))?;
        let (interface, gateway) = default_route(&routes).ok_or_else(|| {
            NetworkError::HostAddressing("the host has no IPv4 default route".into())
        })?;
        let (address, prefix_len) = interface_address(&interface)?;
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let (resolvers, search) = parse_resolv_conf(&resolv);
        Ok(HostAddressing {
            interface,
            address,
            prefix_len,
            gateway,
            resolver: resolvers.first().copied(),
            search,
        })
    }
}

/// The interface and gateway of the default route with the lowest metric, from
/// `/proc/net/route` (addresses there are hexadecimal in the host's byte order).
pub fn default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            let (dest, gw, flags, metric, mask) = (
                hex(f[1])?,
                hex(f[2])?,
                hex(f[3])?,
                f[6].parse::<u32>().ok()?,
                hex(f[7])?,
            );
            let wanted = RTF_UP | RTF_GATEWAY;
            (dest == 0 && mask == 0 && flags & wanted == wanted).then(|| {
                let gateway = Ipv4Addr::from(gw.to_ne_bytes());
                (metric, f[0].to_string(), gateway)
            })
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, iface, gw)| (iface, gw))
}

/// The first IPv4 address of `interface` and its prefix length.
fn interface_address(interface: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| NetworkError::HostAddressing(format!("getifaddrs: {e}")))?;
    for ifa in addrs.filter(|a| a.interface_name == interface) {
        let (Some(addr), Some(mask)) = (
            ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()),
            ifa.netmask.as_ref().and_then(|m| m.as_sockaddr_in()),
        ) else {
            continue;
        };
        let prefix_len = u32::from(mask.ip()).leading_ones() as u8;
        return Ok((addr.ip(), prefix_len.max(1)));
    }
    Err(NetworkError::HostAddressing(format!(
        "the default route's interface {interface} has no IPv4 address"
    )))
}

/// The IPv4 `nameserver`s and the `search` (or `domain`) list of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> (Vec<Ipv4Addr>, Vec<String>) {
    let mut resolvers = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(a) = words.next().and_then(|w| w.parse::<Ipv4Addr>().ok()) {
                    resolvers.push(a);
                }
            }
            // The last search or domain line wins, as in the resolver.
            Some("search") | Some("domain") => {
                search = words.map(String::from).collect();
            }
            _ => {}
        }
    }
    (resolvers, search)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t00000000\t010010AC\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            default_route(table),
            Some(("eth0".to_string(), Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(default_route("Iface\n"), None);
        // A route without RTF_GATEWAY is on-link, not a default route through a gateway.
        assert_eq!(
            default_route("h\neth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"),
            None
        );
    }

    #[test]
    fn resolvers_and_search_list() {
        let (r, s) = parse_resolv_conf(
            "# x\nnameserver 10.255.255.53\nnameserver ::1\nnameserver 192.0.2.53\n\
             domain a.example\nsearch b.example c.example\noptions ndots:2\n",
        );
        assert_eq!(
            r,
            [
                Ipv4Addr::new(10, 255, 255, 53),
                Ipv4Addr::new(192, 0, 2, 53)
            ]
        );
        assert_eq!(s, ["b.example", "c.example"]);
    }

    #[test]
    fn this_host_when_it_has_a_default_route() {
        match HostAddressing::of_this_host() {
            Ok(a) => {
                assert!(!a.interface.is_empty());
                assert!((1..=32).contains(&a.prefix_len));
            }
            Err(e) => println!("SKIPPED this_host_when_it_has_a_default_route: {e}"),
        }
    }
}
