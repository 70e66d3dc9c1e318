//! The rules' syntax, every verdict, and the refusals checked field by field, their checksums
//! recomputed here (not with the module's own sum).

use super::*;
use proptest::prelude::*;

pub(crate) const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// passt's gateway MAC (the address it answers ARP with).
pub(crate) const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
pub(crate) const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn rule(s: &str) -> AllowRule {
    s.parse().unwrap()
}

/// 192.0.2.10:27000 (any), 192.0.2.0/24:1700-1710/tcp, 10.1.2.3:53/udp.
pub(crate) fn policy() -> EgressPolicy {
    EgressPolicy::new(vec![
        rule("192.0.2.10:27000"),
        rule("192.0.2.0/24:1700-1710/tcp"),
        rule("10.1.2.3:53/udp"),
    ])
}

/// The Internet checksum over `parts` is right (the folded sum of everything, checksum field
/// included, is all ones). Independent of the module's `sum16`/`fold`.
fn checksum_ok(parts: &[&[u8]]) -> bool {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u64 = 0;
    for pair in bytes.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u64::from);
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// The checksum to put in a header whose checksum field is zero.
fn checksum_of(parts: &[&[u8]]) -> [u8; 2] {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u64 = 0;
    for pair in bytes.chunks(2) {
        sum += (u64::from(pair[0]) << 8) | pair.get(1).copied().map_or(0, u64::from);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

pub(crate) fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ethertype.to_be_bytes(), payload].concat()
}

/// An IPv4 packet with `options` (a multiple of 4 bytes), a valid header checksum, DF set.
pub(crate) fn ipv4(
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let hlen = 20 + options.len();
    let total = (hlen + payload.len()) as u16;
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum_of(&[&h]);
    h[10..12].copy_from_slice(&c);
    [h, payload.to_vec()].concat()
}

pub(crate) fn tcp_segment(sport: u16, dport: u16, seq: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(data);
    t
}

pub(crate) fn udp_datagram(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// The guest's TCP segment to `dst`:`dport`.
pub(crate) fn tcp_frame(dst: Ipv4Addr, dport: u16, seq: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let seg = tcp_segment(40_000, dport, seq, flags, data);
    ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(6, GUEST_IP, dst, &[], &seg),
    )
}

/// The guest's UDP datagram to `dst`:`dport`.
pub(crate) fn udp_frame(dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let dgram = udp_datagram(50_000, dport, data);
    ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(17, GUEST_IP, dst, &[], &dgram),
    )
}

fn icmp_frame(dst: Ipv4Addr, icmp_type: u8, rest: &[u8]) -> Vec<u8> {
    let msg = [&[icmp_type, 0, 0, 0, 0, 1, 0, 1][..], rest].concat();
    ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(1, GUEST_IP, dst, &[], &msg),
    )
}

