//! The embedded backend: the in-process KVM VMM of the `vmm` crate. No helper process: the
//! vCPU threads, the virtio-vsock device and the virtio-fs file servers run in the shepherd
//! itself, so Grid Engine accounts the guest's CPU time to the shepherd. [`VmSpec::root_disk`]
//! becomes a read-only virtio-blk disk (`/dev/vda`); each of [`VmSpec::shares`] a virtio-fs
//! device served with the job user's identity. Under the shepherd this runs in the VMM process
//! ([`crate::vmm_process`]), which already is the job user; where the caller is root and
//! [`VmSpec::credentials`] names another user (tests, tools), the VMM's threads take it per
//! thread.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::protocol::ShareTransport;

use crate::network::link::DeviceLink;

use super::{BackendError, EndedBy, RunningVm, VmBackend, VmExit, VmKiller, VmSpec};

/// The guest's vsock context id.
const GUEST_CID: u64 = 3;
/// Console log bound: a chatty guest cannot fill the host disk.
const CONSOLE_LOG_MAX: u64 = 1 << 20;

/// Boots VMs with the `vmm` crate.
pub struct EmbeddedBackend;

/// The identity the VMM's threads take for `spec`: none when this process already runs as the
/// job user; the job user's when it runs as root (the Grid Engine shepherd); anything else
/// cannot switch and is refused.
fn thread_identity(
    spec: &VmSpec,
    euid: u32,
) -> Result<Option<vmm::ThreadCredentials>, BackendError> {
    match &spec.credentials {
        None => Ok(None),
        Some(c) if c.uid == euid => Ok(None),
        Some(c) if euid == 0 => Ok(Some(c.for_thread())),
        Some(c) => Err(BackendError::Unavailable(format!(
            "the embedded VMM runs in this process (euid {euid}), which cannot take uid {}",
            c.uid
        ))),
    }
}

impl VmBackend for EmbeddedBackend {
    fn attaches_disks(&self) -> bool {
        true
    }

    fn attaches_shares(&self) -> bool {
        true
    }

    fn share_transport(&self) -> ShareTransport {
        ShareTransport::VirtioFs
    }

    fn name(&self) -> &'static str {
        "embedded"
    }

    fn opens_kvm(&self) -> bool {
        true
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, BackendError> {
        self.run(spec, None)
    }

    fn restore(&self, spec: &VmSpec, snapshot: &Path) -> Result<Box<dyn RunningVm>, BackendError> {
        self.run(spec, Some(snapshot))
    }
}

impl EmbeddedBackend {
    /// Boots `spec`, or restores it from `snapshot`.
    fn run(
        &self,
        spec: &VmSpec,
        snapshot: Option<&Path>,
    ) -> Result<Box<dyn RunningVm>, BackendError> {
        let mut config = vm_config(spec);
        let net_link = spec
            .network
            .as_ref()
            .map(DeviceLink::attach)
            .transpose()
            .map_err(|e| BackendError::Start(e.to_string()))?;
        if let (Some(net), Some(link)) = (&spec.network, &net_link) {
            config.net = Some(vmm::NetConfig {
                stream: link.stream.clone(),
                mac: net.mac,
                mtu: net.mtu,
            });
        }
        config.run_as = thread_identity(spec, nix::unistd::geteuid().as_raw())?;
        let started = match snapshot {
            None => vmm::Vm::start(config),
            Some(path) => vmm::Vm::restore(config, path),
        };
        let handle = started.map_err(|e| match e {
            vmm::VmError::Snapshot(s) => BackendError::Restore {
                elsewhere: s.is_host_mismatch(),
                message: s.to_string(),
            },
            vmm::VmError::Boot(_) => BackendError::Guest(e.to_string()),
            vmm::VmError::KvmUnavailable(_) => BackendError::Unavailable(e.to_string()),
            _ => BackendError::Start(e.to_string()),
        })?;
        Ok(Box::new(EmbeddedVm {
            handle: Arc::new(handle),
            _net_link: net_link,
        }))
    }
}

/// Snapshots through the VM's handle.
struct EmbeddedCheckpoint(Arc<vmm::VmHandle>);

impl super::VmCheckpoint for EmbeddedCheckpoint {
    fn snapshot(&self, path: &Path) -> Result<super::VmSnapshotInfo, BackendError> {
        let info = self
            .0
            .snapshot(path)
            .map_err(|e| BackendError::Start(e.to_string()))?;
        Ok(super::VmSnapshotInfo {
            file_bytes: info.file_bytes,
            memory_bytes_stored: info.memory_bytes_stored,
            build_id: info.build_id,
        })
    }

    fn pause(&self) -> Result<(), BackendError> {
        self.0
            .pause()
            .map_err(|e| BackendError::Start(e.to_string()))
    }

    fn resume(&self) -> Result<(), BackendError> {
        self.0
            .resume()
            .map_err(|e| BackendError::Start(e.to_string()))
    }
}

struct EmbeddedVm {
    handle: Arc<vmm::VmHandle>,
    /// The network device's stream and its filter's relay (the VMM holds its own reference).
    _net_link: Option<DeviceLink>,
}

