//! The allow-list network policy of outsiders' jobs ([`EgressPolicy`]), judged frame by frame on
//! the guest's way out: [`EgressPolicy::judge`] takes an Ethernet frame as the guest sent it and
//! says whether it goes on to passt ([`Verdict::Pass`]), is dropped ([`Verdict::Drop`], with a
//! [`DropReason`]), or is refused with a reply for the guest ([`Verdict::Refuse`]): a TCP RST
//! for a connection attempt, an ICMP port unreachable for a UDP datagram, so that the job fails
//! at once with `ECONNREFUSED` instead of waiting for a timeout.
//!
//! What passes: ARP (passt answers it itself); DHCP requests (UDP 68 to 67, whatever the
//! address: passt's DHCP server takes every UDP datagram to port 67 and forwards none); TCP and
//! UDP to an address, port and protocol a rule allows; ICMP echo requests to an address any
//! rule covers. Everything else is dropped: IPv6, VLAN tags and other ethertypes, IPv4
//! fragments (a later fragment carries no ports to judge), other ICMP types and IP protocols,
//! and any header that is truncated or inconsistent (IP version not 4, IHL below 5, a total
//! length beyond the frame, a TCP data offset past the segment, a UDP length past the
//! datagram). Headers are read as passt reads them (the IHL says where the transport header
//! starts, the total length where the packet ends, Ethernet padding after it is ignored), so
//! that a frame cannot mean one thing here and another there. Checksums are not verified:
//! passt does not forward packets, it rebuilds them on its own sockets.
//!
//! Refusals go only to a sender that can take them: a unicast Ethernet source and destination
//! and unicast IPv4 addresses on both ends (no RST or ICMP error about a broadcast or multicast
//! datagram, RFC 1122 3.2.2 and 4.2.2.13). A refused TCP segment gets an RST only when it
//! opens a connection (SYN without ACK or RST); any other is dropped, as passt would have
//! nothing to match it to anyway.
//!
//! The filter is pure and allocates nothing: a verdict is a value and a refusal a fixed-size
//! frame ([`RefusalFrame`]); counting is the caller's ([`super::filtering_relay`]). Host names
//! are not this module's: the caller resolves them and makes one rule per address.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::passt_stream::ETH_HLEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q, 802.1ad and the older QinQ tag.
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes of the datagram past its IP header (RFC 792).
const ICMP_QUOTE: usize = 8;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_SERVER_PORT: u16 = 67;

/// TTL of the replies.
const REPLY_TTL: u8 = 64;

/// The longest refusal: an ICMP port unreachable quoting a 60-byte IP header (IHL 15) and 8
/// bytes of the datagram.
pub const MAX_REFUSAL_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + 60 + ICMP_QUOTE;

/// The transport protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP.
    Any,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        })
    }
}

/// One destination the guest may reach: the addresses of `net`/`prefix_len`, the ports in
/// `ports`, over `protocol`. Written `ADDR[/PREFIX]:PORTS[/PROTO]` (see its `FromStr`): PORTS
/// is a port, a range `FIRST-LAST` or `*` (any port); PROTO is `tcp`, `udp` or `any` (the
/// default). ICMP echo requests may go to any address a rule covers, whatever its ports.
///
/// A rule built by hand (or deserialized) that [`AllowRule::validate`] refuses allows nothing:
/// a prefix longer than 32 covers no address, an empty port range no port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AllowRule {
    /// The network (bits past the prefix are ignored when matching).
    pub net: Ipv4Addr,
    /// Leading bits of `net` that an address must share, 0..=32.
    pub prefix_len: u8,
    /// Destination ports.
    pub ports: RangeInclusive<u16>,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// The guest's allowed destinations. No rule: nothing but ARP and DHCP gets out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// Any rule that allows a packet lets it through.
    pub rules: Vec<AllowRule>,
    /// The guest's own TCP ports that the host forwards to it (inbound): what the guest sends
    /// from them, its side of connections made to it, passes whatever the peer.
    #[serde(default)]
    pub served_tcp: Vec<u16>,
    /// The same for UDP.
    #[serde(default)]
    pub served_udp: Vec<u16>,
}

