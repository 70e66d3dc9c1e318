//! A checkpointing job's checkpoint environment (checkpoint(5)) as execd writes it into
//! `config`, and whether this shepherd serves it: the `transparent` and `userdefined`
//! interfaces are VM snapshots here; the kernel-level ones (`hibernator`, `cpr`, `cray-ckpt`,
//! `application-level`) run their own commands on the host, so they go to the stock shepherd.

use std::path::PathBuf;
use std::time::Duration;

use super::config::JobConfig;
use crate::network::policy::NetworkMode;
use crate::network::NetworkSetting;
use crate::settings::VmSettings;

/// Why a checkpointing job is not served by this shepherd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    #[error("checkpoint interface {0:?} runs its own commands on the host")]
    HostInterface(String),
    #[error("the checkpoint environment's ckpt_dir {0:?} is not an absolute path")]
    NoDirectory(String),
    #[error("the job's config has no {0}")]
    Missing(&'static str),
    #[error("snapshots need the embedded VMM, and this queue's jobs run in {0}")]
    Backend(String),
    #[error(
        "snapshots cannot capture a network device yet, and the job has one (its queue's \
         network, unless it asks for SGE_VM_NETWORK=none)"
    )]
    Network,
}

/// The checkpoint environment of a job this shepherd checkpoints by VM snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEnv {
    /// The environment's interface, as configured (`transparent` or `userdefined`).
    pub interface: String,
    /// This task's checkpoint directory: `<ckpt_dir>/sge_virtualizer.<job>.<task>`, made and
    /// written by the VMM process as the job user.
    pub dir: PathBuf,
    /// How often to checkpoint a running job (`ckpt_interval`: execd writes it only when the
    /// environment's `when` has `m`, as the larger of the queue's `min_cpu_interval` and the
    /// job's `-c`).
    pub interval: Option<Duration>,
    /// The job was re-queued with its checkpoint in the arena (`ckpt_restarted` 2): it goes on
    /// from it, where this host can see and restore it.
    pub restart: bool,
}

impl CheckpointEnv {
    /// [`Self::from_config`], where this host can also snapshot the job's VM: the queue's
    /// backend resolves to the embedded VMM here, and the job has no network device
    /// (`network_requested`: the job's `SGE_VM_NETWORK`).
    pub fn served_here(
        c: &JobConfig,
        vm: &VmSettings,
        network_requested: Option<&str>,
    ) -> Result<CheckpointEnv, NotServed> {
        let env = Self::from_config(c)?;
        let backend = crate::backend::select(vm.backend)
            .map_err(|e| NotServed::Backend(format!("no VM here ({e})")))?;
        if backend.backend.name() != "embedded" {
            return Err(NotServed::Backend(format!(
                "the {} backend ({})",
                backend.backend.name(),
                backend.reason
            )));
        }
        let no_network = match network_requested.map(str::trim) {
            Some("none") => true,
            Some("" | "queue") | None => vm.network == NetworkSetting::Mode(NetworkMode::None),
            // refused when the job starts, with its reason
            Some(_) => true,
        };
        if !no_network {
            return Err(NotServed::Network);
        }
        Ok(env)
    }

