//! The frames of the protocol and the records they carry.

/// A protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// agent → host, first frame on a connection.
    Hello { version: u16, boot: BootTimes },
    /// host → agent: start the job.
    Spawn(Spawn),
    /// host → agent, optional, right before [`Frame::Spawn`]: the job's OS image and shared
    /// directories. A failure to set them up is answered with [`Frame::SpawnFailed`]
    /// ([`SpawnStage::Filesystems`]).
    Filesystems(Filesystems),
    /// host → agent, right before [`Frame::Spawn`] (after [`Frame::Filesystems`], so the
    /// name files go into the job's root): the guest's host name and network. A failure to set
    /// them up is answered with [`Frame::SpawnFailed`] ([`SpawnStage::Network`]).
    Network(GuestNetwork),
    /// agent → host: the job runs as this guest pid (it leads its own session and process group).
    Started { pid: i32 },
    /// agent → host: the job could not be started; no Exit follows.
    SpawnFailed {
        stage: SpawnStage,
        errno: i32,
        message: String,
    },
    /// host → agent: bytes for the job's stdin.
    Stdin(Vec<u8>),
    /// agent → host: bytes the job wrote to stdout.
    Stdout(Vec<u8>),
    /// agent → host: bytes the job wrote to stderr.
    Stderr(Vec<u8>),
    /// End of one stream: stdin from the host; stdout/stderr from the agent. From the host,
    /// stdout/stderr means their destination failed: the agent closes the job's pipe, so the
    /// job's next write fails (EPIPE), and sends its own Eof for the stream when done.
    Eof(Stream),
    /// host → agent: deliver this signal to the job's process group.
    Signal { signo: i32 },
    /// agent → host: the job ended; raw `wait4` status, the job's rusage and the guest's memory.
    Exit {
        wait_status: i32,
        rusage: Rusage,
        memory: GuestMemoryReport,
    },
    /// host → agent: Exit received and every output byte written.
    Ack,
    /// host → agent: the first `offset` bytes of `stream` (stdout or stderr) are written to the
    /// job's destination; the agent may forget them. Until then it keeps them, to send again
    /// on a new connection.
    OutputAck { stream: Stream, offset: u64 },
    /// agent → host, first frame on a new connection to a host that lost the old one (after a
    /// restore from a snapshot the guest's vsock transport is reset): how far each stream has
    /// come on the agent's side. The host answers [`Frame::Resume`].
    Reconnect(ReconnectPoint),
    /// host → agent, answer to [`Frame::Reconnect`]: how many bytes of stdout and stderr the
    /// host has. The agent sends again from there (then the Eofs and the Exit it had sent), so
    /// no byte is lost or repeated.
    Resume { stdout: u64, stderr: u64 },
    /// Either way: a fatal problem, in words.
    Error { message: String },
}

/// Where the agent's side of a session stands when it reconnects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconnectPoint {
    /// The protocol version the agent speaks (as in [`Frame::Hello`]).
    pub version: u16,
    /// Bytes of stdout the job has written in all (the agent still has those from the last
    /// [`Frame::OutputAck`] on).
    pub stdout_sent: u64,
    /// The same for stderr.
    pub stderr_sent: u64,
    /// Bytes of stdin the agent has taken from the host.
    pub stdin_received: u64,
    /// Whether the host had ended stdin ([`Frame::Eof`]`(Stdin)`): no more is wanted.
    pub stdin_ended: bool,
}

/// One of the job's three standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// What the agent knows about the guest's boot when it says Hello, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// CLOCK_BOOTTIME when the agent started (time the guest kernel took to reach init).
    pub agent_start_ns: u64,
    /// CLOCK_BOOTTIME when the connection to the host was established.
    pub connected_ns: u64,
    /// CLOCK_REALTIME when the agent started (guest wall clock, for cross-checking).
    pub agent_start_realtime_ns: u64,
}

/// The guest's memory when the job ended: how large it was and whether it ran out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestMemoryReport {
    /// The guest's `MemTotal`, in KiB.
    pub total_kib: u64,
    /// Processes the guest kernel's OOM killer killed (`oom_kill` in `/proc/vmstat`). The guest
    /// runs only this job, so every one was the job's.
    pub oom_kills: u64,
}

/// How the job's stdin is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StdinMode {
    /// `/dev/null`.
    #[default]
    Null,
    /// A pipe fed by [`Frame::Stdin`] frames until [`Frame::Eof`]`(Stdin)`.
    Frames,
}

/// `RLIM_INFINITY` on the wire.
pub const RLIM_INFINITY: u64 = u64::MAX;

/// One resource limit for the job (`resource` is a Linux `RLIMIT_*` number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Everything the agent needs to start the job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spawn {
    /// argv; `argv[0]` is the program (searched in the job's PATH if it has no `/`).
    pub argv: Vec<Vec<u8>>,
    /// The complete environment, `NAME=value` entries.
    pub env: Vec<Vec<u8>>,
    /// Working directory in the guest.
    pub cwd: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub rlimits: Vec<Rlimit>,
    /// Nice value applied before the job runs.
    pub nice: i32,
    pub stdin: StdinMode,
}

