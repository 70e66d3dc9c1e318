//! Whether a snapshot can resume on this host's CPU: every CPU feature bit the snapshot's guest
//! saw in its CPUID must be one this host's KVM supports (`KVM_GET_SUPPORTED_CPUID`), or the
//! guest could execute an instruction the host cannot run. [`FEATURE_REGISTERS`] says which
//! CPUID registers hold feature flags; bits that describe the VM rather than the CPU (the APIC
//! id, topology, the hypervisor bit, OSXSAVE/OSPKE mirroring CR4) are left out.

use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

use super::vcpu_state::CpuidEntry;
use super::SnapshotError;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Register {
    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Self::Eax => e.eax,
            Self::Ebx => e.ebx,
            Self::Ecx => e.ecx,
            Self::Edx => e.edx,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Eax => "EAX",
            Self::Ebx => "EBX",
            Self::Ecx => "ECX",
            Self::Edx => "EDX",
        }
    }
}

/// A CPUID register whose bits are CPU features.
#[derive(Debug, Clone, Copy)]
pub struct FeatureRegister {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input).
    pub subleaf: u32,
    /// The register.
    pub register: Register,
    /// The bits that are features.
    pub mask: u32,
}

const fn reg(leaf: u32, subleaf: u32, register: Register, mask: u32) -> FeatureRegister {
    FeatureRegister {
        leaf,
        subleaf,
        register,
        mask,
    }
}

/// Leaf 1 ECX: OSXSAVE (27) mirrors CR4, the hypervisor bit (31) is the VMM's.
const LEAF1_ECX_MASK: u32 = !((1 << 27) | (1 << 31));
/// Leaf 1 EDX: APIC (9) follows the APIC-base MSR, HTT (28) is the VMM's topology.
const LEAF1_EDX_MASK: u32 = !((1 << 9) | (1 << 28));
/// Leaf 7 ECX: OSPKE (4) mirrors CR4.
const LEAF7_ECX_MASK: u32 = !(1 << 4);

/// The CPUID registers compared.
pub const FEATURE_REGISTERS: &[FeatureRegister] = &[
    reg(0x1, 0, Register::Ecx, LEAF1_ECX_MASK),
    reg(0x1, 0, Register::Edx, LEAF1_EDX_MASK),
    reg(0x6, 0, Register::Eax, u32::MAX),
    reg(0x7, 0, Register::Ebx, u32::MAX),
    reg(0x7, 0, Register::Ecx, LEAF7_ECX_MASK),
    reg(0x7, 0, Register::Edx, u32::MAX),
    reg(0x7, 1, Register::Eax, u32::MAX),
    // XSAVE state components (XCR0 bits) and XSAVE instruction variants.
    reg(0xd, 0, Register::Eax, u32::MAX),
    reg(0xd, 0, Register::Edx, u32::MAX),
    reg(0xd, 1, Register::Eax, u32::MAX),
    // KVM's paravirtual features (kvmclock, async PF, PV EOI...).
    reg(0x4000_0001, 0, Register::Eax, u32::MAX),
    reg(0x8000_0001, 0, Register::Ecx, u32::MAX),
    reg(0x8000_0001, 0, Register::Edx, u32::MAX),
    reg(0x8000_0007, 0, Register::Edx, u32::MAX),
    reg(0x8000_0008, 0, Register::Ebx, u32::MAX),
];

/// Feature bits a snapshot's guest saw that this host's KVM lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCpuFeature {
    /// The leaf.
    pub leaf: u32,
    /// The subleaf.
    pub subleaf: u32,
    /// The register.
    pub register: Register,
    /// The missing bits.
    pub bits: u32,
}

impl std::fmt::Display for MissingCpuFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPUID leaf {:#x} subleaf {} {} bits {:#010x}",
            self.leaf,
            self.subleaf,
            self.register.name(),
            self.bits
        )
    }
}

