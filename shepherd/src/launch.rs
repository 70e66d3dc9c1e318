//! Launching a job in a fresh microVM: as root, check the image and the shares, lay out the run
//! directory, listen for the agent, create the logs and open `/dev/kvm`; then fork the VMM
//! process ([`crate::vmm_process`]), the job user's, which boots the VM, runs the agent
//! conversation, writes the job's output and tears the VM down at the end, and reports back.
//!
//! This is the one entry point both the standalone `run` command and the Grid Engine shepherd
//! use; they differ only in where stdio goes and where signals come from.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use guest_agent::protocol::{
    Account, Filesystems, GuestMemoryReport, GuestNetwork, RootImage, Rusage, ShareTransport,
    SharedMount, Spawn, AGENT_VSOCK_PORT,
};

use std::sync::{Arc, Mutex};

use crate::agent_session::{converse, AgentExit, GuestSetup, SessionStart};
pub use crate::agent_session::{JobError, JobIo, StdinSource};
use crate::backend::{
    self, BackendError, EndedBy, RunningVm, VmBackend, VmLogs, VmShare, VmSpec, CONSOLE_LOG,
    ROOT_DISK_GUEST_DEVICE,
};
pub use crate::backend::{BackendChoice, VmmCredentials};
use crate::checkpoint::taker::AfterCheckpoint;
use crate::checkpoint::{self, CheckpointDir, CheckpointError, Checkpointer};
use crate::guest_image::{self, UntrustedGuestImage};
use crate::image::store::ImageInUse;
use crate::image::{ImageError, ImageStore};
use crate::job_control::AgentLink;
pub use crate::job_control::JobController;
use crate::network::passt::PasstProcess;
use crate::network::{JobNetwork, NetworkError, NetworkPolicy, PASST_LOG};
use crate::path_trust;
use crate::run_dir::{self, RunDir, RunDirError};
use crate::session_progress::SessionProgress;
use crate::shared_dirs::{self, SharedDir, SharedDirError};
use crate::timings::{now_ms, since_start, Timings};
use crate::vmm_process::message::{Channel, FromVmm, Received, StartFailure, ToVmm};
use crate::vmm_process::supervisor::Start;
use crate::vmm_process::{self, ForkError, VmmProcess};

/// Kernel command line for the guest. `panic=-1`: a panic ends the VM at once; `quiet`: every
/// console byte is a slow emulated port write. How a reset ends the VM (`reboot=`) is each
/// backend's: it depends on the devices the backend gives the guest.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 panic=-1 quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// The hybrid-vsock base name in the run directory's `vm/`.
const VSOCK_UDS: &str = "vsock.sock";

/// How long a booting VM may take until its agent connects.
const AGENT_CONNECT_PATIENCE: Duration = Duration::from_secs(120);
/// How long a VM may take to reset itself after its agent synced and closed the connection;
/// after that it is stopped (it has nothing left to do).
const VM_END_PATIENCE: Duration = Duration::from_millis(50);

/// Everything needed to run one job in a microVM.
pub struct LaunchSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub backend: BackendChoice,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Guest RAM on transparent huge pages (see [`VmSpec::huge_pages`]).
    pub huge_pages: bool,
    /// Extra kernel command-line words after [`DEFAULT_CMDLINE`].
    pub extra_cmdline: String,
    pub spawn: Spawn,
    /// A fresh, empty directory of this process's, private to it (a temporary directory), laid
    /// out by [`RunDir::prepare`]: the console and backend logs, and `vm/` for the sockets.
    pub run_dir: PathBuf,
    pub vmm_credentials: Option<VmmCredentials>,
    /// The job's network ([`crate::network`]).
    pub network: NetworkPolicy,
    /// Checkpoints of the job, or its restore from one.
    pub checkpoint: Option<CheckpointPlan>,
}

/// Checkpoints of a job ([`crate::checkpoint`]): taken on request
/// ([`JobController::checkpoint`]) into `dir`, or, with `restore`, the job started from the
/// latest one there instead of being booted. The job's VM must be the embedded VMM's, with no
/// network device (whose state snapshots cannot capture yet); a restore needs the same VM
/// (memory, vCPUs, devices) and the job's output files as the checkpoint left them, or longer.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    /// The checkpoint directory; the VMM process (the job user) creates and writes it.
    pub dir: PathBuf,
    /// Whether to start from the latest checkpoint in `dir` instead of booting.
    pub restore: RestorePolicy,
}

/// Whether a job with a checkpoint directory starts from its latest checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePolicy {
    /// Boot the VM.
    Boot,
    /// Restore the latest checkpoint; none there is an error (`run --restore`).
    Latest,
    /// Restore the latest checkpoint if there is one, else boot (a re-queued Grid Engine job,
    /// whose checkpoint may be on another host's disk: it starts over, as with the stock
    /// shepherd).
    LatestIfAny,
}

/// The job's file systems beyond the guest's initramfs.
#[derive(Debug, Clone, Default)]
pub struct JobFilesystems {
    /// The OS image to run the job in; `None`: the initramfs (busybox).
    pub image: Option<ImageChoice>,
    /// Host directories the job sees at the same paths, served with the job user's identity.
    pub shares: Vec<SharedDir>,
}

/// An OS image by name, from a store directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChoice {
    pub store: PathBuf,
    pub name: String,
}

