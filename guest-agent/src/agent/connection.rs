//! The agent's connection to the host: AF_VSOCK to the host CID in a guest, or a Unix socket
//! when the agent runs as an ordinary process in tests.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Where the agent connects.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `AF_VSOCK` to `cid:port` (the host is CID 2).
    Vsock { cid: u32, port: u32 },
    /// A Unix stream socket (host-process mode, for tests).
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {endpoint} within {waited:?}: {last}")]
    GaveUp {
        endpoint: String,
        waited: Duration,
        last: String,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

fn connect_once(endpoint: &Endpoint) -> std::io::Result<File> {
    match endpoint {
        Endpoint::Vsock { cid, port } => {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(*cid, *port),
            )?;
            // A connected stream socket reads and writes like a file.
            Ok(File::from(fd))
        }
        Endpoint::Unix(path) => {
            UnixStream::connect(path).map(|s| File::from(std::os::fd::OwnedFd::from(s)))
        }
    }
}

/// Connects, retrying with exponential backoff (1 ms doubling to 100 ms) until `deadline`:
/// the host side or the guest's vsock transport may not be ready at the first try.
pub fn connect_with_retry(endpoint: &Endpoint, patience: Duration) -> Result<File, ConnectError> {
    connect_until(endpoint, patience, |_| false)
}

/// Connects again to a host that had the session: as [`connect_with_retry`], except that a
/// refusal is final. A host that ended the session on purpose no longer listens (a Unix
/// socket then refuses, the host's vsock answers with a reset), and the job must not wait for
/// it; a host that takes a session over (a restored VM's) listens before the VM runs.
pub fn reconnect(endpoint: &Endpoint, patience: Duration) -> Result<File, ConnectError> {
    connect_until(endpoint, patience, |e| {
        matches!(
            e.raw_os_error(),
            Some(libc::ECONNREFUSED | libc::ENOENT | libc::ECONNRESET)
        )
    })
}

fn connect_until(
    endpoint: &Endpoint,
    patience: Duration,
    is_final: impl Fn(&std::io::Error) -> bool,
) -> Result<File, ConnectError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        match connect_once(endpoint) {
            Ok(f) => return Ok(f),
            Err(e) => {
                if start.elapsed() >= patience || is_final(&e) {
                    return Err(ConnectError::GaveUp {
                        endpoint: endpoint.to_string(),
                        waited: start.elapsed(),
                        last: e.to_string(),
                    });
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
        }
    }
}
