//! The VMM thread: an event-manager loop that drives the virtio devices (queue notifications
//! through ioeventfds, host sockets of the vsock muxer) until the VM is torn down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::credentials::ThreadCredentials;
use crate::lifecycle::{ExitReason, Lifecycle};

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

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