/// Why no VM could be started. Whose fault each is (the job's, the queue's, or a shortage)
/// is decided in [`crate::sge::start_failure`].
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    SharedDir(#[from] SharedDirError),
    #[error(
        "shared directories need the VM to run as the job user (uid {job_uid}), not uid {vmm_uid}"
    )]
    ShareIdentity { job_uid: u32, vmm_uid: u32 },
    #[error("guest kernel {0} not found")]
    KernelMissing(PathBuf),
    #[error("guest initramfs {0} not found")]
    InitrdMissing(PathBuf),
    #[error("{0}")]
    BackendUnavailable(String),
    #[error("VM could not start: {0}")]
    VmStart(String),
    #[error("the guest kernel or initramfs cannot be booted: {0}")]
    GuestUnbootable(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    UntrustedGuestImage(#[from] UntrustedGuestImage),
    #[error(
        "OS image {name:?} is not trusted: {reason} (an image store and its images must be \
         owned by root and writable only by root)"
    )]
    UntrustedImage {
        name: String,
        reason: crate::path_trust::UntrustedPath,
    },
    #[error("can't make the VMM process: {0}")]
    VmmProcess(#[from] ForkError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The job's checkpoint could not be restored: sound but not on this host (`elsewhere`),
    /// or unusable anywhere.
    #[error("the job's checkpoint cannot be restored{}: {message}", if *.elsewhere { " on this host" } else { "" })]
    RestoreRefused { elsewhere: bool, message: String },
}

impl From<backend::BackendError> for LaunchError {
    fn from(e: backend::BackendError) -> Self {
        match e {
            backend::BackendError::Unavailable(m) => LaunchError::BackendUnavailable(m),
            backend::BackendError::Start(m) => LaunchError::VmStart(m),
            backend::BackendError::Guest(m) => LaunchError::GuestUnbootable(m),
            backend::BackendError::Io(e) => LaunchError::Io(e),
            backend::BackendError::RunDir(e) => LaunchError::RunDir(e),
            backend::BackendError::Restore { elsewhere, message } => {
                LaunchError::RestoreRefused { elsewhere, message }
            }
        }
    }
}

/// The job's end as the guest reported it.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// Raw wait status from `wait4` in the guest.
    pub wait_status: i32,
    pub rusage: Rusage,
    /// The guest's size and OOM kills.
    pub memory: GuestMemoryReport,
    pub job_started: SystemTime,
    pub job_ended: SystemTime,
    pub timings: Timings,
    /// What went wrong writing the job's output files (a full quota, `h_fsize`), for the
    /// trace; the job itself saw its later writes fail.
    pub output_failures: Vec<String>,
    /// passt ended before the job did (killed, or failed): the job ran on without a network.
    /// For the trace; not the job's result.
    pub network_lost: Option<String>,
}

impl JobOutcome {
    /// Exit code as a shell reports it: the exit status, or 128 + signal.
    pub fn shell_exit_code(&self) -> i32 {
        let s = self.wait_status;
        if libc::WIFSIGNALED(s) {
            128 + libc::WTERMSIG(s)
        } else {
            libc::WEXITSTATUS(s)
        }
    }
}

/// A job whose VM is booting or running, in its VMM process.
pub struct RunningJob {
    controller: JobController,
    process: VmmProcess,
    backend: String,
    /// The checkpoint the VM was restored from, when it was not booted.
    restored_from: Option<u64>,
    /// The job's hold on its OS image (`image rm` refuses it), released once the VM is gone.
    _image_in_use: Option<ImageInUse>,
    /// The job's passt, stopped (if it has not ended with the VM) once the VMM process is gone.
    _passt: Option<PasstProcess>,
}

impl RunningJob {
    pub fn controller(&self) -> JobController {
        self.controller.clone()
    }

    /// The backend that runs the VM and why it was chosen, in words (for the job's trace).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The checkpoint the job's VM was restored from; `None` when it was booted.
    pub fn restored_from(&self) -> Option<u64> {
        self.restored_from
    }

    /// The VMM process (Grid Engine's `job_pid`): the job user's, carrying its groups.
    pub fn vmm_pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits for the job to end and its VMM process to be gone. A VMM process that died
    /// without reporting (killed by its owner, a seccomp kill, a crash) is the job's error.
    pub fn wait(mut self) -> Result<JobOutcome, JobError> {
        let mut result = self.process.wait();
        let lost = self
            ._passt
            .as_mut()
            .and_then(PasstProcess::ended_abnormally);
        if let Some(lost) = &lost {
            tracing::warn!("{lost}");
        }
        if let Ok(outcome) = &mut result {
            outcome.network_lost = lost;
        }
        result
    }
}

/// The agent's view of the job's file systems and the backend's devices for them.
struct AttachedFilesystems {
    frame: Option<Filesystems>,
    image_in_use: Option<ImageInUse>,
    root_disk: Option<PathBuf>,
    shares: Vec<VmShare>,
    /// An imported image's `Env`, to go under the job's environment.
    image_env: Vec<String>,
}

/// The host's passwd and group entries of the job user, for an image that does not know it.
/// `None` for root (every image has it) and for a uid the host has no name for.
fn host_account(spawn: &Spawn) -> Option<Account> {
    use nix::unistd::{Gid, Group, Uid, User};
    if spawn.uid == 0 {
        return None;
    }
    let user = User::from_uid(Uid::from_raw(spawn.uid)).ok().flatten()?;
    let clean = |s: &str| s.replace([':', '\n'], " ");
    let passwd = format!(
        "{}:x:{}:{}:{}:{}:{}",
        clean(&user.name),
        spawn.uid,
        spawn.gid,
        clean(&user.gecos.to_string_lossy()),
        clean(&user.dir.display().to_string()),
        clean(&user.shell.display().to_string())
    );
    let mut gids = vec![spawn.gid];
    gids.extend(spawn.groups.iter().filter(|g| **g != spawn.gid));
    let groups = gids
        .into_iter()
        .filter_map(|gid| {
            let group = Group::from_gid(Gid::from_raw(gid)).ok().flatten()?;
            Some(format!("{}:x:{gid}:", clean(&group.name)).into_bytes())
        })
        .collect();
    Some(Account {
        passwd: passwd.into_bytes(),
        groups,
    })
}

