//! Model-specific registers a vCPU starts with: the syscall/sysenter MSRs cleared, the TSC at 0
//! and fast string operations enabled, as the Linux boot protocol expects from firmware.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::CpuError;

/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSR values, in the order they are written.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes the boot MSRs; fails naming the first MSR KVM refused.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(CpuError::MsrList)?;
    let written = vcpu.set_msrs(&msrs).map_err(CpuError::SetMsrs)?;
    if written < entries.len() {
        return Err(CpuError::MsrRefused {
            index: entries[written].index,
            written,
            total: entries.len(),
        });
    }
    Ok(())
}
