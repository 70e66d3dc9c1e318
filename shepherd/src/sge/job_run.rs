//! One batch job from start to `exit_status`: the order of the stock shepherd (pid, prolog,
//! pe_start, addgrpid, job, usage, pe_stop, epilog, exit_status) with the job in a microVM.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use guest_agent::protocol::{Rusage, Spawn, SpawnStage, StdinMode};

use super::active_dir::ActiveDir;
use super::checkpoint_env::CheckpointEnv;
use super::config::{JobConfig, TaskKind};
use super::control_method::{ControlMethods, MethodRunner};
use super::delegation::{self, DelegationPolicy};
use super::environment::JobEnvironment;
use super::fault::{Fault, JobCause};
use super::file_size_limit::FileSizeLimited;
use super::guest_rusage;
use super::job_argv::{self, JobCommand, ScriptDelivery, SCRIPT_ENV};
use super::job_checkpoints::{ArenaMark, JobCheckpoints};
use super::job_requests;
use super::job_user::JobUser;
use super::limits;
use super::output_paths::{self, JobStreams, OutputKind};
use super::procedure::{exit_code, Procedure, ProcedureKind, RunAs};
use super::shortage_streak::{ShortagePolicy, ShortageStreak, ShortageVerdict};
use super::signal_relay::SignalRelay;
use super::signal_source::SignalSource;
use super::signals::{execd_intent, read_signal_file};
use super::spawn_size;
use super::start_attempts::{StartAttempts, MAX_NEVER_CONNECTED};
use super::start_failure::{self, BootOwner};
use super::state::{job_exit_state, ShepherdState};
use super::usage::{JobEnd, UsageRecord};
use crate::guest_ram::{self, GuestRam, JobMemoryRequest};
use crate::host_memory;
use crate::image::selection::{self, ImagePolicy};
use crate::launch::{
    self, ImageChoice, JobError, JobFilesystems, JobIo, LaunchSpec, StdinSource, VmmCredentials,
};
use crate::settings::{Settings, VmSettings};
use crate::shared_dirs::{job_shares, JobPaths, SharedDir};

/// Poll tick while a procedure runs.
const TICK: Duration = Duration::from_millis(100);

/// The state `exit_status` gets if this process dies of a panic now; read by the panic hook.
/// Before the job it is 11 (queue error, job re-queued), not 7, which would stop the host.
static STATE_IF_CRASHED: AtomicI32 = AtomicI32::new(ShepherdState::BeforeJob as i32);
static CRASH_DIR: Mutex<Option<ActiveDir>> = Mutex::new(None);

/// A failure that ends the shepherd with `state`, its message the first line of `error`.
struct Failure {
    state: ShepherdState,
    message: String,
    /// Also write `noresources` (re-queue without queue error).
    no_resources: bool,
}

impl Failure {
    fn new(state: ShepherdState, message: impl Into<String>) -> Self {
        Failure {
            state,
            message: message.into(),
            no_resources: false,
        }
    }
    /// A failure whose state follows from who owns its cause.
    fn of(fault: Fault, message: impl Into<String>) -> Self {
        Failure {
            state: fault.state(),
            message: message.into(),
            no_resources: fault.no_resources(),
        }
    }
    fn no_resources(message: impl Into<String>) -> Self {
        Self::of(Fault::Shortage, message)
    }
}

/// Entry point when started by execd. Returns the process exit code (the shepherd state).
pub fn run_as_shepherd() -> i32 {
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "sge_shepherd".into());
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut dir = ActiveDir::new(cwd.clone());

    let config = match JobConfig::read(&cwd.join("config")) {
        Ok(c) => c,
        Err(e) => return finish_early(&dir, ShepherdState::BeforeProlog, &e.to_string()),
    };
    // Not ours to run: hand over before writing anything (the stock shepherd writes its files).
    let mut checkpoints = None;
    if config.task_kind() != TaskKind::Batch {
        // Unreadable settings cannot say whether the queue allows it: refuse; every queue of
        // this host reads the same file, so it is the host's error.
        let settings = match Settings::load() {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("sge_virtualizer: {e}");
                return finish_early(&dir, Fault::Host.state(), &msg);
            }
        };
        let queue = config.get("queue").unwrap_or_default();
        let vm = settings.for_queue(queue);
        let not_served = if config.task_kind() == TaskKind::Checkpointing {
            let network = JobEnvironment::read(&cwd.join("environment"))
                .ok()
                .and_then(|env| {
                    env.get(crate::network::policy::JOB_NETWORK_VAR)
                        .map(str::to_string)
                });
            // execd starts us with euid = the admin user, who may not open /dev/kvm: the
            // backend is probed as root, and the euid given back for the stock shepherd.
            let served = as_root(|| CheckpointEnv::served_here(&config, &vm, network.as_deref()));
            match served {
                Ok(env) => {
                    checkpoints = Some(env);
                    None
                }
                Err(why) => Some(format!("checkpointing job: {why}")),
            }
        } else {
            Some("interactive jobs and qrsh -inherit tasks run on the host".to_string())
        };
        if let Some(why) = &not_served {
            if vm.delegate == DelegationPolicy::Never {
                let msg = format!(
                    "sge_virtualizer: queue {queue} runs every job in a VM (delegate = \"never\"), \
                     and this one cannot: {why}"
                );
                // A job error, not the queue's; 100 rather than 30 because an interactive
                // job in Eqw would leave its qrsh waiting for ever, while 100 finishes it.
                return finish_early(&dir, ShepherdState::AfterJob, &msg);
            }
            let stock = settings
                .stock_shepherd
                .unwrap_or_else(delegation::stock_shepherd_from_env);
            let err = delegation::exec_stock(&stock, &argv0);
            return finish_early(
                &dir,
                ShepherdState::BeforeJob,
                &format!(
                    "sge_virtualizer: can't exec the stock shepherd {}: {err}",
                    stock.display()
                ),
            );
        }
    }

    set_process_name(config.get("job_id").unwrap_or_default());
    // Signals first: execd may already have sent some.
    let signals = match SignalSource::new() {
        Ok(s) => s,
        Err(e) => {
            return finish_early(&dir, ShepherdState::BeforeProlog, &format!("signalfd: {e}"))
        }
    };
    become_root();
    if let Some(admin) = config
        .get("admin_user")
        .and_then(|n| nix::unistd::User::from_name(n).ok().flatten())
    {
        dir.set_admin(Some((admin.uid.as_raw(), admin.gid.as_raw())));
    }
    install_panic_hook(&dir);
    if let Err(e) = dir.write_pid(std::process::id()) {
        return finish_early(&dir, ShepherdState::BeforeProlog, &e.to_string());
    }
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));

    let mut run = JobRun {
        config,
        dir,
        signals,
        state: ShepherdState::NoFailure,
        checkpoints,
        arena: None,
    };
    let state = run.run();
    run.dir.trace(&format!("exit_status {}", state.code()));
    if let Err(e) = run.dir.write_exit_status(state.code()) {
        eprintln!("sge_virtualizer: {e}");
    }
    state.code()
}

