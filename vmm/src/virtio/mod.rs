//! Virtio devices over the MMIO transport.

use kvm_ioctls::VmFd;
use linux_loader::loader::Cmdline;
use vm_device::device_manager::IoManager;

use crate::config::VmConfig;
use crate::event_loop::Subscriber;
use crate::memory::GuestMemory;

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Not yet available.
    #[error("virtio-vsock is not available yet")]
    Unsupported,
}

/// State of an attached vsock device.
#[derive(Debug)]
pub struct VsockDeviceInfo;

/// Devices attached to a VM.
pub(crate) struct AttachedDevices {
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) vsock: Option<VsockDeviceInfo>,
}

pub(crate) fn attach_devices(
    config: &VmConfig,
    _vm: &VmFd,
    _io: &mut IoManager,
    _mem: &std::sync::Arc<GuestMemory>,
    _cmdline: &mut Cmdline,
) -> Result<AttachedDevices, VirtioError> {
    if config.vsock.is_some() {
        return Err(VirtioError::Unsupported);
    }
    Ok(AttachedDevices {
        subscribers: Vec::new(),
        vsock: None,
    })
}