/// The list as one line.
pub(crate) fn describe(missing: &[MissingCpuFeature]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The entry for `leaf`/`subleaf`: an exact match, else one whose subleaf does not matter.
fn lookup(entries: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .or_else(|| {
            entries
                .iter()
                .find(|e| e.function == leaf && e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        })
}

/// The feature bits of `guest` that `host` lacks (an absent leaf has no features).
pub fn missing_features(guest: &[CpuidEntry], host: &[CpuidEntry]) -> Vec<MissingCpuFeature> {
    FEATURE_REGISTERS
        .iter()
        .filter_map(|r| {
            let want = lookup(guest, r.leaf, r.subleaf).map_or(0, |e| r.register.of(e)) & r.mask;
            let have = lookup(host, r.leaf, r.subleaf).map_or(0, |e| r.register.of(e));
            let bits = want & !have;
            (bits != 0).then_some(MissingCpuFeature {
                leaf: r.leaf,
                subleaf: r.subleaf,
                register: r.register,
                bits,
            })
        })
        .collect()
}

/// A short name for the CPU features in `cpuid` ([`FEATURE_REGISTERS`] only): `cpu-` and the
/// CRC-32 of the masked feature registers, in hex. Hosts whose KVM offers the same features
/// have the same class, and a snapshot taken on one restores on any other: what a scheduler
/// matches to send a checkpointed job only where it can go on.
pub fn feature_class(cpuid: &[CpuidEntry]) -> String {
    let mut crc = crc32fast::Hasher::new();
    for r in FEATURE_REGISTERS {
        let value = lookup(cpuid, r.leaf, r.subleaf).map_or(0, |e| r.register.of(e)) & r.mask;
        crc.update(&r.leaf.to_le_bytes());
        crc.update(&r.subleaf.to_le_bytes());
        crc.update(&value.to_le_bytes());
    }
    format!("cpu-{:08x}", crc.finalize())
}

/// [`feature_class`] of what this host's KVM offers a guest.
pub fn host_class() -> Result<String, SnapshotError> {
    Ok(feature_class(&host_supported_cpuid()?))
}

/// The CPUID `kvm` can give a guest ([`crate::cpu::cpuid::kvm_guest_cpuid`]): what [`check`]
/// compares a snapshot against on restore.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<Vec<CpuidEntry>, SnapshotError> {
    Ok(crate::cpu::cpuid::kvm_guest_cpuid(kvm)
        .map_err(SnapshotError::kvm("KVM_GET_SUPPORTED_CPUID"))?
        .as_slice()
        .iter()
        .map(CpuidEntry::from)
        .collect())
}

/// [`supported_cpuid`] of a fresh `/dev/kvm` descriptor.
pub fn host_supported_cpuid() -> Result<Vec<CpuidEntry>, SnapshotError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(SnapshotError::kvm("opening /dev/kvm"))?;
    supported_cpuid(&kvm)
}

/// Refuses a guest CPUID with features `host` lacks, naming them.
pub fn check(guest: &[CpuidEntry], host: &[CpuidEntry]) -> Result<(), SnapshotError> {
    let missing = missing_features(guest, host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::CpuIncompatible(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0,
            ebx,
            ecx,
            edx: 0,
        }
    }

    #[test]
    fn the_class_names_the_features_and_nothing_else() {
        let host = [entry(1, 0, 0x0100_0000, 0b1111), entry(7, 0, 0x20, 0)];
        let class = feature_class(&host);
        assert!(class.starts_with("cpu-") && class.len() == 12, "{class}");
        // another APIC id, the OSXSAVE mirror of CR4, the hypervisor bit: the same class
        let same = [
            entry(1, 0, 0x0300_0000, 0b1111 | (1 << 27) | (1 << 31)),
            entry(7, 0, 0x20, 0),
        ];
        assert_eq!(feature_class(&same), class);
        // one feature more or less: another class
        assert_ne!(
            feature_class(&[entry(1, 0, 0, 0b1111), entry(7, 0, 0x21, 0)]),
            class
        );
        assert_ne!(
            feature_class(&[entry(1, 0, 0, 0b0111), entry(7, 0, 0x20, 0)]),
            class
        );
        // entries in another order: the same class
        assert_eq!(feature_class(&[host[1], host[0]]), class);
    }

    #[test]
    fn a_subset_passes_and_a_missing_bit_is_named() {
        let host = [entry(1, 0, 0, 0b1111), entry(7, 0, 0x20, 0)];
        let guest = [entry(1, 0, 0xff00_0000, 0b0101), entry(7, 0, 0x20, 0)];
        assert!(
            check(&guest, &host).is_ok(),
            "APIC id in EBX is not a feature"
        );
        let guest = [entry(1, 0, 0, 0b1_0000), entry(7, 0, 0x21, 0)];
        let err = check(&guest, &host).unwrap_err();
        let SnapshotError::CpuIncompatible(missing) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            missing,
            &vec![
                MissingCpuFeature {
                    leaf: 1,
                    subleaf: 0,
                    register: Register::Ecx,
                    bits: 0b1_0000
                },
                MissingCpuFeature {
                    leaf: 7,
                    subleaf: 0,
                    register: Register::Ebx,
                    bits: 1
                }
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("leaf 0x7 subleaf 0 EBX bits 0x00000001"),
            "{text}"
        );
    }

    #[test]
    fn vmm_owned_bits_are_not_compared() {
        let host = [entry(1, 0, 0, 0)];
        let guest = [entry(1, 0, 0, (1 << 31) | (1 << 27))];
        assert!(check(&guest, &host).is_ok());
    }
}
