//! The host side of the vsock device in Firecracker's hybrid-vsock convention: guest
//! connections to port P are connected to the Unix socket `<uds_path>_P`; host programs connect
//! to the Unix listener `<uds_path>` and write `CONNECT <port>\n`, get `OK <host_port>\n` once
//! the guest accepts, and then talk to the guest listener on that port.
//!
//! The muxer owns every [`Connection`], a nested epoll set over the listener and the host
//! streams (the device's event loop watches only the epoll fd), the queue of connections with
//! something to send to the guest, and RST replies for packets that match no connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::Connection;
use super::packet::*;

/// Most simultaneous connections.
pub const MAX_CONNECTIONS: usize = 1023;
/// Most accepted host streams still waiting for their `CONNECT` line.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Most queued RST replies; beyond that they are dropped (the guest times out instead).
pub const MAX_QUEUED_RSTS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host-side port for host-initiated connections (as Firecracker: 2^30 upwards).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How often connection deadlines are checked while any runs.
const DEADLINE_TICK: Duration = Duration::from_millis(250);

/// (host port, guest port)
type ConnKey = (u32, u32);

/// Errors while setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The listener could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The epoll set could not be created.
    #[error("cannot create the vsock muxer's epoll set: {0}")]
    Epoll(std::io::Error),
}

