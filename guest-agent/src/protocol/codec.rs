//! Encoding frames to bytes and decoding them back, with every length checked.

use super::frame::{
    Account, BootTimes, Filesystems, Frame, GuestMemoryReport, GuestNetwork, Ipv4Interface,
    ReconnectPoint, Rlimit, RootImage, Rusage, ShareTransport, SharedMount, Spawn, SpawnStage,
    StdinMode, Stream,
};
use super::MAX_FRAME_LEN;

/// Why bytes could not be turned into a frame (or read at all).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    FrameTooLarge(usize),
    #[error("empty frame")]
    EmptyFrame,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the frame payload")]
    TrailingBytes(usize),
    #[error("invalid value {value} for {field}")]
    InvalidValue { field: &'static str, value: u64 },
    #[error("connection closed in the middle of a frame")]
    UnexpectedEof,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

const KIND_HELLO: u8 = 1;
const KIND_SPAWN: u8 = 2;
const KIND_STARTED: u8 = 3;
const KIND_SPAWN_FAILED: u8 = 4;
const KIND_STDIN: u8 = 5;
const KIND_STDOUT: u8 = 6;
const KIND_STDERR: u8 = 7;
const KIND_EOF: u8 = 8;
const KIND_SIGNAL: u8 = 9;
const KIND_EXIT: u8 = 10;
const KIND_ACK: u8 = 11;
const KIND_ERROR: u8 = 12;
const KIND_FILESYSTEMS: u8 = 13;
const KIND_NETWORK: u8 = 14;
const KIND_OUTPUT_ACK: u8 = 15;
const KIND_RECONNECT: u8 = 16;
const KIND_RESUME: u8 = 17;

/// Encodes `frame` with its length prefix, ready to write.
///
/// A frame whose body would exceed [`MAX_FRAME_LEN`] is refused; senders chunk data to
/// [`super::MAX_DATA_CHUNK`].
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0, 0, 0, 0]);
    let mut w = Writer(&mut out);
    match frame {
        Frame::Hello { version, boot } => {
            w.u8(KIND_HELLO);
            w.u16(*version);
            w.u64(boot.agent_start_ns);
            w.u64(boot.connected_ns);
            w.u64(boot.agent_start_realtime_ns);
        }
        Frame::Spawn(spawn) => {
            w.u8(KIND_SPAWN);
            w.list(&spawn.argv, |w, a| w.bytes(a));
            w.list(&spawn.env, |w, e| w.bytes(e));
            w.bytes(&spawn.cwd);
            w.u32(spawn.uid);
            w.u32(spawn.gid);
            w.list(&spawn.groups, |w, g| w.u32(*g));
            w.list(&spawn.rlimits, |w, r| {
                w.u32(r.resource);
                w.u64(r.soft);
                w.u64(r.hard);
            });
            w.i32(spawn.nice);
            w.u8(match spawn.stdin {
                StdinMode::Null => 0,
                StdinMode::Frames => 1,
            });
        }
        Frame::Filesystems(fs) => {
            w.u8(KIND_FILESYSTEMS);
            match &fs.root {
                None => w.u8(0),
                Some(root) => {
                    w.u8(1);
                    w.bytes(&root.device);
                    w.bytes(&root.fstype);
                }
            }
            w.list(&fs.mounts, |w, m| {
                w.u8(match m.transport {
                    ShareTransport::NineP => 0,
                    ShareTransport::VirtioFs => 1,
                });
                w.bytes(&m.tag);
                w.bytes(&m.target);
                w.u8(u8::from(m.read_only));
            });
            match &fs.account {
                None => w.u8(0),
                Some(account) => {
                    w.u8(1);
                    w.bytes(&account.passwd);
                    w.list(&account.groups, |w, g| w.bytes(g));
                }
            }
        }
        Frame::Network(net) => {
            w.u8(KIND_NETWORK);
            w.bytes(&net.hostname);
            match &net.ipv4 {
                None => w.u8(0),
                Some(v4) => {
                    w.u8(1);
                    w.raw(&v4.address);
                    w.u8(v4.prefix_len);
                    w.raw(&v4.gateway);
                    w.u32(v4.mtu);
                }
            }
            w.list(&net.nameservers, |w, a| w.raw(a));
            w.list(&net.search, |w, d| w.bytes(d));
        }
        Frame::Started { pid } => {
            w.u8(KIND_STARTED);
            w.i32(*pid);
        }
        Frame::SpawnFailed {
            stage,
            errno,
            message,
        } => {
            w.u8(KIND_SPAWN_FAILED);
            w.u8(stage_code(*stage));
            w.i32(*errno);
            w.bytes(message.as_bytes());
        }
        Frame::Stdin(data) => {
            w.u8(KIND_STDIN);
            w.bytes(data);
        }
        Frame::Stdout(data) => {
            w.u8(KIND_STDOUT);
            w.bytes(data);
        }
        Frame::Stderr(data) => {
            w.u8(KIND_STDERR);
            w.bytes(data);
        }
        Frame::Eof(stream) => {
            w.u8(KIND_EOF);
            w.u8(stream_code(*stream));
        }
        Frame::OutputAck { stream, offset } => {
            w.u8(KIND_OUTPUT_ACK);
            w.u8(stream_code(*stream));
            w.u64(*offset);
        }
        Frame::Reconnect(point) => {
            w.u8(KIND_RECONNECT);
            w.u16(point.version);
            w.u64(point.stdout_sent);
            w.u64(point.stderr_sent);
            w.u64(point.stdin_received);
            w.u8(point.stdin_ended.into());
        }
        Frame::Resume { stdout, stderr } => {
            w.u8(KIND_RESUME);
            w.u64(*stdout);
            w.u64(*stderr);
        }
        Frame::Signal { signo } => {
            w.u8(KIND_SIGNAL);
            w.i32(*signo);
        }
        Frame::Exit {
            wait_status,
            rusage,
            memory,
        } => {
            w.u8(KIND_EXIT);
            w.i32(*wait_status);
            w.u64(rusage.utime_us);
            w.u64(rusage.stime_us);
            for v in rusage_counters(rusage) {
                w.i64(v);
            }
            w.u64(memory.total_kib);
            w.u64(memory.oom_kills);
        }
        Frame::Ack => w.u8(KIND_ACK),
        Frame::Error { message } => {
            w.u8(KIND_ERROR);
            w.bytes(message.as_bytes());
        }
    }
    let body_len = out.len() - 4;
    if body_len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(body_len));
    }
    out[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes one frame body (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, ProtocolError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(body.len()));
    }
    let mut r = Reader(body);
    let kind = r.u8("kind").map_err(|_| ProtocolError::EmptyFrame)?;
    let frame = match kind {
        KIND_HELLO => Frame::Hello {
            version: r.u16("version")?,
            boot: BootTimes {
                agent_start_ns: r.u64("boot times")?,
                connected_ns: r.u64("boot times")?,
                agent_start_realtime_ns: r.u64("boot times")?,
            },
        },
        KIND_SPAWN => {
            let argv = r.list("argv", 4, |r| r.bytes("argv"))?;
            let env = r.list("env", 4, |r| r.bytes("env"))?;
            let cwd = r.bytes("cwd")?;
            let uid = r.u32("uid")?;
            let gid = r.u32("gid")?;
            let groups = r.list("groups", 4, |r| r.u32("groups"))?;
            let rlimits = r.list("rlimits", 20, |r| {
                Ok(Rlimit {
                    resource: r.u32("rlimit")?,
                    soft: r.u64("rlimit")?,
                    hard: r.u64("rlimit")?,
                })
            })?;
            let nice = r.i32("nice")?;
            let stdin = match r.u8("stdin mode")? {
                0 => StdinMode::Null,
                1 => StdinMode::Frames,
                v => {
                    return Err(ProtocolError::InvalidValue {
                        field: "stdin mode",
                        value: v.into(),
                    })
                }
            };
            Frame::Spawn(Spawn {
                argv,
                env,
                cwd,
                uid,
                gid,
                groups,
                rlimits,
                nice,
                stdin,
            })
        }
        KIND_FILESYSTEMS => {
            let root = match r.u8("root")? {
                0 => None,
                1 => Some(RootImage {
                    device: r.bytes("root device")?,
                    fstype: r.bytes("root fstype")?,
                }),
                v => {
                    return Err(ProtocolError::InvalidValue {
                        field: "root",
                        value: v.into(),
                    })
                }
            };
            let mounts = r.list("mounts", 10, |r| {
                let transport = match r.u8("mount transport")? {
                    0 => ShareTransport::NineP,
                    1 => ShareTransport::VirtioFs,
                    v => {
                        return Err(ProtocolError::InvalidValue {
                            field: "mount transport",
                            value: v.into(),
                        })
                    }
                };
                let tag = r.bytes("mount tag")?;
                let target = r.bytes("mount target")?;
                let read_only = match r.u8("mount read-only")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(ProtocolError::InvalidValue {
                            field: "mount read-only",
                            value: v.into(),
                        })
                    }
                };
                Ok(SharedMount {
                    transport,
                    tag,
                    target,
                    read_only,
                })
            })?;
            let account = match r.u8("account")? {
                0 => None,
                1 => Some(Account {
                    passwd: r.bytes("passwd line")?,
                    groups: r.list("group lines", 4, |r| r.bytes("group line"))?,
                }),
                v => {
                    return Err(ProtocolError::InvalidValue {
                        field: "account",
                        value: v.into(),
                    })
                }
            };
            Frame::Filesystems(Filesystems {
                root,
                mounts,
                account,
            })
        }
        KIND_NETWORK => {
            let hostname = r.bytes("hostname")?;
            let ipv4 = match r.u8("ipv4")? {
                0 => None,
                1 => {
                    let address = r.array("ipv4 address")?;
                    let prefix_len = r.u8("ipv4 prefix")?;
                    if !(1..=32).contains(&prefix_len) {
                        return Err(ProtocolError::InvalidValue {
                            field: "ipv4 prefix",
                            value: prefix_len.into(),
                        });
                    }
                    Some(Ipv4Interface {
                        address,
                        prefix_len,
                        gateway: r.array("ipv4 gateway")?,
                        mtu: r.u32("mtu")?,
                    })
                }
                v => {
                    return Err(ProtocolError::InvalidValue {
                        field: "ipv4",
                        value: v.into(),
                    })
                }
            };
            let nameservers = r.list("nameservers", 4, |r| r.array("nameserver"))?;
            let search = r.list("search domains", 4, |r| r.bytes("search domain"))?;
            Frame::Network(GuestNetwork {
                hostname,
                ipv4,
                nameservers,
                search,
            })
        }
        KIND_STARTED => Frame::Started { pid: r.i32("pid")? },
        KIND_SPAWN_FAILED => Frame::SpawnFailed {
            stage: stage_from_code(r.u8("stage")?)?,
            errno: r.i32("errno")?,
            message: r.string("message")?,
        },
        KIND_STDIN => Frame::Stdin(r.bytes("data")?),
        KIND_STDOUT => Frame::Stdout(r.bytes("data")?),
        KIND_STDERR => Frame::Stderr(r.bytes("data")?),
        KIND_EOF => Frame::Eof(stream_from_code(r.u8("stream")?)?),
        KIND_OUTPUT_ACK => Frame::OutputAck {
            stream: stream_from_code(r.u8("stream")?)?,
            offset: r.u64("offset")?,
        },
        KIND_RECONNECT => Frame::Reconnect(ReconnectPoint {
            version: r.u16("version")?,
            stdout_sent: r.u64("stdout sent")?,
            stderr_sent: r.u64("stderr sent")?,
            stdin_received: r.u64("stdin received")?,
            stdin_ended: match r.u8("stdin ended")? {
                0 => false,
                1 => true,
                v => {
                    return Err(ProtocolError::InvalidValue {
                        field: "stdin ended",
                        value: v.into(),
                    })
                }
            },
        }),
        KIND_RESUME => Frame::Resume {
            stdout: r.u64("stdout offset")?,
            stderr: r.u64("stderr offset")?,
        },
        KIND_SIGNAL => Frame::Signal {
            signo: r.i32("signo")?,
        },
        KIND_EXIT => {
            let wait_status = r.i32("wait status")?;
            let mut rusage = Rusage {
                utime_us: r.u64("rusage")?,
                stime_us: r.u64("rusage")?,
                ..Rusage::default()
            };
            let mut counters = [0i64; 14];
            for c in counters.iter_mut() {
                *c = r.i64("rusage")?;
            }
            set_rusage_counters(&mut rusage, counters);
            let memory = GuestMemoryReport {
                total_kib: r.u64("guest memory")?,
                oom_kills: r.u64("guest memory")?,
            };
            Frame::Exit {
                wait_status,
                rusage,
                memory,
            }
        }
        KIND_ACK => Frame::Ack,
        KIND_ERROR => Frame::Error {
            message: r.string("message")?,
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    if !r.0.is_empty() {
        return Err(ProtocolError::TrailingBytes(r.0.len()));
    }
    Ok(frame)
}

