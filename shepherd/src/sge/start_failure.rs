//! Whose fault a VM that did not start is, decided by its cause rather than by where it
//! happened (the table in sge_virtualizer(8), "Failure states"):
//!
//! * what the job asked for (its directories, an OS image it chose, a guest it shaped with its
//!   own limits) → the job's error;
//! * what the administrator configured for the queue (guest kernel, initramfs, the queue's OS
//!   image, the image store, a backend this host lacks) → the queue's error: retrying here
//!   cannot help, and the scheduler must send the job elsewhere;
//! * anything else that may pass (memory, processes, descriptors, a VM that could not be
//!   created now) → a shortage, which the caller bounds with [`super::shortage_streak`].

use super::fault::{Fault, JobCause};
use crate::launch::LaunchError;
use crate::network::NetworkError;

/// Who shaped what the VM boots before its agent connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootOwner {
    /// Only the queue's configuration: its kernel, initramfs, image and memory size.
    Queue,
    /// The job too: it chose its OS image, or its limits made the guest smaller than the
    /// queue's size.
    Job,
}

/// The fault and the `error` line for a VM the launch could not start; `image_owner` is who
/// chose the OS image (the job, or the queue when the job chose none or the queue's own).
pub fn launch_failure(e: &LaunchError, image_owner: BootOwner) -> (Fault, String) {
    match e {
        LaunchError::Network(NetworkError::JobRequest(_)) => (
            Fault::Job(JobCause::Request),
            format!("sge_virtualizer: the job's network request: {e}"),
        ),
        LaunchError::SharedDir(_) | LaunchError::ShareIdentity { .. } => (
            Fault::Job(JobCause::Cwd),
            format!("sge_virtualizer: can't give the job its directories: {e}"),
        ),
        LaunchError::Image(_) if image_owner == BootOwner::Job => (
            Fault::Job(JobCause::Request),
            format!("sge_virtualizer: the job's OS image is unusable: {e}"),
        ),
        LaunchError::Image(_)
        | LaunchError::Network(NetworkError::AllowEntry { .. } | NetworkError::PasstMissing)
        | LaunchError::UntrustedImage { .. }
        | LaunchError::KernelMissing(_)
        | LaunchError::InitrdMissing(_)
        | LaunchError::UntrustedGuestImage(_)
        | LaunchError::BackendUnavailable(_)
        | LaunchError::GuestUnbootable(_) => (
            Fault::Queue,
            format!("sge_virtualizer: this queue's VMs cannot start on this host: {e}"),
        ),
        // Judged by the caller, which knows whether the job checkpoints (the checkpoint is
        // kept and the job re-queued, or the job's error); here only for completeness.
        LaunchError::RestoreRefused {
            elsewhere: false, ..
        } => (
            Fault::Job(JobCause::Request),
            format!("sge_virtualizer: {e}"),
        ),
        LaunchError::RestoreRefused {
            elsewhere: true, ..
        }
        | LaunchError::VmStart(_)
        | LaunchError::Network(_)
        | LaunchError::Io(_)
        | LaunchError::RunDir(_)
        | LaunchError::VmmProcess(_) => (
            Fault::Shortage,
            format!("sge_virtualizer: can't start the job's VM now: {e}"),
        ),
    }
}

/// The fault for a VM that ended by itself before its agent connected, when it is not a
/// matter of counting: `None` when the job shaped the guest (then the job's own start attempts
/// bound it, as for a guest that never connects).
pub fn did_not_boot(owner: BootOwner) -> Option<Fault> {
    match owner {
        BootOwner::Queue => Some(Fault::Queue),
        BootOwner::Job => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageError;
    use std::path::PathBuf;

    #[test]
    fn a_job_asking_for_more_network_than_its_queue_gives_is_the_jobs_error() {
        let e = LaunchError::Network(NetworkError::JobRequest("SGE_VM_NETWORK=\"all\"".into()));
        for owner in [BootOwner::Queue, BootOwner::Job] {
            assert_eq!(launch_failure(&e, owner).0, Fault::Job(JobCause::Request));
        }
    }

    #[test]
    fn the_administrators_guest_is_the_queues_and_passing_shortages_are_shortages() {
        let queue = [
            LaunchError::KernelMissing(PathBuf::from("/k")),
            LaunchError::InitrdMissing(PathBuf::from("/i")),
            LaunchError::BackendUnavailable("no KVM, no QEMU".into()),
            LaunchError::GuestUnbootable("not a kernel".into()),
            LaunchError::Network(NetworkError::PasstMissing),
            LaunchError::Network(NetworkError::AllowEntry {
                entry: "lic.invalid:27000".into(),
                reason: "does not resolve".into(),
            }),
        ];
        for e in &queue {
            for owner in [BootOwner::Queue, BootOwner::Job] {
                let (fault, message) = launch_failure(e, owner);
                assert_eq!(fault, Fault::Queue, "{e}");
                assert!(message.contains(&e.to_string()), "{message}");
            }
        }
        let shortage = [
            LaunchError::VmStart("cannot allocate guest memory".into()),
            LaunchError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)),
            LaunchError::Network(NetworkError::PasstStart("fork: EAGAIN".into())),
        ];
        for e in &shortage {
            assert_eq!(
                launch_failure(e, BootOwner::Queue).0,
                Fault::Shortage,
                "{e}"
            );
        }
    }

    #[test]
    fn an_image_is_the_jobs_only_when_the_job_chose_it() {
        let e = || LaunchError::Image(ImageError::InvalidName("..".into()));
        assert_eq!(
            launch_failure(&e(), BootOwner::Job).0,
            Fault::Job(JobCause::Request)
        );
        assert_eq!(launch_failure(&e(), BootOwner::Queue).0, Fault::Queue);
    }

    #[test]
    fn a_guest_that_does_not_boot_is_the_queues_unless_the_job_shaped_it() {
        assert_eq!(did_not_boot(BootOwner::Queue), Some(Fault::Queue));
        assert_eq!(did_not_boot(BootOwner::Job), None);
    }
}