/// Resolves and verifies the OS image. As root, only from a store nobody else can change: the
/// image is every job's root file system, and root writes its verification record there.
/// The job's hold on the image (`image rm` refuses it until the VM is gone) is taken once the
/// image passed.
fn trusted_image(
    choice: &ImageChoice,
) -> Result<(crate::image::VerifiedImage, Option<ImageInUse>), LaunchError> {
    let store = ImageStore::new(&choice.store);
    let as_root = nix::unistd::geteuid().is_root();
    let untrusted = |reason| LaunchError::UntrustedImage {
        name: choice.name.clone(),
        reason,
    };
    let dir = store.image_dir(&choice.name)?;
    if as_root && dir.is_dir() {
        path_trust::check_directories(&dir, 0).map_err(untrusted)?;
    }
    let image = store.verified(&choice.name)?;
    if as_root {
        path_trust::check_file(&image.path, 0).map_err(untrusted)?;
    }
    // Held only for an image that passed (a refused one leaves the store as it was); an
    // `image rm` that came in between has removed it whole, manifest and all.
    let in_use = store.hold_in_use(&choice.name)?;
    if in_use.is_some() {
        store.manifest(&choice.name)?;
    } else {
        tracing::warn!(
            image = %choice.name,
            "cannot mark the OS image as in use (the store is not this user's): `image rm` \
             will not know of this job"
        );
    }
    Ok((image, in_use))
}

/// Resolves and verifies the OS image and checks the shares. Changes nothing on the host
/// except the image store's record of a successful full check.
fn attach_filesystems(
    fs: &JobFilesystems,
    spawn: &Spawn,
    creds: Option<&VmmCredentials>,
) -> Result<AttachedFilesystems, LaunchError> {
    let (image, image_in_use) = match &fs.image {
        Some(choice) => {
            let (image, in_use) = trusted_image(choice)?;
            (Some(image), in_use)
        }
        None => (None, None),
    };
    let shares = shared_dirs::prepare(&fs.shares)?;
    if !shares.is_empty() {
        let vmm_uid = creds
            .map(|c| c.uid)
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        if vmm_uid != spawn.uid {
            return Err(LaunchError::ShareIdentity {
                job_uid: spawn.uid,
                vmm_uid,
            });
        }
        // `prepare` looked with this process's eyes; the file server has the job user's.
        if let Some(c) = creds.filter(|c| c.uid != nix::unistd::geteuid().as_raw()) {
            shared_dirs::check_reachable_as(&shares, &c.for_thread())?;
        }
    }
    let vm_shares: Vec<VmShare> = shares
        .iter()
        .enumerate()
        .map(|(i, d)| VmShare {
            tag: format!("sge{i}"),
            host_path: d.path.clone(),
            read_only: d.read_only,
        })
        .collect();
    let frame = (image.is_some() || !vm_shares.is_empty()).then(|| Filesystems {
        root: image.as_ref().map(|img| RootImage {
            device: ROOT_DISK_GUEST_DEVICE.as_bytes().to_vec(),
            fstype: img.manifest.fstype.clone().into_bytes(),
        }),
        mounts: vm_shares
            .iter()
            .map(|s| SharedMount {
                // Set from the backend once it is chosen.
                transport: ShareTransport::default(),
                tag: s.tag.clone().into_bytes(),
                target: s.host_path.as_os_str().as_encoded_bytes().to_vec(),
                read_only: s.read_only,
            })
            .collect(),
        account: host_account(spawn),
    });
    let image_env = image
        .as_ref()
        .and_then(|img| img.manifest.source.as_ref())
        .map(|s| s.env.clone())
        .unwrap_or_default();
    Ok(AttachedFilesystems {
        frame,
        image_in_use,
        root_disk: image.map(|img| img.path),
        shares: vm_shares,
        image_env,
    })
}

/// Boots a VM for `spec` and starts the job conversation. Returns once the VM is starting.
pub fn launch(spec: LaunchSpec, io: JobIo) -> Result<RunningJob, LaunchError> {
    launch_in(spec, &JobFilesystems::default(), io)
}