/// Records a failure before the job machinery exists and returns its code.
fn finish_early(dir: &ActiveDir, state: ShepherdState, message: &str) -> i32 {
    let _ = dir.append_error(message);
    if let Err(e) = dir.write_exit_status(state.code()) {
        eprintln!("sge_virtualizer: {message}; {e}");
    }
    state.code()
}

/// `comm` must start with `sge_shep`: after a restart execd finds running shepherds by it.
fn set_process_name(job_id: &str) {
    let mut name = format!("sge_shepherd-{job_id}").into_bytes();
    name.truncate(15);
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
}

/// Runs `f` with euid 0 (where the real uid is root), then gives the euid back.
fn as_root<T>(f: impl FnOnce() -> T) -> T {
    let euid = nix::unistd::geteuid();
    let elevated = nix::unistd::getuid().is_root()
        && !euid.is_root()
        && nix::unistd::seteuid(nix::unistd::Uid::from_raw(0)).is_ok();
    let result = f();
    if elevated {
        let _ = nix::unistd::seteuid(euid);
    }
    result
}

/// Execd starts us with real uid 0 and euid = admin user; files and children need root.
fn become_root() {
    if nix::unistd::getuid().is_root() {
        let root = nix::unistd::Uid::from_raw(0);
        let root_g = nix::unistd::Gid::from_raw(0);
        let _ = nix::unistd::setresuid(root, root, root);
        let _ = nix::unistd::setresgid(root_g, root_g, root_g);
    }
}

/// A panic must still leave `error` and `exit_status`: without them execd puts the whole
/// host in error.
fn install_panic_hook(dir: &ActiveDir) {
    if let Ok(mut g) = CRASH_DIR.lock() {
        *g = Some(dir.clone());
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(g) = CRASH_DIR.try_lock() {
            if let Some(d) = g.as_ref() {
                let _ = d.append_error(&format!("sge_virtualizer: internal error: {info}"));
                let _ = d.write_exit_status(STATE_IF_CRASHED.load(Ordering::SeqCst));
            }
        }
        previous(info);
    }));
}

fn crash_state(state: ShepherdState) {
    STATE_IF_CRASHED.store(state.code(), Ordering::SeqCst);
}

/// What the shepherd knows of the job's VM when it judges how the job ended.
struct VmFacts {
    vcpus: u8,
    /// Who shaped what the VM booted before its agent connected.
    boot_owner: BootOwner,
    /// How many shortages in a row the job's queue may have.
    shortage: ShortagePolicy,
}

/// The job's host-side resources, set up before the prolog.
struct Prepared {
    user: JobUser,
    env: JobEnvironment,
    cwd: PathBuf,
    streams: JobStreams,
    /// The job's stdout and stderr, opened as the job user before the prolog. They go to the
    /// VMM process with the job, so the root shepherd holds no descriptor of them while the job
    /// runs; the procedures after it open them again, as the stock shepherd's children do.
    output: Option<(File, File)>,
    methods: ControlMethods,
    /// The VM settings for the job's queue.
    vm: VmSettings,
}

struct JobRun {
    config: JobConfig,
    dir: ActiveDir,
    signals: SignalSource,
    /// The first failure; later ones only go to `error`/`trace`.
    state: ShepherdState,
    /// A checkpointing job's checkpoint environment (its VM is snapshotted).
    checkpoints: Option<CheckpointEnv>,
    /// What `checkpointed` is left as, once the job's VM ran.
    arena: Option<ArenaMark>,
}

impl JobRun {
    fn record(&mut self, failure: Failure) {
        self.dir.trace(&failure.message);
        let _ = self.dir.append_error(&failure.message);
        if failure.no_resources {
            let _ = self.dir.write_noresources();
        }
        if self.state == ShepherdState::NoFailure {
            self.state = failure.state;
        }
    }

    fn run(&mut self) -> ShepherdState {
        let mut prepared = match self.prepare() {
            Ok(p) => p,
            Err(f) => {
                self.record(f);
                return self.state;
            }
        };
        let mut prolog_ran = false;
        let mut job_exit: Option<i32> = None;
        let started = (|| -> Result<(), Failure> {
            if !self.procedure(ProcedureKind::Prolog, &prepared, None)? {
                return Ok(());
            }
            prolog_ran = true;
            if self.config.get_not_none("pe").is_some()
                && !self.procedure(ProcedureKind::PeStart, &prepared, None)?
            {
                return Ok(());
            }
            let usage = self.job(&mut prepared)?;
            job_exit = Some(usage.end.exit_status());
            crash_state(ShepherdState::AfterJob);
            if let Err(e) = self.dir.write_usage(&usage.to_file_text()) {
                self.record(Failure::new(ShepherdState::AfterJob, e.to_string()));
            }
            let exit_state = job_exit_state(
                usage.end.exit_status(),
                self.config.flag("forbid_reschedule"),
                self.config.flag("forbid_apperror"),
            );
            if exit_state != ShepherdState::NoFailure && self.state == ShepherdState::NoFailure {
                self.dir.trace(&format!(
                    "job exit {} -> state {}",
                    usage.end.exit_status(),
                    exit_state.code()
                ));
                self.state = exit_state;
            }
            Ok(())
        })();
        if let Err(f) = started {
            self.record(f);
        }
        self.leave_arena_mark();
        // the epilog is skipped only when the prolog could not even be started
        let prolog_unstartable = self.state == ShepherdState::BeforeProlog;
        let exit_stat = job_exit.unwrap_or(0).to_string();
        if self.config.get_not_none("pe").is_some() && prolog_ran {
            if let Err(f) = self.procedure(ProcedureKind::PeStop, &prepared, Some(&exit_stat)) {
                self.record(f);
            }
        }
        if !prolog_unstartable {
            if let Err(f) = self.procedure(ProcedureKind::Epilog, &prepared, Some(&exit_stat)) {
                self.record(f);
            }
        }
        self.state
    }

    /// A checkpointing job's `checkpointed`, once its VM ran: kept (re-queued, from its
    /// checkpoint or the start) after a migration, removed otherwise. Before its VM ran the
    /// failure's own state decides (a restore refused here keeps it).
    fn leave_arena_mark(&mut self) {
        let written = match self.arena {
            None => return,
            Some(ArenaMark::Remove) => self.dir.remove_checkpointed(),
            Some(ArenaMark::Migrated { in_arena: true }) => self.dir.write_checkpoint_in_arena(),
            Some(ArenaMark::Migrated { in_arena: false }) => self.dir.write_checkpointed(),
        };
        self.dir.trace(&format!("checkpointed: {:?}", self.arena));
        if let Err(e) = written {
            self.record(Failure::new(ShepherdState::AfterJob, e.to_string()));
        }
    }

