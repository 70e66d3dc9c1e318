//! Grid Engine shepherd mode: `sge_virtualizer` started by `sge_execd` as `shepherd_cmd`
//! (`argv[0]` `sge_shepherd-<job>`, no arguments, cwd = the job's active directory).
//!
//! Host side as the stock shepherd (config, result files, prolog/epilog, signals, notify,
//! methods, accounting); the job itself runs in a microVM through [`crate::launch`]. The
//! contract followed is execd's: see each module for the part it owns.

pub mod active_dir;
pub mod checkpoint_env;
pub mod config;
pub mod control_method;
pub mod counter_dir;
pub mod cpu_class;
pub mod delegation;
pub mod environment;
pub mod expand;
pub mod fault;
pub mod file_size_limit;
pub mod guest_rusage;
pub mod image_request;
pub mod job_argv;
pub mod job_checkpoints;
pub mod job_fifo;
pub mod job_requests;
mod job_run;
pub mod job_user;
pub mod jsv;
pub mod limits;
pub mod load_sensor;
pub mod notify;
pub mod output_paths;
pub mod procedure;
pub mod shortage_streak;
mod signal_relay;
pub mod signal_source;
pub mod signals;
pub mod spawn_size;
pub mod start_attempts;
pub mod start_failure;
pub mod state;
pub mod usage;
mod vm_stop;

pub use job_run::run_as_shepherd;