/// [`launch`] with the job's OS image and shared directories. The image is verified and the
/// shares checked before any VM starts.
pub fn launch_in(
    spec: LaunchSpec,
    filesystems: &JobFilesystems,
    io: JobIo,
) -> Result<RunningJob, LaunchError> {
    let mut spec = spec;
    let attached = attach_filesystems(filesystems, &spec.spawn, spec.vmm_credentials.as_ref())?;
    spec.spawn.env = crate::image::image_env::under_job(&spec.spawn.env, &attached.image_env);
    if !spec.kernel.is_file() {
        return Err(LaunchError::KernelMissing(spec.kernel));
    }
    if !spec.initrd.is_file() {
        return Err(LaunchError::InitrdMissing(spec.initrd));
    }
    guest_image::check_trusted(&spec.kernel, &spec.initrd)?;
    // A kernel no backend can load fails every start: the queue's, found before any VM.
    if !guest_image::read_head(&spec.kernel).is_ok_and(|head| guest_image::is_kernel(&head)) {
        return Err(LaunchError::GuestUnbootable(format!(
            "guest kernel {} is neither an ELF vmlinux nor a bzImage",
            spec.kernel.display()
        )));
    }
    let mut selection = backend::select(spec.backend)?;
    // What the job needs attached that the chosen backend cannot attach, in words.
    let missing = |b: &dyn backend::VmBackend| {
        let mut m = Vec::new();
        if attached.root_disk.is_some() && !b.attaches_disks() {
            m.push("an OS image");
        }
        if !attached.shares.is_empty() && !b.attaches_shares() {
            m.push("shared directories");
        }
        m.join(" and ")
    };
    let unmet = missing(selection.backend.as_ref());
    if !unmet.is_empty() && spec.backend == BackendChoice::Auto {
        let unable = selection.backend.name();
        selection = backend::select(BackendChoice::Qemu)?;
        selection.reason = format!(
            "auto: QEMU, because the job has {unmet}, which the {unable} backend cannot \
             attach yet"
        );
    }
    let unmet = missing(selection.backend.as_ref());
    if !unmet.is_empty() {
        return Err(LaunchError::BackendUnavailable(format!(
            "the {} backend cannot attach {unmet} yet; use the qemu backend",
            selection.backend.name()
        )));
    }
    if spec.checkpoint.is_some() {
        if selection.backend.name() != "embedded" {
            return Err(LaunchError::BackendUnavailable(format!(
                "checkpoints need the embedded VMM, not the {} backend ({})",
                selection.backend.name(),
                selection.reason
            )));
        }
        if matches!(spec.network, NetworkPolicy::Passt(_)) {
            return Err(LaunchError::BackendUnavailable(
                "checkpoints need a job without a network device (snapshots cannot capture \
                 virtio-net yet)"
                    .into(),
            ));
        }
    }
    let backend_in_words = format!("{} ({})", selection.backend.name(), selection.reason);
    let timings = Timings {
        backend: selection.backend.name().to_string(),
        backend_reason: selection.reason.clone(),
        ..Timings::default()
    };
    tracing::info!(backend = selection.backend.name(), reason = %selection.reason, "backend chosen");

    // The run directory stays this process's: the logs are created here, before the VMM
    // process starts, and handed to it open. The VM's sockets go in `vm/`, which goes to the
    // job user (the VMM process and its helpers bind sockets there) once the agent's listener
    // is bound; root creates nothing there after that.
    let vm_user = spec.vmm_credentials.as_ref().map(|c| (c.uid, c.gid));
    let run_dir = RunDir::prepare(&spec.run_dir, vm_user)?;
    let vsock_uds = run_dir.vm_dir().join(VSOCK_UDS);
    let listener = run_dir.bind_listener(&format!("{VSOCK_UDS}_{AGENT_VSOCK_PORT}"))?;
    listener.set_nonblocking(true)?;
    run_dir.give_vm_dir()?;
    let has_network = matches!(spec.network, NetworkPolicy::Passt(_));
    let log_names: Vec<&str> = std::iter::once(CONSOLE_LOG)
        .chain(selection.backend.log_files().iter().copied())
        .chain(has_network.then_some(PASST_LOG))
        .collect();
    let logs = VmLogs::create(run_dir.path(), &log_names, run_dir.vm_user())?;
    // passt is started here, by root with the job user's credentials: the VMM process's
    // seccomp filter refuses the namespace calls of passt's own sandbox.
    let passt_log = logs
        .shared(PASST_LOG)
        .and_then(|f| f.try_clone().ok())
        .map(|f| (f, run_dir.path().join(PASST_LOG)));
    let JobNetwork {
        guest: guest_network,
        vm: vm_network,
        passt,
    } = JobNetwork::start(&spec.network, spec.vmm_credentials.as_ref(), passt_log)?;
    let kvm_device = if selection.backend.opens_kvm() {
        Some(backend::open_kvm_device()?)
    } else {
        None
    };

    // The host's settings before the extra words, which may override them.
    let cmdline = std::iter::once(DEFAULT_CMDLINE.to_string())
        .chain(crate::guest_sysctl::host_sysctl_words(Path::new("/")))
        .chain((!spec.extra_cmdline.is_empty()).then(|| spec.extra_cmdline.clone()))
        .collect::<Vec<_>>()
        .join(" ");
    let vm_spec = VmSpec {
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        cmdline,
        vcpus: spec.vcpus.max(1),
        mem_mib: spec.mem_mib,
        huge_pages: spec.huge_pages,
        vsock_uds,
        console_log: run_dir.path().join(CONSOLE_LOG),
        logs,
        kvm_device,
        run_dir: run_dir.path().to_path_buf(),
        credentials: spec.vmm_credentials.clone(),
        root_disk: attached.root_disk,
        shares: attached.shares,
        network: vm_network,
    };
    let mut fs_frame = attached.frame;
    // The agent mounts the shares with the file system the chosen backend serves them by.
    let transport = selection.backend.share_transport();
    for mount in fs_frame.iter_mut().flat_map(|f| f.mounts.iter_mut()) {
        mount.transport = transport;
    }
    let job = VmmJob {
        backend: selection.backend,
        vm_spec,
        listener,
        filesystems: fs_frame,
        network: guest_network,
        spawn: spec.spawn,
        io,
        timings,
        checkpoint: spec.checkpoint,
    };
    // From here on the job is the VMM process's: this process keeps none of its descriptors
    // (the listener, the output files), which go with `job` into the child.
    let image_in_use = attached.image_in_use;
    let parent_only = image_in_use.as_ref().map(ImageInUse::as_fd);
    let mut process = vmm_process::fork(
        spec.vmm_credentials.as_ref(),
        parent_only.as_slice(),
        move |channel| job.run(channel),
    )?;
    let mut restored_from = None;
    match process.await_start() {
        Start::Started { restored, .. } => restored_from = restored,
        Start::Ended => {}
        Start::Failed(StartFailure::Restore { elsewhere, message }) => {
            return Err(LaunchError::RestoreRefused { elsewhere, message })
        }
        Start::Failed(StartFailure::Unavailable(m)) => {
            return Err(LaunchError::BackendUnavailable(m))
        }
        Start::Failed(StartFailure::Start(m)) => return Err(LaunchError::VmStart(m)),
        Start::Failed(StartFailure::Guest(m)) => return Err(LaunchError::GuestUnbootable(m)),
    }
    Ok(RunningJob {
        controller: JobController {
            vmm: process.control(),
        },
        process,
        backend: backend_in_words,
        restored_from,
        _image_in_use: image_in_use,
        _passt: passt,
    })
}

/// What the VMM process runs: start the VM, talk to its agent, write the job's output, and
/// report to the shepherd.
struct VmmJob {
    backend: Box<dyn VmBackend>,
    vm_spec: VmSpec,
    listener: UnixListener,
    filesystems: Option<Filesystems>,
    network: GuestNetwork,
    spawn: Spawn,
    io: JobIo,
    timings: Timings,
    checkpoint: Option<CheckpointPlan>,
}

/// How the VMM process's VM came to be, and how its session starts.
struct StartedVm {
    vm: Box<dyn RunningVm>,
    start: SessionStart,
    /// The checkpoint directory, when the job has one.
    store: Option<CheckpointDir>,
    /// The checkpoint it was restored from.
    restored: Option<u64>,
}