    /// User, environment, output files, cwd, methods: everything checked before the prolog.
    fn prepare(&mut self) -> Result<Prepared, Failure> {
        let c = &self.config;
        let user = JobUser::from_config(c)
            .map_err(|e| Failure::new(ShepherdState::BeforeJob, format!("sge_virtualizer: {e}")))?;
        self.dir
            .create_empty_results()
            .map_err(|e| Failure::new(ShepherdState::BeforeProlog, e.to_string()))?;
        self.dir.trace(&format!(
            "job {} task {} owner {} ({}:{}) add_grp_id {:?}",
            c.get("job_id").unwrap_or_default(),
            c.get("ja_task_id").unwrap_or_default(),
            user.name,
            user.uid,
            user.gid,
            user.add_grp_id
        ));
        // a bad settings file is every queue's on this host: the host's error, before the prolog
        let vm = Settings::load()
            .map_err(|e| Failure::of(Fault::Host, format!("sge_virtualizer: {e}")))?
            .for_queue(c.get("queue").unwrap_or_default());
        let methods = ControlMethods::from_config(c).map_err(|e| {
            Failure::new(ShepherdState::BeforeProlog, format!("sge_virtualizer: {e}"))
        })?;
        let file_env = JobEnvironment::read(&self.dir.path("environment"))
            .map_err(|e| Failure::new(ShepherdState::BeforeProlog, e.to_string()))?;
        let inherited = c.flag("inherit_env").then(JobEnvironment::from_process);
        let mut env = JobEnvironment::for_job(&file_env, inherited);
        let cwd = PathBuf::from(
            c.get("cwd")
                .map(str::to_string)
                .unwrap_or_else(|| user.home.display().to_string()),
        );
        let streams = JobStreams::from_config(c)
            .map_err(|e| Failure::new(ShepherdState::BeforeProlog, e.to_string()))?;
        // as the stock shepherd's child would find it (its message, its state)
        user.check_can_enter(&cwd).map_err(|e| no_cwd(&cwd, e))?;
        let output = open_job_output(&user, &streams)?;
        env.set("SGE_STDIN_PATH", &streams.stdin.display().to_string());
        env.set("SGE_STDOUT_PATH", &streams.stdout.display().to_string());
        env.set(
            "SGE_STDERR_PATH",
            &streams.stderr_file().display().to_string(),
        );
        env.set("SGE_CWD_PATH", &cwd.display().to_string());
        Ok(Prepared {
            user,
            env,
            cwd,
            streams,
            output: Some(output),
            methods,
            vm,
        })
    }

    /// Runs a procedure if configured. Ok(false): the job must not start (failure recorded or
    /// a KILL arrived meanwhile).
    fn procedure(
        &mut self,
        kind: ProcedureKind,
        p: &Prepared,
        exit_stat: Option<&str>,
    ) -> Result<bool, Failure> {
        let (before, _) = kind.states();
        let proc = match Procedure::from_config(kind, &self.config, &p.user) {
            Ok(Some(proc)) => proc,
            Ok(None) => return Ok(true),
            Err(e) => return Err(Failure::new(before, format!("sge_virtualizer: {e}"))),
        };
        let mut env = p.env.clone();
        if let Some(s) = exit_stat {
            env.set("SGE_JOBEXIT_STAT", s);
        }
        // the stock shepherd's child enters the directory before it opens the output files
        // (pe_start's may lie in it): the same order gives the same state
        p.user
            .check_can_enter(&p.cwd)
            .map_err(|e| no_cwd(&p.cwd, e))?;
        let (stdout, stderr) = self.procedure_output(kind, p, before)?;
        self.dir
            .trace(&format!("starting {}: {:?}", kind.key(), proc.argv));
        let mut child = proc
            .spawn(&env, &p.cwd, stdout, stderr)
            .map_err(|e| Failure::new(e.state(kind), e.to_string()))?;
        let timeout = Duration::from_secs(self.config.number("script_timeout", 120).unwrap_or(120));
        let start = Instant::now();
        let mut queued: Vec<i32> = Vec::new();
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            for sig in self.signals.wait(TICK) {
                if let Ok(s) = execd_intent(sig, || read_signal_file(&self.dir.path("signal"))) {
                    queued.push(s);
                }
            }
            if !queued.is_empty() && start.elapsed() > timeout {
                // SAFETY: plain kill(2) of the procedure's own process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            }
        };
        let code = exit_code(status);
        self.dir
            .trace(&format!("{} exited with {code}", kind.key()));
        if let Some(state) = kind.result_state(Some(code)) {
            self.record(Failure::new(
                state,
                format!(
                    "{} {:?} exited with exit code {code}",
                    kind.key(),
                    proc.argv[0]
                ),
            ));
            return Ok(false);
        }
        if queued.contains(&libc::SIGKILL) && kind == ProcedureKind::Prolog {
            self.dir.trace("job killed during the prolog; not started");
            return Ok(false);
        }
        Ok(true)
    }

    /// Where a procedure writes: pe_start/pe_stop to `pe_stdout_path`/`pe_stderr_path` (a
    /// directory gets `<job_name>.po<job_id>`/`.pe<job_id>`), everything else to the job's files.
    fn procedure_output(
        &self,
        kind: ProcedureKind,
        p: &Prepared,
        before: ShepherdState,
    ) -> Result<(File, File), Failure> {
        let fail = |e: std::io::Error| Failure::new(before, format!("{}: {e}", kind.key()));
        let (own_stdout, own_stderr) = match &p.output {
            Some((o, e)) => (o.try_clone().map_err(fail)?, e.try_clone().map_err(fail)?),
            None => open_job_output(&p.user, &p.streams)?,
        };
        let pe = matches!(kind, ProcedureKind::PeStart | ProcedureKind::PeStop);
        let open = |key: &str, output: OutputKind| -> Option<Result<File, Failure>> {
            let configured = self.config.get(key).filter(|v| !v.is_empty())?;
            let path = output_paths::resolve(Path::new(configured), output, &self.config);
            Some(open_output(&p.user, &path))
        };
        let stdout = match pe
            .then(|| open("pe_stdout_path", OutputKind::PeStdout))
            .flatten()
        {
            Some(f) => f?,
            None => own_stdout,
        };
        let stderr = match pe
            .then(|| open("pe_stderr_path", OutputKind::PeStderr))
            .flatten()
        {
            Some(f) => f?,
            None => own_stderr,
        };
        Ok((stdout, stderr))
    }