/// Checks that `reply` is a well-formed refusal of `orig`, addressed back to its sender: an RST
/// for a TCP segment, an ICMP port unreachable for a UDP datagram; checksums recomputed.
pub(crate) fn check_refusal(orig: &[u8], reply: &[u8]) -> Result<(), String> {
    let err = |what: &str| Err(format!("{what}: reply {reply:02x?} to {orig:02x?}"));
    if reply.len() < 34 || reply.len() > MAX_REFUSAL_LEN {
        return err("length");
    }
    if reply[..6] != orig[6..12] || reply[6..12] != orig[..6] || reply[12..14] != [8, 0] {
        return err("Ethernet header");
    }
    let ip = &reply[14..];
    let oip = &orig[14..];
    let ohlen = usize::from(oip[0] & 0xf) * 4;
    let ototal = usize::from(u16::from_be_bytes([oip[2], oip[3]]));
    if ip[0] != 0x45 || usize::from(u16::from_be_bytes([ip[2], ip[3]])) != ip.len() {
        return err("IP version, header length or total length");
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ip[8] != 64 {
        return err("IP fragment or TTL");
    }
    if !checksum_ok(&[&ip[..20]]) {
        return err("IP header checksum");
    }
    if ip[12..16] != oip[16..20] || ip[16..20] != oip[12..16] {
        return err("IP addresses");
    }
    let l4 = &ip[20..];
    let ol4 = &oip[ohlen..ototal];
    match (ip[9], oip[9]) {
        (6, 6) => {
            if l4.len() != 20 {
                return err("TCP length");
            }
            if l4[..2] != ol4[2..4] || l4[2..4] != ol4[..2] {
                return err("TCP ports");
            }
            let oflags = ol4[13];
            if oflags & 0x02 == 0 || oflags & 0x14 != 0 {
                return err("RST for a segment that opens no connection");
            }
            let odata = ol4.len() - usize::from(ol4[12] >> 4) * 4;
            let oseq = u32::from_be_bytes(ol4[4..8].try_into().unwrap());
            let want_ack = oseq
                .wrapping_add(1)
                .wrapping_add(odata as u32)
                .wrapping_add(u32::from(oflags & 1));
            if l4[4..8] != [0; 4] || u32::from_be_bytes(l4[8..12].try_into().unwrap()) != want_ack {
                return err("TCP sequence or acknowledgement");
            }
            if l4[12] != 0x50 || l4[13] != 0x14 || l4[18..20] != [0, 0] {
                return err("TCP data offset, flags or urgent pointer");
            }
            let pseudo = [&ip[12..20], &[0, 6, 0, 20][..]].concat();
            if !checksum_ok(&[&pseudo, l4]) {
                return err("TCP checksum");
            }
        }
        (1, 17) => {
            if l4[..2] != [3, 3] || l4[4..8] != [0; 4] {
                return err("ICMP type, code or unused field");
            }
            if !checksum_ok(&[l4]) {
                return err("ICMP checksum");
            }
            let quote_len = ohlen + (ototal - ohlen).min(8);
            if l4[8..] != oip[..quote_len] {
                return err("ICMP quote");
            }
        }
        _ => return err("protocol of the reply for that of the original"),
    }
    Ok(())
}

fn refusal(v: Verdict) -> RefusalFrame {
    match v {
        Verdict::Refuse(r) => r,
        other => panic!("not refused: {other:?}"),
    }
}

// --- Rules ---

#[test]
fn the_documented_forms_parse() {
    let cases = [
        (
            "192.0.2.10:27000",
            ALLOWED,
            32,
            27000..=27000,
            Protocol::Any,
        ),
        (
            "192.0.2.0/24:1700-1710",
            Ipv4Addr::new(192, 0, 2, 0),
            24,
            1700..=1710,
            Protocol::Any,
        ),
        (
            "10.1.2.3:53/udp",
            Ipv4Addr::new(10, 1, 2, 3),
            32,
            53..=53,
            Protocol::Udp,
        ),
        (
            "10.1.2.3:*",
            Ipv4Addr::new(10, 1, 2, 3),
            32,
            0..=65535,
            Protocol::Any,
        ),
        (
            "10.1.2.3:8080/tcp",
            Ipv4Addr::new(10, 1, 2, 3),
            32,
            8080..=8080,
            Protocol::Tcp,
        ),
        (
            " 0.0.0.0/0:*/ANY ",
            Ipv4Addr::UNSPECIFIED,
            0,
            0..=65535,
            Protocol::Any,
        ),
        (
            "10.1.2.3/32:0-65535/Tcp",
            Ipv4Addr::new(10, 1, 2, 3),
            32,
            0..=65535,
            Protocol::Tcp,
        ),
    ];
    for (text, net, prefix_len, ports, protocol) in cases {
        assert_eq!(
            text.parse::<AllowRule>(),
            Ok(AllowRule {
                net,
                prefix_len,
                ports,
                protocol
            }),
            "{text}"
        );
    }
}

#[test]
fn bad_forms_say_what_is_wrong() {
    use RuleErrorKind as K;
    let cases: Vec<(&str, K)> = vec![
        ("", K::MissingPort),
        ("192.0.2.10", K::MissingPort),
        ("192.0.2.0/24", K::MissingPort),
        ("lic.example.org:1700", K::Address("lic.example.org".into())),
        (":80", K::Address(String::new())),
        ("192.0.2.256:80", K::Address("192.0.2.256".into())),
        ("192.0.2:80", K::Address("192.0.2".into())),
        ("[2001:db8::1]:80", K::Ipv6),
        ("2001:db8::1:80", K::Ipv6),
        ("192.0.2.0/33:80", K::Prefix("33".into())),
        ("192.0.2.0/:80", K::Prefix(String::new())),
        ("192.0.2.0/+8:80", K::Prefix("+8".into())),
        (
            "192.0.2.0/255.255.255.0:80",
            K::Prefix("255.255.255.0".into()),
        ),
        (
            "192.0.2.1/24:80",
            K::HostBits {
                net: Ipv4Addr::new(192, 0, 2, 1),
                prefix_len: 24,
                network: Ipv4Addr::new(192, 0, 2, 0),
            },
        ),
        ("192.0.2.10:", K::Port(String::new())),
        ("192.0.2.10:65536", K::Port("65536".into())),
        ("192.0.2.10:+80", K::Port("+80".into())),
        ("192.0.2.10: 80", K::Port(" 80".into())),
        ("192.0.2.10:80-", K::Port("80-".into())),
        ("192.0.2.10:-80", K::Port("-80".into())),
        ("192.0.2.10:1-2-3", K::Port("1-2-3".into())),
        ("192.0.2.10:**", K::Port("**".into())),
        ("192.0.2.10:http", K::Port("http".into())),
        (
            "192.0.2.10:90-80",
            K::EmptyRange {
                first: 90,
                last: 80,
            },
        ),
        ("192.0.2.10:80/sctp", K::Protocol("sctp".into())),
        ("192.0.2.10:80/", K::Protocol(String::new())),
        ("192.0.2.10:80/tcp/udp", K::Protocol("tcp/udp".into())),
    ];
    for (text, kind) in cases {
        let e = text.parse::<AllowRule>().unwrap_err();
        assert_eq!(e.kind, kind, "{text}");
        assert_eq!(e.rule, text.trim());
    }
    let msg = |t: &str| t.parse::<AllowRule>().unwrap_err().to_string();
    assert_eq!(
        msg("lic.example.org:1700"),
        "allow rule `lic.example.org:1700`: `lic.example.org` is not an IPv4 address (host \
         names must be resolved to addresses before the policy is built)"
    );
    assert!(msg("192.0.2.10").contains("no port: write ADDRESS:PORT"));
    assert!(msg("192.0.2.1/24:80").contains("the network is 192.0.2.0/24"));
    assert!(msg("192.0.2.10:90-80").contains("90-80 is empty"));
    assert!(msg("192.0.2.10:80/sctp").contains("tcp, udp or any"));
    assert!(msg("::1:80").contains("IPv6"));
}

#[test]
fn rules_print_as_they_parse() {
    for text in [
        "192.0.2.10:27000",
        "192.0.2.0/24:1700-1710",
        "10.1.2.3:53/udp",
        "10.1.2.3:*",
        "10.1.2.3:8080/tcp",
        "0.0.0.0/0:*",
    ] {
        assert_eq!(rule(text).to_string(), text);
    }
    assert_eq!(rule("10.1.2.3/32:0-65535/any").to_string(), "10.1.2.3:*");
}

#[test]
fn policies_go_through_serde_unchanged() {
    let p = policy();
    let json = serde_json::to_string(&p).unwrap();
    assert!(
        json.contains("\"192.0.2.10\"") && json.contains("\"udp\""),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), p);
}

