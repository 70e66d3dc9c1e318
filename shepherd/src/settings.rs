//! The virtualizer's own configuration file (TOML): guest image, VM size, backend, and
//! per-queue overrides. Default path [`DEFAULT_PATH`], overridden by the environment variable
//! [`PATH_ENV`]. A missing file at the default path means built-in defaults; a file that is
//! named but missing, or that does not parse, is an error.
//!
//! ```toml
//! kernel = "/usr/lib/sge_virtualizer/vmlinux"      # the default; root-owned, see guest_image
//! initramfs = "/usr/lib/sge_virtualizer/initramfs.cpio"
//! memory_mib = 512          # guest RAM for jobs that request none (default: the host's
//!                           # memory less memory_reserve_mib; see guest_ram)
//! memory_max_mib = 65536    # the most any job's guest gets (a cap on every rule)
//! memory_reserve_mib = 1024 # host memory kept back from a guest sized from the host
//! memory_requests = ["mem_free", "m_mem_free"]  # consumables whose request sizes the guest
//! huge_pages = false        # guest RAM on transparent huge pages (embedded VMM)
//! vcpus = 2                 # default: the job's slots on this host
//! backend = "auto"          # auto | embedded | qemu
//! vmm_overhead_mib = 192    # host memory the VMM needs beyond guest RAM (h_vmem sizing)
//! stock_shepherd = "/usr/sbin/sge_shepherd"   # for delegated jobs; default from bootstrap
//! shortage_limit = 3        # a queue's VM-start shortages in a row that re-queue the job;
//! shortage_window_s = 3600  # the next one within the window puts the queue in error
//! extra_cmdline = ""
//! share_job_dirs = true     # share cwd, $HOME, $TMPDIR and the script's directory
//! shares = ["/data"]        # more host directories the jobs see at the same paths
//! image_store = "/var/lib/sge_virtualizer/images"
//! image = "bookworm"        # OS image jobs run in (default: the initramfs)
//! job_images = ["bullseye"] # images a job may ask for with -v SGE_VM_IMAGE=NAME ("*": any)
//! delegate = "stock"        # interactive, qrsh -inherit and checkpointing jobs: "stock" runs
//!                           # them with the stock shepherd on the host, "never" refuses them
//! network = "host-user"     # host-user | none | { allow = ["HOST:PORTS", ...], dns = true,
//!                           # inbound_tcp = [...], inbound_udp = [...] } (see network::policy)
//! [queues."gpu.q"]
//! memory_mib = 4096
//! kernel = "/srv/images/gpu/vmlinux"
//! [queues."outsiders.q"]
//! network = { allow = ["license.example.org:27000-27009"] }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::BackendChoice;
use crate::guest_image;
use crate::guest_ram::RamPolicy;
use crate::image;
use crate::network::NetworkSetting;
use crate::sge::delegation::DelegationPolicy;
use crate::sge::shortage_streak::{ShortagePolicy, DEFAULT_LIMIT, DEFAULT_WINDOW};

pub const DEFAULT_PATH: &str = "/etc/sge_virtualizer.toml";
pub const PATH_ENV: &str = "SGE_VIRTUALIZER_CONFIG";

pub const DEFAULT_VMM_OVERHEAD_MIB: u32 = 192;
/// Host memory kept back from a guest sized from the host's memory.
pub const DEFAULT_MEMORY_RESERVE_MIB: u32 = 1024;
/// Memory consumables whose request sizes a job's guest when it has no `h_vmem`/`s_vmem`.
pub const DEFAULT_MEMORY_REQUESTS: [&str; 2] = ["mem_free", "m_mem_free"];

/// Why the settings file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("can't read sge_virtualizer settings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bad sge_virtualizer settings {path}: {message}")]
    Parse { path: String, message: String },
}

/// Values a queue section may override.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOverrides {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub memory_mib: Option<u32>,
    pub memory_max_mib: Option<u32>,
    pub memory_requests: Option<Vec<String>>,
    pub huge_pages: Option<bool>,
    pub vcpus: Option<u8>,
    pub backend: Option<BackendChoice>,
    pub extra_cmdline: Option<String>,
    pub share_job_dirs: Option<bool>,
    pub shares: Option<Vec<PathBuf>>,
    pub image: Option<String>,
    pub job_images: Option<Vec<String>>,
    pub delegate: Option<DelegationPolicy>,
    pub network: Option<NetworkSetting>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub memory_mib: Option<u32>,
    pub memory_max_mib: Option<u32>,
    pub memory_reserve_mib: Option<u32>,
    pub memory_requests: Option<Vec<String>>,
    pub huge_pages: Option<bool>,
    pub vcpus: Option<u8>,
    pub backend: Option<BackendChoice>,
    pub extra_cmdline: Option<String>,
    pub share_job_dirs: Option<bool>,
    pub shares: Option<Vec<PathBuf>>,
    pub image: Option<String>,
    pub job_images: Option<Vec<String>>,
    pub delegate: Option<DelegationPolicy>,
    pub network: Option<NetworkSetting>,
    pub image_store: Option<PathBuf>,
    pub vmm_overhead_mib: Option<u32>,
    pub stock_shepherd: Option<PathBuf>,
    pub shortage_limit: Option<u32>,
    pub shortage_window_s: Option<u64>,
    #[serde(default)]
    pub queues: BTreeMap<String, VmOverrides>,
}