    /// Starts the VM and the job, relays signals until it ends.
    fn job(&mut self, p: &mut Prepared) -> Result<UsageRecord, Failure> {
        let c = &self.config;
        // the job's queue: its settings, the job's config as execd wrote it, this host
        let before_job = |e: String| Failure::of(Fault::Queue, e);
        let vm = &p.vm;
        let delivery = if vm.share_job_dirs {
            ScriptDelivery::SharedPath
        } else {
            ScriptDelivery::Copied
        };
        let mut command = job_argv::build(c, delivery, |path| p.user.read(path))
            .map_err(|e| before_job(format!("sge_virtualizer: {e}")))?;
        let rlimits =
            limits::job_rlimits(c).map_err(|e| before_job(format!("sge_virtualizer: {e}")))?;
        // The job's output files keep its file-size limit, as its own writes would.
        let output_limit = rlimits
            .iter()
            .find(|r| r.resource == libc::RLIMIT_FSIZE)
            .map(|r| r.soft)
            .filter(|&soft| soft != guest_agent::protocol::RLIM_INFINITY);
        let hard_vmem =
            limits::vmem_budget(c).map_err(|e| before_job(format!("sge_virtualizer: {e}")))?;
        let soft_vmem =
            limits::soft_vmem_budget(c).map_err(|e| before_job(format!("sge_virtualizer: {e}")))?;
        let consumable = if hard_vmem.is_none() && soft_vmem.is_none() {
            self.requested_memory(c, &vm.memory_requests)
        } else {
            None
        };
        let ram = GuestRam::choose(
            &vm.ram,
            &JobMemoryRequest {
                hard_vmem,
                soft_vmem,
                consumable,
            },
            host_memory::total_mib(),
        );
        self.dir.trace(&ram.to_string());
        let mem_mib = ram.mib;
        let slots = c.number("host_slots", 1).unwrap_or(1).clamp(1, 255) as u8;
        let vcpus = vm.vcpus.unwrap_or(slots).max(1);
        let filesystems = self.filesystems(p, vm)?;

        let job_stdin_null = p.streams.stdin == Path::new("/dev/null");
        let stdin: StdinSource = if let Some(script) = command.stdin_script.take() {
            StdinSource::Reader(Box::new(std::io::Cursor::new(script)))
        } else {
            let own: Option<Box<dyn std::io::Read + Send>> = if job_stdin_null {
                None
            } else {
                let f = p.user.open_input(&p.streams.stdin).map_err(|e| {
                    Failure::of(
                        Fault::Job(JobCause::File),
                        format!(
                            "error: can't open stdin file \"{}\": {e}",
                            p.streams.stdin.display()
                        ),
                    )
                })?;
                Some(Box::new(f))
            };
            match (command.script_ahead_of_stdin(), own) {
                (None, None) => StdinSource::Null,
                (None, Some(own)) => StdinSource::Reader(own),
                (Some(script), own) => {
                    let script = std::io::Cursor::new(script.to_vec());
                    let own = own.unwrap_or_else(|| Box::new(std::io::empty()));
                    StdinSource::Reader(Box::new(std::io::Read::chain(script, own)))
                }
            }
        };
        let stdin_mode = match stdin {
            StdinSource::Null => StdinMode::Null,
            StdinSource::Reader(_) => StdinMode::Frames,
        };
        let guest_cwd = if vm.share_job_dirs {
            p.cwd.clone()
        } else {
            // without shares the guest does not see the host's directories
            PathBuf::from("/tmp")
        };
        let spawn =
            self.spawn_request(p, &command, rlimits, stdin_mode, &guest_cwd, job_stdin_null);
        // the job's own argv and environment: too large for the guest is the job's error,
        // found before any VM starts
        spawn_size::check(&spawn).map_err(|e| {
            Failure::of(
                Fault::Job(JobCause::Request),
                format!("sge_virtualizer: {e}"),
            )
        })?;

        if let Some(g) = p.user.add_grp_id {
            if c.get("write_osjob_id").map(str::trim) != Some("0") {
                self.dir
                    .write_addgrpid(g)
                    .map_err(|e| before_job(e.to_string()))?;
            }
        }
        // Who shaped what boots before the agent connects: an image the job chose (other than
        // the queue's), or guest RAM its limits lowered, make a guest that does not boot the
        // job's to answer for, not the queue's.
        let image_owner =
            if filesystems.image.as_ref().map(|i| i.name.as_str()) != vm.image.as_deref() {
                BootOwner::Job
            } else {
                BootOwner::Queue
            };
        let boot_owner = if ram.rule.is_the_jobs() {
            BootOwner::Job
        } else {
            image_owner
        };
        // A VM start this host cannot back now is a shortage, found before any VM starts.
        if let Err(short) = host_memory::can_back(guest_ram::start_footprint_mib(
            mem_mib,
            vm.ram.vmm_overhead_mib,
        )) {
            return Err(self.shortage(
                vm.shortage,
                format!("sge_virtualizer: can't start the job's VM now: {short}"),
            ));
        }
        let run_dir = tempfile::Builder::new()
            .prefix(&format!(
                "sge_virtualizer.{}.",
                c.get("job_id").unwrap_or("0")
            ))
            .tempdir()
            .map_err(|e| {
                self.shortage(
                    vm.shortage,
                    format!("sge_virtualizer: can't create the VM's runtime directory: {e}"),
                )
            })?;
        let (stdout, stderr) = match p.output.take() {
            Some(files) => files,
            None => open_job_output(&p.user, &p.streams)?,
        };
        let io = JobIo {
            stdin,
            stdout_file: crate::checkpoint::taker::regular_file(&stdout),
            stderr_file: crate::checkpoint::taker::regular_file(&stderr),
            stdout: FileSizeLimited::wrap(stdout, output_limit),
            stderr: FileSizeLimited::wrap(stderr, output_limit),
        };
        let requested = p.env.get(crate::network::policy::JOB_NETWORK_VAR);
        let network = crate::network::policy::for_job(&vm.network, requested).map_err(|e| {
            let (fault, message) =
                start_failure::launch_failure(&launch::LaunchError::Network(e), image_owner);
            Failure::of(fault, message)
        })?;
        self.dir.trace(&format!("network: {network:?}"));
        self.dir.trace(&format!(
            "starting VM: kernel {} initramfs {} {} MiB {} vCPUs backend {:?}; image {:?}; \
             shares {:?}; argv {:?}",
            vm.kernel.display(),
            vm.initramfs.display(),
            mem_mib,
            vcpus,
            vm.backend,
            filesystems.image.as_ref().map(|i| &i.name),
            filesystems
                .shares
                .iter()
                .map(|s| s.path.display().to_string())
                .collect::<Vec<_>>(),
            command.argv
        ));
        let spec = LaunchSpec {
            kernel: vm.kernel.clone(),
            initrd: vm.initramfs.clone(),
            backend: vm.backend,
            vcpus,
            mem_mib,
            huge_pages: vm.huge_pages,
            extra_cmdline: vm.extra_cmdline.clone(),
            spawn,
            run_dir: run_dir.path().to_path_buf(),
            vmm_credentials: Some(VmmCredentials {
                uid: p.user.uid,
                gid: p.user.gid,
                groups: p.user.groups.clone(),
            }),
            network,
            checkpoint: self.checkpoints.as_ref().map(|env| {
                self.dir.trace(&format!(
                    "checkpoints ({} interface): VM snapshots in {}{}{}",
                    env.interface,
                    env.dir.display(),
                    env.interval
                        .map(|i| format!(", every {} s", i.as_secs()))
                        .unwrap_or_default(),
                    if env.restart {
                        "; restarted: going on from the latest one"
                    } else {
                        ""
                    }
                ));
                launch::CheckpointPlan {
                    dir: env.dir.clone(),
                    restore: if env.restart {
                        launch::RestorePolicy::LatestIfAny
                    } else {
                        launch::RestorePolicy::Boot
                    },
                }
            }),
        };
        let running = launch::launch_in(spec, &filesystems, io).map_err(|e| match e {
            // A checkpoint this host cannot resume (its CPU, KVM or build): kept in the arena
            // and the job re-queued, for a host that can.
            launch::LaunchError::RestoreRefused {
                elsewhere: true, ..
            } => {
                if let Err(mark) = self.dir.write_checkpoint_in_arena() {
                    self.dir
                        .trace(&format!("can't keep the checkpoint in the arena: {mark}"));
                }
                Failure::new(
                    ShepherdState::BeforeJob,
                    format!("sge_virtualizer: {e}; re-queued with its checkpoint for another host"),
                )
            }
            _ => match start_failure::launch_failure(&e, image_owner) {
                (Fault::Shortage, message) => self.shortage(vm.shortage, message),
                (fault, message) => Failure::of(fault, message),
            },
        })?;
        crash_state(ShepherdState::AfterJob);
        // The VMM process: the job user's, with add_grp_id among its groups.
        let job_pid = running.vmm_pid();
        self.dir.trace(&format!(
            "VM started: backend {}, VMM process {job_pid}",
            running.backend()
        ));
        self.config.set("job_pid", &job_pid.to_string());
        let _ = self.dir.write_job_pid(job_pid);
        let controller = running.controller();
        let restored_from = running.restored_from();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("job-wait".into())
            .spawn(move || {
                let _ = tx.send(running.wait());
            })
            .map_err(|e| Failure::new(ShepherdState::AfterJob, e.to_string()))?;
        let started_wall = SystemTime::now();
        let runner = MethodRunner::new(RunAs::from(&p.user), p.env.clone(), p.cwd.clone());
        let mut relay = SignalRelay::new(&self.dir, &self.config, &p.methods, runner);
        if let Some(env) = &self.checkpoints {
            match restored_from {
                Some(generation) => self
                    .dir
                    .trace(&format!("job restored from checkpoint {generation}")),
                None if env.restart => self.dir.trace(&format!(
                    "no checkpoint of the job in {}: it starts over",
                    env.dir.display()
                )),
                None => {}
            }
            let (cp, steps) =
                JobCheckpoints::new(env.interval, restored_from.is_some(), Instant::now());
            relay = relay.with_checkpoints(cp, steps);
        }
        let end = relay.run(&mut self.signals, &controller, &rx);
        let (result, killed) = (end.result, end.killed);
        if let Some(cp) = &end.checkpoints {
            let migrated = matches!(result, Err(JobError::Migrated { .. }));
            self.arena = Some(cp.end(migrated));
        }
        drop(run_dir);
        let facts = VmFacts {
            vcpus,
            boot_owner,
            shortage: vm.shortage,
        };
        self.outcome(result, killed, started_wall, &facts)
    }

