//! The Grid Engine form of "restore this job only where its snapshot can go on": the
//! `vm_cpu_class` complex. Each execution host publishes the class of the CPU features its KVM
//! offers a guest ([`vmm::snapshot::cpu_compat::feature_class`], e.g. `cpu-3f9a0c12`) through
//! the load sensor ([`super::load_sensor`]); a checkpointing job that requests
//! `-l vm_cpu_class=<class>` runs, and is restored after a migration, only on hosts of that
//! class, where every feature its guest saw is there. Hosts of another class would refuse the
//! restore (the job is then re-queued with its checkpoint: [`super::job_run`]), so the request
//! saves the round trips; the load sensor's value tells the administrator which classes a farm
//! has.
//!
//! The complex, as `qconf -sc` shows it:
//! `vm_cpu_class  vmcpu  RESTRING  ==  YES  NO  NONE  0`

/// The complex's name.
pub const COMPLEX: &str = "vm_cpu_class";
/// The line to add with `qconf -mc`.
pub const COMPLEX_LINE: &str = "vm_cpu_class  vmcpu  RESTRING  ==  YES  NO  NONE  0";

/// This host's class, or `None` where KVM cannot say (no KVM here: no VM to restore either).
pub fn this_host() -> Option<String> {
    vmm::snapshot::cpu_compat::host_class().ok()
}
