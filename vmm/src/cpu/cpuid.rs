//! The CPUID a vCPU sees: KVM's supported set, with the hypervisor bit, the APIC id and a
//! topology of one package with `vcpus` cores, minus features the caller asks to hide (for hosts
//! whose KVM cannot emulate them; see [`CpuFeature`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::CpuError;

/// CPU features that can be hidden from the guest. Hiding is for hosts whose KVM emulates guest
/// kernel code in software and lacks some instructions (see the project's notes on kvm_pvm); the
/// default VM hides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuFeature {
    /// XSAVE and everything that needs it (OSXSAVE, AVX, AVX2, AVX-512, FMA, F16C, leaf 0xD).
    Xsave,
    /// Supervisor-mode access prevention.
    Smap,
    /// Supervisor-mode execution prevention.
    Smep,
    /// The POPCNT instruction.
    Popcnt,
    /// The CMPXCHG16B instruction.
    Cmpxchg16b,
}

impl CpuFeature {
    /// Parses the names Linux uses in `clearcpuid=` (`xsave`, `smap`, `smep`, `popcnt`, `cx16`).
    pub fn from_linux_name(name: &str) -> Option<Self> {
        match name {
            "xsave" => Some(Self::Xsave),
            "smap" => Some(Self::Smap),
            "smep" => Some(Self::Smep),
            "popcnt" => Some(Self::Popcnt),
            "cx16" => Some(Self::Cmpxchg16b),
            _ => None,
        }
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

// Leaf 1 ECX/EDX bits.
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
/// TSC-deadline mode of the local APIC timer. KVM emulates it in the in-kernel LAPIC whenever
/// `KVM_CAP_TSC_DEADLINE_TIMER` is reported, but leaves it out of `KVM_GET_SUPPORTED_CPUID`
/// (it is not a host CPU feature): without it Linux calibrates the LAPIC timer against the PIT
/// (`calibrate_APIC_clock`, at least 100 ms of polling, 250-480 ms in the nested tier) before it
/// can start the first CPU. Firecracker and QEMU both set it.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX bits.
const EBX7_SMEP: u32 = 1 << 7;
const EBX7_SMAP: u32 = 1 << 20;
/// AVX2 and the AVX-512 family in leaf 7.0 EBX (bits 5, 16, 17, 21, 26, 27, 28, 30, 31).
const EBX7_AVX_FAMILY: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// AVX-512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ, VAES, VPCLMULQDQ, GFNI in leaf 7.0 ECX.
const ECX7_AVX_FAMILY: u32 =
    (1 << 1) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// AVX-512 4VNNIW/4FMAPS, VP2INTERSECT, FP16 in leaf 7.0 EDX.
const EDX7_AVX_FAMILY: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
/// AVX-VNNI and AVX512_BF16 in leaf 7.1 EAX.
const EAX71_AVX_FAMILY: u32 = (1 << 4) | (1 << 5);
// Leaf 6 ECX bit 3: energy performance bias, which a guest cannot use.
const ECX6_EPB: u32 = 1 << 3;

/// Topology the guest sees.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// This vCPU's index, used as its APIC id.
    pub cpu_index: u8,
    /// Number of vCPUs in the VM (one package, one thread per core).
    pub vcpus: u8,
}

/// Bits needed to number `n` cores (ceil(log2(n))).
fn bits_for(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (u32::from(n) - 1).leading_zeros()
    }
}

/// Applies topology, the hypervisor bit, and the hidden features to one entry.
pub fn filter_entry(entry: &mut kvm_cpuid_entry2, topo: Topology, hidden: &[CpuFeature]) {
    let apic_id = u32::from(topo.cpu_index);
    let hide = |f: CpuFeature| hidden.contains(&f);
    match entry.function {
        LEAF_FEATURES => {
            entry.ecx |= ECX_HYPERVISOR;
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(topo.vcpus) << 16);
            if topo.vcpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
            if hide(CpuFeature::Xsave) {
                entry.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_FMA | ECX_F16C);
            }
            if hide(CpuFeature::Popcnt) {
                entry.ecx &= !ECX_POPCNT;
            }
            if hide(CpuFeature::Cmpxchg16b) {
                entry.ecx &= !ECX_CX16;
            }
        }
        // EAX[31:26]: cores per package - 1 (only on leaves describing a cache).
        LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
            entry.eax = (entry.eax & 0x3fff) | (u32::from(topo.vcpus).saturating_sub(1) << 26);
        }
        LEAF_THERMAL_POWER => entry.ecx &= !ECX6_EPB,
        LEAF_EXT_FEATURES => {
            if entry.index == 0 {
                if hide(CpuFeature::Smep) {
                    entry.ebx &= !EBX7_SMEP;
                }
                if hide(CpuFeature::Smap) {
                    entry.ebx &= !EBX7_SMAP;
                }
                if hide(CpuFeature::Xsave) {
                    entry.ebx &= !EBX7_AVX_FAMILY;
                    entry.ecx &= !ECX7_AVX_FAMILY;
                    entry.edx &= !EDX7_AVX_FAMILY;
                }
            } else if entry.index == 1 && hide(CpuFeature::Xsave) {
                entry.eax &= !EAX71_AVX_FAMILY;
            }
        }
        LEAF_TOPOLOGY => {
            // Level 0: SMT (one thread per core); level 1: cores; higher levels invalid.
            let (shift, count, level_type) = match entry.index {
                0 => (0, 1, 1),
                1 => (bits_for(topo.vcpus), u32::from(topo.vcpus), 2),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = count;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = apic_id;
        }
        LEAF_XSAVE if hide(CpuFeature::Xsave) => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_AMD_SIZES => {
            // ECX[7:0]: number of cores - 1.
            entry.ecx = (entry.ecx & !0xff) | u32::from(topo.vcpus).saturating_sub(1);
        }
        LEAF_AMD_TOPOLOGY => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff; // core id; 0 extra threads per core
            entry.ecx = 0; // node 0
        }
        _ => {}
    }
}