    /// The job's queue (its settings section and its shortage streak).
    fn queue(&self) -> &str {
        self.config.get("queue").unwrap_or_default()
    }

    /// The failure for a shortage that may pass: re-queued, unless the queue has had its
    /// allowed number in a row on this host; then the queue's error.
    /// The memory consumable among `names` the job requested (`-l mem_free=4G`), over its
    /// slots here. Unreadable requests are traced and count as none.
    fn requested_memory(&self, c: &JobConfig, names: &[String]) -> Option<(String, u64)> {
        if names.is_empty() {
            return None;
        }
        let job_id = c.get("job_id")?.trim();
        let requests = match job_requests::hard_requests(job_id) {
            Ok(r) => r,
            Err(e) => {
                self.dir.trace(&format!(
                    "can't read the job's memory request ({e}); sizing its guest as for a job \
                     that made none"
                ));
                return None;
            }
        };
        let (name, value) = job_requests::first_of(&requests, names)?;
        match limits::parse_amount(value) {
            Some(bytes) => Some((
                name.to_string(),
                bytes.saturating_mul(limits::host_slots(c)),
            )),
            None => {
                self.dir.trace(&format!(
                    "the job's request {name}={value} is not a memory amount; ignored for the \
                     guest's size"
                ));
                None
            }
        }
    }

    fn shortage(&self, policy: ShortagePolicy, message: String) -> Failure {
        match ShortageStreak::configured(policy).record(self.queue()) {
            Ok(ShortageVerdict::Requeue { count, limit }) => Failure::no_resources(format!(
                "{message} (shortage {count} of {limit} in a row allowed on this host)"
            )),
            Ok(ShortageVerdict::QueueError { count }) => Failure::of(
                Fault::Queue,
                format!(
                    "{message} ({count} shortages in a row on this host: the queue stays in \
                     error until an administrator clears it with qmod -c)"
                ),
            ),
            Err(count_error) => {
                self.dir.trace(&format!(
                    "can't count the queue's shortages ({count_error}): re-queued unbounded"
                ));
                Failure::no_resources(message)
            }
        }
    }

    /// The OS image (the queue's, or the one the job asked for where allowed) and the shared
    /// directories (the job's own, where enabled, and the configured ones).
    fn filesystems(&self, p: &Prepared, vm: &VmSettings) -> Result<JobFilesystems, Failure> {
        let policy = ImagePolicy {
            queue_image: vm.image.as_deref(),
            job_may_request: &vm.job_images,
        };
        let image =
            selection::choose(&policy, p.env.get(selection::JOB_IMAGE_VAR)).map_err(|e| {
                Failure::of(
                    Fault::Job(JobCause::Request),
                    format!("sge_virtualizer: {e}"),
                )
            })?;
        let configured: Vec<SharedDir> = vm.shares.iter().map(SharedDir::new).collect();
        let shares = if vm.share_job_dirs {
            let tmpdir = p.env.get("TMPDIR").map(PathBuf::from);
            let script = (!self.config.flag("handle_as_binary"))
                .then(|| self.config.get("script_file").map(PathBuf::from))
                .flatten();
            job_shares(&JobPaths {
                cwd: &p.cwd,
                home: Some(&p.user.home),
                tmpdir: tmpdir.as_deref(),
                script: script.as_deref(),
                configured: &configured,
            })
        } else {
            configured
        };
        Ok(JobFilesystems {
            image: image.map(|name| ImageChoice {
                store: vm.image_store.clone(),
                name,
            }),
            shares,
        })
    }