#[test]
fn rules_built_by_hand_that_make_no_sense_allow_nothing_more() {
    let wide = AllowRule {
        net: ALLOWED,
        prefix_len: 33,
        ports: 0..=65535,
        protocol: Protocol::Any,
    };
    assert!(wide.validate().is_err());
    assert!(!wide.covers(ALLOWED));
    #[allow(clippy::reversed_empty_ranges)]
    let empty = AllowRule {
        net: ALLOWED,
        prefix_len: 32,
        ports: 90..=80,
        protocol: Protocol::Any,
    };
    assert!(empty.validate().is_err());
    let p = EgressPolicy::new(vec![wide, empty]);
    for port in [0, 80, 85, 90, 65535] {
        assert_ne!(
            p.judge(&tcp_frame(ALLOWED, port, 1, 0x02, &[])),
            Verdict::Pass
        );
    }
    // Host bits are ignored when matching: the rule means its network.
    let sloppy = AllowRule {
        net: Ipv4Addr::new(192, 0, 2, 77),
        prefix_len: 24,
        ports: 80..=80,
        protocol: Protocol::Tcp,
    };
    assert!(sloppy.validate().is_err());
    assert!(sloppy.covers(Ipv4Addr::new(192, 0, 2, 1)));
    assert!(!sloppy.covers(Ipv4Addr::new(192, 0, 3, 1)));
}