/// Adds the features KVM emulates but does not list in its supported CPUID (see
/// [`ECX_TSC_DEADLINE`]): `tsc_deadline_timer` is whether KVM reports
/// `KVM_CAP_TSC_DEADLINE_TIMER`.
pub fn add_emulated_features(entry: &mut kvm_cpuid_entry2, tsc_deadline_timer: bool) {
    if entry.function == LEAF_FEATURES && tsc_deadline_timer {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Everything `kvm` can give a guest: `KVM_GET_SUPPORTED_CPUID` plus what it emulates without
/// listing it there ([`add_emulated_features`]). The base of every vCPU's CPUID, and what a
/// snapshot's guest CPUID is checked against on restore.
pub fn kvm_guest_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let tsc_deadline_timer = kvm.check_extension(Cap::TscDeadlineTimer);
    for entry in cpuid.as_mut_slice() {
        add_emulated_features(entry, tsc_deadline_timer);
    }
    Ok(cpuid)
}

/// Builds the CPUID for one vCPU from what KVM can give a guest ([`kvm_guest_cpuid`]).
pub fn vcpu_cpuid(kvm: &Kvm, topo: Topology, hidden: &[CpuFeature]) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm_guest_cpuid(kvm).map_err(CpuError::GetSupportedCpuid)?;
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, topo, hidden);
    }
    Ok(cpuid)
}

/// Programs the vCPU's CPUID; returns what it set (snapshots record it).
pub fn setup_cpuid(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    topo: Topology,
    hidden: &[CpuFeature],
) -> Result<CpuId, CpuError> {
    let cpuid = vcpu_cpuid(kvm, topo, hidden)?;
    vcpu.set_cpuid2(&cpuid).map_err(CpuError::SetCpuid)?;
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        e.ecx = 0;
        filter_entry(
            &mut e,
            Topology {
                cpu_index: 3,
                vcpus: 4,
            },
            &[],
        );
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn hidden_features_are_cleared_and_others_kept() {
        let mut e1 = entry(1, 0);
        let mut e7 = entry(7, 0);
        let hidden = [
            CpuFeature::Xsave,
            CpuFeature::Popcnt,
            CpuFeature::Cmpxchg16b,
            CpuFeature::Smap,
            CpuFeature::Smep,
        ];
        let topo = Topology {
            cpu_index: 0,
            vcpus: 1,
        };
        filter_entry(&mut e1, topo, &hidden);
        filter_entry(&mut e7, topo, &hidden);
        assert_eq!(
            e1.ecx & (ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_POPCNT | ECX_CX16),
            0
        );
        assert_ne!(e1.ecx & 1, 0, "SSE3 stays");
        assert_eq!(e7.ebx & (EBX7_SMAP | EBX7_SMEP | (1 << 5)), 0);
        assert_ne!(e7.ebx & (1 << 9), 0, "ERMS stays");
        let mut none = entry(1, 0);
        filter_entry(&mut none, topo, &[]);
        assert_ne!(none.ecx & ECX_XSAVE, 0);
    }

    #[test]
    fn topology_leaf_describes_cores() {
        let mut l0 = entry(0xb, 0);
        let mut l1 = entry(0xb, 1);
        let mut l2 = entry(0xb, 2);
        let topo = Topology {
            cpu_index: 2,
            vcpus: 3,
        };
        for e in [&mut l0, &mut l1, &mut l2] {
            filter_entry(e, topo, &[]);
        }
        assert_eq!((l0.eax, l0.ebx, l0.ecx >> 8, l0.edx), (0, 1, 1, 2));
        assert_eq!((l1.eax, l1.ebx, l1.ecx >> 8, l1.edx), (2, 3, 2, 2));
        assert_eq!((l2.ebx, l2.ecx >> 8), (0, 0));
    }

    #[test]
    fn tsc_deadline_timer_is_added_to_leaf1_only_when_kvm_emulates_it() {
        let mut with = entry(1, 0);
        with.ecx = 0;
        add_emulated_features(&mut with, true);
        assert_eq!(with.ecx, ECX_TSC_DEADLINE);
        let mut without = entry(1, 0);
        without.ecx = 0;
        add_emulated_features(&mut without, false);
        assert_eq!(without.ecx, 0);
        let mut other = entry(7, 0);
        other.ecx = 0;
        add_emulated_features(&mut other, true);
        assert_eq!(other.ecx, 0, "only leaf 1 carries the bit");
    }

    #[test]
    fn linux_names_parse() {
        assert_eq!(
            CpuFeature::from_linux_name("cx16"),
            Some(CpuFeature::Cmpxchg16b)
        );
        assert_eq!(CpuFeature::from_linux_name("avx"), None);
    }

    #[test]
    fn supported_cpuid_from_kvm_is_filtered() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: /dev/kvm cannot be opened here");
            return;
        };
        let cpuid = vcpu_cpuid(
            &kvm,
            Topology {
                cpu_index: 0,
                vcpus: 2,
            },
            &[CpuFeature::Xsave],
        )
        .unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ecx & ECX_XSAVE, 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
        assert_eq!(
            leaf1.ecx & ECX_TSC_DEADLINE != 0,
            kvm.check_extension(Cap::TscDeadlineTimer)
        );
    }
}