struct PendingHostStream {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock muxer.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    fd_conn: HashMap<RawFd, ConnKey>,
    registered: HashMap<RawFd, EventSet>,
    pending_hosts: HashMap<RawFd, PendingHostStream>,
    rx_keys: VecDeque<ConnKey>,
    rx_set: HashSet<ConnKey>,
    rsts: VecDeque<PacketHeader>,
    next_local_port: u32,
    /// Ticks while some connection has a deadline (see [`Connection::deadline`]).
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is out of the epoll set after `accept` failed for want of descriptors
    /// (EMFILE, ENFILE, ENOMEM): left in, its pending connection would keep it readable and
    /// the event loop would spin. It is put back on the next timer tick.
    listener_paused: bool,
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket file there) for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(uds_path);
            }
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let fd = listener.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| MuxerError::Epoll(e.into()))?;
        let tfd = timer.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                tfd,
                EpollEvent::new(EventSet::IN, tfd as u64),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            fd_conn: HashMap::new(),
            registered: HashMap::new(),
            pending_hosts: HashMap::new(),
            rx_keys: VecDeque::new(),
            rx_set: HashSet::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            timer,
            timer_armed: false,
            listener_paused: false,
        })
    }

    /// Runs the deadline timer while some connection has a deadline or the listener is paused.
    /// Called only from the VMM thread's entry points (the vCPU threads' seccomp filter has no
    /// timerfd calls).
    fn arm_timer(&mut self) {
        let needed = self.listener_paused || self.conns.values().any(|c| c.deadline().is_some());
        let result = match (needed, self.timer_armed) {
            (true, false) => self.timer.reset(DEADLINE_TICK, Some(DEADLINE_TICK)),
            (false, true) => self.timer.clear(),
            _ => return,
        };
        match result {
            Ok(()) => self.timer_armed = needed,
            Err(e) => tracing::warn!("vsock: cannot set the deadline timer: {e}"),
        }
    }

    /// Resets connections whose deadline passed, and puts a paused listener back.
    fn expire_deadlines(&mut self) {
        let _ = self.timer.wait();
        if self.listener_paused {
            self.listener_paused = !self.watch_listener(ControlOperation::Add);
        }
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter_mut()
            .filter_map(|(k, c)| c.expire(now).then_some(*k))
            .collect();
        for key in expired {
            self.update(key);
        }
    }

    /// The epoll fd to watch.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet is waiting for an RX buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_keys.is_empty()
    }

    /// Device reset: drops every connection the guest knew about. Host streams still waiting
    /// for their `CONNECT` line and host-initiated connections whose REQUEST the guest has not
    /// seen are kept, so a host that connects before the driver is up is not cut off.
    pub fn reset(&mut self) {
        let dropped: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.is_unannounced())
            .map(|(k, _)| *k)
            .collect();
        for key in dropped {
            if let Some(conn) = self.conns.remove(&key) {
                let fd = conn.fd();
                if self.registered.remove(&fd).is_some() {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.fd_conn.remove(&fd);
            }
        }
        self.rx_keys.clear();
        self.rx_set.clear();
        self.rsts.clear();
        let kept: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in kept {
            self.update(key);
        }
    }

    fn queue_rst_reply(&mut self, hdr: &PacketHeader) {
        if hdr.op == OP_RST || self.rsts.len() >= MAX_QUEUED_RSTS {
            return;
        }
        self.rsts.push_back(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Re-evaluates a connection after it changed: removes it when finished, otherwise updates
    /// its epoll interest and its place in the RX queue.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.fd();
        if conn.is_finished() {
            if self.registered.remove(&fd).is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_conn.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        let want = conn.interest();
        let have = self.registered.get(&fd).copied();
        // An fd with no interest is removed from the set: epoll would otherwise keep reporting
        // HUP/ERR on it and spin the loop.
        let result = match (have, want.is_empty()) {
            (None, true) => Ok(()),
            (Some(_), true) => {
                self.registered.remove(&fd);
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            }
            (None, false) => {
                self.registered.insert(fd, want);
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(want, fd as u64))
            }
            (Some(h), false) if h != want => {
                self.registered.insert(fd, want);
                self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(want, fd as u64),
                )
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!("vsock: epoll update failed: {e}");
        }
        self.fd_conn.insert(fd, key);
        if conn.has_pending_rx() && self.rx_set.insert(key) {
            self.rx_keys.push_back(key);
        }
    }

    /// A packet from the guest (already parsed and validated by the device).
    pub fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.handle_guest_pkt(hdr, data);
        self.arm_timer();
    }

    fn handle_guest_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!("vsock: dropping packet with bad addresses {hdr:?}");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.queue_rst_reply(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(hdr, data);
            self.update(key);
            return;
        }
        if hdr.op != OP_REQUEST {
            self.queue_rst_reply(hdr);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_rst_reply(hdr);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
        match connect_without_blocking(&path) {
            Ok(stream) => {
                self.conns
                    .insert(key, Connection::peer_init(stream, hdr, self.guest_cid));
                self.update(key);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path} refused: {e}");
                self.queue_rst_reply(hdr);
            }
        }
    }

    /// The next packet for the guest; RW data goes to `buf`.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        let pkt = self.next_rx_pkt(buf);
        self.arm_timer();
        pkt
    }

    fn next_rx_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some(rst);
        }
        // Each queued connection is asked once per call: one with nothing to send after all
        // must not be re-queued and asked again forever.
        for _ in 0..self.rx_keys.len() {
            let Some(key) = self.rx_keys.pop_front() else {
                break;
            };
            self.rx_set.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.recv_pkt(buf);
            self.update(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Handles whatever is ready on the listener and the host streams.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            if n == 0 {
                self.arm_timer();
                return;
            }
            for ev in &events[..n] {
                let fd = ev.fd();
                if fd == self.timer.as_raw_fd() {
                    self.expire_deadlines();
                } else if fd == self.listener.as_raw_fd() {
                    self.accept_host_streams();
                } else if self.pending_hosts.contains_key(&fd) {
                    self.read_connect_line(fd);
                } else if let Some(key) = self.fd_conn.get(&fd).copied() {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.notify(ev.event_set());
                    }
                    self.update(key);
                }
            }
        }
    }

    fn accept_host_streams(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending_hosts.len() >= MAX_PENDING_HOST_STREAMS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: closes the stream
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending_hosts.insert(
                            fd,
                            PendingHostStream {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors (or another lasting error): stop watching until the
                    // next tick rather than spin on a listener that stays readable.
                    tracing::warn!("vsock: cannot accept host connections for now: {e}");
                    self.listener_paused = self.watch_listener(ControlOperation::Delete);
                    self.arm_timer();
                    return;
                }
            }
        }
    }

    /// Adds the listener to the epoll set or deletes it; whether that worked.
    fn watch_listener(&self, op: ControlOperation) -> bool {
        let fd = self.listener.as_raw_fd();
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, fd as u64))
            .is_ok()
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port >= u32::MAX / 2 {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so no data after it is consumed.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending_hosts.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&p.line)),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Some(None),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Some(None),
            }
        };
        let Some(port) = outcome else {
            return; // line incomplete; wait for more
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(p) = self.pending_hosts.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            return; // bad line: the stream is closed
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let local_port = self.allocate_local_port();
        let key = (local_port, peer_port);
        self.conns.insert(
            key,
            Connection::local_init(p.stream, local_port, peer_port, self.guest_cid),
        );
        self.update(key);
    }
}

