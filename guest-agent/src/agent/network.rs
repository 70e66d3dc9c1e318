//! The guest's name and network, set up by PID 1 before the job starts: the execution host's
//! node name as the guest's, `lo` up, eth0 (virtio-net, backed by passt on the host) with the
//! static IPv4 address, route and MTU the host decided, and the name files in the job's root
//! (`/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`).
//!
//! Interfaces are set with the classic `SIOC*` ioctls on a datagram socket rather than
//! rtnetlink: five fixed-size requests, no message parsing, and nothing a job could send back.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::protocol::{GuestNetwork, Ipv4Interface};

/// The guest's only network device (virtio-net; nothing renames it in the guest).
pub const GUEST_INTERFACE: &str = "eth0";

/// How long eth0 may take to appear (the driver probes before init runs; this only covers a
/// slow probe).
const INTERFACE_PATIENCE: Duration = Duration::from_secs(5);

/// The address `/etc/hosts` gives the host name when the job has no network (Debian's
/// convention for a host without a permanent address).
const NO_NETWORK_SELF: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// Why the guest's name or network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("host name {0:?} is not a valid node name (1..=64 bytes, no NUL or '/')")]
    BadHostname(String),
    #[error("sethostname: {0}")]
    Hostname(Errno),
    #[error("the network device {GUEST_INTERFACE} did not appear within {INTERFACE_PATIENCE:?}")]
    InterfaceMissing,
    #[error("{interface}: {step}: {errno}")]
    Interface {
        interface: &'static str,
        step: &'static str,
        errno: Errno,
    },
    #[error("route {what}: {errno}")]
    Route { what: &'static str, errno: Errno },
    #[error("write {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

impl NetworkError {
    /// The errno reported to the host with the failure.
    pub fn errno(&self) -> i32 {
        match self {
            NetworkError::BadHostname(_) => libc::EINVAL,
            NetworkError::InterfaceMissing => libc::ENODEV,
            NetworkError::Hostname(e)
            | NetworkError::Interface { errno: e, .. }
            | NetworkError::Route { errno: e, .. } => *e as i32,
            NetworkError::File { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Sets up everything in `net`. Only PID 1 of a guest calls this.
pub fn configure(net: &GuestNetwork) -> Result<(), NetworkError> {
    let hostname = checked_hostname(&net.hostname)?;
    nix::unistd::sethostname(&hostname).map_err(NetworkError::Hostname)?;
    let sock = control_socket()?;
    bring_up(&sock, "lo")?;
    if let Some(v4) = &net.ipv4 {
        wait_for_interface(Path::new("/sys/class/net").join(GUEST_INTERFACE).as_path())?;
        configure_ipv4(&sock, v4)?;
    }
    let own_address = net.ipv4.map(|v4| Ipv4Addr::from(v4.address));
    write_file("/etc/hostname", &format!("{hostname}\n"))?;
    let existing = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    write_file("/etc/hosts", &hosts_file(&existing, &hostname, own_address))?;
    write_file("/etc/resolv.conf", &resolv_conf(net))?;
    Ok(())
}

/// The host name as a string the kernel takes (`__NEW_UTS_LEN` is 64).
fn checked_hostname(name: &[u8]) -> Result<String, NetworkError> {
    let text = String::from_utf8_lossy(name).into_owned();
    if name.is_empty() || name.len() > 64 || name.contains(&0) || name.contains(&b'/') {
        return Err(NetworkError::BadHostname(text));
    }
    Ok(text)
}

/// `/etc/hosts` for the job: the root's own lines kept, except those that named the host, then
/// the host's name on the guest's address (eth0's, which is the execution host's own under
/// passt), or on 127.0.1.1 without a network; `localhost` added if the root had no such line.
pub fn hosts_file(existing: &str, hostname: &str, own_address: Option<Ipv4Addr>) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names_host = |line: &str| {
        let data = line.split('#').next().unwrap_or("");
        data.split_whitespace()
            .skip(1)
            .any(|name| name == hostname || name == short)
    };
    let mut out = String::new();
    let mut has_localhost = false;
    for line in existing.lines().filter(|l| !names_host(l)) {
        let data = line.split('#').next().unwrap_or("");
        has_localhost |= data.split_whitespace().skip(1).any(|n| n == "localhost");
        out.push_str(line);
        out.push('\n');
    }
    if !has_localhost {
        out.insert_str(0, "127.0.0.1\tlocalhost\n");
    }
    let address = own_address.unwrap_or(NO_NETWORK_SELF);
    if short == hostname {
        out.push_str(&format!("{address}\t{hostname}\n"));
    } else {
        out.push_str(&format!("{address}\t{hostname} {short}\n"));
    }
    out
}

/// `/etc/resolv.conf` for the job: the resolvers and search list the host sent; a job without
/// a network gets none (lookups fail at once instead of timing out).
pub fn resolv_conf(net: &GuestNetwork) -> String {
    let mut out = String::from("# written by sge-vm-agent for this job\n");
    if net.ipv4.is_none() {
        return out;
    }
    let search: Vec<String> = net
        .search
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .filter(|d| !d.is_empty() && !d.contains(char::is_whitespace))
        .collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for ns in &net.nameservers {
        out.push_str(&format!("nameserver {}\n", Ipv4Addr::from(*ns)));
    }
    out
}

/// Replaces `path` with a new file (a symlink there, such as systemd's resolv.conf link into
/// /run, is replaced, not followed).
fn write_file(path: &str, contents: &str) -> Result<(), NetworkError> {
    let err = |source| NetworkError::File {
        path: path.to_string(),
        source,
    };
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::write(path, contents).map_err(err)
}

fn wait_for_interface(sys_path: &Path) -> Result<(), NetworkError> {
    let deadline = Instant::now() + INTERFACE_PATIENCE;
    while !sys_path.exists() {
        if Instant::now() >= deadline {
            return Err(NetworkError::InterfaceMissing);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn control_socket() -> Result<OwnedFd, NetworkError> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetworkError::Interface {
            interface: "lo",
            step: "socket",
            errno: Errno::last(),
        });
    }
    // SAFETY: fd is a descriptor we just created and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of PODs); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_of(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads an
    // AF_INET sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// One `SIOC*` interface request.
fn interface_ioctl(
    sock: &OwnedFd,
    interface: &'static str,
    step: &'static str,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
) -> Result<(), NetworkError> {
    // SAFETY: `req` is a valid, initialised ifreq that outlives the call; the request numbers
    // used here read or write only that struct.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(NetworkError::Interface {
            interface,
            step,
            errno: Errno::last(),
        });
    }
    Ok(())
}

fn bring_up(sock: &OwnedFd, interface: &'static str) -> Result<(), NetworkError> {
    let mut req = ifreq(interface);
    interface_ioctl(sock, interface, "get flags", libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    interface_ioctl(sock, interface, "set up", libc::SIOCSIFFLAGS, &mut req)
}

fn configure_ipv4(sock: &OwnedFd, v4: &Ipv4Interface) -> Result<(), NetworkError> {
    let eth = GUEST_INTERFACE;
    let address = Ipv4Addr::from(v4.address);
    let netmask = prefix_netmask(v4.prefix_len);
    let mut req = ifreq(eth);
    req.ifr_ifru.ifru_addr = sockaddr_of(address);
    interface_ioctl(sock, eth, "set address", libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(eth);
    req.ifr_ifru.ifru_netmask = sockaddr_of(netmask);
    interface_ioctl(sock, eth, "set netmask", libc::SIOCSIFNETMASK, &mut req)?;
    if v4.mtu > 0 {
        let mut req = ifreq(eth);
        req.ifr_ifru.ifru_mtu = i32::try_from(v4.mtu).unwrap_or(i32::MAX);
        interface_ioctl(sock, eth, "set MTU", libc::SIOCSIFMTU, &mut req)?;
    }
    // A gratuitous ARP when eth0 comes up: passt learns the guest's MAC from the guest's first
    // frame, and until then cannot deliver an inbound connection to a job that only listens.
    let arp_notify = format!("/proc/sys/net/ipv4/conf/{eth}/arp_notify");
    std::fs::write(&arp_notify, b"1").map_err(|source| NetworkError::File {
        path: arp_notify,
        source,
    })?;
    bring_up(sock, eth)?;
    let gateway = Ipv4Addr::from(v4.gateway);
    // A gateway outside the prefix (passt copies a host's /32 as it is) needs its own route.
    if !same_prefix(address, gateway, v4.prefix_len) {
        add_route(sock, "to the gateway", gateway, Ipv4Addr::BROADCAST, None)?;
    }
    add_route(
        sock,
        "default",
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Some(gateway),
    )
}

/// The netmask of a prefix length (1..=32, checked by the protocol).
pub fn prefix_netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

fn same_prefix(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::from(prefix_netmask(prefix_len));
    u32::from(a) & mask == u32::from(b) & mask
}

/// The kernel's `struct rtentry` (x86-64), which glibc's libc bindings do not define.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds a route through eth0: to `dst`/`mask` via `gateway`, or on the link without one.
fn add_route(
    sock: &OwnedFd,
    what: &'static str,
    dst: Ipv4Addr,
    mask: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetworkError> {
    let dev = CString::new(GUEST_INTERFACE).map_err(|_| NetworkError::Route {
        what,
        errno: Errno::EINVAL,
    })?;
    let mut flags = libc::RTF_UP;
    if gateway.is_some() {
        flags |= libc::RTF_GATEWAY;
    }
    if mask == Ipv4Addr::BROADCAST {
        flags |= libc::RTF_HOST;
    }
    let mut entry = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_of(dst),
        rt_gateway: sockaddr_of(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        rt_genmask: sockaddr_of(mask),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr().cast_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `entry` is a complete struct rtentry and `dev` a NUL-terminated string, both alive
    // for the call; SIOCADDRT only reads them.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut entry as *mut RtEntry,
        )
    };
    if rc < 0 {
        return Err(NetworkError::Route {
            what,
            errno: Errno::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn netmasks_of_prefixes() {
        assert_eq!(prefix_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(prefix_netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert!(same_prefix(
            Ipv4Addr::new(192, 0, 2, 2),
            Ipv4Addr::new(192, 0, 2, 1),
            24
        ));
        assert!(!same_prefix(
            Ipv4Addr::new(192, 0, 2, 2),
            Ipv4Addr::new(192, 0, 2, 1),
            32
        ));
    }

    #[test]
    fn hosts_keeps_the_roots_lines_and_names_the_host_once() {
        let existing = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n127.0.1.1 oldname node7\n# node7 comment\n";
        let out = hosts_file(
            existing,
            "node7.example.org",
            Some(Ipv4Addr::new(192, 0, 2, 2)),
        );
        assert_eq!(
            out,
            "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n# node7 comment\n\
             192.0.2.2\tnode7.example.org node7\n"
        );
    }

    #[test]
    fn hosts_adds_localhost_and_the_no_network_address() {
        assert_eq!(
            hosts_file("", "node7", None),
            "127.0.0.1\tlocalhost\n127.0.1.1\tnode7\n"
        );
    }

    #[test]
    fn resolv_conf_lists_search_and_resolvers_only_with_a_network() {
        let mut net = GuestNetwork {
            hostname: b"h".to_vec(),
            ipv4: Some(Ipv4Interface {
                address: [192, 0, 2, 2],
                prefix_len: 24,
                gateway: [192, 0, 2, 1],
                mtu: 65520,
            }),
            nameservers: vec![[192, 0, 2, 1], [10, 0, 0, 53]],
            search: vec![b"example.org".to_vec(), b"bad domain".to_vec()],
        };
        assert_eq!(
            resolv_conf(&net),
            "# written by sge-vm-agent for this job\nsearch example.org\n\
             nameserver 192.0.2.1\nnameserver 10.0.0.53\n"
        );
        net.ipv4 = None;
        assert_eq!(
            resolv_conf(&net),
            "# written by sge-vm-agent for this job\n"
        );
    }

    #[test]
    fn host_names_the_kernel_refuses_are_errors() {
        for bad in [&b""[..], b"a/b", b"a\0b", &[b'x'; 65]] {
            assert!(checked_hostname(bad).is_err());
        }
        assert_eq!(checked_hostname(b"node7").unwrap(), "node7");
    }
}