// --- Verdicts ---

#[test]
fn arp_and_dhcp_pass_whatever_the_policy() {
    let deny_all = EgressPolicy::default();
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 2, 2]);
    let arp = ethernet([0xff; 6], GUEST_MAC, 0x0806, &arp);
    assert_eq!(deny_all.judge(&arp), Verdict::Pass);
    let discover = ethernet(
        [0xff; 6],
        GUEST_MAC,
        0x0800,
        &ipv4(
            17,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            &[],
            &udp_datagram(68, 67, &[1; 300]),
        ),
    );
    assert_eq!(deny_all.judge(&discover), Verdict::Pass);
    // A renewal, unicast to the server.
    let renew = ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(
            17,
            GUEST_IP,
            Ipv4Addr::new(10, 0, 2, 2),
            &[],
            &udp_datagram(68, 67, &[1; 300]),
        ),
    );
    assert_eq!(deny_all.judge(&renew), Verdict::Pass);
    // Port 67 from another port is no DHCP client's.
    let other = ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(
            17,
            GUEST_IP,
            ELSEWHERE,
            &[],
            &udp_datagram(1067, 67, &[1; 30]),
        ),
    );
    assert!(matches!(deny_all.judge(&other), Verdict::Refuse(_)));
}

#[test]
fn allowed_tcp_and_udp_pass() {
    let p = policy();
    for (frame, what) in [
        (tcp_frame(ALLOWED, 27000, 7, 0x02, &[]), "SYN to a port"),
        (tcp_frame(ALLOWED, 27000, 7, 0x10, b"data"), "ACK with data"),
        (
            udp_frame(ALLOWED, 27000, b"x"),
            "UDP to an any-protocol rule",
        ),
        (
            tcp_frame(Ipv4Addr::new(192, 0, 2, 200), 1700, 1, 0x02, &[]),
            "first port of a range in a /24",
        ),
        (
            tcp_frame(Ipv4Addr::new(192, 0, 2, 0), 1710, 1, 0x02, &[]),
            "last port of the range",
        ),
        (
            udp_frame(Ipv4Addr::new(10, 1, 2, 3), 53, b"query"),
            "UDP to a UDP rule",
        ),
    ] {
        assert_eq!(p.judge(&frame), Verdict::Pass, "{what}");
    }
    let everything = EgressPolicy::new(vec![rule("0.0.0.0/0:*")]);
    assert_eq!(
        everything.judge(&tcp_frame(ELSEWHERE, 1, 1, 0x02, &[])),
        Verdict::Pass
    );
}