/// What happens to a frame the guest sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On to passt, unchanged.
    Pass,
    /// Dropped without a word.
    Drop(DropReason),
    /// Dropped, and this frame goes back to the guest instead.
    Refuse(RefusalFrame),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than a header it has or announces (Ethernet, IPv4 with its total length, TCP
    /// with its data offset, UDP, ICMP).
    Truncated,
    /// A header no sender writes: IP version not 4, IHL below 5, a total length shorter than
    /// the IP header, a TCP data offset below 5, a UDP length below 8 or past the datagram.
    Malformed,
    /// IPv6 (the policy has IPv4 addresses only).
    Ipv6,
    /// A VLAN tag.
    Vlan,
    /// Another ethertype.
    Ethertype(u16),
    /// An IPv4 fragment (more fragments, or an offset).
    Fragment,
    /// An IP protocol other than TCP, UDP and ICMP.
    IpProtocol(u8),
    /// ICMP other than an echo request.
    IcmpType(u8),
    /// TCP, UDP or an echo request to a destination no rule allows, which gets no reply (a TCP
    /// segment that opens no connection, or a sender that cannot take a reply).
    NotAllowed,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Truncated => f.write_str("truncated header"),
            DropReason::Malformed => f.write_str("malformed header"),
            DropReason::Ipv6 => f.write_str("IPv6"),
            DropReason::Vlan => f.write_str("VLAN tag"),
            DropReason::Ethertype(t) => write!(f, "ethertype {t:#06x}"),
            DropReason::Fragment => f.write_str("IPv4 fragment"),
            DropReason::IpProtocol(p) => write!(f, "IP protocol {p}"),
            DropReason::IcmpType(t) => write!(f, "ICMP type {t}"),
            DropReason::NotAllowed => f.write_str("destination not allowed"),
        }
    }
}

/// A reply to deliver to the guest: an Ethernet frame of at most [`MAX_REFUSAL_LEN`] bytes,
/// held inline (refusals are rare, but the filter allocates nothing).
#[derive(Clone)]
pub struct RefusalFrame {
    bytes: [u8; MAX_REFUSAL_LEN],
    len: u8,
}

impl RefusalFrame {
    /// The frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl AsRef<[u8]> for RefusalFrame {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for RefusalFrame {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for RefusalFrame {}

impl fmt::Debug for RefusalFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RefusalFrame({} bytes:", self.len)?;
        for b in self.as_bytes() {
            write!(f, " {b:02x}")?;
        }
        f.write_str(")")
    }
}

/// An allow rule that does not parse or does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allow rule `{rule}`: {kind}")]
pub struct RuleError {
    /// The rule as written.
    pub rule: String,
    /// What is wrong with it.
    pub kind: RuleErrorKind,
}

/// What is wrong with an allow rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleErrorKind {
    /// No `:PORTS`.
    #[error("no port: write ADDRESS:PORT, ADDRESS:FIRST-LAST or ADDRESS:* (any port)")]
    MissingPort,
    /// An IPv6 address.
    #[error("IPv6 addresses cannot be allowed (IPv4 only)")]
    Ipv6,
    /// Not a dotted-quad IPv4 address.
    #[error(
        "`{0}` is not an IPv4 address (host names must be resolved to addresses before the \
         policy is built)"
    )]
    Address(String),
    /// Not a prefix length.
    #[error("`{0}` is not a prefix length (0 to 32)")]
    Prefix(String),
    /// Bits set past the prefix (`192.0.2.1/24`): probably a typo, so refused rather than
    /// widened silently.
    #[error(
        "{net}/{prefix_len} has bits set past the prefix; the network is {network}/{prefix_len}"
    )]
    HostBits {
        /// The address as written.
        net: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
        /// The network the prefix makes of it.
        network: Ipv4Addr,
    },
    /// Not a port, a range or `*`.
    #[error("`{0}` is not a port (0 to 65535), a range FIRST-LAST, or * (any port)")]
    Port(String),
    /// A range whose first port is above its last.
    #[error("the port range {first}-{last} is empty (its first port is above its last)")]
    EmptyRange {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// Not `tcp`, `udp` or `any`.
    #[error("`{0}` is not a protocol (tcp, udp or any)")]
    Protocol(String),
}

