//! What a job on this host needs, checked ahead of any job: the settings file, each queue's
//! guest kernel, initramfs and OS images, a backend that can run VMs, and the directories the
//! shepherd writes to as root. Each problem says what is wrong, whose it is and how to fix it.
//! Used by `sge_virtualizer check` (an administrator's command and a Grid Engine load sensor).

use std::path::{Path, PathBuf};

use crate::backend;
use crate::guest_image;
use crate::guest_ram::{self, GuestRam, JobMemoryRequest};
use crate::host_memory;
use crate::image::store::ImageStore;
use crate::path_trust::{self, UntrustedPath};
use crate::settings::{Settings, VmSettings};

/// The name of the top-level settings, used by queues without a section of their own.
pub const DEFAULT_SCOPE: &str = "(default)";

/// One thing that keeps jobs from running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `settings`, `host`, or the queue whose jobs it stops.
    pub scope: String,
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}\n    fix: {}", self.scope, self.what, self.fix)
    }
}

/// Where the settings come from.
#[derive(Debug, Clone)]
pub struct SettingsSource {
    pub path: PathBuf,
    /// A missing file is an error (named explicitly) or the built-in defaults.
    pub required: bool,
}

impl SettingsSource {
    /// `$SGE_VIRTUALIZER_CONFIG`, else the default path, as the shepherd reads them.
    pub fn from_env() -> Self {
        match std::env::var_os(crate::settings::PATH_ENV).filter(|v| !v.is_empty()) {
            Some(p) => Self {
                path: PathBuf::from(p),
                required: true,
            },
            None => Self {
                path: PathBuf::from(crate::settings::DEFAULT_PATH),
                required: false,
            },
        }
    }
}

/// Checks the settings and every queue in `queues` (all queues the settings name, and the
/// default, when empty).
pub fn check(source: &SettingsSource, queues: &[String]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let settings = match Settings::load_from(&source.path, source.required) {
        Ok(s) => s,
        Err(e) => {
            problems.push(Problem {
                scope: "settings".into(),
                what: e.to_string(),
                fix: format!(
                    "correct {} (see sge_virtualizer(8), CONFIGURATION FILE); until then every \
                     job on this host fails",
                    source.path.display()
                ),
            });
            return problems;
        }
    };
    if source.path.exists() {
        problems.extend(untrusted(
            path_trust::check_file(&source.path, 0),
            &source.path,
            "settings",
            "the settings file",
        ));
    }
    let scopes: Vec<String> = if queues.is_empty() {
        std::iter::once(DEFAULT_SCOPE.to_string())
            .chain(settings.queues.keys().cloned())
            .collect()
    } else {
        queues.to_vec()
    };
    for scope in &scopes {
        let vm = settings.for_queue(scope);
        for p in check_queue(scope, &vm) {
            // A problem the queues inherit from the top level is told once, naming them all.
            match problems
                .iter_mut()
                .find(|q| q.what == p.what && q.fix == p.fix)
            {
                Some(same) => same.scope = format!("{}, {}", same.scope, p.scope),
                None => problems.push(p),
            }
        }
    }
    problems.extend(check_directories(&settings, &scopes));
    problems
}

