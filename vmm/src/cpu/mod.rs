//! Architectural state of a vCPU at power-on: CPUID, MSRs, FPU, local APIC and the long-mode
//! registers of the 64-bit Linux boot protocol. Each submodule owns one of these.

pub mod cpuid;
pub mod fpu;
pub mod lapic;
pub mod long_mode;
pub mod msrs;

pub use cpuid::CpuFeature;

/// Errors while programming a vCPU's initial state.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    /// KVM_SET_MSRS failed outright.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped at an MSR it would not take.
    #[error("KVM refused boot MSR {index:#x} ({written} of {total} written)")]
    MsrRefused {
        /// The first MSR not written.
        index: u32,
        /// How many were written.
        written: usize,
        /// How many were requested.
        total: usize,
    },
    /// Building the MSR list failed.
    #[error("cannot build the MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    /// KVM_GET_LAPIC / KVM_SET_LAPIC failed.
    #[error("local APIC set-up failed: {0}")]
    Lapic(kvm_ioctls::Error),
    /// KVM_GET_SREGS / KVM_SET_SREGS / KVM_SET_REGS failed.
    #[error("register set-up failed: {0}")]
    Registers(kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("cannot write boot tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}