    fn spawn_request(
        &self,
        p: &Prepared,
        command: &JobCommand,
        rlimits: Vec<guest_agent::protocol::Rlimit>,
        stdin: StdinMode,
        cwd: &Path,
        job_stdin_null: bool,
    ) -> Spawn {
        let mut env = p.env.clone();
        if let Some(script) = command.script_in_environment() {
            env.set(SCRIPT_ENV, &String::from_utf8_lossy(script));
        }
        Spawn {
            argv: command
                .guest_argv(job_stdin_null)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            env: env.to_entries(),
            cwd: cwd.as_os_str().as_encoded_bytes().to_vec(),
            uid: p.user.uid,
            gid: p.user.gid,
            groups: p.user.groups.clone(),
            rlimits,
            nice: limits::nice(&self.config),
            stdin,
        }
    }

    /// Turns the job's end into a usage record or a failure.
    fn outcome(
        &mut self,
        result: Result<launch::JobOutcome, JobError>,
        killed: bool,
        started: SystemTime,
        facts: &VmFacts,
    ) -> Result<UsageRecord, Failure> {
        let killed_record = |start: SystemTime| UsageRecord {
            end: JobEnd::Signaled {
                signal: libc::SIGKILL,
                core: false,
            },
            start_time: start,
            end_time: SystemTime::now(),
            rusage: Rusage::default(),
        };
        let connected = !matches!(
            result,
            Err(JobError::AgentNeverConnected(_)
                | JobError::GuestDidNotBoot(_)
                | JobError::VmFailedToRun(_))
        );
        if connected {
            // The VM came up and its agent connected: no bound to keep, no shortage now.
            StartAttempts::configured().clear(&self.config);
            ShortageStreak::configured(facts.shortage).clear(self.queue());
        }
        if let Err(e) = &result {
            if let Some(failure) = refused_before_start(e) {
                return Err(failure);
            }
        }
        match result {
            Ok(o) => {
                let end = JobEnd::from_wait_status(o.wait_status);
                self.dir
                    .trace(&format!("job ended: exit status {}", end.exit_status()));
                let wall = o
                    .job_ended
                    .duration_since(o.job_started)
                    .unwrap_or_default();
                for failure in o.output_failures.iter().chain(&o.network_lost) {
                    self.dir.trace(failure);
                }
                if let Some(note) = guest_ram::out_of_memory_note(&o.memory) {
                    self.dir.trace(&note);
                }
                let (rusage, note) = guest_rusage::bounded(o.rusage, wall, facts.vcpus);
                if let Some(note) = note {
                    self.dir.trace(&note);
                }
                Ok(UsageRecord {
                    end,
                    start_time: o.job_started,
                    end_time: o.job_ended,
                    rusage,
                })
            }
            Err(e @ JobError::GuestDidNotBoot(_)) if !killed => {
                match start_failure::did_not_boot(facts.boot_owner) {
                    Some(fault) => Err(Failure::of(
                        fault,
                        format!("sge_virtualizer: this queue's guest does not boot: {e}"),
                    )),
                    None => Err(self.never_connected(&e)),
                }
            }
            Err(e @ JobError::AgentNeverConnected(_)) if !killed => Err(self.never_connected(&e)),
            Err(JobError::Migrated { dir, generation }) => {
                // As the stock shepherd reports a migrated job: killed (137), re-queued.
                self.dir.trace(&format!(
                    "migration: checkpoint {generation} in {dir}; the job's VM stopped, the job \
                     is re-queued to go on from it"
                ));
                Ok(killed_record(started))
            }
            Err(e @ JobError::VmFailedToRun(_)) if !killed => Err(self.shortage(
                facts.shortage,
                format!("sge_virtualizer: can't start the job's VM now: {e}"),
            )),
            Err(e) if killed => {
                self.dir.trace(&format!("job killed; its VM ended: {e}"));
                Ok(killed_record(started))
            }
            Err(e) => {
                // the VM or its agent died under the job: report it as killed, with the reason
                self.record(Failure::new(
                    ShepherdState::AfterJob,
                    format!("sge_virtualizer: the job's VM failed: {e}"),
                ));
                Ok(killed_record(started))
            }
        }
    }
}

impl JobRun {
    /// The failure for a start whose guest agent never connected: re-queued (the host may be
    /// short of something now), but only [`MAX_NEVER_CONNECTED`] times on this host; then the
    /// job's error, as a guest that never comes up is most likely the job's (its image).
    fn never_connected(&self, e: &JobError) -> Failure {
        let counted = StartAttempts::configured().record_never_connected(&self.config);
        match counted {
            Ok(n) if n >= MAX_NEVER_CONNECTED => Failure::of(
                Fault::Job(JobCause::Request),
                format!(
                    "sge_virtualizer: the job's VM came up {n} times on this host without its \
                     guest agent connecting; not re-queued again: {e}"
                ),
            ),
            Ok(n) => Failure::no_resources(format!(
                "sge_virtualizer: the job's VM did not come up (attempt {n} of \
                 {MAX_NEVER_CONNECTED} on this host): {e}"
            )),
            Err(count_error) => {
                self.dir.trace(&format!(
                    "can't count the job's start attempts ({count_error}): re-queued unbounded"
                ));
                Failure::no_resources(format!(
                    "sge_virtualizer: the job's VM did not come up: {e}"
                ))
            }
        }
    }
}

/// The failure for a job the guest did not start: it refused the spawn, or broke the agent
/// protocol before `Started`. The guest is the job's owner's, so this is always the job's error
/// (the queue and host stay usable): a missing working directory is 28, anything else 30, which
/// execd charges to the job in every case (27 or 11 it would charge to the queue unless the
/// job itself asked for the shell or binary). `None` for other errors, and for a violation
/// after the job started (the job ran: handled as a VM that died under it).
fn refused_before_start(e: &JobError) -> Option<Failure> {
    match e {
        JobError::SpawnFailed {
            stage,
            errno,
            message,
        } => {
            let cause = match stage {
                SpawnStage::Cwd => JobCause::Cwd,
                _ => JobCause::Request,
            };
            Some(Failure::of(
                Fault::Job(cause),
                format!(
                    "sge_virtualizer: the job could not be started in the VM ({stage:?}): \
                     {message} ({})",
                    std::io::Error::from_raw_os_error(*errno)
                ),
            ))
        }
        JobError::ProtocolViolation(v) if !v.state.job_started() => Some(Failure::of(
            Fault::Job(JobCause::Request),
            format!("sge_virtualizer: the job's VM did not start the job: {v}"),
        )),
        _ => None,
    }
}

/// Opens the job's stdout and stderr files as the job user (stderr: the same file when merged).
fn open_job_output(user: &JobUser, streams: &JobStreams) -> Result<(File, File), Failure> {
    let stdout = open_output(user, &streams.stdout)?;
    let stderr = match &streams.stderr {
        Some(p) => open_output(user, p)?,
        None => stdout
            .try_clone()
            .map_err(|e| Failure::new(ShepherdState::OpenOutput, e.to_string()))?,
    };
    Ok((stdout, stderr))
}