fn stream_code(stream: Stream) -> u8 {
    match stream {
        Stream::Stdin => 0,
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

fn stream_from_code(code: u8) -> Result<Stream, ProtocolError> {
    match code {
        0 => Ok(Stream::Stdin),
        1 => Ok(Stream::Stdout),
        2 => Ok(Stream::Stderr),
        v => Err(ProtocolError::InvalidValue {
            field: "stream",
            value: v.into(),
        }),
    }
}

fn stage_code(stage: SpawnStage) -> u8 {
    match stage {
        SpawnStage::Credentials => 0,
        SpawnStage::Limits => 1,
        SpawnStage::Cwd => 2,
        SpawnStage::Exec => 3,
        SpawnStage::Other => 4,
        SpawnStage::Filesystems => 5,
        SpawnStage::Network => 6,
    }
}

fn stage_from_code(code: u8) -> Result<SpawnStage, ProtocolError> {
    Ok(match code {
        0 => SpawnStage::Credentials,
        1 => SpawnStage::Limits,
        2 => SpawnStage::Cwd,
        3 => SpawnStage::Exec,
        4 => SpawnStage::Other,
        5 => SpawnStage::Filesystems,
        6 => SpawnStage::Network,
        v => {
            return Err(ProtocolError::InvalidValue {
                field: "spawn stage",
                value: v.into(),
            })
        }
    })
}

fn rusage_counters(r: &Rusage) -> [i64; 14] {
    [
        r.maxrss, r.ixrss, r.idrss, r.isrss, r.minflt, r.majflt, r.nswap, r.inblock, r.oublock,
        r.msgsnd, r.msgrcv, r.nsignals, r.nvcsw, r.nivcsw,
    ]
}

fn set_rusage_counters(r: &mut Rusage, c: [i64; 14]) {
    [
        r.maxrss, r.ixrss, r.idrss, r.isrss, r.minflt, r.majflt, r.nswap, r.inblock, r.oublock,
        r.msgsnd, r.msgrcv, r.nsignals, r.nvcsw, r.nivcsw,
    ] = c;
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Fixed-size bytes, no length.
    fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        // Lengths beyond u32 cannot occur: the whole frame is checked against MAX_FRAME_LEN.
        self.u32(v.len().min(u32::MAX as usize) as u32);
        self.0.extend_from_slice(v);
    }
    fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        self.u32(items.len().min(u32::MAX as usize) as u32);
        for item in items {
            each(self, item);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, ProtocolError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, ProtocolError> {
        let len = self.u32(what)? as usize;
        Ok(self.take(len, what)?.to_vec())
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        Ok(String::from_utf8_lossy(&self.bytes(what)?).into_owned())
    }
    /// Reads a counted list; `min_item` bytes per item bounds the count by what is left, so a
    /// forged count cannot make us reserve memory the frame does not back.
    fn list<T>(
        &mut self,
        what: &'static str,
        min_item: usize,
        mut each: impl FnMut(&mut Self) -> Result<T, ProtocolError>,
    ) -> Result<Vec<T>, ProtocolError> {
        let count = self.u32(what)? as usize;
        if count.saturating_mul(min_item) > self.0.len() {
            return Err(ProtocolError::Truncated(what));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(each(self)?);
        }
        Ok(items)
    }
}
