//! The VMM process's end of the job's network: the stream to passt as the VM's device gets it,
//! directly for the job user's full access, or through the allow-list filter's relay thread
//! (under its own seccomp filter: it parses the guest's frames) when the policy has one.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm::virtio::net::egress_filter::EgressPolicy;
use vmm::virtio::net::filtering_relay::{self, RelayReport};

use super::NetworkError;

/// The network device a VM gets: its stream to passt (qemu framing), its MAC and MTU, and the
/// allow-list to enforce between them, if any.
#[derive(Debug, Clone)]
pub struct VmNetwork {
    pub stream: Arc<OwnedFd>,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub egress: Option<EgressPolicy>,
}

/// The device's end of the link, and the relay thread behind it (joined when dropped: it ends
/// once either end closes).
#[derive(Debug)]
pub struct DeviceLink {
    pub stream: Arc<OwnedFd>,
    relay: Option<JoinHandle<Option<RelayReport>>>,
}

impl DeviceLink {
    /// The stream the device gets for `net`: passt's own, or a relay's through the filter.
    pub fn attach(net: &VmNetwork) -> Result<DeviceLink, NetworkError> {
        let Some(policy) = net.egress.clone() else {
            return Ok(DeviceLink {
                stream: net.stream.clone(),
                relay: None,
            });
        };
        let (device_end, relay_end) =
            UnixStream::pair().map_err(|e| NetworkError::Link(format!("socketpair: {e}")))?;
        let passt = net
            .stream
            .try_clone()
            .map_err(|e| NetworkError::Link(format!("dup of passt's stream: {e}")))?;
        let relay = std::thread::Builder::new()
            .name("net-filter".into())
            .spawn(move || relay_thread(OwnedFd::from(relay_end), passt, &policy))
            .map_err(|e| NetworkError::Link(format!("relay thread: {e}")))?;
        Ok(DeviceLink {
            stream: Arc::new(OwnedFd::from(device_end)),
            relay: Some(relay),
        })
    }
}

/// The relay thread's life. It logs nothing once under its filter (logging may make calls the
/// filter does not allow): its report goes back to whoever joins it.
fn relay_thread(guest: OwnedFd, passt: OwnedFd, policy: &EgressPolicy) -> Option<RelayReport> {
    // The relay parses what the guest sends: it runs only under its allow-list. Without the
    // filter it does not run at all (the device then sees its stream end: no network).
    let filtered = vmm::seccomp::net_relay_filter()
        .map_err(|e| e.to_string())
        .and_then(|f| seccompiler::apply_filter(&f).map_err(|e| e.to_string()));
    if let Err(e) = filtered {
        tracing::warn!(error = %e, "network filter not started: the job has no network");
        return None;
    }
    filtering_relay::run(guest, passt, policy).ok()
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            if relay.is_finished() {
                if let Ok(Some(report)) = relay.join() {
                    tracing::info!(?report, "network filter ended");
                }
            }
            // Otherwise it ends by itself when the VM's end closes (this process is ending).
        }
    }
}