impl VmmJob {
    /// Boots the VM, or restores it from the latest checkpoint (cutting the job's output back
    /// to it first).
    fn start_vm(
        backend: &dyn VmBackend,
        vm_spec: &VmSpec,
        plan: Option<&CheckpointPlan>,
        io: &JobIo,
        fresh: SessionStart,
    ) -> Result<StartedVm, StartFailure> {
        let failure = |e: BackendError| match e {
            BackendError::Unavailable(m) => StartFailure::Unavailable(m),
            BackendError::Guest(m) => StartFailure::Guest(m),
            BackendError::Restore { elsewhere, message } => {
                StartFailure::Restore { elsewhere, message }
            }
            other => StartFailure::Start(other.to_string()),
        };
        let store = plan
            .map(|p| CheckpointDir::open(&p.dir))
            .transpose()
            .map_err(|e| StartFailure::Start(e.to_string()))?;
        let policy = plan.map_or(RestorePolicy::Boot, |p| p.restore);
        let latest = match (&store, policy) {
            (Some(store), RestorePolicy::Latest | RestorePolicy::LatestIfAny) => {
                match store.load_latest() {
                    Ok(latest) => Some((store, latest)),
                    Err(CheckpointError::NoCheckpoint(_))
                        if policy == RestorePolicy::LatestIfAny =>
                    {
                        None
                    }
                    Err(e @ CheckpointError::NoCheckpoint(_)) => {
                        return Err(StartFailure::Start(e.to_string()))
                    }
                    Err(e) => {
                        return Err(StartFailure::Restore {
                            elsewhere: false,
                            message: e.to_string(),
                        })
                    }
                }
            }
            _ => None,
        };
        let Some((store, (record, snapshot))) = latest else {
            let vm = backend.start(vm_spec).map_err(failure)?;
            return Ok(StartedVm {
                vm,
                start: fresh,
                store,
                restored: None,
            });
        };
        if (record.mem_mib, record.vcpus) != (vm_spec.mem_mib, vm_spec.vcpus) {
            return Err(StartFailure::Restore {
                elsewhere: false,
                message: format!(
                    "checkpoint {} is of a VM with {} MiB and {} vCPUs, not {} MiB and {}",
                    record.generation, record.mem_mib, record.vcpus, vm_spec.mem_mib, vm_spec.vcpus
                ),
            });
        }
        // The snapshot is read and checked first: a damaged one must not cost output bytes.
        let vm = backend.restore(vm_spec, &snapshot).map_err(failure)?;
        // The guest waits for its host meanwhile: the session starts after this.
        let at = match checkpoint::taker::rewind_outputs(&record, io) {
            Ok(at) => at,
            Err(e) => {
                (vm.killer())();
                return Err(StartFailure::Start(e.to_string()));
            }
        };
        Ok(StartedVm {
            vm,
            start: SessionStart::Resume(at),
            store: Some(store.clone()),
            restored: Some(record.generation),
        })
    }

    /// The VMM process's life, in the child (already the job user).
    fn run(self, channel: &Channel) {
        let VmmJob {
            backend,
            vm_spec,
            listener,
            filesystems,
            network,
            spawn,
            io,
            mut timings,
            checkpoint: plan,
        } = self;
        let fresh = SessionStart::Fresh {
            setup: GuestSetup {
                filesystems,
                network: Some(network),
            },
            spawn,
        };
        let StartedVm {
            vm,
            start,
            store,
            restored,
        } = match Self::start_vm(backend.as_ref(), &vm_spec, plan.as_ref(), &io, fresh) {
            Ok(started) => started,
            Err(failure) => {
                let _ = channel.send(&FromVmm::StartFailed(failure));
                return;
            }
        };
        timings.vm_created_ms = now_ms();
        let started = FromVmm::VmStarted {
            vm_created_ms: timings.vm_created_ms,
            first_instruction_ms: timings.first_instruction_ms,
            restored,
        };
        if channel.send(&started).is_err() {
            // The shepherd is gone: so is the job.
            (vm.killer())();
            return;
        }
        let link = AgentLink::default();
        let progress = SessionProgress::default();
        let checkpointer = match (store, vm.checkpoint()) {
            (Some(store), Some(vm_checkpoint)) => Some(Arc::new(Checkpointer::new(
                vm_checkpoint,
                progress.clone(),
                store,
                vm_spec.mem_mib,
                vm_spec.vcpus,
            ))),
            _ => None,
        };
        let migrated = Arc::new(Mutex::new(None));
        if let Ok(requests) = channel.try_clone() {
            let requests = Requests {
                channel: requests,
                link: link.clone(),
                stop_vm: vm.killer(),
                vm_control: vm.checkpoint(),
                suspended: std::sync::atomic::AtomicBool::new(false),
                checkpointer: checkpointer.clone(),
                migrated: migrated.clone(),
            };
            let _ = std::thread::Builder::new()
                .name("vmm-requests".into())
                .spawn(move || requests.serve());
        }
        let result = run_session(
            vm,
            listener,
            start,
            io,
            (link, &progress),
            timings,
            vm_spec.console_log.clone(),
            || {
                let _ = channel.send(&FromVmm::JobStarted);
            },
        );
        let migrated = migrated.lock().unwrap_or_else(|p| p.into_inner()).take();
        let result = match (result, migrated) {
            // The session ended because the VM was stopped after its checkpoint.
            (Err(_), Some(generation)) => Err(JobError::Migrated {
                dir: checkpointer
                    .as_ref()
                    .map(|c| c.dir().path().display().to_string())
                    .unwrap_or_default(),
                generation,
            }),
            (Ok(outcome), _) => {
                // The job ended on its own: its checkpoints are of no more use.
                if let Some(c) = &checkpointer {
                    c.dir().clean();
                }
                Ok(outcome)
            }
            (result, _) => result,
        };
        let report = match result {
            Ok(o) => FromVmm::Exited {
                wait_status: o.wait_status,
                rusage: o.rusage,
                memory: o.memory,
                job_started: o.job_started,
                job_ended: o.job_ended,
                timings: o.timings,
                output_failures: o
                    .output_failures
                    .into_iter()
                    .take(2)
                    .map(crate::vmm_process::message::bounded_text)
                    .collect(),
            },
            Err(e) => FromVmm::Failed(e.bounded()),
        };
        let _ = channel.send(&report);
    }
}