impl RunningVm for EmbeddedVm {
    fn first_instruction(&self) -> Option<Instant> {
        self.handle.timestamps().first_vcpu_run()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, BackendError> {
        Ok(self.handle.wait_timeout(timeout).map(|reason| VmExit {
            orderly: matches!(reason, vmm::ExitReason::GuestReset),
            ended_by: match reason {
                vmm::ExitReason::HostRequest => EndedBy::Outside,
                vmm::ExitReason::DeviceError { .. } | vmm::ExitReason::VcpuError { .. } => {
                    EndedBy::Vmm
                }
                _ => EndedBy::Guest,
            },
            description: reason.to_string(),
        }))
    }

    fn killer(&self) -> VmKiller {
        let handle = self.handle.clone();
        Arc::new(move || {
            handle.request_stop();
            // The device thread, and with it the vsock connection the agent session reads,
            // ends only once the VM's threads are joined: join them now (within the VMM's own
            // deadline), off the caller's thread, so the session sees the connection close
            // instead of waiting on a VM that is gone.
            let handle = handle.clone();
            let _ = std::thread::Builder::new()
                .name("vm-stopper".into())
                .spawn(move || {
                    handle.wait();
                });
        })
    }

    fn checkpoint(&self) -> Option<Arc<dyn super::VmCheckpoint>> {
        Some(Arc::new(EmbeddedCheckpoint(self.handle.clone())))
    }
}

/// The VMM configuration for `spec`: the root disk as the first (read-only) virtio-blk disk,
/// each share a virtio-fs device under its tag.
fn vm_config(spec: &VmSpec) -> vmm::VmConfig {
    let mut config = vmm::VmConfig::new(&spec.kernel);
    config.initrd = Some(spec.initrd.clone());
    // The i8042 reset is how the guest ends the VM; no PCI, no modules in our guest.
    config.cmdline = format!("reboot=k pci=off nomodule {}", spec.cmdline);
    config.mem_mib = spec.mem_mib.into();
    config.huge_pages = spec.huge_pages;
    config.vcpus = spec.vcpus;
    config.vsock = Some(vmm::VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: spec.vsock_uds.clone(),
    });
    // The root disk is the first virtio-blk disk: /dev/vda in the guest.
    config.disks = spec
        .root_disk
        .iter()
        .map(|path| vmm::DiskConfig {
            path: path.clone(),
            read_only: true,
        })
        .collect();
    config.shares = spec
        .shares
        .iter()
        .map(|share| vmm::ShareConfig {
            tag: share.tag.clone(),
            path: share.host_path.clone(),
            read_only: share.read_only,
        })
        .collect();
    config.kvm_device = spec.kvm_device.clone();
    config.serial = match spec.logs.shared(super::CONSOLE_LOG) {
        Some(file) => vmm::SerialSink::OpenFile {
            file,
            max_bytes: CONSOLE_LOG_MAX,
        },
        None => vmm::SerialSink::File {
            path: spec.console_log.clone(),
            max_bytes: CONSOLE_LOG_MAX,
        },
    };
    config
}

/// Whether `auto` should pick this backend, and why (probed once per host boot).
pub fn usable() -> (bool, String) {
    super::probe_cache::cached(|| {
        let probe = vmm::kvm_can_run_linux();
        (probe.usable, probe.reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{VmShare, VmmCredentials};
    use std::path::PathBuf;

    #[test]
    fn agent_and_vmm_agree_on_the_boot_timer() {
        use guest_agent::agent::pid1;
        assert_eq!(pid1::BOOT_TIMER_PORT, vmm::BOOT_TIMER_PORT);
        assert_eq!(pid1::BOOT_TIMER_MAGIC, vmm::BOOT_TIMER_MAGIC);
    }

    fn spec() -> VmSpec {
        VmSpec::for_tests()
    }

    #[test]
    fn the_root_disk_is_the_first_read_only_disk() {
        assert!(vm_config(&spec()).disks.is_empty());
        let mut s = spec();
        s.root_disk = Some(PathBuf::from("/images/os.img"));
        let c = vm_config(&s);
        assert_eq!(
            c.disks,
            vec![vmm::DiskConfig {
                path: PathBuf::from("/images/os.img"),
                read_only: true
            }]
        );
    }

    #[test]
    fn shares_become_virtio_fs_devices_under_their_tags() {
        let mut s = spec();
        s.shares.push(VmShare {
            tag: "sge0".into(),
            host_path: PathBuf::from("/home/alice"),
            read_only: false,
        });
        s.shares.push(VmShare {
            tag: "sge1".into(),
            host_path: PathBuf::from("/opt/apps"),
            read_only: true,
        });
        let c = vm_config(&s);
        assert_eq!(
            c.shares,
            vec![
                vmm::ShareConfig {
                    tag: "sge0".into(),
                    path: PathBuf::from("/home/alice"),
                    read_only: false
                },
                vmm::ShareConfig {
                    tag: "sge1".into(),
                    path: PathBuf::from("/opt/apps"),
                    read_only: true
                }
            ]
        );
        assert_eq!(EmbeddedBackend.share_transport(), ShareTransport::VirtioFs);
    }

    #[test]
    fn the_vmm_threads_take_the_job_users_identity_only_when_they_must() {
        let mut s = spec();
        assert_eq!(thread_identity(&s, 0).unwrap(), None);
        s.credentials = Some(VmmCredentials {
            uid: 1000,
            gid: 100,
            groups: vec![100, 20017],
        });
        assert_eq!(
            thread_identity(&s, 1000).unwrap(),
            None,
            "already the job user"
        );
        assert_eq!(
            thread_identity(&s, 0).unwrap(),
            Some(vmm::ThreadCredentials {
                uid: 1000,
                gid: 100,
                groups: vec![100, 20017]
            }),
            "root switches the VMM's threads"
        );
        let err = thread_identity(&s, 1001).unwrap_err().to_string();
        assert!(err.contains("cannot take uid 1000"), "{err}");
    }
}
