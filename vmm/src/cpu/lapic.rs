//! Local APIC wiring: LINT0 as ExtINT (the legacy PIC's output, "virtual wire" mode) and LINT1 as
//! NMI, as a PC's firmware leaves it. Linux relies on this when no MP/ACPI table overrides it.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::CpuError;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn read_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn write_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Sets the delivery mode (bits 8..=10) of an LVT entry, keeping the other bits.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 = ExtINT and LINT1 = NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut state = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    let lvt0 = read_reg(&state, APIC_LVT0);
    write_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = read_reg(&state, APIC_LVT1);
    write_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&state).map_err(CpuError::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }

    #[test]
    fn register_round_trip() {
        let mut s = kvm_lapic_state::default();
        write_reg(&mut s, APIC_LVT1, 0xdead_beef);
        assert_eq!(read_reg(&s, APIC_LVT1), 0xdead_beef);
    }
}