/// The job's file systems beyond the initramfs, set up before the job starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filesystems {
    /// The OS image to switch root into; `None` keeps the initramfs as the job's root.
    pub root: Option<RootImage>,
    /// Host directories to mount in the job's root, in this order (parents before children).
    pub mounts: Vec<SharedMount>,
    /// The job user's account, added to the root's /etc/passwd and /etc/group where its uid
    /// or gids are missing, so names resolve in an image that does not know the user.
    pub account: Option<Account>,
}

/// A user account as the host knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    /// One passwd(5) line without the newline: `name:x:uid:gid:gecos:home:shell`.
    pub passwd: Vec<u8>,
    /// group(5) lines without newlines: `name:x:gid:`, for the primary and supplementary groups.
    pub groups: Vec<Vec<u8>>,
}

/// A read-only root file system on a guest block device. The agent puts a writable overlay
/// (guest memory) over it, moves /proc, /sys, /dev, /tmp and /run into it and switches root.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RootImage {
    /// The guest block device, e.g. `/dev/vda`.
    pub device: Vec<u8>,
    /// Its file system type, e.g. `ext4`.
    pub fstype: Vec<u8>,
}

/// How a shared host directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShareTransport {
    /// virtio-9p (9P2000.L), e.g. QEMU's `virtio-9p-device`.
    #[default]
    NineP,
    /// virtio-fs (FUSE over virtio).
    VirtioFs,
}

/// A host directory to mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedMount {
    pub transport: ShareTransport,
    /// The device's tag (9p `mount_tag` / virtio-fs tag).
    pub tag: Vec<u8>,
    /// Absolute path in the job's root where it appears (the host path, by convention).
    pub target: Vec<u8>,
    pub read_only: bool,
}

/// The guest's identity on the network: the execution host's names, and eth0 where the job
/// has a network.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestNetwork {
    /// The execution host's node name (`uname -n`), which the guest takes as its own: `hostname`
    /// and `$HOSTNAME` read as they do under the stock shepherd.
    pub hostname: Vec<u8>,
    /// eth0's IPv4 set-up; `None`: the job has no network device, only `lo`.
    pub ipv4: Option<Ipv4Interface>,
    /// Resolvers for `/etc/resolv.conf`, in order.
    pub nameservers: Vec<[u8; 4]>,
    /// Search domains for `/etc/resolv.conf`.
    pub search: Vec<Vec<u8>>,
}

/// A static IPv4 set-up of eth0 (passt's addressing, decided by the host; no DHCP round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ipv4Interface {
    pub address: [u8; 4],
    /// Prefix length, 1..=32.
    pub prefix_len: u8,
    /// The default route's gateway (passt answers for it; connections to it reach the host).
    pub gateway: [u8; 4],
    pub mtu: u32,
}

/// Where starting the job failed, so the host can map it to the right failure state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStage {
    /// Switching to the job's uid/gid/groups.
    Credentials,
    /// Applying rlimits or nice.
    Limits,
    /// Changing into the working directory.
    Cwd,
    /// Executing the program (missing, not executable, bad interpreter).
    Exec,
    /// Anything else (pipes, fork).
    Other,
    /// Mounting the OS image or the shared directories, or switching root into the image.
    Filesystems,
    /// Setting the host name, bringing up lo or eth0, or writing the name files.
    Network,
}

impl SpawnStage {
    /// Every stage (for exhaustive and property tests on both sides of the protocol).
    pub const ALL: [SpawnStage; 7] = [
        SpawnStage::Credentials,
        SpawnStage::Limits,
        SpawnStage::Cwd,
        SpawnStage::Exec,
        SpawnStage::Other,
        SpawnStage::Filesystems,
        SpawnStage::Network,
    ];
}

/// The job's resource usage as `wait4` reported it in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rusage {
    pub utime_us: u64,
    pub stime_us: u64,
    pub maxrss: i64,
    pub ixrss: i64,
    pub idrss: i64,
    pub isrss: i64,
    pub minflt: i64,
    pub majflt: i64,
    pub nswap: i64,
    pub inblock: i64,
    pub oublock: i64,
    pub msgsnd: i64,
    pub msgrcv: i64,
    pub nsignals: i64,
    pub nvcsw: i64,
    pub nivcsw: i64,
}

impl Rusage {
    /// Converts the kernel's `struct rusage`.
    pub fn from_libc(ru: &libc::rusage) -> Self {
        let us =
            |tv: libc::timeval| (tv.tv_sec.max(0) as u64) * 1_000_000 + tv.tv_usec.max(0) as u64;
        Rusage {
            utime_us: us(ru.ru_utime),
            stime_us: us(ru.ru_stime),
            maxrss: ru.ru_maxrss,
            ixrss: ru.ru_ixrss,
            idrss: ru.ru_idrss,
            isrss: ru.ru_isrss,
            minflt: ru.ru_minflt,
            majflt: ru.ru_majflt,
            nswap: ru.ru_nswap,
            inblock: ru.ru_inblock,
            oublock: ru.ru_oublock,
            msgsnd: ru.ru_msgsnd,
            msgrcv: ru.ru_msgrcv,
            nsignals: ru.ru_nsignals,
            nvcsw: ru.ru_nvcsw,
            nivcsw: ru.ru_nivcsw,
        }
    }
}