#[test]
fn a_refused_syn_gets_a_reset_addressed_back() {
    let p = policy();
    for (frame, what) in [
        (tcp_frame(ELSEWHERE, 443, 1000, 0x02, &[]), "elsewhere"),
        (tcp_frame(ALLOWED, 27001, 1000, 0x02, &[]), "next port"),
        (
            tcp_frame(Ipv4Addr::new(192, 0, 2, 1), 1711, 1000, 0x02, &[]),
            "past the range",
        ),
        (
            tcp_frame(Ipv4Addr::new(192, 0, 3, 1), 1700, 1000, 0x02, &[]),
            "outside the /24",
        ),
        (
            tcp_frame(Ipv4Addr::new(10, 1, 2, 3), 53, 1000, 0x02, &[]),
            "TCP to a UDP rule",
        ),
        (
            tcp_frame(ELSEWHERE, 443, u32::MAX, 0x02, &[]),
            "sequence wraps",
        ),
        (
            tcp_frame(ELSEWHERE, 443, 5, 0x02 | 0x01 | 0x08, b"fast open"),
            "SYN+FIN+PSH with data",
        ),
    ] {
        let r = refusal(p.judge(&frame));
        check_refusal(&frame, r.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // The exact reply to a plain SYN.
    let frame = tcp_frame(ELSEWHERE, 443, 0x0102_0304, 0x02, &[]);
    let r = refusal(p.judge(&frame));
    let b = r.as_bytes();
    assert_eq!(b.len(), 54);
    assert_eq!(b[..6], GUEST_MAC);
    assert_eq!(b[6..12], GW_MAC);
    assert_eq!(b[14 + 12..14 + 16], ELSEWHERE.octets());
    assert_eq!(b[14 + 16..14 + 20], GUEST_IP.octets());
    let t = &b[34..];
    assert_eq!(u16::from_be_bytes([t[0], t[1]]), 443);
    assert_eq!(u16::from_be_bytes([t[2], t[3]]), 40_000);
    assert_eq!(t[8..12], 0x0102_0305u32.to_be_bytes());
    // Data and FIN count in the acknowledgement.
    let frame = tcp_frame(ELSEWHERE, 443, 100, 0x03, &[0; 10]);
    let r = refusal(p.judge(&frame));
    assert_eq!(r.as_bytes()[34 + 8..34 + 12], 112u32.to_be_bytes());
    // Ethernet padding after the IP packet is not data.
    let mut padded = tcp_frame(ELSEWHERE, 443, 100, 0x02, &[]);
    padded.resize(60, 0xee);
    let r = refusal(p.judge(&padded));
    assert_eq!(r.as_bytes()[34 + 8..34 + 12], 101u32.to_be_bytes());
    check_refusal(&padded, r.as_bytes()).unwrap();
}

#[test]
fn refused_tcp_that_opens_nothing_is_dropped() {
    let p = policy();
    for flags in [0x10, 0x12, 0x06, 0x04, 0x14, 0x01, 0x11, 0x18, 0x00] {
        assert_eq!(
            p.judge(&tcp_frame(ELSEWHERE, 443, 1, flags, &[])),
            Verdict::Drop(DropReason::NotAllowed),
            "flags {flags:#x}"
        );
    }
}

#[test]
fn a_refused_udp_datagram_gets_a_port_unreachable_quoting_it() {
    let p = policy();
    for frame in [
        udp_frame(ELSEWHERE, 53, b"a query of some length"),
        udp_frame(Ipv4Addr::new(10, 1, 2, 3), 54, &[]),
        udp_frame(Ipv4Addr::new(192, 0, 2, 10), 27001, &[7; 3]),
        udp_frame(Ipv4Addr::new(192, 0, 2, 5), 1700, b"a TCP-only rule"),
    ] {
        let r = refusal(p.judge(&frame));
        check_refusal(&frame, r.as_bytes()).unwrap();
    }
    // IP options are quoted with the header: the longest reply there is.
    let options = [1u8; 40];
    let frame = ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(
            17,
            GUEST_IP,
            ELSEWHERE,
            &options,
            &udp_datagram(5000, 6000, b"payload"),
        ),
    );
    let r = refusal(p.judge(&frame));
    assert_eq!(r.as_bytes().len(), MAX_REFUSAL_LEN);
    check_refusal(&frame, r.as_bytes()).unwrap();
    let icmp = &r.as_bytes()[34..];
    assert_eq!(icmp[8..8 + 60], frame[14..14 + 60]);
    assert_eq!(icmp[68..76], frame[74..82], "the UDP header");
}

#[test]
fn no_reply_to_or_about_broadcast_and_multicast() {
    let p = policy();
    let udp = udp_datagram(50_000, 137, b"x");
    let syn = tcp_segment(40_000, 80, 1, 0x02, &[]);
    let cases = [
        (GW_MAC, GUEST_IP, Ipv4Addr::BROADCAST, 17, &udp),
        (GW_MAC, GUEST_IP, Ipv4Addr::new(224, 0, 0, 251), 17, &udp),
        (GW_MAC, Ipv4Addr::UNSPECIFIED, ELSEWHERE, 17, &udp),
        (GW_MAC, Ipv4Addr::new(239, 1, 1, 1), ELSEWHERE, 6, &syn),
        ([0xff; 6], GUEST_IP, ELSEWHERE, 6, &syn),
        ([0x01, 0, 0x5e, 0, 0, 1], GUEST_IP, ELSEWHERE, 17, &udp),
    ];
    for (mac, src, dst, proto, l4) in cases {
        let frame = ethernet(mac, GUEST_MAC, 0x0800, &ipv4(proto, src, dst, &[], l4));
        assert_eq!(
            p.judge(&frame),
            Verdict::Drop(DropReason::NotAllowed),
            "{mac:x?} {src} {dst}"
        );
    }
    // A multicast source MAC.
    let frame = ethernet(
        GW_MAC,
        [0x01, 0, 0, 0, 0, 1],
        0x0800,
        &ipv4(6, GUEST_IP, ELSEWHERE, &[], &syn),
    );
    assert_eq!(p.judge(&frame), Verdict::Drop(DropReason::NotAllowed));
}

#[test]
fn pings_go_where_a_rule_reaches() {
    let p = policy();
    assert_eq!(p.judge(&icmp_frame(ALLOWED, 8, b"ping")), Verdict::Pass);
    assert_eq!(
        p.judge(&icmp_frame(Ipv4Addr::new(192, 0, 2, 99), 8, &[])),
        Verdict::Pass
    );
    assert_eq!(
        p.judge(&icmp_frame(ELSEWHERE, 8, b"ping")),
        Verdict::Drop(DropReason::NotAllowed)
    );
    for t in [0u8, 3, 5, 11, 13, 17] {
        assert_eq!(
            p.judge(&icmp_frame(ALLOWED, t, &[])),
            Verdict::Drop(DropReason::IcmpType(t))
        );
    }
    let short = ethernet(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(1, GUEST_IP, ALLOWED, &[], &[8, 0, 0, 0, 0, 1, 0]),
    );
    assert_eq!(p.judge(&short), Verdict::Drop(DropReason::Truncated));
}

#[test]
fn fragments_are_dropped() {
    let p = policy();
    for flags_offset in [0x2000u16, 0x0001, 0x2001, 0x1fff, 0x6000] {
        let mut frame = tcp_frame(ALLOWED, 27000, 1, 0x02, &[]);
        frame[20..22].copy_from_slice(&flags_offset.to_be_bytes());
        assert_eq!(
            p.judge(&frame),
            Verdict::Drop(DropReason::Fragment),
            "{flags_offset:#x}"
        );
    }
    // DF alone (and the reserved bit, which nothing reads) is no fragment.
    let mut frame = tcp_frame(ALLOWED, 27000, 1, 0x02, &[]);
    frame[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
    assert_eq!(p.judge(&frame), Verdict::Pass);
    frame[20..22].copy_from_slice(&0x8000u16.to_be_bytes());
    assert_eq!(p.judge(&frame), Verdict::Pass);
}

#[test]
fn other_ethertypes_and_protocols_are_dropped() {
    let p = EgressPolicy::new(vec![rule("0.0.0.0/0:*")]);
    let ip = ipv4(6, GUEST_IP, ALLOWED, &[], &tcp_segment(1, 2, 3, 0x02, &[]));
    let with = |t: u16| ethernet(GW_MAC, GUEST_MAC, t, &ip);
    assert_eq!(p.judge(&with(0x86dd)), Verdict::Drop(DropReason::Ipv6));
    for t in [0x8100, 0x88a8, 0x9100] {
        assert_eq!(p.judge(&with(t)), Verdict::Drop(DropReason::Vlan));
    }
    for t in [0x88cc, 0x8035, 0x0000, 0xffff, 0x0801] {
        assert_eq!(p.judge(&with(t)), Verdict::Drop(DropReason::Ethertype(t)));
    }
    for proto in [0u8, 2, 4, 41, 47, 50, 58, 132, 255] {
        let frame = ethernet(
            GW_MAC,
            GUEST_MAC,
            0x0800,
            &ipv4(proto, GUEST_IP, ALLOWED, &[], &[0; 40]),
        );
        assert_eq!(
            p.judge(&frame),
            Verdict::Drop(DropReason::IpProtocol(proto))
        );
    }
}

#[test]
fn truncated_and_malformed_headers_are_dropped() {
    use DropReason::{Malformed, Truncated};
    let p = EgressPolicy::new(vec![rule("0.0.0.0/0:*")]);
    let good = tcp_frame(ALLOWED, 80, 1, 0x02, &[]);
    assert_eq!(p.judge(&good), Verdict::Pass);
    // Shorter than each header.
    for len in [0, 1, 13, 14, 33] {
        assert_eq!(p.judge(&good[..len]), Verdict::Drop(Truncated), "{len}");
    }
    let edit = |at: usize, bytes: &[u8]| {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        p.judge(&f)
    };
    // IP version, IHL, total length.
    assert_eq!(edit(14, &[0x65]), Verdict::Drop(Malformed));
    assert_eq!(edit(14, &[0x44]), Verdict::Drop(Malformed));
    assert_eq!(edit(14, &[0x40]), Verdict::Drop(Malformed));
    assert_eq!(edit(16, &[0, 19]), Verdict::Drop(Malformed));
    assert_eq!(
        edit(16, &[0, 41]),
        Verdict::Drop(Truncated),
        "past the frame"
    );
    assert_eq!(edit(16, &[0xff, 0xff]), Verdict::Drop(Truncated));
    // An IHL past the total length, or leaving no room for TCP.
    assert_eq!(edit(14, &[0x4f]), Verdict::Drop(Malformed));
    assert_eq!(edit(14, &[0x49]), Verdict::Drop(Truncated));
    // TCP data offset below 5, or past the segment.
    assert_eq!(edit(34 + 12, &[0x40]), Verdict::Drop(Malformed));
    assert_eq!(edit(34 + 12, &[0x60]), Verdict::Drop(Truncated));
    // A total length that cuts TCP short.
    assert_eq!(edit(16, &[0, 39]), Verdict::Drop(Truncated));
    // UDP: shorter than its header, a length below 8 or past the datagram.
    let udp = udp_frame(ALLOWED, 53, b"abc");
    assert_eq!(p.judge(&udp), Verdict::Pass);
    let mut f = udp.clone();
    f[16..18].copy_from_slice(&27u16.to_be_bytes());
    assert_eq!(p.judge(&f[..41]), Verdict::Drop(Truncated));
    for bad_len in [0u16, 7, 12, 0xffff] {
        let mut f = udp.clone();
        f[38..40].copy_from_slice(&bad_len.to_be_bytes());
        assert_eq!(
            p.judge(&f),
            Verdict::Drop(Malformed),
            "UDP length {bad_len}"
        );
    }
    // A UDP length shorter than the datagram is fine (the rest is ignored).
    let mut f = udp.clone();
    f[38..40].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(p.judge(&f), Verdict::Pass);
}

#[test]
fn an_empty_policy_refuses_every_connection() {
    let p = EgressPolicy::default();
    let syn = tcp_frame(ALLOWED, 27000, 1, 0x02, &[]);
    check_refusal(&syn, refusal(p.judge(&syn)).as_bytes()).unwrap();
    let dgram = udp_frame(ALLOWED, 27000, b"x");
    check_refusal(&dgram, refusal(p.judge(&dgram)).as_bytes()).unwrap();
    assert_eq!(
        p.judge(&icmp_frame(ALLOWED, 8, &[])),
        Verdict::Drop(DropReason::NotAllowed)
    );
}

// --- Properties ---

fn any_rule() -> impl Strategy<Value = AllowRule> {
    (
        any::<u32>(),
        0u8..=32,
        any::<u16>(),
        any::<u16>(),
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Any)
        ],
    )
        .prop_map(|(addr, prefix_len, a, b, protocol)| {
            let mask = prefix_mask(prefix_len).unwrap();
            AllowRule {
                net: Ipv4Addr::from(addr & mask),
                prefix_len,
                ports: a.min(b)..=a.max(b),
                protocol,
            }
        })
}

