//! The x87/SSE state a vCPU starts with (the values a CPU has after FNINIT and reset).

use kvm_bindings::kvm_fpu;
use kvm_ioctls::VcpuFd;

use super::CpuError;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
const FCW_INIT: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR_INIT: u32 = 0x1f80;

/// Loads the power-on FPU state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: FCW_INIT,
        mxcsr: MXCSR_INIT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)
}