/// A decimal number of ASCII digits only (no sign, no space: `u16::from_str` takes a `+`).
fn decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The mask of a prefix of `prefix_len` bits (`None` past 32).
fn prefix_mask(prefix_len: u8) -> Option<u32> {
    match prefix_len {
        0 => Some(0),
        1..=32 => Some(u32::MAX << (32 - u32::from(prefix_len))),
        _ => None,
    }
}

impl AllowRule {
    /// Whether the rule makes sense: a prefix of at most 32 bits with no bit of `net` set past
    /// it, and a non-empty port range. (Parsing checks this; a rule built by hand that fails it
    /// allows less than it seems to, never more.)
    pub fn validate(&self) -> Result<(), RuleErrorKind> {
        let Some(mask) = prefix_mask(self.prefix_len) else {
            return Err(RuleErrorKind::Prefix(self.prefix_len.to_string()));
        };
        let network = Ipv4Addr::from(u32::from(self.net) & mask);
        if network != self.net {
            return Err(RuleErrorKind::HostBits {
                net: self.net,
                prefix_len: self.prefix_len,
                network,
            });
        }
        if self.ports.start() > self.ports.end() {
            return Err(RuleErrorKind::EmptyRange {
                first: *self.ports.start(),
                last: *self.ports.end(),
            });
        }
        Ok(())
    }

    /// Whether `addr` is in the rule's network.
    pub fn covers(&self, addr: Ipv4Addr) -> bool {
        prefix_mask(self.prefix_len)
            .is_some_and(|mask| (u32::from(addr) ^ u32::from(self.net)) & mask == 0)
    }

    /// Whether the rule allows `port` at `addr` over TCP (`tcp`) or UDP (`!tcp`).
    fn allows(&self, tcp: bool, addr: Ipv4Addr, port: u16) -> bool {
        let protocol = match self.protocol {
            Protocol::Any => true,
            Protocol::Tcp => tcp,
            Protocol::Udp => !tcp,
        };
        protocol && self.ports.contains(&port) && self.covers(addr)
    }
}

impl fmt::Display for AllowRule {
    /// The form `FromStr` reads: `ADDR[/PREFIX]:PORTS[/PROTO]`, the prefix left out at 32, the
    /// protocol at `any`, ports `*` for all of them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if self.prefix_len != 32 {
            write!(f, "/{}", self.prefix_len)?;
        }
        let (first, last) = (*self.ports.start(), *self.ports.end());
        match (first, last) {
            (0, u16::MAX) => f.write_str(":*")?,
            _ if first == last => write!(f, ":{first}")?,
            _ => write!(f, ":{first}-{last}")?,
        }
        if self.protocol != Protocol::Any {
            write!(f, "/{}", self.protocol)?;
        }
        Ok(())
    }
}

impl FromStr for AllowRule {
    type Err = RuleError;