/// The shepherd's requests, in the VMM process.
struct Requests {
    channel: Channel,
    link: AgentLink,
    stop_vm: backend::VmKiller,
    /// Pauses and resumes the VM, where the backend can.
    vm_control: Option<Arc<dyn backend::VmCheckpoint>>,
    /// The vCPUs are paused for a suspended job.
    suspended: std::sync::atomic::AtomicBool,
    checkpointer: Option<Arc<Checkpointer>>,
    /// The checkpoint after which the VM was stopped.
    migrated: Arc<Mutex<Option<u64>>>,
}

impl Requests {
    /// Serves signals for the job, checkpoints, and stopping the VM (also when the shepherd
    /// goes away).
    fn serve(self) {
        loop {
            match self.channel.receive::<ToVmm>(None) {
                Ok(Received::Message(ToVmm::Signal(signo))) => self.link.signal(signo),
                Ok(Received::Message(ToVmm::StopVm)) => self.stop(),
                Ok(Received::Message(ToVmm::Checkpoint(then))) => self.checkpoint(then),
                Ok(Received::Message(ToVmm::Suspend(suspend))) => self.suspend(suspend),
                Ok(Received::Nothing) => {}
                Ok(Received::Closed) | Err(_) => {
                    (self.stop_vm)();
                    return;
                }
            }
        }
    }

    fn stop(&self) {
        // Output the job's destinations have not taken yet is dropped, not waited for.
        self.link
            .output_abandoned()
            .store(true, std::sync::atomic::Ordering::SeqCst);
        (self.stop_vm)();
    }

    fn suspend(&self, suspend: bool) {
        use std::sync::atomic::Ordering;
        let Some(vm) = &self.vm_control else { return };
        if !suspend {
            // Asked of the VM whenever it may be paused: it must never stay paused.
            if self.suspended.swap(false, Ordering::SeqCst) {
                if let Err(e) = vm.resume() {
                    tracing::warn!("can't resume the VM: {e}");
                }
            }
            return;
        }
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = vm.pause() {
            // A pause that timed out leaves the vCPUs that did park paused: all of them run
            // again, and the job stays stopped in the guest all the same.
            let _ = vm.resume();
            self.suspended.store(false, Ordering::SeqCst);
            tracing::warn!("can't pause the VM (it runs on): {e}");
        }
    }

    fn checkpoint(&self, then: AfterCheckpoint) {
        use crate::vmm_process::message::{bounded_text, CheckpointOutcome};
        // A suspended job's VM stays paused after a periodic checkpoint.
        let after = if self.suspended.load(std::sync::atomic::Ordering::SeqCst) {
            AfterCheckpoint::StayPaused
        } else {
            then
        };
        let outcome = match &self.checkpointer {
            Some(c) => match c.take(after) {
                Ok(report) => CheckpointOutcome::Taken(report),
                Err(e @ checkpoint::CheckpointError::NotCheckpointable(_)) => {
                    CheckpointOutcome::NotNow(bounded_text(e.to_string()))
                }
                Err(e) => CheckpointOutcome::Failed(bounded_text(e.to_string())),
            },
            None => CheckpointOutcome::Failed("the job has no checkpoint directory".into()),
        };
        if let (CheckpointOutcome::Taken(report), AfterCheckpoint::StayPaused) = (&outcome, then) {
            *self.migrated.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.generation);
            self.stop();
        }
        let _ = self.channel.send(&FromVmm::Checkpointed(outcome));
    }
}

/// The last non-empty lines of the guest console, for error messages.
fn console_tail(path: &std::path::Path) -> String {
    let text = run_dir::read_log_tail(path);
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    // A crash ends in a stack trace, which says little: name the line that started it too.
    const CRASH: [&str; 6] = ["Kernel panic", "BUG:", "Oops", "WARNING:", "stall", "RIP:"];
    let cause = lines[..lines.len() - tail.len()]
        .iter()
        .find(|l| CRASH.iter().any(|c| l.contains(c)));
    match (cause, tail.is_empty()) {
        (_, true) => "no console output".into(),
        (Some(cause), false) => format!("console: {cause} | ... | {}", tail.join(" | ")),
        (None, false) => format!("console: {}", tail.join(" | ")),
    }
}

