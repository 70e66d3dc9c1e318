//! VM backends: how a microVM is started, watched and stopped. The shepherd's policy (what to
//! run, where output goes) lives elsewhere; a backend only boots a guest whose vsock is bridged
//! to host Unix sockets in the hybrid-vsock convention (guest connects to port P → the host
//! listener `<vsock_uds>_P`).

pub mod embedded;
pub mod helper_process;
mod probe_cache;
pub mod qemu;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::protocol::ShareTransport;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Embedded where KVM can run a Linux guest, otherwise QEMU.
    Auto,
    /// The in-process KVM VMM.
    Embedded,
    /// An external `qemu-system-x86_64` (TCG where KVM cannot run Linux).
    Qemu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "embedded" => Ok(BackendChoice::Embedded),
            "qemu" => Ok(BackendChoice::Qemu),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, embedded or qemu)"
            )),
        }
    }
}

/// The guest console's log in the run directory.
pub const CONSOLE_LOG: &str = "console.log";

/// The VM's log files: created by the root shepherd in its own run directory (new files, never
/// through a symlink, handed to the VM's user) and given to the VMM process open, because that
/// process runs as the job user and cannot create files there.
#[derive(Debug, Clone, Default)]
pub struct VmLogs {
    files: Vec<(String, Arc<File>)>,
}

impl VmLogs {
    /// Creates `names` in `dir` with [`crate::run_dir::create_file`].
    pub fn create(
        dir: &Path,
        names: &[&str],
        owner: Option<crate::run_dir::Owner>,
    ) -> Result<VmLogs, crate::run_dir::RunDirError> {
        let files = names
            .iter()
            .map(|name| {
                crate::run_dir::create_file(&dir.join(name), owner)
                    .map(|f| (name.to_string(), Arc::new(f)))
            })
            .collect::<Result<_, _>>()?;
        Ok(VmLogs { files })
    }

    /// A descriptor of the log `name` (the backend's own duplicate).
    pub fn open(&self, name: &str) -> Result<File, BackendError> {
        let (_, file) = self
            .files
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BackendError::Start(format!("no log file {name} was prepared")))?;
        Ok(file.try_clone()?)
    }

    /// The shared handle of the log `name`.
    pub fn shared(&self, name: &str) -> Option<Arc<File>> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
    }
}

/// Identity the VMM and its helper processes run with: the job user plus `add_grp_id`, so Grid
/// Engine's PDC accounts for them and its addgrp kill reaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmCredentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl VmmCredentials {
    /// The same identity for one thread of this process (the embedded VMM's threads, checks
    /// made as the job user).
    pub fn for_thread(&self) -> vmm::ThreadCredentials {
        vmm::ThreadCredentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line (the backend may append its device entries).
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Back guest RAM with transparent huge pages (the embedded VMM advises them; QEMU already
    /// advises them for all guest RAM, and the host's `shmem_enabled` decides for its memfd).
    pub huge_pages: bool,
    /// Hybrid-vsock base path; the guest's connections to port P arrive at `<vsock_uds>_P`.
    /// Its directory holds the VM's sockets; it is the VM user's where
    /// [`VmBackend::helpers_create_sockets`] says so.
    pub vsock_uds: PathBuf,
    /// Where the guest's serial console goes: [`CONSOLE_LOG`] in [`VmSpec::run_dir`], open in
    /// [`VmSpec::logs`].
    pub console_log: PathBuf,
    /// The console log and the backend's own logs ([`VmBackend::log_files`]), already open.
    pub logs: VmLogs,
    /// `/dev/kvm`, opened by the shepherd for a backend that [`VmBackend::opens_kvm`] (the VMM
    /// process's user need not be allowed to open it).
    pub kvm_device: Option<Arc<File>>,
    /// The shepherd's private directory (see [`crate::run_dir`]): the backend creates its logs
    /// there with [`crate::run_dir::create_file`], never anything by plain path.
    pub run_dir: PathBuf,
    pub credentials: Option<VmmCredentials>,
    /// An OS image attached read-only as the guest's first virtio-blk disk
    /// ([`ROOT_DISK_GUEST_DEVICE`]).
    pub root_disk: Option<PathBuf>,
    /// Host directories served to the guest, each under its tag.
    pub shares: Vec<VmShare>,
    /// A virtio-net device backed by the job's passt ([`crate::network`]).
    pub network: Option<crate::network::VmNetwork>,
}

/// The guest device of [`VmSpec::root_disk`].
pub const ROOT_DISK_GUEST_DEVICE: &str = "/dev/vda";

/// A host directory served to the guest by the backend's file server, which runs with
/// [`VmSpec::credentials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShare {
    /// The device tag the guest mounts it by.
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
}

