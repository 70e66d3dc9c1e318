//! The VMM thread: an event-manager loop that drives the virtio devices (queue notifications
//! through ioeventfds, host sockets of the vsock muxer) until the VM is torn down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::credentials::ThreadCredentials;
use crate::lifecycle::{ExitReason, Lifecycle};
use crate::thread_exit::{join_by, THREAD_EXIT_PATIENCE};

/// A boxed subscriber the loop drives.
pub(crate) type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Ends the loop when its eventfd is written.
struct StopSignal {
    fd: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("cannot watch the event loop's stop fd: {e:?}");
        }
    }
}

/// The running VMM thread.
pub(crate) struct EventLoop {
    thread: Option<JoinHandle<()>>,
    stop: EventFd,
}

impl EventLoop {
    /// Starts the thread with `subscribers`; it takes `run_as`, then installs `seccomp`, before
    /// it handles any event.
    pub(crate) fn spawn(
        subscribers: Vec<Subscriber>,
        seccomp: Option<seccompiler::BpfProgram>,
        run_as: Option<ThreadCredentials>,
        lifecycle: Arc<Lifecycle>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        manager.add_subscriber(Box::new(StopSignal {
            fd: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                if let Some(creds) = run_as {
                    if let Err(e) = creds.apply_to_current_thread() {
                        lifecycle.request_exit(ExitReason::DeviceError {
                            message: e.to_string(),
                        });
                        return;
                    }
                }
                if let Some(filter) = seccomp {
                    if let Err(e) = seccompiler::apply_filter(&filter) {
                        lifecycle.request_exit(ExitReason::DeviceError {
                            message: format!("cannot install the seccomp filter: {e}"),
                        });
                        return;
                    }
                }
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        if let event_manager::Error::Epoll(errno) = &e {
                            if errno.errno() == libc::EINTR {
                                continue;
                            }
                        }
                        lifecycle.request_exit(ExitReason::DeviceError {
                            message: format!("event loop failed: {e:?}"),
                        });
                        return;
                    }
                }
            })?;
        Ok(Self {
            thread: Some(thread),
            stop,
        })
    }

    /// Stops the thread and waits for it until `deadline` (a thread stuck in a request that
    /// never returns is left behind). Returns whether it was joined.
    pub(crate) fn stop_by(&mut self, deadline: Instant) -> bool {
        match self.thread.take() {
            Some(t) => {
                let _ = self.stop.write(1);
                join_by(t, deadline)
            }
            None => true,
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop_by(Instant::now() + THREAD_EXIT_PATIENCE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A FUSE file system whose server never answers: `/dev/fuse` opened and mounted, never
    /// read. A request to it waits until a fatal signal or the connection's end. Unmounted
    /// (lazily) and aborted (the device closed) on drop. Err: why it cannot be made here.
    struct SilentFuse {
        dev: Option<OwnedFd>,
        mountpoint: tempfile::TempDir,
    }

    impl SilentFuse {
        fn mount() -> Result<Self, String> {
            if !nix::unistd::geteuid().is_root() {
                return Err("not root (mounting FUSE needs CAP_SYS_ADMIN)".into());
            }
            let dev: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .map_err(|e| format!("cannot open /dev/fuse: {e}"))?
                .into();
            let mountpoint = tempfile::tempdir().map_err(|e| e.to_string())?;
            let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
            nix::mount::mount(
                Some("sgevfs-silent"),
                mountpoint.path(),
                Some("fuse"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
            .map_err(|e| format!("mount(2) of a fuse file system: {e}"))?;
            Ok(SilentFuse {
                dev: Some(dev),
                mountpoint,
            })
        }
    }

    impl Drop for SilentFuse {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.mountpoint.path(), nix::mount::MntFlags::MNT_DETACH);
            // Closing the device aborts the connection: waiting requests fail with ENOTCONN.
            self.dev.take();
        }
    }

    /// A device whose queue notification makes the event thread look up a path on the silent
    /// file system, as the virtio-fs server does for a guest's request into a share with the
    /// job user's FUSE mount inside.
    struct StallingDevice {
        notify: EventFd,
        path: std::path::PathBuf,
        entered: mpsc::Sender<()>,
    }

    impl MutEventSubscriber for StallingDevice {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.notify.read();
            let _ = self.entered.send(());
            let _ = std::fs::symlink_metadata(&self.path);
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.notify, EventSet::IN)).unwrap();
        }
    }

    /// Issue 18 item 6: stopping a VM whose event thread is stuck in a request to a FUSE file
    /// system that never answers used to join that thread for ever; now the stop gives up on
    /// it after [`THREAD_EXIT_PATIENCE`].
    #[test]
    fn stopping_never_waits_for_ever_on_an_event_thread_stuck_in_fuse() {
        let fuse = match SilentFuse::mount() {
            Ok(f) => f,
            Err(why) => {
                eprintln!(
                    "SKIPPED: stopping_never_waits_for_ever_on_an_event_thread_stuck_in_fuse: \
                     {why}"
                );
                return;
            }
        };
        let notify = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let device = StallingDevice {
            notify: notify.try_clone().unwrap(),
            path: fuse.mountpoint.path().join("anything"),
            entered: entered_tx,
        };
        let lifecycle = Arc::new(Lifecycle::new(1));
        let event_loop = EventLoop::spawn(vec![Box::new(device)], None, None, lifecycle).unwrap();
        notify.write(1).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the event thread never handled the notification");
        // Let it get into the request.
        std::thread::sleep(Duration::from_millis(200));
        let (done_tx, done) = mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            drop(event_loop);
            let _ = done_tx.send(());
        });
        let stopped = done.recv_timeout(THREAD_EXIT_PATIENCE + Duration::from_secs(5));
        // Release the stuck thread either way, so the test leaves nothing behind.
        drop(fuse);
        stopped.expect("stopping the event loop waited for its stuck thread");
        assert!(start.elapsed() >= THREAD_EXIT_PATIENCE - Duration::from_millis(100));
    }
}
