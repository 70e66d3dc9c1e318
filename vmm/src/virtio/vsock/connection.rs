//! One vsock stream connection between the guest and a host Unix socket: its state machine
//! (request/response, established, half and full shutdown, reset) and credit-based flow control
//! in both directions.
//!
//! Guest -> host: bytes from RW packets go to the host stream; what the stream does not take yet
//! waits in a bounded buffer of [`TX_BUF_SIZE`] bytes, which is the credit (`buf_alloc`) the host
//! advertises. `fwd_cnt` counts bytes handed to the host stream; a CREDIT_UPDATE is sent when the
//! guest's view of its credit falls low. A guest that sends beyond its credit is reset.
//!
//! Host -> guest: bytes are read from the host stream only into a bounded staging buffer, and
//! sent as RW packets only within the guest's credit (`buf_alloc - (rx_cnt - fwd_cnt)` from the
//! guest's headers); out of credit, the connection asks with CREDIT_REQUEST and waits.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;

/// Host receive buffer per connection (the credit advertised to the guest).
pub const TX_BUF_SIZE: u32 = 64 * 1024;
/// Host -> guest staging buffer per connection.
pub const RX_STAGING_SIZE: usize = 64 * 1024;
/// Send a CREDIT_UPDATE when the guest believes it has less credit than this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 16 * 1024;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a guest-closed connection may take to hand its last bytes to the host stream.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST to be sent or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host stream is connected, RESPONSE to be sent.
    PeerInit,
    /// Data flows.
    Established,
    /// The guest shut down both directions: flush what it sent, then RST.
    Closing,
    /// Over: remove it once its final packet (if any) is sent.
    Closed,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Port on the host side (the vsock "local" port).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    guest_cid: u64,
    state: ConnState,
    // Control packets waiting to be sent to the guest.
    pending_request: bool,
    pending_response: bool,
    pending_rst: bool,
    pending_shutdown: u32,
    pending_credit_update: bool,
    pending_credit_request: bool,
    credit_requested: bool,
    // Guest -> host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_to_peer: Wrapping<u32>,
    rx_from_peer: Wrapping<u32>,
    peer_shutdown: u32,
    host_write_shut: bool,
    // Host -> guest.
    rx_staging: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    host_eof: bool,
    shutdown_sent: bool,
    /// `OK <port>\n` still to be written to a host-initiated stream.
    ok_reply: Option<Vec<u8>>,
    /// When the connection is reset if it has not moved on (unanswered REQUEST, undrained
    /// close).
    deadline: Option<Instant>,
}

