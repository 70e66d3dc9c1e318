//! Reaps every child of the agent — the job and every orphan the kernel re-parents to us — and
//! reports the job's own exit with its rusage.

use std::sync::mpsc::Sender;
use std::time::Duration;

use super::event::Event;
use crate::protocol::Rusage;

/// Runs forever on its own thread.
pub fn run(job_pid: libc::pid_t, events: Sender<Event>) {
    loop {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid value for this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes only into the two live locals passed by pointer.
        let pid = unsafe { libc::wait4(-1, &mut status, 0, &mut ru) };
        if pid == job_pid {
            let _ = events.send(Event::JobExited {
                wait_status: status,
                rusage: Rusage::from_libc(&ru),
            });
        } else if pid < 0 {
            // ECHILD: nothing to reap right now; orphans may still appear later.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