/// The VM settings for one job after applying the queue's overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// How the guest's RAM is sized (see [`crate::guest_ram`]).
    pub ram: RamPolicy,
    /// Memory consumables whose request sizes the guest (looked up in the job's requests).
    pub memory_requests: Vec<String>,
    /// Guest RAM on transparent huge pages where the host has them.
    pub huge_pages: bool,
    /// `None`: one per slot.
    pub vcpus: Option<u8>,
    pub backend: BackendChoice,
    pub extra_cmdline: String,
    /// Share the job's cwd, `$HOME`, `$TMPDIR` and script directory into the guest.
    pub share_job_dirs: bool,
    /// More host directories to share.
    pub shares: Vec<PathBuf>,
    /// The queue's OS image; `None`: the initramfs.
    pub image: Option<String>,
    /// Images a job may request.
    pub job_images: Vec<String>,
    /// What happens to tasks that are not virtualized.
    pub delegate: DelegationPolicy,
    /// The job's network (see [`crate::network::policy`]).
    pub network: NetworkSetting,
    pub image_store: PathBuf,
    /// How many shortages in a row the queue may have (host-wide setting).
    pub shortage: ShortagePolicy,
}

impl Settings {
    /// Parses TOML text; `path` is for messages.
    pub fn parse(text: &str, path: &str) -> Result<Self, SettingsError> {
        toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: path.into(),
            message: e.message().to_string(),
        })
    }

    /// Loads from `$SGE_VIRTUALIZER_CONFIG` or the default path.
    pub fn load() -> Result<Self, SettingsError> {
        match std::env::var_os(PATH_ENV).filter(|v| !v.is_empty()) {
            Some(p) => Self::load_from(Path::new(&p), true),
            None => Self::load_from(Path::new(DEFAULT_PATH), false),
        }
    }

    /// Loads `path`; a missing file is an error only when `required`.
    pub fn load_from(path: &Path, required: bool) -> Result<Self, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Settings::default())
            }
            Err(source) => Err(SettingsError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// The settings for a job in `queue`: queue section > top level > environment/defaults.
    pub fn for_queue(&self, queue: &str) -> VmSettings {
        let q = self.queues.get(queue).cloned().unwrap_or_default();
        let d = self;
        let kernel = q.kernel.or_else(|| d.kernel.clone());
        let initramfs = q.initramfs.or_else(|| d.initramfs.clone());
        // The shepherd boots only configured or installed files, never a build tree's.
        let image = guest_image::locate(
            kernel.as_deref(),
            initramfs.as_deref(),
            guest_image::Search::Installed,
        );
        VmSettings {
            kernel: image.kernel,
            initramfs: image.initrd,
            ram: RamPolicy {
                fixed_mib: q.memory_mib.or(d.memory_mib),
                max_mib: q.memory_max_mib.or(d.memory_max_mib),
                reserve_mib: d.memory_reserve_mib.unwrap_or(DEFAULT_MEMORY_RESERVE_MIB),
                vmm_overhead_mib: d.vmm_overhead_mib.unwrap_or(DEFAULT_VMM_OVERHEAD_MIB),
            },
            memory_requests: q
                .memory_requests
                .or_else(|| d.memory_requests.clone())
                .unwrap_or_else(|| DEFAULT_MEMORY_REQUESTS.map(String::from).to_vec()),
            huge_pages: q.huge_pages.or(d.huge_pages).unwrap_or(false),
            vcpus: q.vcpus.or(d.vcpus),
            backend: q.backend.or(d.backend).unwrap_or(BackendChoice::Auto),
            extra_cmdline: q
                .extra_cmdline
                .or_else(|| d.extra_cmdline.clone())
                .unwrap_or_default(),
            share_job_dirs: q.share_job_dirs.or(d.share_job_dirs).unwrap_or(true),
            shares: q.shares.or_else(|| d.shares.clone()).unwrap_or_default(),
            image: q.image.or_else(|| d.image.clone()),
            job_images: q
                .job_images
                .or_else(|| d.job_images.clone())
                .unwrap_or_default(),
            delegate: q.delegate.or(d.delegate).unwrap_or_default(),
            network: q.network.or_else(|| d.network.clone()).unwrap_or_default(),
            image_store: image::store_dir(self.image_store.as_deref()),
            shortage: ShortagePolicy {
                limit: self.shortage_limit.unwrap_or(DEFAULT_LIMIT),
                window: self
                    .shortage_window_s
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_WINDOW),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegation_is_stock_unless_a_queue_says_never() {
        let s = Settings::parse("[queues.\"outsiders.q\"]\ndelegate = \"never\"\n", "t").unwrap();
        assert_eq!(s.for_queue("all.q").delegate, DelegationPolicy::Stock);
        assert_eq!(s.for_queue("outsiders.q").delegate, DelegationPolicy::Never);
        assert!(Settings::parse("delegate = \"sometimes\"\n", "t").is_err());
    }

    #[test]
    fn full_file_with_queue_override() {
        let s = Settings::parse(
            r#"
kernel = "/k"
initramfs = "/i"
memory_mib = 512
backend = "qemu"
vmm_overhead_mib = 100
stock_shepherd = "/usr/sbin/sge_shepherd"
image = "bookworm"
shares = ["/data"]
image_store = "/srv/images"
shortage_limit = 5
shortage_window_s = 60
memory_reserve_mib = 2048
[queues."big.q"]
memory_mib = 2048
memory_max_mib = 8192
memory_requests = ["bigmem"]
huge_pages = true
vcpus = 4
kernel = "/k2"
share_job_dirs = false
image = "bullseye"
job_images = ["*"]
"#,
            "t",
        )
        .unwrap();
        let all = s.for_queue("all.q");
        assert_eq!(all.kernel, PathBuf::from("/k"));
        assert_eq!(all.initramfs, PathBuf::from("/i"));
        assert_eq!(all.ram.fixed_mib, Some(512));
        assert_eq!((all.ram.max_mib, all.ram.reserve_mib), (None, 2048));
        assert_eq!(all.ram.vmm_overhead_mib, 100);
        assert_eq!(all.memory_requests, DEFAULT_MEMORY_REQUESTS);
        assert_eq!(all.vcpus, None);
        assert_eq!(all.backend, BackendChoice::Qemu);
        let big = s.for_queue("big.q");
        assert_eq!(big.kernel, PathBuf::from("/k2"));
        assert_eq!(big.initramfs, PathBuf::from("/i"));
        assert_eq!((big.ram.fixed_mib, big.vcpus), (Some(2048), Some(4)));
        assert_eq!((big.ram.max_mib, big.ram.reserve_mib), (Some(8192), 2048));
        assert_eq!(big.memory_requests, ["bigmem"]);
        assert!(big.huge_pages && !all.huge_pages);
        assert!(all.share_job_dirs && !big.share_job_dirs);
        assert_eq!(all.shares, [PathBuf::from("/data")]);
        assert_eq!(big.shares, [PathBuf::from("/data")]);
        assert_eq!(all.image.as_deref(), Some("bookworm"));
        assert_eq!(big.image.as_deref(), Some("bullseye"));
        assert!(all.job_images.is_empty());
        assert_eq!(big.job_images, ["*"]);
        assert_eq!(big.image_store, PathBuf::from("/srv/images"));
        assert_eq!(
            big.shortage,
            ShortagePolicy {
                limit: 5,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(
            Settings::default().for_queue("q").shortage,
            ShortagePolicy::default()
        );
        assert_eq!(
            s.stock_shepherd,
            Some(PathBuf::from("/usr/sbin/sge_shepherd"))
        );
    }

    #[test]
    fn errors_name_the_file() {
        let e = Settings::parse("memory_mib = \"lots\"", "/etc/x.toml").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("bad sge_virtualizer settings /etc/x.toml"));
        assert!(Settings::parse("no_such_key = 1", "t").is_err());
        assert!(Settings::parse("backend = \"vmware\"", "t").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("none.toml");
        assert_eq!(
            Settings::load_from(&missing, false).unwrap(),
            Settings::default()
        );
        assert!(matches!(
            Settings::load_from(&missing, true),
            Err(SettingsError::Read { .. })
        ));
    }

    /// The test executable lives in the source tree, whose `build/guest/` has a kernel once
    /// the guest is built: the shepherd must not boot it (any writable ancestor of an installed
    /// binary could hold one).
    #[test]
    fn without_a_configured_kernel_the_shepherd_boots_the_installed_one() {
        if std::env::var_os("SGE_VIRTUALIZER_KERNEL").is_some() {
            eprintln!("SKIPPED: installed-kernel test: SGE_VIRTUALIZER_KERNEL is set");
            return;
        }
        let v = Settings::default().for_queue("q");
        assert_eq!(
            v.kernel,
            Path::new(guest_image::INSTALLED_DIR).join(guest_image::KERNEL_FILE)
        );
    }

    #[test]
    fn by_default_guest_ram_comes_from_the_host_and_the_jobs_requests() {
        let v = Settings::default().for_queue("q");
        assert_eq!(v.ram.fixed_mib, None);
        assert_eq!(v.ram.max_mib, None);
        assert_eq!(v.ram.reserve_mib, DEFAULT_MEMORY_RESERVE_MIB);
        assert_eq!(v.ram.vmm_overhead_mib, DEFAULT_VMM_OVERHEAD_MIB);
        assert_eq!(v.memory_requests, DEFAULT_MEMORY_REQUESTS);
        assert!(Settings::parse("[queues.q]\nmemory_reserve_mib = 5\n", "t").is_err());
    }
}