/// A frame from the guest of any kind the filter knows, with any fields, then possibly cut
/// short or with a few bytes changed.
fn guest_frame() -> impl Strategy<Value = Vec<u8>> {
    let ip = (
        prop_oneof![Just(1u8), Just(6), Just(17), any::<u8>()],
        any::<u32>(),
        prop_oneof![
            Just(u32::from(ELSEWHERE)),
            Just(u32::from(ALLOWED)),
            any::<u32>()
        ],
        prop::collection::vec(any::<u8>(), 0..=10).prop_map(|mut o| {
            o.resize(o.len() / 4 * 4, 1);
            o
        }),
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..40),
    );
    (
        ip,
        prop_oneof![Just(0x0800u16), Just(0x0806), Just(0x86dd), any::<u16>()],
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        prop::option::of(any::<usize>()),
        any::<bool>(),
    )
        .prop_map(
            |(
                (proto, src, dst, options, sport, dport, seq, flags, data),
                ethertype,
                edits,
                cut,
                pad,
            )| {
                let l4 = match proto {
                    6 => tcp_segment(sport, dport, seq, flags, &data),
                    17 => udp_datagram(sport, dport, &data),
                    1 => [&[flags % 16, 0, 0, 0][..], &data].concat(),
                    _ => data,
                };
                let packet = ipv4(
                    proto,
                    Ipv4Addr::from(src),
                    Ipv4Addr::from(dst),
                    &options,
                    &l4,
                );
                let mut frame = ethernet(GW_MAC, GUEST_MAC, ethertype, &packet);
                if pad && frame.len() < 60 {
                    frame.resize(60, 0);
                }
                let n = frame.len();
                for (at, b) in edits {
                    frame[at % n] = b;
                }
                if let Some(c) = cut {
                    frame.truncate(c % (n + 1));
                }
                frame
            },
        )
}