    /// Parses `ADDR[/PREFIX]:PORTS[/PROTO]`: `192.0.2.10:27000`, `192.0.2.0/24:1700-1710`,
    /// `10.1.2.3:53/udp`, `10.1.2.3:*`, `10.1.2.3:8080/tcp`. Spaces around the rule are
    /// ignored; the protocol's case too.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let text = s.trim();
        let err = |kind| RuleError {
            rule: text.to_string(),
            kind,
        };
        // An IPv4 rule has one ':'; IPv6 has several (and `[...]` around them with a port).
        if text.starts_with('[') || text.matches(':').count() > 1 {
            return Err(err(RuleErrorKind::Ipv6));
        }
        let (net_part, tail) = text
            .split_once(':')
            .ok_or_else(|| err(RuleErrorKind::MissingPort))?;
        let (addr_part, prefix_len) = match net_part.split_once('/') {
            Some((addr, prefix)) => {
                let len = decimal::<u8>(prefix)
                    .filter(|&l| l <= 32)
                    .ok_or_else(|| err(RuleErrorKind::Prefix(prefix.to_string())))?;
                (addr, len)
            }
            None => (net_part, 32),
        };
        let net: Ipv4Addr = addr_part
            .parse()
            .map_err(|_| err(RuleErrorKind::Address(addr_part.to_string())))?;
        let (ports_part, protocol) = match tail.split_once('/') {
            Some((ports, proto)) => {
                let protocol = match proto.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "any" => Protocol::Any,
                    _ => return Err(err(RuleErrorKind::Protocol(proto.to_string()))),
                };
                (ports, protocol)
            }
            None => (tail, Protocol::Any),
        };
        let bad_port = || err(RuleErrorKind::Port(ports_part.to_string()));
        let ports = if ports_part == "*" {
            0..=u16::MAX
        } else if let Some((first, last)) = ports_part.split_once('-') {
            let first = decimal::<u16>(first).ok_or_else(bad_port)?;
            let last = decimal::<u16>(last).ok_or_else(bad_port)?;
            first..=last
        } else {
            let port = decimal::<u16>(ports_part).ok_or_else(bad_port)?;
            port..=port
        };
        let rule = AllowRule {
            net,
            prefix_len,
            ports,
            protocol,
        };
        rule.validate().map_err(err)?;
        Ok(rule)
    }
}

/// `N` bytes of `b` at `at`.
fn array_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..)?.first_chunk::<N>().copied()
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_be_bytes)
}

/// The one's complement sum of `data` as 16-bit big-endian words (an odd last byte padded
/// with zero), added to `acc`. Not folded: up to 64 KiB fits a u32.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// The Internet checksum (RFC 1071) of a sum from [`sum16`].
fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The IPv4 packet in a frame, its headers checked against each other and the frame.
struct Ipv4Packet<'a> {
    /// The IP header, options included.
    header: &'a [u8],
    /// What follows it, up to the total length.
    payload: &'a [u8],
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    fragment: bool,
}

impl<'a> Ipv4Packet<'a> {
    fn parse(frame: &'a [u8]) -> Result<Self, DropReason> {
        let ip = frame.get(ETH_HLEN..).ok_or(DropReason::Truncated)?;
        let fixed = ip.first_chunk::<IPV4_HLEN>().ok_or(DropReason::Truncated)?;
        if fixed[0] >> 4 != 4 {
            return Err(DropReason::Malformed);
        }
        let header_len = usize::from(fixed[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if header_len < IPV4_HLEN || total_len < header_len {
            return Err(DropReason::Malformed);
        }
        let packet = ip.get(..total_len).ok_or(DropReason::Truncated)?;
        let (header, payload) = packet.split_at(header_len);
        let frag = u16::from_be_bytes([fixed[6], fixed[7]]);
        Ok(Self {
            header,
            payload,
            protocol: fixed[9],
            src: Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]),
            dst: Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]),
            // More fragments, or an offset.
            fragment: frag & 0x3fff != 0,
        })
    }
}

/// Whether a reply can go back to the sender of `frame`: unicast Ethernet and IPv4 addresses
/// on both ends.
fn replyable(frame: &[u8], ip: &Ipv4Packet) -> bool {
    let unicast_mac = |at: usize| frame.get(at).is_some_and(|b| b & 1 == 0);
    let unicast_ip = |a: Ipv4Addr| !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
    unicast_mac(0) && unicast_mac(6) && unicast_ip(ip.src) && unicast_ip(ip.dst)
}