fn accept_agent(
    vm: &mut Box<dyn RunningVm>,
    listener: &UnixListener,
    console_log: &std::path::Path,
) -> Result<UnixStream, JobError> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| JobError::AgentLost(e.to_string()))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(JobError::AgentNeverConnected(e.to_string())),
        }
        match vm.wait_timeout(Duration::from_millis(2)) {
            Ok(Some(exit)) => {
                let what = format!(
                    "VM ended before its agent connected ({}); {}",
                    exit.description,
                    console_tail(console_log)
                );
                return Err(match exit.ended_by {
                    EndedBy::Outside => JobError::AgentNeverConnected(what),
                    EndedBy::Guest => JobError::GuestDidNotBoot(what),
                    EndedBy::Vmm => JobError::VmFailedToRun(what),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(JobError::Vm(e.to_string())),
        }
        if start.elapsed() > AGENT_CONNECT_PATIENCE {
            (vm.killer())();
            return Err(JobError::AgentNeverConnected(format!(
                "no connection within {AGENT_CONNECT_PATIENCE:?}; {}",
                console_tail(console_log)
            )));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    mut vm: Box<dyn RunningVm>,
    listener: UnixListener,
    start: SessionStart,
    io: JobIo,
    (link, progress): (AgentLink, &SessionProgress),
    mut timings: Timings,
    console_log: PathBuf,
    on_started: impl FnOnce(),
) -> Result<JobOutcome, JobError> {
    let accepted = accept_agent(&mut vm, &listener, &console_log);
    // One agent, one connection: later connections to its port are refused at once by the
    // host kernel instead of filling a backlog nobody drains.
    drop(listener);
    let result = accepted.and_then(|stream| {
        let mut job_started = SystemTime::now();
        let exit: Result<AgentExit, JobError> =
            converse(stream, start, io, &link, progress, &mut timings, || {
                job_started = SystemTime::now();
                on_started();
            });
        exit.map(|e| (e, job_started))
    });
    let job_ended = SystemTime::now();

    // An orderly end: the agent resets the VM after our Ack. Anything else: stop it now.
    let patience = if result.is_ok() {
        VM_END_PATIENCE
    } else {
        Duration::from_millis(500)
    };
    match vm.wait_timeout(patience) {
        Ok(Some(exit)) => tracing::debug!(exit = %exit.description, "the VM ended by itself"),
        _ => {
            // Routine where the guest's reset is slow (emulation, nested KVM): info, not warn,
            // as `run` shows warnings on the job's stderr.
            tracing::info!(
                patience_ms = patience.as_millis() as u64,
                "the VM did not end within the grace after the job's end: killing it"
            );
            (vm.killer())();
            if !matches!(vm.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
                tracing::warn!("the VM was still not gone 5 s after it was killed");
            }
        }
    }
    timings.vm_gone_ms = now_ms();
    // Read only now: when start() returns, the vCPU threads may not have entered the guest yet
    // (under emulation they seldom had, and the field was null).
    timings.first_instruction_ms = vm.first_instruction().map(since_start);
    let (exit, job_started) = result?;
    Ok(JobOutcome {
        wait_status: exit.wait_status,
        rusage: exit.rusage,
        memory: exit.memory,
        job_started,
        job_ended,
        timings,
        output_failures: exit.output_failures,
        network_lost: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A failure that is the administrator's, charged to the queue even when the job chose
    /// its image.
    fn assert_administrators(err: &LaunchError) {
        use crate::sge::start_failure::{launch_failure, BootOwner};
        assert_eq!(
            launch_failure(err, BootOwner::Job).0,
            crate::sge::fault::Fault::Queue,
            "the administrator's problem, not the job's: {err}"
        );
    }

    const NOBODY: u32 = 65534;

    /// Every name root or the VMM creates in the run directory, and where.
    const PLANTED: [&str; 6] = [
        "console.log",
        "qemu.log",
        "vhost-device-vsock.log",
        "vsock.sock",
        "vhost-vsock.sock",
        "vsock.sock_1024",
    ];

    /// The job user's side of the attack: as soon as it can write anywhere in the run
    /// directory, it plants a symlink to `victim` under every name root may create there, and
    /// swaps the agent's listening socket for one (the window between bind and chown).
    fn plant_symlinks(run_dir: &Path, victim: &Path, stop: &AtomicBool) {
        let tmp_link = |dir: &Path| dir.join(".planted");
        while !stop.load(Ordering::Relaxed) {
            for dir in [run_dir.to_path_buf(), run_dir.join("vm")] {
                for name in PLANTED {
                    let path = dir.join(name);
                    let is_socket = std::fs::symlink_metadata(&path)
                        .map(|m| m.file_type().is_socket())
                        .unwrap_or(false);
                    if is_socket {
                        let _ = std::os::unix::fs::symlink(victim, tmp_link(&dir));
                        let _ = std::fs::rename(tmp_link(&dir), &path);
                    } else {
                        let _ = std::os::unix::fs::symlink(victim, &path);
                    }
                }
            }
        }
    }

    fn launch_against_a_planting_job_user(backend: BackendChoice) {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED: launch symlink test ({backend:?}): needs root to act as a job user"
            );
            return;
        }
        if backend == BackendChoice::Qemu && backend::qemu::QemuBackend::locate().is_err() {
            eprintln!("SKIPPED: launch symlink test (qemu): qemu or vhost-device-vsock missing");
            return;
        }
        if backend == BackendChoice::Embedded && !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: launch symlink test (embedded): no /dev/kvm");
            return;
        }
        // Root's file, in a directory only root can enter (as /etc/shadow would be).
        let secret = tempfile::tempdir().unwrap();
        let victim = secret.path().join("victim");
        std::fs::write(&victim, b"precious\n").unwrap();
        // A kernel that does not boot (an ELF header and nothing behind it, so that the
        // launch's own format check lets it by): everything the backends create is created
        // before the kernel is loaded (embedded) or looked at (QEMU).
        let images = tempfile::tempdir().unwrap();
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        std::fs::write(images.path().join("vmlinux"), elf).unwrap();
        std::fs::write(images.path().join("initramfs.cpio"), b"").unwrap();
        // As the shepherd makes it: a fresh root-owned temporary directory.
        let run_dir = tempfile::Builder::new()
            .prefix("sge_virtualizer.test.")
            .tempdir()
            .unwrap();
        let creds = VmmCredentials {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![NOBODY],
        };

        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let (run_dir, victim, stop) =
                (run_dir.path().to_path_buf(), victim.clone(), stop.clone());
            let as_job_user = creds.for_thread();
            std::thread::spawn(move || {
                as_job_user
                    .run_on_own_thread(|| plant_symlinks(&run_dir, &victim, &stop))
                    .unwrap()
            })
        };
        let spec = LaunchSpec {
            kernel: images.path().join("vmlinux"),
            initrd: images.path().join("initramfs.cpio"),
            backend,
            vcpus: 1,
            mem_mib: 64,
            huge_pages: false,
            extra_cmdline: String::new(),
            spawn: Spawn {
                argv: vec![b"/bin/true".to_vec()],
                uid: NOBODY,
                gid: NOBODY,
                ..Spawn::default()
            },
            run_dir: run_dir.path().to_path_buf(),
            vmm_credentials: Some(creds),
            // With passt: its log is one more file root creates in the run directory.
            network: crate::network::NetworkSetting::default().resolve().unwrap(),
            checkpoint: None,
        };
        let io = JobIo::streams(
            StdinSource::Null,
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
        );
        // Give the job user time to act while the VM is set up and (for QEMU) fails to boot.
        let launched = launch(spec, io);
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(job) = launched {
            job.controller().kill_vm();
            let _ = job.wait();
        }
        stop.store(true, Ordering::Relaxed);
        attacker.join().unwrap();

        let meta = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&std::fs::read(&victim).unwrap()),
            "precious\n",
            "root wrote through the job user's symlink"
        );
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "root chowned the victim");
        // The launch got as far as creating its files: the console log (embedded: before the
        // kernel is loaded) or the vsock daemon's log (QEMU), as root's regular files.
        let created = [CONSOLE_LOG, "vhost-device-vsock.log"]
            .iter()
            .filter_map(|name| std::fs::symlink_metadata(run_dir.path().join(name)).ok())
            .filter(|m| m.file_type().is_file())
            .count();
        assert!(created > 0, "the launch created none of its files");
        // The directory root writes in stays root's: the job user cannot add names to it.
        let dir = std::fs::symlink_metadata(run_dir.path()).unwrap();
        assert_eq!(dir.uid(), 0, "the run directory was given to the job user");
        assert_eq!(
            dir.permissions().mode() & 0o022,
            0,
            "{:o}",
            dir.permissions().mode()
        );
    }

    #[test]
    fn root_refuses_a_kernel_in_a_directory_others_can_write() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: untrusted kernel launch test: the check applies to root only");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        for f in ["vmlinux", "initramfs.cpio"] {
            std::fs::write(open.join(f), b"").unwrap();
        }
        let run_dir = tempfile::tempdir().unwrap();
        let spec = LaunchSpec {
            kernel: open.join("vmlinux"),
            initrd: open.join("initramfs.cpio"),
            backend: BackendChoice::Qemu,
            vcpus: 1,
            mem_mib: 64,
            huge_pages: false,
            extra_cmdline: String::new(),
            spawn: Spawn::default(),
            run_dir: run_dir.path().to_path_buf(),
            vmm_credentials: None,
            network: NetworkPolicy::None,
            checkpoint: None,
        };
        let io = JobIo::streams(
            StdinSource::Null,
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
        );
        let err = launch(spec, io)
            .err()
            .expect("booted a kernel others can replace");
        assert!(matches!(err, LaunchError::UntrustedGuestImage(_)), "{err}");
        assert_administrators(&err);
        assert_eq!(std::fs::read_dir(run_dir.path()).unwrap().count(), 0);
    }

    /// An image store another user can write: they could swap every job's root file system,
    /// or plant a symlink where root writes the verification record.
    #[test]
    fn root_refuses_an_image_from_a_store_others_can_write() {
        use crate::image::{verification, Manifest, IMAGE_FILE, MANIFEST_FILE};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: untrusted image store test: the check applies to root only");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("images");
        let dir = store.join("deb");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(IMAGE_FILE), b"an image").unwrap();
        Manifest {
            name: "deb".into(),
            suite: "bookworm".into(),
            mirror: String::new(),
            variant: "minbase".into(),
            file: IMAGE_FILE.into(),
            fstype: "ext4".into(),
            size: 8,
            sha256: verification::sha256_file(&dir.join(IMAGE_FILE)).unwrap(),
            created: String::new(),
            os_version: None,
            source: None,
        }
        .save(&dir.join(MANIFEST_FILE))
        .unwrap();
        let choice = ImageChoice {
            store: store.clone(),
            name: "deb".into(),
        };
        trusted_image(&choice).unwrap();
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = trusted_image(&choice).expect_err("an image others can swap");
        assert!(matches!(err, LaunchError::UntrustedImage { .. }), "{err}");
        assert_administrators(&err);
    }

    #[test]
    fn embedded_root_never_writes_through_a_job_users_symlink() {
        launch_against_a_planting_job_user(BackendChoice::Embedded);
    }

    #[test]
    fn qemu_root_never_writes_through_a_job_users_symlink() {
        launch_against_a_planting_job_user(BackendChoice::Qemu);
    }

    /// A VM whose pause times out (some vCPUs parked, some not) runs again at once, and a
    /// later resume still reaches a VM that did pause: a suspended job's VM never stays
    /// paused (a CI run on a loaded host showed a job frozen until its hard stop).
    #[test]
    fn a_suspension_never_leaves_the_vm_paused() {
        #[derive(Default)]
        struct Vm {
            fail_pause: AtomicBool,
            paused: AtomicBool,
            resumes: std::sync::atomic::AtomicU32,
        }
        impl backend::VmCheckpoint for Vm {
            fn snapshot(&self, _: &Path) -> Result<backend::VmSnapshotInfo, BackendError> {
                Err(BackendError::Start("no".into()))
            }
            fn pause(&self) -> Result<(), BackendError> {
                self.paused.store(true, Ordering::SeqCst);
                if self.fail_pause.load(Ordering::SeqCst) {
                    return Err(BackendError::Start(
                        "the vCPUs did not pause in time".into(),
                    ));
                }
                Ok(())
            }
            fn resume(&self) -> Result<(), BackendError> {
                self.paused.store(false, Ordering::SeqCst);
                self.resumes.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
        let vm = Arc::new(Vm::default());
        let (channel, _other) = Channel::pair().unwrap();
        let requests = Requests {
            channel,
            link: AgentLink::default(),
            stop_vm: Arc::new(|| {}),
            vm_control: Some(vm.clone()),
            suspended: AtomicBool::new(false),
            checkpointer: None,
            migrated: Arc::new(Mutex::new(None)),
        };
        requests.suspend(true);
        assert!(vm.paused.load(Ordering::SeqCst));
        requests.suspend(true);
        requests.suspend(false);
        assert!(!vm.paused.load(Ordering::SeqCst));
        assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
        vm.fail_pause.store(true, Ordering::SeqCst);
        requests.suspend(true);
        assert!(
            !vm.paused.load(Ordering::SeqCst),
            "a pause that timed out is undone"
        );
        requests.suspend(false);
        assert_eq!(
            vm.resumes.load(Ordering::SeqCst),
            2,
            "no resume of a running VM"
        );
    }
}