    /// The environment of a `ckpt_job=1` task, or why this shepherd leaves it to the stock one.
    pub fn from_config(c: &JobConfig) -> Result<CheckpointEnv, NotServed> {
        let interface = c
            .get("ckpt_interface")
            .ok_or(NotServed::Missing("ckpt_interface"))?;
        if !["transparent", "userdefined"]
            .iter()
            .any(|ours| interface.eq_ignore_ascii_case(ours))
        {
            return Err(NotServed::HostInterface(interface.to_string()));
        }
        let base = c.get("ckpt_dir").ok_or(NotServed::Missing("ckpt_dir"))?;
        let base_path = PathBuf::from(base.trim());
        if !base_path.is_absolute() {
            return Err(NotServed::NoDirectory(base.to_string()));
        }
        let job = c.get("job_id").ok_or(NotServed::Missing("job_id"))?.trim();
        let task = c.get("ja_task_id").unwrap_or("0").trim();
        // Only digits: nothing in the name can climb out of ckpt_dir.
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(job) || !(digits(task) || task.is_empty()) {
            return Err(NotServed::Missing("numeric job_id and ja_task_id"));
        }
        let task = if task.is_empty() { "0" } else { task };
        let interval = c
            .number("ckpt_interval", 0)
            .ok()
            .filter(|&s| s > 0)
            .map(Duration::from_secs);
        let restart = c.number("ckpt_restarted", 0).unwrap_or(0) > 1;
        Ok(CheckpointEnv {
            interface: interface.to_string(),
            dir: base_path.join(format!("sge_virtualizer.{job}.{task}")),
            interval,
            restart,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(interface: &str, dir: &str, interval: &str, restarted: &str) -> JobConfig {
        JobConfig::parse(&format!(
            "job_id=42\nja_task_id=3\nckpt_job=1\nckpt_interface={interface}\n\
             ckpt_dir={dir}\nckpt_interval={interval}\nckpt_restarted={restarted}\n\
             ckpt_signal=none\n"
        ))
    }

    #[test]
    fn transparent_and_userdefined_are_snapshots_here() {
        for interface in ["transparent", "USERDEFINED"] {
            let env =
                CheckpointEnv::from_config(&config(interface, "/var/ckpt", "300", "0")).unwrap();
            assert_eq!(env.dir, PathBuf::from("/var/ckpt/sge_virtualizer.42.3"));
            assert_eq!(env.interval, Some(Duration::from_secs(300)));
            assert!(!env.restart);
        }
    }

    #[test]
    fn only_a_checkpoint_in_the_arena_is_restored() {
        let restarted = |n| {
            CheckpointEnv::from_config(&config("transparent", "/c", "0", n))
                .unwrap()
                .restart
        };
        // 1: re-queued without a checkpoint (killed on migration): it starts over.
        assert!(!restarted("0") && !restarted("1") && restarted("2"));
        let env = CheckpointEnv::from_config(&config("transparent", "/c", "0", "2")).unwrap();
        assert_eq!(
            env.interval, None,
            "ckpt_interval 0 is no periodic checkpoint"
        );
    }

    #[test]
    fn kernel_level_interfaces_and_unusable_dirs_go_to_the_stock_shepherd() {
        for interface in ["hibernator", "cpr", "cray-ckpt", "application-level"] {
            assert_eq!(
                CheckpointEnv::from_config(&config(interface, "/c", "0", "0")),
                Err(NotServed::HostInterface(interface.into()))
            );
        }
        for dir in ["none", "relative/dir", ""] {
            assert!(matches!(
                CheckpointEnv::from_config(&config("transparent", dir, "0", "0")),
                Err(NotServed::NoDirectory(_))
            ));
        }
        let c = JobConfig::parse("job_id=../x\nckpt_interface=transparent\nckpt_dir=/c\n");
        assert!(CheckpointEnv::from_config(&c).is_err());
    }

    /// A queue whose jobs run in QEMU cannot snapshot them: the job goes to the stock shepherd.
    #[test]
    fn only_the_embedded_vmm_serves_checkpointing_jobs() {
        let settings =
            crate::settings::Settings::parse("backend = \"qemu\"\nnetwork = \"none\"\n", "test")
                .unwrap();
        let vm = settings.for_queue("all.q");
        let c = config("transparent", "/var/ckpt", "0", "0");
        assert!(matches!(
            CheckpointEnv::served_here(&c, &vm, None),
            Err(NotServed::Backend(_))
        ));
        // a kernel-level interface is refused before the backend is even looked at
        let c = config("cpr", "/var/ckpt", "0", "0");
        assert!(matches!(
            CheckpointEnv::served_here(&c, &vm, Some("none")),
            Err(NotServed::HostInterface(_))
        ));
    }
}