/// Sends without raising SIGPIPE when the host peer has gone.
fn send_nosignal(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a valid slice for the duration of the call; fd is owned by the caller.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: ConnState,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            pending_request: state == ConnState::LocalInit,
            pending_response: state == ConnState::PeerInit,
            pending_rst: false,
            pending_shutdown: 0,
            pending_credit_update: false,
            pending_credit_request: false,
            credit_requested: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            rx_from_peer: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
            rx_staging: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_eof: false,
            shutdown_sent: false,
            ok_reply: None,
            deadline: None,
        }
    }

    /// The connection's deadline, if one runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Resets the connection if its deadline passed; returns whether it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now && self.state != ConnState::Closed => {
                self.deadline = None;
                self.reset();
                true
            }
            _ => false,
        }
    }

    /// A connection the guest asked for (its REQUEST `hdr`), already connected to `stream`.
    pub fn peer_init(stream: UnixStream, hdr: &PacketHeader, guest_cid: u64) -> Self {
        let mut c = Self::new(
            stream,
            hdr.dst_port,
            hdr.src_port,
            guest_cid,
            ConnState::PeerInit,
        );
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    /// A connection a host program asked for with `CONNECT <peer_port>`.
    pub fn local_init(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        Self::new(
            stream,
            local_port,
            peer_port,
            guest_cid,
            ConnState::LocalInit,
        )
    }

    /// The host stream's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// A host-initiated connection whose REQUEST the guest has not seen yet: it survives a
    /// device reset (the driver resets the device when it starts, which must not drop a
    /// `CONNECT` the host sent early).
    pub fn is_unannounced(&self) -> bool {
        self.state == ConnState::LocalInit && self.pending_request
    }

    /// Whether the connection is over and has nothing left to send.
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Closed && !self.pending_rst
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending_rst
            || self.pending_request
            || self.pending_response
            || self.pending_credit_update
            || self.pending_credit_request
            || (self.pending_shutdown != 0 && self.rx_staging.is_empty())
            || (self.can_send_data() && !self.rx_staging.is_empty() && self.peer_credit() > 0)
    }

    /// The epoll events this connection wants on its host stream.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == ConnState::Closed {
            // Nothing more goes to or comes from the host stream; watching it would only
            // spin on its hang-up.
            return ev;
        }
        let reading = matches!(self.state, ConnState::Established)
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.rx_staging.len() < RX_STAGING_SIZE;
        if reading {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() || self.ok_reply.is_some() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn header(&mut self, op: u16) -> PacketHeader {
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Produces the next packet for the guest; data (for RW) is written to `buf`, at most its
    /// length. Returns the header (with `len` set) or `None` if nothing is pending.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if self.pending_rst {
            self.pending_rst = false;
            self.state = ConnState::Closed;
            return Some(self.header(OP_RST));
        }
        if self.pending_request {
            self.pending_request = false;
            self.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
            return Some(self.header(OP_REQUEST));
        }
        if self.pending_response {
            self.pending_response = false;
            self.state = ConnState::Established;
            return Some(self.header(OP_RESPONSE));
        }
        if self.can_send_data() && !self.rx_staging.is_empty() {
            let credit = self.peer_credit() as usize;
            let n = self.rx_staging.len().min(credit).min(buf.len());
            if n > 0 {
                for (dst, src) in buf.iter_mut().zip(self.rx_staging.drain(..n)) {
                    *dst = src;
                }
                self.rx_cnt += Wrapping(n as u32);
                if !self.rx_staging.is_empty() && self.peer_credit() == 0 && !self.credit_requested
                {
                    self.credit_requested = true;
                    self.pending_credit_request = true;
                }
                let mut h = self.header(OP_RW);
                h.len = n as u32;
                self.pending_credit_update = false;
                return Some(h);
            }
        }
        if self.pending_shutdown != 0 && self.rx_staging.is_empty() {
            let mut h = self.header(OP_SHUTDOWN);
            h.flags = self.pending_shutdown;
            self.pending_shutdown = 0;
            self.shutdown_sent = true;
            return Some(h);
        }
        if self.pending_credit_update {
            self.pending_credit_update = false;
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        if self.pending_credit_request {
            self.pending_credit_request = false;
            return Some(self.header(OP_CREDIT_REQUEST));
        }
        None
    }

    /// Handles a packet from the guest for this connection.
    pub fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (_, OP_RST) => {
                // The guest dropped the connection: nothing more to send, not even an RST.
                self.state = ConnState::Closed;
                self.pending_rst = false;
                self.pending_shutdown = 0;
            }
            (ConnState::LocalInit, OP_RESPONSE) => {
                self.state = ConnState::Established;
                self.deadline = None;
                self.ok_reply = Some(format!("OK {}\n", self.local_port).into_bytes());
                self.flush_to_host();
            }
            (ConnState::Established, OP_RW) | (ConnState::Closing, OP_RW) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    self.reset();
                    return;
                }
                let free = TX_BUF_SIZE as usize - self.tx_buf.len();
                if data.len() > free {
                    // The guest ignored its credit.
                    self.reset();
                    return;
                }
                self.rx_from_peer += Wrapping(data.len() as u32);
                self.tx_buf.extend(data);
                self.flush_to_host();
            }
            (ConnState::Established, OP_SHUTDOWN) | (ConnState::Closing, OP_SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                    self.rx_staging.clear();
                }
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
                    && self.state != ConnState::Closing
                {
                    self.state = ConnState::Closing;
                    self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                }
                self.flush_to_host();
            }
            (ConnState::Established, OP_CREDIT_UPDATE) => {}
            (ConnState::Established, OP_CREDIT_REQUEST) => self.pending_credit_update = true,
            _ => self.reset(),
        }
    }

    /// Sends an RST to the guest and ends the connection.
    pub fn reset(&mut self) {
        self.tx_buf.clear();
        self.ok_reply = None;
        self.rx_staging.clear();
        self.pending_rst = true;
        self.pending_request = false;
        self.pending_response = false;
        self.pending_shutdown = 0;
        self.pending_credit_update = false;
        self.pending_credit_request = false;
        self.state = ConnState::Closed;
    }

    /// The host stream is ready (`events` from epoll).
    pub fn notify(&mut self, events: EventSet) {
        if events.contains(EventSet::OUT) {
            self.flush_to_host();
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            self.read_from_host();
        }
        if events.contains(EventSet::ERROR) && self.state != ConnState::Closed {
            self.reset();
        }
    }

    fn read_from_host(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        while self.state == ConnState::Established
            && !self.host_eof
            && self.rx_staging.len() < RX_STAGING_SIZE
        {
            let room = (RX_STAGING_SIZE - self.rx_staging.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    // The host will send no more; the guest may still send (half-close).
                    self.host_eof = true;
                    self.pending_shutdown |= SHUTDOWN_SEND;
                }
                Ok(n) => self.rx_staging.extend(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        if !self.rx_staging.is_empty() && self.peer_credit() == 0 && !self.credit_requested {
            self.credit_requested = true;
            self.pending_credit_request = true;
        }
    }

    /// Writes pending bytes to the host stream; handles the guest's shutdowns once drained.
    fn flush_to_host(&mut self) {
        let fd = self.stream.as_raw_fd();
        if let Some(reply) = self.ok_reply.take() {
            match send_nosignal(fd, &reply) {
                Ok(n) if n == reply.len() => {}
                Ok(n) => self.ok_reply = Some(reply[n..].to_vec()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.ok_reply = Some(reply),
                Err(_) => {
                    self.reset();
                    return;
                }
            }
            if self.ok_reply.is_some() {
                return;
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(fd, front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        // The guest believes it may still send buf_alloc - (sent - last fwd_cnt it saw).
        let believed =
            TX_BUF_SIZE.saturating_sub((self.rx_from_peer - self.last_fwd_cnt_to_peer).0);
        if self.fwd_cnt != self.last_fwd_cnt_to_peer
            && believed < CREDIT_UPDATE_THRESHOLD
            && self.state == ConnState::Established
        {
            self.pending_credit_update = true;
        }
        if self.tx_buf.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                self.host_write_shut = true;
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
            if self.state == ConnState::Closing {
                // Linux expects the peer of a full shutdown to answer with RST.
                self.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest_hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::peer_init(a, &guest_hdr(OP_REQUEST, 0, buf_alloc, 0), 3);
        let mut buf = [0u8; 16];
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 1000));
        assert_eq!(c.state(), ConnState::Established);
        (c, b)
    }

    #[test]
    fn host_to_guest_data_respects_the_guest_credit() {
        let (mut c, mut host) = established(1000);
        host.write_all(&[7u8; 3000]).unwrap();
        c.notify(EventSet::IN);
        let mut buf = vec![0u8; 4096];
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 1000));
        // Out of credit: only a credit request may follow.
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!(h.op, OP_CREDIT_REQUEST);
        assert!(c.recv_pkt(&mut buf).is_none());
        // The guest consumed 1000 bytes.
        c.send_pkt(&guest_hdr(OP_CREDIT_UPDATE, 0, 1000, 1000), &[]);
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 1000));
    }

    #[test]
    fn guest_to_host_data_arrives_and_overrun_resets() {
        let (mut c, mut host) = established(4096);
        c.send_pkt(&guest_hdr(OP_RW, 5, 4096, 0), b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let too_much = vec![0u8; TX_BUF_SIZE as usize + 1];
        c.send_pkt(&guest_hdr(OP_RW, too_much.len() as u32, 4096, 0), &too_much);
        let mut buf = [0u8; 16];
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_RST);
        assert!(c.is_finished());
    }

    #[test]
    fn host_eof_sends_shutdown_and_guest_full_shutdown_gets_rst() {
        let (mut c, host) = established(4096);
        host.shutdown(std::net::Shutdown::Write).unwrap();
        c.notify(EventSet::IN);
        let mut buf = [0u8; 16];
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        let mut s = guest_hdr(OP_SHUTDOWN, 0, 4096, 0);
        s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        c.send_pkt(&s, &[]);
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_RST);
        assert!(c.is_finished());
    }

    #[test]
    fn host_initiated_connection_replies_ok_after_response() {
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::local_init(a, 1 << 30, 6000, 3);
        let mut buf = [0u8; 16];
        let h = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_REQUEST, 1 << 30, 6000));
        let mut r = guest_hdr(OP_RESPONSE, 0, 4096, 0);
        r.src_port = 6000;
        c.send_pkt(&r, &[]);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(c.state(), ConnState::Established);
    }
}