/// Parses `CONNECT <port>` (without the newline).
/// Connects to the Unix stream listener at `path` without ever waiting for it: a listener
/// whose backlog is full (its owner is slow, or a guest floods it with connections) answers
/// EAGAIN at once instead of blocking the VMM's event thread, and the guest gets a RST.
fn connect_without_blocking(path: &str) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A Unix stream connect on a non-blocking socket completes or fails at once (EAGAIN for a
    // full backlog); it never returns EINPROGRESS.
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Default::default()
        }
    }

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"HELLO 52"), None);
    }

    #[test]
    fn guest_request_without_host_listener_gets_rst() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Muxer::new(3, &dir.path().join("v.sock")).unwrap();
        m.send_pkt(&guest(OP_REQUEST, 1234, 5000), &[]);
        let mut buf = [0u8; 64];
        let h = m.recv_pkt(&mut buf).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RST, 5000, 1234, 3)
        );
        assert!(!m.has_pending_rx());
    }

    /// A host listener whose backlog is full (nobody accepts): before, the muxer's `connect`
    /// blocked the VMM's event thread, with the transport lock held, until somebody accepted.
    #[test]
    fn guest_requests_to_a_full_listener_are_reset_without_blocking() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        let path = format!("{}_5000", base.display());
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(path.as_str()).unwrap()).unwrap();
        listen(&listener, Backlog::new(1).unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut m = Muxer::new(3, &base).unwrap();
            let mut resets = 0;
            let mut buf = [0u8; 64];
            for port in 0..16 {
                m.send_pkt(&guest(OP_REQUEST, 2000 + port, 5000), &[]);
                while let Some(h) = m.recv_pkt(&mut buf) {
                    resets += usize::from(h.op == OP_RST);
                }
            }
            let _ = tx.send((resets, m.connection_count()));
        });
        let (resets, connected) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the muxer blocked in connect on a full backlog");
        assert!(resets >= 10, "{resets} of 16 reset");
        assert_eq!(resets + connected, 16);
        drop(listener);
    }

    /// Before, an `accept` that failed for want of descriptors left the listener readable in
    /// the epoll set, and `process_events` looped on it for ever (the event thread wedged at
    /// 100% CPU). Runs in a child process of its own: it lowers the open-files limit.
    #[test]
    fn a_host_connection_that_cannot_be_accepted_for_want_of_descriptors_does_not_spin() {
        const CHILD: &str = "SGE_VMM_TEST_MUXER_EMFILE_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "--nocapture"])
                .arg("virtio::vsock::muxer::tests::a_host_connection_that_cannot_be_accepted_for_want_of_descriptors_does_not_spin")
                .env(CHILD, "1")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let start = Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    panic!("the muxer spun on a listener it could not accept from");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(status.success(), "child: {status}");
            return;
        }
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        let mut m = Muxer::new(3, &base).unwrap();
        let _host = UnixStream::connect(&base).unwrap();
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, 64, hard).unwrap();
        let mut fillers = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f);
        }
        m.process_events(); // returns: the listener is paused, not spun on
        assert_eq!(m.pending_hosts.len(), 0);
        assert!(m.listener_paused);
        fillers.truncate(fillers.len() - 2);
        std::thread::sleep(DEADLINE_TICK * 2);
        m.process_events(); // the tick puts the listener back ...
        m.process_events(); // ... and the connection is accepted
        assert_eq!(m.pending_hosts.len(), 1);
        assert!(!m.listener_paused);
    }

    #[test]
    fn guest_request_reaches_the_host_listener_and_data_flows() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_5000", base.display())).unwrap();
        let mut m = Muxer::new(3, &base).unwrap();
        m.send_pkt(&guest(OP_REQUEST, 1234, 5000), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(m.recv_pkt(&mut buf).unwrap().op, OP_RESPONSE);
        let mut rw = guest(OP_RW, 1234, 5000);
        rw.len = 2;
        m.send_pkt(&rw, b"hi");
        let mut got = [0u8; 2];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        host.write_all(b"yo").unwrap();
        m.process_events();
        let h = m.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 2));
        assert_eq!(&buf[..2], b"yo");
    }

    #[test]
    fn unanswered_host_connect_is_reset_after_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        let mut m = Muxer::new(3, &base).unwrap();
        let mut host = UnixStream::connect(&base).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        m.process_events();
        m.process_events();
        let mut buf = [0u8; 8];
        assert_eq!(m.recv_pkt(&mut buf).unwrap().op, OP_REQUEST);
        // The guest never answers.
        let start = std::time::Instant::now();
        while !m.has_pending_rx() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no RST after the request timeout"
            );
            std::thread::sleep(Duration::from_millis(50));
            m.process_events();
        }
        assert!(
            start.elapsed()
                >= super::super::connection::REQUEST_TIMEOUT - Duration::from_millis(300)
        );
        assert_eq!(m.recv_pkt(&mut buf).unwrap().op, OP_RST);
        assert_eq!(m.connection_count(), 0);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "host stream closed without an OK");
    }

    #[test]
    fn packets_for_unknown_connections_or_other_cids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Muxer::new(3, &dir.path().join("v.sock")).unwrap();
        let mut spoofed = guest(OP_REQUEST, 1, 2);
        spoofed.src_cid = 7;
        m.send_pkt(&spoofed, &[]);
        assert!(!m.has_pending_rx(), "spoofed source CID is dropped");
        m.send_pkt(&guest(OP_RW, 1, 2), b"x");
        let mut buf = [0u8; 8];
        assert_eq!(m.recv_pkt(&mut buf).unwrap().op, OP_RST);
        m.send_pkt(&guest(OP_RST, 1, 2), &[]);
        assert!(!m.has_pending_rx(), "an RST is never answered");
    }
}