#[cfg(test)]
impl VmSpec {
    /// A spec with placeholder paths and nothing attached, for the backends' unit tests.
    pub(crate) fn for_tests() -> VmSpec {
        VmSpec {
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            cmdline: String::new(),
            vcpus: 1,
            mem_mib: 64,
            huge_pages: false,
            vsock_uds: PathBuf::from("/run/v"),
            console_log: PathBuf::from("/run/c"),
            logs: VmLogs::default(),
            kvm_device: None,
            run_dir: PathBuf::from("/run"),
            credentials: None,
            root_disk: None,
            shares: Vec::new(),
            network: None,
        }
    }
}

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend not available: {0}")]
    Unavailable(String),
    #[error("VM failed to start: {0}")]
    Start(String),
    /// The guest kernel or initramfs cannot be booted (not a kernel, not loadable): the
    /// administrator's to fix, not a shortage that passes.
    #[error("the guest cannot be booted: {0}")]
    Guest(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    RunDir(#[from] crate::run_dir::RunDirError),
    /// A snapshot that cannot be restored: sound but not on this host (`elsewhere`: its CPU,
    /// KVM or VMM build), or unusable anywhere (damaged, of another VM).
    #[error("the checkpoint cannot be restored{}: {message}", if *.elsewhere { " on this host" } else { "" })]
    Restore { elsewhere: bool, message: String },
}

/// How a VM ended, in words, whether that was the guest's orderly reset, and who ended it.
#[derive(Debug, Clone)]
pub struct VmExit {
    pub orderly: bool,
    pub ended_by: EndedBy,
    pub description: String,
}

/// Who ended a VM: before its agent connects, this says whose a failed start is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The guest: it reset, shut down or crashed, or KVM could not run what it did.
    Guest,
    /// The VMM could not go on running it (QEMU exited with an error, a device or vCPU
    /// thread failed): a host problem that may pass.
    Vmm,
    /// Something outside: the host's stop, a signal to the VMM, its helper gone.
    Outside,
}

/// Stops a VM from any thread.
pub type VmKiller = Arc<dyn Fn() + Send + Sync>;

/// What a VM snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshotInfo {
    pub file_bytes: u64,
    pub memory_bytes_stored: u64,
    /// The VMM build that wrote it (only the same build restores it).
    pub build_id: String,
}

/// Snapshots of a running VM, from any thread (the embedded backend's).
pub trait VmCheckpoint: Send + Sync {
    /// Pauses the VM and writes its snapshot to `path`, a new file. Leaves the VM paused.
    fn snapshot(&self, path: &Path) -> Result<VmSnapshotInfo, BackendError>;
    /// Pauses the VM's vCPUs (devices keep running); returns once every vCPU is parked.
    fn pause(&self) -> Result<(), BackendError>;
    /// Resumes a paused VM.
    fn resume(&self) -> Result<(), BackendError>;
}

/// A booted VM.
pub trait RunningVm: Send {
    /// When the guest executed its first instruction, where the backend can tell.
    fn first_instruction(&self) -> Option<Instant>;
    /// Waits up to `timeout` for the VM to end.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, BackendError>;
    /// A handle that stops the VM at once.
    fn killer(&self) -> VmKiller;
    /// Snapshots of this VM, where the backend takes them.
    fn checkpoint(&self) -> Option<Arc<dyn VmCheckpoint>> {
        None
    }
}

/// A way to boot VMs.
pub trait VmBackend {
    fn name(&self) -> &'static str;
    /// Whether [`VmSpec::root_disk`] is attached; a backend that cannot is never given one.
    fn attaches_disks(&self) -> bool {
        false
    }
    /// Whether [`VmSpec::shares`] are attached; a backend that cannot is never given any.
    fn attaches_shares(&self) -> bool {
        false
    }
    /// How the guest reaches the shares: the file system type the agent mounts them with.
    fn share_transport(&self) -> ShareTransport {
        ShareTransport::NineP
    }
    /// Whether helper processes running as the VM's user create sockets next to
    /// [`VmSpec::vsock_uds`], so that directory must be handed to that user.
    fn helpers_create_sockets(&self) -> bool {
        false
    }
    /// The log files (beyond [`CONSOLE_LOG`]) the backend writes in [`VmSpec::run_dir`]; the
    /// shepherd creates them before the VMM process starts ([`VmSpec::logs`]).
    fn log_files(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether the VMM itself opens `/dev/kvm` (then the shepherd opens it for the VMM process
    /// and hands it over in [`VmSpec::kvm_device`]).
    fn opens_kvm(&self) -> bool {
        false
    }
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, BackendError>;
    /// Starts the VM `spec` describes from the snapshot at `snapshot` instead of booting it.
    fn restore(&self, spec: &VmSpec, snapshot: &Path) -> Result<Box<dyn RunningVm>, BackendError> {
        let _ = (spec, snapshot);
        Err(BackendError::Unavailable(format!(
            "the {} backend cannot restore VM snapshots; the embedded one can",
            self.name()
        )))
    }
}

/// The backend chosen for a request, and why.
pub struct Selection {
    pub backend: Box<dyn VmBackend>,
    pub reason: String,
}

/// Resolves `choice` to a backend. `auto` takes the embedded VMM only where KVM can run a
/// Linux guest; the QEMU backend needs its external programs.
pub fn select(choice: BackendChoice) -> Result<Selection, BackendError> {
    match choice {
        BackendChoice::Qemu => Ok(Selection {
            backend: Box::new(qemu::QemuBackend::locate()?),
            reason: "requested".into(),
        }),
        BackendChoice::Embedded => Ok(Selection {
            backend: Box::new(embedded::EmbeddedBackend),
            reason: "requested".into(),
        }),
        BackendChoice::Auto => {
            let (usable, why) = embedded::usable();
            if usable {
                Ok(Selection {
                    backend: Box::new(embedded::EmbeddedBackend),
                    reason: format!("auto: {why}"),
                })
            } else {
                Ok(Selection {
                    backend: Box::new(qemu::QemuBackend::locate()?),
                    reason: format!(
                        "auto: QEMU, because the embedded VMM cannot run Linux here: {why}"
                    ),
                })
            }
        }
    }
}

/// Opens `/dev/kvm` for a VMM process that may not open it itself.
pub fn open_kvm_device() -> Result<Arc<File>, BackendError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(Arc::new)
        .map_err(|e| BackendError::Unavailable(format!("KVM is not usable: /dev/kvm: {e}")))
}
