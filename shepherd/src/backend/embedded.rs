//! The embedded backend: the in-process KVM VMM of the `vmm` crate. No helper process: the
//! vCPU threads and the virtio-vsock device run in the shepherd itself, so Grid Engine accounts
//! the guest's CPU time to the shepherd. [`VmSpec::root_disk`] becomes a read-only virtio-blk
//! disk (`/dev/vda`); [`VmSpec::shares`] are refused (no virtio-fs in the VMM yet).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BackendError, RunningVm, VmBackend, VmExit, VmKiller, VmSpec};

/// The guest's vsock context id.
const GUEST_CID: u64 = 3;
/// Console log bound: a chatty guest cannot fill the host disk.
const CONSOLE_LOG_MAX: u64 = 1 << 20;

/// Boots VMs with the `vmm` crate.
pub struct EmbeddedBackend;

impl EmbeddedBackend {
    /// Checks that this process can run the VMM for `spec`'s credentials: the VMM is this
    /// process, so it must already run as the job user (the Grid Engine shepherd switches before
    /// it launches).
    fn check_credentials(spec: &VmSpec) -> Result<(), BackendError> {
        if let Some(c) = &spec.credentials {
            let euid = nix::unistd::geteuid().as_raw();
            if euid != c.uid {
                return Err(BackendError::Unavailable(format!(
                    "the embedded VMM runs in this process (euid {euid}) and must run as uid {}",
                    c.uid
                )));
            }
        }
        Ok(())
    }
}

impl VmBackend for EmbeddedBackend {
    fn attaches_disks(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "embedded"
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, BackendError> {
        Self::check_credentials(spec)?;
        let config = vm_config(spec)?;
        let handle = vmm::Vm::start(config).map_err(|e| BackendError::Start(e.to_string()))?;
        Ok(Box::new(EmbeddedVm {
            handle: Arc::new(handle),
        }))
    }
}

struct EmbeddedVm {
    handle: Arc<vmm::VmHandle>,
}

impl RunningVm for EmbeddedVm {
    fn first_instruction(&self) -> Option<Instant> {
        self.handle.timestamps().first_vcpu_run()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, BackendError> {
        Ok(self.handle.wait_timeout(timeout).map(|reason| VmExit {
            orderly: matches!(reason, vmm::ExitReason::GuestReset),
            description: reason.to_string(),
        }))
    }

    fn killer(&self) -> VmKiller {
        let handle = self.handle.clone();
        Arc::new(move || handle.request_stop())
    }
}

/// The VMM configuration for `spec`: the root disk as the first (read-only) virtio-blk disk;
/// shared directories are refused.
fn vm_config(spec: &VmSpec) -> Result<vmm::VmConfig, BackendError> {
    if !spec.shares.is_empty() {
        return Err(BackendError::Unavailable(
            "the embedded VMM cannot serve shared directories: it has no virtio-fs device yet"
                .into(),
        ));
    }
    let mut config = vmm::VmConfig::new(&spec.kernel);
    config.initrd = Some(spec.initrd.clone());
    // The i8042 reset is how the guest ends the VM; no PCI, no modules in our guest.
    config.cmdline = format!("reboot=k pci=off nomodule {}", spec.cmdline);
    config.mem_mib = spec.mem_mib.into();
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
    config.serial = vmm::SerialSink::File {
        path: spec.console_log.clone(),
        max_bytes: CONSOLE_LOG_MAX,
    };
    Ok(config)
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
    use crate::backend::VmShare;
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
        assert!(vm_config(&spec()).unwrap().disks.is_empty());
        let mut s = spec();
        s.root_disk = Some(PathBuf::from("/images/os.img"));
        let c = vm_config(&s).unwrap();
        assert_eq!(
            c.disks,
            vec![vmm::DiskConfig {
                path: PathBuf::from("/images/os.img"),
                read_only: true
            }]
        );
    }

    #[test]
    fn shares_are_refused_until_there_is_virtio_fs() {
        let mut s = spec();
        s.shares.push(VmShare {
            tag: "home".into(),
            host_path: PathBuf::from("/home"),
            read_only: false,
        });
        let err = vm_config(&s).err().unwrap().to_string();
        assert!(err.contains("virtio-fs"), "{err}");
    }
}