/// The job owner cannot enter the job's working directory: the job's error (state 28), in the
/// stock shepherd's words.
fn no_cwd(cwd: &Path, e: std::io::Error) -> Failure {
    Failure::of(
        Fault::Job(JobCause::Cwd),
        format!("error: can't chdir to {}: {e}", cwd.display()),
    )
}

/// Opens an output file as the job user; failing is the job's error (state 26), as with the
/// stock shepherd.
fn open_output(user: &JobUser, path: &Path) -> Result<File, Failure> {
    user.open_output(path).map_err(|e| {
        Failure::of(
            Fault::Job(JobCause::File),
            format!("error: can't open output file \"{}\": {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_protocol::{AgentEvent, SessionState};
    use crate::agent_session::session_error;
    use crate::sge::state::Charge;
    use guest_agent::protocol::{BootTimes, Frame, Stream, PROTOCOL_VERSION};
    use proptest::prelude::*;

    fn facts(vcpus: u8, boot_owner: BootOwner) -> VmFacts {
        VmFacts {
            vcpus,
            boot_owner,
            shortage: ShortagePolicy::default(),
        }
    }

    /// A job run whose active directory is `dir`, as the tests drive `outcome` with it.
    fn job_run(dir: &Path, config: JobConfig) -> JobRun {
        JobRun {
            config,
            dir: ActiveDir::new(dir.to_path_buf()),
            signals: SignalSource::new().unwrap(),
            state: ShepherdState::NoFailure,
            checkpoints: None,
            arena: None,
        }
    }

    /// A migrated job's run ends as the stock shepherd reports one (killed, 137) and leaves
    /// its checkpoint in the arena; a checkpointing job that ended otherwise leaves none.
    #[test]
    fn a_migrated_run_is_reported_killed_and_keeps_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = job_run(tmp.path(), JobConfig::default());
        let facts = facts(1, BootOwner::Queue);
        let migrated = Err(JobError::Migrated {
            dir: "/ckpt/sge_virtualizer.1.1".into(),
            generation: 2,
        });
        let usage = run
            .outcome(migrated, false, SystemTime::now(), &facts)
            .ok()
            .expect("a migration is not a failure");
        assert_eq!(usage.end.exit_status(), 137);
        assert_eq!(run.state, ShepherdState::NoFailure);

        run.arena = Some(ArenaMark::Migrated { in_arena: true });
        run.leave_arena_mark();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("checkpointed")).unwrap(),
            "1\n"
        );
        run.arena = Some(ArenaMark::Migrated { in_arena: false });
        run.leave_arena_mark();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("checkpointed")).unwrap(),
            ""
        );
        run.arena = Some(ArenaMark::Remove);
        run.leave_arena_mark();
        assert!(!tmp.path().join("checkpointed").exists());
        // a job without checkpoints leaves the marker alone (a restore refused here wrote it)
        run.dir.write_checkpoint_in_arena().unwrap();
        run.arena = None;
        run.leave_arena_mark();
        assert!(tmp.path().join("checkpointed").exists());
    }

    /// Whom execd charges when a job's session ends in `e` (not killed), through the real
    /// [`JobRun::outcome`].
    fn charge_of(e: JobError) -> (Charge, String) {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = job_run(tmp.path(), JobConfig::default());
        let trace =
            |run: &JobRun| std::fs::read_to_string(run.dir.path("trace")).unwrap_or_default();
        match run.outcome(
            Err(e),
            false,
            SystemTime::now(),
            &facts(1, BootOwner::Queue),
        ) {
            Err(f) => (f.state.charged_to(), f.message),
            Ok(_) => (run.state.charged_to(), trace(&run)),
        }
    }

    /// Issue 12 item 7: the guest's rusage goes into `usage` within wall time × vCPUs, and the
    /// trace says it was clamped.
    #[test]
    fn inflated_guest_cpu_time_is_clamped_in_the_usage_record() {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = job_run(tmp.path(), JobConfig::default());
        let started = SystemTime::now();
        let outcome = launch::JobOutcome {
            wait_status: 0,
            rusage: Rusage {
                utime_us: 1_000_000_000_000,
                stime_us: 0,
                ..Rusage::default()
            },
            memory: Default::default(),
            job_started: started,
            job_ended: started + Duration::from_secs(3),
            timings: Default::default(),
            output_failures: Vec::new(),
            network_lost: None,
        };
        let record = run
            .outcome(Ok(outcome), false, started, &facts(2, BootOwner::Queue))
            .ok()
            .unwrap();
        // (3 s + 1 s of clock slack) × 2 vCPUs
        assert_eq!(record.rusage.utime_us + record.rusage.stime_us, 8_000_000);
        let trace = std::fs::read_to_string(run.dir.path("trace")).unwrap();
        assert!(
            trace.contains("CPU time 1000000.000000 s clamped"),
            "{trace}"
        );
    }

    /// Issue 12 item 7: a job whose guest never connects is re-queued a bounded number of
    /// times on a host, then failed as the job's error with the reason; a start whose agent
    /// connects forgets the count.
    #[test]
    fn a_guest_that_never_connects_is_requeued_a_bounded_number_of_times() {
        let tmp = tempfile::tempdir().unwrap();
        std::env::set_var(
            crate::sge::start_attempts::DIR_ENV,
            tmp.path().join("attempts"),
        );
        let active = tempfile::tempdir().unwrap();
        let mut run = job_run(
            active.path(),
            JobConfig::parse("job_id=12\nja_task_id=3\nsubmission_time=1700000000\n"),
        );
        let never = || JobError::AgentNeverConnected("VM ended before its agent connected".into());
        let outcome = |run: &mut JobRun, e| {
            run.outcome(
                Err(e),
                false,
                SystemTime::now(),
                &facts(1, BootOwner::Queue),
            )
            .err()
            .unwrap()
        };
        for round in 0..2 {
            for attempt in 1..MAX_NEVER_CONNECTED {
                let f = outcome(&mut run, never());
                assert_eq!(f.state, ShepherdState::Again, "{}", f.message);
                assert!(f.no_resources);
                assert!(
                    f.message
                        .contains(&format!("attempt {attempt} of {MAX_NEVER_CONNECTED}")),
                    "{}",
                    f.message
                );
            }
            if round == 0 {
                // The agent connects this time (and the job fails otherwise): count forgotten.
                let later = JobError::Vm("later trouble".into());
                let _ = run.outcome(
                    Err(later),
                    false,
                    SystemTime::now(),
                    &facts(1, BootOwner::Queue),
                );
            }
        }
        let last = outcome(&mut run, never());
        assert_eq!(last.state, ShepherdState::AppError, "{}", last.message);
        assert_eq!(last.state.charged_to(), Charge::Job);
        assert!(!last.no_resources);
        assert!(
            last.message.contains("not re-queued again"),
            "{}",
            last.message
        );
        std::env::remove_var(crate::sge::start_attempts::DIR_ENV);
    }

    /// Issue 20 item 2: a guest that ends by itself before its agent connects did not boot.
    /// When only the queue shaped it (kernel, initramfs, image, RAM) that is the queue's error;
    /// when the job did (its own image, or limits that shrank the guest), the job's own bounded
    /// start attempts apply, so a job's owner cannot put a queue in error.
    #[test]
    fn a_guest_that_does_not_boot_is_the_queues_unless_the_job_shaped_it() {
        let active = tempfile::tempdir().unwrap();
        let mut run = job_run(active.path(), JobConfig::default());
        let e = || JobError::GuestDidNotBoot("VM ended before its agent connected".into());
        let f = run
            .outcome(
                Err(e()),
                false,
                SystemTime::now(),
                &facts(1, BootOwner::Queue),
            )
            .err()
            .unwrap();
        assert_eq!(f.state.charged_to(), Charge::Queue, "{}", f.message);
        assert!(!f.no_resources);
        assert!(f.message.contains("guest does not boot"), "{}", f.message);
        // A key no earlier run used: the count is 1 wherever the counts are kept (or cannot be
        // kept), so the start is re-queued.
        let unique = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let mut run = job_run(
            active.path(),
            JobConfig::parse(&format!(
                "job_id={}\nja_task_id=0\nsubmission_time={unique}\n",
                std::process::id()
            )),
        );
        let f = run
            .outcome(
                Err(e()),
                false,
                SystemTime::now(),
                &facts(1, BootOwner::Job),
            )
            .err()
            .unwrap();
        assert_eq!(f.state, ShepherdState::Again, "{}", f.message);
        assert!(f.no_resources);
    }

    /// Issue 20 item 1: shortages re-queue the job up to the configured number in a row, then
    /// the next one is the queue's error with the reason; a started VM ends the streak.
    #[test]
    fn shortages_in_a_row_end_with_the_queue_in_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::env::set_var(
            crate::sge::shortage_streak::DIR_ENV,
            tmp.path().join("shortages"),
        );
        let active = tempfile::tempdir().unwrap();
        let mut run = job_run(active.path(), JobConfig::parse("queue=short.q\n"));
        let mut vm = Settings::default().for_queue("short.q");
        vm.shortage.limit = 2;
        for count in 1..=2 {
            let f = run.shortage(vm.shortage, "no RAM".into());
            assert_eq!(f.state, ShepherdState::Again, "{}", f.message);
            assert!(f.no_resources);
            assert!(
                f.message.contains(&format!("shortage {count} of 2")),
                "{}",
                f.message
            );
        }
        let f = run.shortage(vm.shortage, "no RAM".into());
        assert_eq!(f.state.charged_to(), Charge::Queue, "{}", f.message);
        assert!(!f.no_resources);
        assert!(
            f.message.starts_with("no RAM (3 shortages in a row"),
            "{}",
            f.message
        );
        // the streak started again; a started VM ends it
        run.shortage(vm.shortage, "no RAM".into());
        ShortageStreak::configured(vm.shortage).clear("short.q");
        let f = run.shortage(vm.shortage, "no RAM".into());
        assert!(f.message.contains("shortage 1 of 2"), "{}", f.message);
        // a VM the VMM could not run (QEMU exited with an error) is a shortage too
        let failed = JobError::VmFailedToRun("qemu exited (exit status: 1)".into());
        let vm_facts = VmFacts {
            vcpus: 1,
            boot_owner: BootOwner::Queue,
            shortage: vm.shortage,
        };
        let f = run
            .outcome(Err(failed), false, SystemTime::now(), &vm_facts)
            .err()
            .unwrap();
        assert!(f.message.contains("shortage 2 of 2"), "{}", f.message);
        std::env::remove_var(crate::sge::shortage_streak::DIR_ENV);
    }

    fn hello() -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            boot: BootTimes::default(),
        }
    }

    fn spawn_failed(stage: SpawnStage) -> Frame {
        Frame::SpawnFailed {
            stage,
            errno: libc::EPERM,
            message: "forged".into(),
        }
    }

    /// Feeds `frames` to a session until it ends without an exit; the error it ends with.
    fn session_end(frames: impl IntoIterator<Item = Frame>) -> Option<JobError> {
        let mut state = SessionState::AwaitingHello;
        for frame in frames {
            match state.accept(frame) {
                Ok(AgentEvent::Exited { .. }) => return None,
                r @ (Ok(AgentEvent::SpawnRefused { .. })
                | Ok(AgentEvent::AgentFailed { .. })
                | Err(_)) => return Some(session_error(r)),
                Ok(_) => {}
            }
        }
        None
    }

    /// Issue 12 item 4: whatever stage a guest names in SpawnFailed, before Started it is the
    /// job's error; after Started it is refused as a violation, and never the queue's.
    #[test]
    fn spawn_failures_from_the_guest_never_charge_the_queue() {
        for stage in SpawnStage::ALL {
            let before = session_end([hello(), spawn_failed(stage)]).unwrap();
            let (charge, message) = charge_of(before);
            assert_eq!(charge, Charge::Job, "{stage:?}: {message}");

            let after =
                session_end([hello(), Frame::Started { pid: 9 }, spawn_failed(stage)]).unwrap();
            assert!(
                matches!(after, JobError::ProtocolViolation(_)),
                "{stage:?}: {after:?}"
            );
            let (charge, message) = charge_of(after);
            assert_eq!(charge, Charge::Nobody, "{stage:?}: {message}");
            assert!(message.contains("broke the protocol"), "{message}");
        }
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let stage = proptest::sample::select(SpawnStage::ALL.to_vec());
        prop_oneof![
            1 => Just(hello()),
            2 => (-1..3i32).prop_map(|pid| Frame::Started { pid }),
            4 => stage.prop_map(spawn_failed),
            1 => Just(Frame::Stdout(b"o".to_vec())),
            1 => Just(Frame::Stderr(b"e".to_vec())),
            1 => Just(Frame::Eof(Stream::Stdout)),
            1 => Just(Frame::Eof(Stream::Stdin)),
            1 => Just(Frame::Ack),
            1 => Just(Frame::Signal { signo: 9 }),
            1 => Just(Frame::Error {
                message: "boom".into()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Random frame sequences from a guest never end the job with a state execd charges to
        /// the queue or the host.
        #[test]
        fn guest_frames_never_charge_the_queue_or_host(
            says_hello in proptest::bool::weighted(0.8),
            frames in proptest::collection::vec(any_frame(), 0..12)
        ) {
            // Mostly past Hello, where the interesting states are.
            let frames = says_hello.then(hello).into_iter().chain(frames);
            if let Some(e) = session_end(frames) {
                let (charge, message) = charge_of(e);
                prop_assert!(matches!(charge, Charge::Job | Charge::Nobody), "{charge:?}: {message}");
            }
        }
    }
}