proptest! {
    #[test]
    fn judge_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = policy().judge(&bytes);
    }

    #[test]
    fn every_refusal_is_well_formed_and_addressed_back(
        frame in guest_frame(),
        rules in prop::collection::vec(any_rule(), 0..4),
    ) {
        let p = EgressPolicy::new(rules);
        if let Verdict::Refuse(r) = p.judge(&frame) {
            prop_assert!(check_refusal(&frame, r.as_bytes()).is_ok(), "{:?}", check_refusal(&frame, r.as_bytes()));
        }
    }

    #[test]
    fn unallowed_syns_and_datagrams_are_always_refused_well(
        dst in any::<u32>().prop_filter("unicast, outside 192.0.2.0/24 and 10.1.2.3", |a| {
            let a = Ipv4Addr::from(*a);
            !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
                && a.octets()[..3] != [192, 0, 2] && a != Ipv4Addr::new(10, 1, 2, 3)
        }),
        dport in any::<u16>(),
        seq in any::<u32>(),
        tcp in any::<bool>(),
        fin_psh in 0u8..4,
        options in 0usize..=10,
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let dst = Ipv4Addr::from(dst);
        let l4 = if tcp {
            tcp_segment(1234, dport, seq, 0x02 | (fin_psh & 1) | ((fin_psh & 2) << 2), &data)
        } else if dport == 67 {
            return Ok(());
        } else {
            udp_datagram(1234, dport, &data)
        };
        let opts = vec![1u8; options * 4];
        let frame = ethernet(GW_MAC, GUEST_MAC, 0x0800,
            &ipv4(if tcp { 6 } else { 17 }, GUEST_IP, dst, &opts, &l4));
        match policy().judge(&frame) {
            Verdict::Refuse(r) => prop_assert!(check_refusal(&frame, r.as_bytes()).is_ok(),
                "{:?}", check_refusal(&frame, r.as_bytes())),
            other => prop_assert!(false, "not refused: {:?}", other),
        }
    }

    #[test]
    fn rules_print_and_parse_back_unchanged(r in any_rule()) {
        prop_assert_eq!(r.to_string().parse::<AllowRule>(), Ok(r));
    }

    #[test]
    fn a_rule_allows_exactly_its_addresses_ports_and_protocol(
        r in any_rule(), addr in any::<u32>(), port in any::<u16>(), tcp in any::<bool>(),
    ) {
        let addr = Ipv4Addr::from(addr);
        let in_net = r.prefix_len == 0
            || u32::from(addr) >> (32 - u32::from(r.prefix_len))
                == u32::from(r.net) >> (32 - u32::from(r.prefix_len));
        let proto = match r.protocol { Protocol::Any => true, Protocol::Tcp => tcp, Protocol::Udp => !tcp };
        let want = in_net && r.ports.contains(&port) && proto;
        let frame = if tcp {
            tcp_frame(addr, port, 1, 0x10, &[])
        } else {
            udp_frame(addr, port, b"x")
        };
        let p = EgressPolicy::new(vec![r]);
        prop_assert_eq!(p.judge(&frame) == Verdict::Pass, want);
    }
}

#[test]
fn the_guests_served_ports_answer_anyone() {
    // The frame builders send TCP from port 40 000 and UDP from 50 000: as if the host
    // forwarded those to the guest.
    let mut p = policy();
    let answer = tcp_frame(ELSEWHERE, 51_000, 7, 0x12, &[]);
    let datagram = udp_frame(ELSEWHERE, 51_000, b"answer");
    assert_eq!(p.judge(&answer), Verdict::Drop(DropReason::NotAllowed));
    assert!(matches!(p.judge(&datagram), Verdict::Refuse(_)));
    p.served_tcp = vec![40_000];
    assert_eq!(p.judge(&answer), Verdict::Pass);
    assert!(matches!(p.judge(&datagram), Verdict::Refuse(_)), "TCP only");
    p.served_udp = vec![50_000];
    assert_eq!(p.judge(&datagram), Verdict::Pass);
}
