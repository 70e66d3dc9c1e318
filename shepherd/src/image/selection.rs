//! Which OS image a job runs in: the one it asks for in [`JOB_IMAGE_VAR`], when the
//! administrator allows that image, else its queue's image from the virtualizer's settings,
//! else none (the guest's initramfs).

use super::{validate_name, ImageError};

/// The job environment variable (`qsub -v SGE_VM_IMAGE=NAME`) that asks for an image.
pub const JOB_IMAGE_VAR: &str = "SGE_VM_IMAGE";

/// What the administrator configured for a queue.
#[derive(Debug, Clone, Copy)]
pub struct ImagePolicy<'a> {
    /// The queue's image; `None`: the initramfs.
    pub queue_image: Option<&'a str>,
    /// Images a job may ask for; `"*"` allows every image in the store.
    pub job_may_request: &'a [String],
}

/// The image for a job that asked for `requested` (the value of [`JOB_IMAGE_VAR`], if set).
/// Asking for an image that is not allowed is the job's error, and says which are.
pub fn choose(policy: &ImagePolicy, requested: Option<&str>) -> Result<Option<String>, ImageError> {
    match requested.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(policy.queue_image.map(str::to_string)),
        Some(name) => {
            validate_name(name)?;
            let allowed = policy.job_may_request.iter().any(|a| a == "*" || a == name)
                || policy.queue_image == Some(name);
            if allowed {
                Ok(Some(name.to_string()))
            } else {
                Err(ImageError::NotAllowed {
                    name: name.to_string(),
                    allowed: if policy.job_may_request.is_empty() {
                        "none".into()
                    } else {
                        policy.job_may_request.join(", ")
                    },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_image_applies_unless_the_job_asks() {
        let allowed = vec!["bookworm".to_string()];
        let policy = ImagePolicy {
            queue_image: Some("bullseye"),
            job_may_request: &allowed,
        };
        assert_eq!(choose(&policy, None).unwrap().as_deref(), Some("bullseye"));
        assert_eq!(
            choose(&policy, Some(" ")).unwrap().as_deref(),
            Some("bullseye")
        );
        assert_eq!(
            choose(&policy, Some("bookworm")).unwrap().as_deref(),
            Some("bookworm")
        );
        assert_eq!(
            choose(&policy, Some("bullseye")).unwrap().as_deref(),
            Some("bullseye")
        );
    }

    #[test]
    fn an_image_the_administrator_did_not_allow_is_the_jobs_error() {
        let policy = ImagePolicy {
            queue_image: None,
            job_may_request: &[],
        };
        assert_eq!(choose(&policy, None).unwrap(), None);
        let err = choose(&policy, Some("bookworm")).unwrap_err();
        assert!(matches!(err, ImageError::NotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("allowed: none"), "{err}");
        assert!(matches!(
            choose(&policy, Some("../x")),
            Err(ImageError::InvalidName(_))
        ));
        let any = vec!["*".to_string()];
        let open = ImagePolicy {
            queue_image: None,
            job_may_request: &any,
        };
        assert_eq!(choose(&open, Some("x")).unwrap().as_deref(), Some("x"));
    }
}