impl RefusalFrame {
    /// A frame back to the sender of `frame`: Ethernet addresses swapped, then an IPv4 header
    /// from `ip`'s destination to its source carrying `protocol`; `body` writes the
    /// transport part (the bytes after the IP header) and returns its length.
    fn reply(
        frame: &[u8],
        ip: &Ipv4Packet,
        protocol: u8,
        body: impl FnOnce(&mut [u8]) -> usize,
    ) -> Self {
        let mut bytes = [0u8; MAX_REFUSAL_LEN];
        let (eth, rest) = bytes.split_at_mut(ETH_HLEN);
        if let (Some(dst), Some(src)) = (frame.get(6..12), frame.get(..6)) {
            eth[..6].copy_from_slice(dst);
            eth[6..12].copy_from_slice(src);
        }
        eth[12..].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let (iph, l4) = rest.split_at_mut(IPV4_HLEN);
        let l4_len = body(l4);
        let total = IPV4_HLEN + l4_len;
        iph[0] = 0x45;
        iph[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        // Don't fragment (id 0, as for any atomic datagram, RFC 6864).
        iph[6] = 0x40;
        iph[8] = REPLY_TTL;
        iph[9] = protocol;
        iph[12..16].copy_from_slice(&ip.dst.octets());
        iph[16..20].copy_from_slice(&ip.src.octets());
        let csum = fold(sum16(iph, 0));
        iph[10..12].copy_from_slice(&csum.to_be_bytes());
        Self {
            bytes,
            len: (ETH_HLEN + total) as u8,
        }
    }

    /// The RST|ACK that refuses the connection `tcp` (a segment of `ip`) opens: ports swapped,
    /// sequence 0 (the SYN carried no acknowledgement), acknowledging the SYN, its data and a FIN,
    /// as Linux's `tcp_v4_send_reset` does.
    fn tcp_reset(frame: &[u8], ip: &Ipv4Packet, tcp: &[u8; TCP_HLEN], data_len: usize) -> Self {
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let consumed = 1 + u32::from(tcp[13] & TCP_FIN != 0) + data_len as u32;
        let ack = seq.wrapping_add(consumed);
        Self::reply(frame, ip, IPPROTO_TCP, |out| {
            let t = &mut out[..TCP_HLEN];
            t[0..2].copy_from_slice(&tcp[2..4]);
            t[2..4].copy_from_slice(&tcp[0..2]);
            t[8..12].copy_from_slice(&ack.to_be_bytes());
            t[12] = ((TCP_HLEN / 4) as u8) << 4;
            t[13] = TCP_RST | TCP_ACK;
            let pseudo = pseudo_header_sum(ip.dst, ip.src, IPPROTO_TCP, TCP_HLEN);
            let csum = fold(sum16(t, pseudo));
            t[16..18].copy_from_slice(&csum.to_be_bytes());
            TCP_HLEN
        })
    }

    /// The ICMP port unreachable for a UDP datagram of `ip`, quoting its IP header and the
    /// first 8 bytes after it.
    fn port_unreachable(frame: &[u8], ip: &Ipv4Packet) -> Self {
        let quoted = ip.payload.len().min(ICMP_QUOTE);
        Self::reply(frame, ip, IPPROTO_ICMP, |out| {
            let len = ICMP_HLEN + ip.header.len() + quoted;
            let Some(icmp) = out.get_mut(..len) else {
                // Not reached: MAX_REFUSAL_LEN holds the longest IP header and the quote.
                return 0;
            };
            icmp[0] = ICMP_DEST_UNREACH;
            icmp[1] = ICMP_PORT_UNREACH;
            let (hdr, quote) = icmp[ICMP_HLEN..].split_at_mut(ip.header.len());
            hdr.copy_from_slice(ip.header);
            quote.copy_from_slice(&ip.payload[..quoted]);
            let csum = fold(sum16(icmp, 0));
            icmp[2..4].copy_from_slice(&csum.to_be_bytes());
            len
        })
    }
}

/// The sum of the TCP/UDP pseudo-header (RFC 793): source, destination, protocol, length.
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let acc = sum16(&src.octets(), 0);
    let acc = sum16(&dst.octets(), acc);
    acc + u32::from(protocol) + len as u32
}