/// One queue's kernel, initramfs, images and backend.
fn check_queue(scope: &str, vm: &VmSettings) -> Vec<Problem> {
    let problem = |what: String, fix: String| Problem {
        scope: scope.to_string(),
        what,
        fix,
    };
    let mut problems = Vec::new();
    for (file, what, is_format) in [
        (
            &vm.kernel,
            "guest kernel",
            guest_image::is_kernel as fn(&[u8]) -> bool,
        ),
        (&vm.initramfs, "guest initramfs", guest_image::is_initramfs),
    ] {
        match guest_image::read_head(file) {
            Err(e) => problems.push(problem(
                format!("{what} {}: {e}", file.display()),
                format!(
                    "install it (scripts/setup.sh builds both into build/guest; install them in \
                     {}) or name the right path in the settings",
                    crate::guest_image::INSTALLED_DIR
                ),
            )),
            Ok(head) if !is_format(&head) => problems.push(problem(
                format!("{what} {} is not a {what} file", file.display()),
                "replace it with the built vmlinux / initramfs.cpio".into(),
            )),
            Ok(_) => problems.extend(untrusted(
                path_trust::check_file(file, 0),
                file,
                scope,
                what,
            )),
        }
    }
    let store = ImageStore::new(&vm.image_store);
    for (name, whose) in vm.image.iter().map(|n| (n, "the queue's OS image")).chain(
        vm.job_images
            .iter()
            .filter(|n| n.as_str() != "*")
            .map(|n| (n, "an OS image jobs may request")),
    ) {
        if let Err(e) = store.verified(name) {
            problems.push(problem(
                format!("{whose} {name:?}: {e}"),
                format!(
                    "build it (sge_virtualizer image build --debootstrap SUITE {name}) or \
                     remove it from the settings"
                ),
            ));
        }
    }
    // A guest whose start the host cannot back is refused at every start, as a shortage.
    let ram = GuestRam::choose(
        &vm.ram,
        &JobMemoryRequest::default(),
        host_memory::total_mib(),
    );
    if let Err(short) = host_memory::can_back(guest_ram::start_footprint_mib(
        ram.mib,
        vm.ram.vmm_overhead_mib,
    )) {
        problems.push(problem(
            format!("{ram}: {short}"),
            "lower memory_mib or memory_max_mib for the queue, or give the host more memory".into(),
        ));
    }
    if let Err(e) = backend::select(vm.backend) {
        problems.push(problem(
            format!("no backend can run VMs ({:?}): {e}", vm.backend),
            "install Debian's qemu-system-x86 and vhost-device-vsock (scripts/setup.sh), or \
             give the host KVM with hardware virtualization"
                .into(),
        ));
    }
    problems
}

/// The directories the shepherd writes in as root.
fn check_directories(settings: &Settings, scopes: &[String]) -> Vec<Problem> {
    let mut dirs: Vec<PathBuf> = scopes
        .iter()
        .map(|s| settings.for_queue(s).image_store)
        .collect();
    dirs.push(PathBuf::from("/run/sge_virtualizer"));
    dirs.sort();
    dirs.dedup();
    dirs.iter()
        .filter(|d| d.exists())
        .flat_map(|d| untrusted(path_trust::check_directories(d, 0), d, "host", "directory"))
        .collect()
}

/// `result` of a [`path_trust`] check of `path` as a problem: whoever can change the file or a
/// directory above it chooses what every job boots or where root writes.
fn untrusted(
    result: Result<(), UntrustedPath>,
    path: &Path,
    scope: &str,
    what: &str,
) -> Option<Problem> {
    let e = result.err()?;
    let culprit = match &e {
        UntrustedPath::Unreadable { path, .. }
        | UntrustedPath::Owner { path, .. }
        | UntrustedPath::Writable { path, .. } => path.display().to_string(),
    };
    Some(Problem {
        scope: scope.to_string(),
        what: format!("{what} {}: {e}", path.display()),
        fix: format!("chown root: {culprit} and chmod go-w {culprit}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_others_can_write_is_a_problem_with_its_fix() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let file = dir.join("vmlinux");
        std::fs::write(&file, b"\x7fELF").unwrap();
        let check = |f: &Path| untrusted(path_trust::check_file(f, 0), f, "q", "guest kernel");
        let p = check(&file).expect("a problem");
        if !nix::unistd::geteuid().is_root() {
            return; // the temporary directory itself is not root's
        }
        assert!(
            p.what
                .contains("can be changed by users other than its owner"),
            "{p}"
        );
        assert_eq!(
            p.fix,
            format!("chown root: {d} and chmod go-w {d}", d = dir.display())
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check(&file), None);
    }

    #[test]
    fn unparsable_settings_are_one_problem_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.toml");
        std::fs::write(&path, "kernel = [").unwrap();
        let problems = check(
            &SettingsSource {
                path: path.clone(),
                required: true,
            },
            &[],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].scope, "settings");
        assert!(problems[0].fix.contains(&path.display().to_string()));
    }

    #[test]
    fn a_queue_whose_kernel_is_missing_is_named_with_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.toml");
        let missing = tmp.path().join("no-such-vmlinux");
        std::fs::write(
            &path,
            format!(
                "[queues.\"broken.q\"]\nkernel = \"{}\"\n",
                missing.display()
            ),
        )
        .unwrap();
        let problems = check(
            &SettingsSource {
                path,
                required: true,
            },
            &["broken.q".to_string()],
        );
        assert!(
            problems.iter().any(|p| p.scope == "broken.q"
                && p.what.contains("guest kernel")
                && p.what.contains(&missing.display().to_string())),
            "{problems:?}"
        );
    }
}