impl EgressPolicy {
    /// A policy of `rules`.
    pub fn new(rules: Vec<AllowRule>) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }

    /// Whether a rule allows `port` at `addr` over TCP (`tcp`) or UDP.
    fn allows(&self, tcp: bool, addr: Ipv4Addr, port: u16) -> bool {
        self.rules.iter().any(|r| r.allows(tcp, addr, port))
    }

    /// What happens to `frame`, an Ethernet frame the guest sent (see the module's doc).
    pub fn judge(&self, frame: &[u8]) -> Verdict {
        match self.judge_frame(frame) {
            Ok(verdict) => verdict,
            Err(reason) => Verdict::Drop(reason),
        }
    }

    fn judge_frame(&self, frame: &[u8]) -> Result<Verdict, DropReason> {
        match be16(frame, 12).ok_or(DropReason::Truncated)? {
            ETHERTYPE_ARP => return Ok(Verdict::Pass),
            ETHERTYPE_IPV4 => {}
            ETHERTYPE_IPV6 => return Err(DropReason::Ipv6),
            t if ETHERTYPE_VLAN.contains(&t) => return Err(DropReason::Vlan),
            t => return Err(DropReason::Ethertype(t)),
        }
        let ip = Ipv4Packet::parse(frame)?;
        if ip.fragment {
            return Err(DropReason::Fragment);
        }
        match ip.protocol {
            IPPROTO_TCP => self.judge_tcp(frame, &ip),
            IPPROTO_UDP => self.judge_udp(frame, &ip),
            IPPROTO_ICMP => self.judge_icmp(&ip),
            p => Err(DropReason::IpProtocol(p)),
        }
    }

    fn judge_tcp(&self, frame: &[u8], ip: &Ipv4Packet) -> Result<Verdict, DropReason> {
        let tcp = ip.payload;
        let fixed = tcp.first_chunk::<TCP_HLEN>().ok_or(DropReason::Truncated)?;
        let data_offset = usize::from(fixed[12] >> 4) * 4;
        if data_offset < TCP_HLEN {
            return Err(DropReason::Malformed);
        }
        let data_len = tcp
            .len()
            .checked_sub(data_offset)
            .ok_or(DropReason::Truncated)?;
        let src_port = u16::from_be_bytes([fixed[0], fixed[1]]);
        let dst_port = u16::from_be_bytes([fixed[2], fixed[3]]);
        if self.allows(true, ip.dst, dst_port) || self.served_tcp.contains(&src_port) {
            return Ok(Verdict::Pass);
        }
        let flags = fixed[13];
        let opens = flags & TCP_SYN != 0 && flags & (TCP_ACK | TCP_RST) == 0;
        if opens && replyable(frame, ip) {
            return Ok(Verdict::Refuse(RefusalFrame::tcp_reset(
                frame, ip, fixed, data_len,
            )));
        }
        Err(DropReason::NotAllowed)
    }

    fn judge_udp(&self, frame: &[u8], ip: &Ipv4Packet) -> Result<Verdict, DropReason> {
        let udp = ip.payload;
        let fixed = udp.first_chunk::<UDP_HLEN>().ok_or(DropReason::Truncated)?;
        let udp_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
        if udp_len < UDP_HLEN || udp_len > udp.len() {
            return Err(DropReason::Malformed);
        }
        let src_port = u16::from_be_bytes([fixed[0], fixed[1]]);
        let dst_port = u16::from_be_bytes([fixed[2], fixed[3]]);
        if src_port == DHCP_CLIENT_PORT && dst_port == DHCP_SERVER_PORT {
            return Ok(Verdict::Pass);
        }
        if self.allows(false, ip.dst, dst_port) || self.served_udp.contains(&src_port) {
            return Ok(Verdict::Pass);
        }
        if replyable(frame, ip) {
            return Ok(Verdict::Refuse(RefusalFrame::port_unreachable(frame, ip)));
        }
        Err(DropReason::NotAllowed)
    }

    fn judge_icmp(&self, ip: &Ipv4Packet) -> Result<Verdict, DropReason> {
        let icmp = ip
            .payload
            .first_chunk::<ICMP_HLEN>()
            .ok_or(DropReason::Truncated)?;
        if icmp[0] != ICMP_ECHO_REQUEST {
            return Err(DropReason::IcmpType(icmp[0]));
        }
        if self.rules.iter().any(|r| r.covers(ip.dst)) {
            Ok(Verdict::Pass)
        } else {
            Err(DropReason::NotAllowed)
        }
    }
}

/// Also the frame builders and the refusal check the relay's tests use.
#[cfg(test)]
pub(crate) mod tests;
