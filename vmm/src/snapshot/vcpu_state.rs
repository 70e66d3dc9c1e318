//! One vCPU's state as plain serde types, converted from and to the kvm-bindings structs;
//! [`capture`] reads it from a `VcpuFd` (on the vCPU's own thread, see [`crate::vcpu`]) and
//! [`restore`] loads it into a fresh one.
//!
//! What is kept: general and special registers, the x87/SSE/AVX state (XSAVE where KVM has
//! `KVM_CAP_XSAVE`, else the legacy FPU block), the XCRs (where `KVM_CAP_XCRS`), every MSR in
//! KVM's `KVM_GET_MSR_INDEX_LIST` that `KVM_GET_MSRS` can read, the local APIC's register page,
//! the debug registers, pending events, the MP state, the CPUID the VMM gave the vCPU, and its TSC
//! frequency. MSRs are stored in restore order: `IA32_TSC_DEADLINE` after `IA32_TSC`, and a zero
//! deadline replaced by the TSC value, as Firecracker does (KVM compares the deadline with the
//! TSC when it is written; restoring it first, or as zero, can lose the guest's next timer
//! interrupt).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;
pub use crate::cpu::msrs::MSR_IA32_TSC;

/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs restored after all others, in this order.
const DEFERRED_MSRS: [u32; 1] = [MSR_IA32_TSC_DEADLINE];

/// Bytes of the local APIC register page (`kvm_lapic_state`).
pub const LAPIC_REGS_LEN: usize = 1024;
/// 32-bit words of the legacy XSAVE area (`kvm_xsave.region`).
pub const XSAVE_LEGACY_WORDS: usize = 1024;
/// Largest XSAVE area accepted (64 KiB; AMX needs about 11 KiB).
pub const MAX_XSAVE_WORDS: usize = 16 * 1024;
/// Most XCRs KVM has room for.
pub const MAX_XCRS: usize = 16;
/// Most MSRs accepted per vCPU.
pub const MAX_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;

/// The general registers (`kvm_regs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

super::mirror_struct!(
    Regs,
    kvm_regs,
    [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags]
);

/// A segment register (`kvm_segment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

super::mirror_struct!(
    Segment,
    kvm_segment,
    [base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable]
);

/// A descriptor table register (`kvm_dtable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The special registers (`kvm_sregs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// Pending external interrupt (one bit per vector), as KVM reports it.
    pub interrupt_bitmap: [u64; 4],
}

super::mirror_struct!(DescriptorTable, kvm_dtable, [base, limit]);
super::mirror_struct!(
    Sregs,
    kvm_sregs,
    [cr0, cr2, cr3, cr4, cr8, efer, apic_base, interrupt_bitmap],
    via [cs, ds, es, fs, gs, ss, tr, ldt, gdt, idt]
);

/// The legacy x87/SSE block (`kvm_fpu`), kept where KVM has no XSAVE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

super::mirror_struct!(
    Fpu,
    kvm_fpu,
    [
        fpr,
        fcw,
        fsw,
        ftwx,
        last_opcode,
        last_ip,
        last_dp,
        xmm,
        mxcsr
    ]
);

/// The floating-point and vector state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FloatingPoint {
    /// The XSAVE area as KVM_GET_XSAVE(2) returns it: raw 32-bit words, because it is a
    /// hardware-defined layout (legacy area, XSAVE header, components at CPUID-given offsets)
    /// that KVM itself passes through as a blob.
    Xsave(Vec<u32>),
    /// The legacy FPU block, where KVM lacks `KVM_CAP_XSAVE`.
    Fpu(Box<Fpu>),
}

/// One extended control register (`kvm_xcr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// Which XCR (0 is XCR0).
    pub xcr: u32,
    /// Its value.
    pub value: u64,
}

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// The MSR's index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The debug registers (`kvm_debugregs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub flags: u64,
}

/// Pending exceptions, interrupts, NMIs and SMIs (`kvm_vcpu_events`), field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_smm_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
}

/// `From` both ways between [`VcpuEvents`] and `kvm_vcpu_events`, from one list of our flat
/// field and its path in KVM's nested struct.
macro_rules! vcpu_events_fields {
    ($($ours:ident: $($path:ident).+),+ $(,)?) => {
        impl From<&kvm_vcpu_events> for VcpuEvents {
            fn from(k: &kvm_vcpu_events) -> Self {
                Self {
                    $($ours: k.$($path).+,)+
                }
            }
        }

        impl From<&VcpuEvents> for kvm_vcpu_events {
            fn from(e: &VcpuEvents) -> Self {
                let mut k = kvm_vcpu_events::default();
                $(k.$($path).+ = e.$ours;)+
                k
            }
        }
    };
}

vcpu_events_fields!(
    exception_injected: exception.injected,
    exception_nr: exception.nr,
    exception_has_error_code: exception.has_error_code,
    exception_pending: exception.pending,
    exception_error_code: exception.error_code,
    interrupt_injected: interrupt.injected,
    interrupt_nr: interrupt.nr,
    interrupt_soft: interrupt.soft,
    interrupt_shadow: interrupt.shadow,
    nmi_injected: nmi.injected,
    nmi_pending: nmi.pending,
    nmi_masked: nmi.masked,
    sipi_vector: sipi_vector,
    flags: flags,
    smi_smm: smi.smm,
    smi_pending: smi.pending,
    smi_smm_inside_nmi: smi.smm_inside_nmi,
    smi_latched_init: smi.latched_init,
    triple_fault_pending: triple_fault.pending,
    exception_has_payload: exception_has_payload,
    exception_payload: exception_payload,
);

/// One CPUID leaf as the vCPU was given it (`kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

super::mirror_struct!(
    CpuidEntry,
    kvm_cpuid_entry2,
    [function, index, flags, eax, ebx, ecx, edx]
);

/// Everything about one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: Sregs,
    /// x87/SSE/AVX state.
    pub fp: FloatingPoint,
    /// Extended control registers; `None` where KVM lacks `KVM_CAP_XCRS`.
    pub xcrs: Option<Vec<Xcr>>,
    /// MSRs, in restore order.
    pub msrs: Vec<MsrEntry>,
    /// The local APIC's 1 KiB register page, raw: it is the hardware's register layout, which
    /// KVM passes through as bytes too.
    pub lapic: Vec<u8>,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// Pending events.
    pub events: VcpuEvents,
    /// `KVM_MP_STATE_*` (runnable, halted, waiting for INIT/SIPI...).
    pub mp_state: u32,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<CpuidEntry>,
    /// The vCPU's TSC frequency in kHz, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Checks the sizes a crafted file could get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.lapic.len() != LAPIC_REGS_LEN {
            return Err(format!(
                "LAPIC page is {} bytes, not {LAPIC_REGS_LEN}",
                self.lapic.len()
            ));
        }
        if let FloatingPoint::Xsave(words) = &self.fp {
            if words.len() < XSAVE_LEGACY_WORDS || words.len() > MAX_XSAVE_WORDS {
                return Err(format!("XSAVE area of {} words", words.len()));
            }
        }
        if self.xcrs.as_ref().is_some_and(|x| x.len() > MAX_XCRS) {
            return Err("more than 16 XCRs".into());
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(format!("{} MSRs", self.msrs.len()));
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(format!("{} CPUID entries", self.cpuid.len()));
        }
        Ok(())
    }
}

/// What a VM's KVM offers for capturing vCPU state, probed once per VM: by its first snapshot,
/// or when it is restored, on that caller's thread (the vCPU threads' seccomp filter allows no
/// `/dev/kvm` or VM ioctls).
#[derive(Debug, Clone)]
pub struct VcpuStateCaps {
    /// Size in bytes of the XSAVE area KVM fills (`KVM_CAP_XSAVE2`), or `None` without
    /// `KVM_CAP_XSAVE` (then the legacy FPU block is used). At least 4096 when present.
    pub xsave_bytes: Option<usize>,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debug_regs: bool,
    /// `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: bool,
    /// `KVM_GET_MSR_INDEX_LIST`, or why it is unavailable.
    pub msr_indices: Result<Vec<u32>, String>,
}

impl VcpuStateCaps {
    /// Probes `kvm` and `vm`.
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Self {
        let xsave_bytes = if vm.check_extension(Cap::Xsave) {
            let size = vm.check_extension_int(Cap::Xsave2);
            Some((size.max(0) as usize).max(std::mem::size_of::<kvm_xsave>()))
        } else {
            None
        };
        Self {
            xsave_bytes,
            xcrs: vm.check_extension(Cap::Xcrs),
            debug_regs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            msr_indices: kvm
                .get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST failed: {e}")),
        }
    }
}

/// Reads every MSR of `indices` that KVM will read, in chunks; an MSR that KVM_GET_MSRS stops at
/// is left out. Returns them in restore order (deferred ones last, a zero TSC deadline
/// replaced).
fn read_msrs(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Vec<MsrEntry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::InvalidState(format!("MSR list: {e:?}")))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(SnapshotError::kvm(format!("vCPU {vcpu}: KVM_GET_MSRS")))?;
        let read = read.min(chunk.len());
        out.extend(msrs.as_slice()[..read].iter().map(|m| MsrEntry {
            index: m.index,
            data: m.data,
        }));
        // KVM stops at the first MSR it cannot read: skip it and go on after it.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    order_msrs_for_restore(&mut out);
    Ok(out)
}

/// Moves the deferred MSRs to the end and gives a zero TSC deadline the TSC's value (see the
/// module docs).
pub fn order_msrs_for_restore(msrs: &mut Vec<MsrEntry>) {
    let tsc = msrs
        .iter()
        .filter(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
        .max();
    let (mut deferred, rest): (Vec<MsrEntry>, Vec<MsrEntry>) =
        msrs.iter().partition(|m| DEFERRED_MSRS.contains(&m.index));
    if let Some(tsc) = tsc {
        for m in deferred
            .iter_mut()
            .filter(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data == 0)
        {
            m.data = tsc;
        }
    }
    *msrs = rest;
    msrs.append(&mut deferred);
}

fn xsave_fam_len(bytes: usize) -> usize {
    bytes
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(4)
}

/// Captures vCPU `vcpu`'s state; `cpuid` is the CPUID the VMM gave it (`KVM_SET_CPUID2`). The
/// vCPU must be out of `KVM_RUN` with no I/O pending completion (see [`crate::vcpu`]), and no
/// other vCPU of the VM may be running.
///
/// The CPUID is the one the VMM set, not `KVM_GET_CPUID2`'s answer: on kvm_pvm (measured) that
/// returns leaves with many more feature bits than were set and than
/// `KVM_GET_SUPPORTED_CPUID` offers, so a snapshot built from it would be refused by its own
/// host.
pub fn capture(
    fd: &VcpuFd,
    vcpu: u8,
    caps: &VcpuStateCaps,
    cpuid: &[CpuidEntry],
) -> Result<VcpuState, SnapshotError> {
    let what = |ioctl: &str| format!("vCPU {vcpu}: {ioctl}");
    // KVM_GET_MP_STATE accepts pending INIT/SIPI into the LAPIC and MP state: first, as
    // Firecracker does, so the rest is read after that change.
    let mp_state = fd
        .get_mp_state()
        .map_err(SnapshotError::kvm(what("KVM_GET_MP_STATE")))?
        .mp_state;
    let regs = Regs::from(
        &fd.get_regs()
            .map_err(SnapshotError::kvm(what("KVM_GET_REGS")))?,
    );
    let sregs = Sregs::from(
        &fd.get_sregs()
            .map_err(SnapshotError::kvm(what("KVM_GET_SREGS")))?,
    );
    let fp = match caps.xsave_bytes {
        Some(bytes) if bytes > std::mem::size_of::<kvm_xsave>() => {
            let mut xsave = Xsave::new(xsave_fam_len(bytes))
                .map_err(|e| SnapshotError::InvalidState(format!("XSAVE buffer: {e:?}")))?;
            // SAFETY: `xsave` has room for `bytes` bytes, the size KVM_CAP_XSAVE2 reported for
            // this VM; the VMM enables no dynamic XSTATE features (arch_prctl) after probing.
            unsafe { fd.get_xsave2(&mut xsave) }
                .map_err(SnapshotError::kvm(what("KVM_GET_XSAVE2")))?;
            let x = &xsave.as_fam_struct_ref().xsave;
            let mut words = x.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            FloatingPoint::Xsave(words)
        }
        Some(_) => FloatingPoint::Xsave(
            fd.get_xsave()
                .map_err(SnapshotError::kvm(what("KVM_GET_XSAVE")))?
                .region
                .to_vec(),
        ),
        None => FloatingPoint::Fpu(Box::new(Fpu::from(
            &fd.get_fpu()
                .map_err(SnapshotError::kvm(what("KVM_GET_FPU")))?,
        ))),
    };
    let xcrs = if caps.xcrs {
        let x = fd
            .get_xcrs()
            .map_err(SnapshotError::kvm(what("KVM_GET_XCRS")))?;
        let n = (x.nr_xcrs as usize).min(MAX_XCRS);
        Some(
            x.xcrs[..n]
                .iter()
                .map(|x| Xcr {
                    xcr: x.xcr,
                    value: x.value,
                })
                .collect(),
        )
    } else {
        None
    };
    let debug_regs = if caps.debug_regs {
        let d = fd
            .get_debug_regs()
            .map_err(SnapshotError::kvm(what("KVM_GET_DEBUGREGS")))?;
        DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
        }
    } else {
        DebugRegs::default()
    };
    let lapic = fd
        .get_lapic()
        .map_err(SnapshotError::kvm(what("KVM_GET_LAPIC")))?
        .regs
        .iter()
        .map(|b| *b as u8)
        .collect();
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = cpuid.to_vec();
    let indices = caps
        .msr_indices
        .as_ref()
        .map_err(|e| SnapshotError::InvalidState(e.clone()))?;
    let msrs = read_msrs(fd, vcpu, indices)?;
    // Last, as Firecracker does: the GET ioctls above may change what is pending.
    let events = if caps.vcpu_events {
        VcpuEvents::from(
            &fd.get_vcpu_events()
                .map_err(SnapshotError::kvm(what("KVM_GET_VCPU_EVENTS")))?,
        )
    } else {
        VcpuEvents::default()
    };
    Ok(VcpuState {
        regs,
        sregs,
        fp,
        xcrs,
        msrs,
        lapic,
        debug_regs,
        events,
        mp_state,
        cpuid,
        tsc_khz,
    })
}

/// Loads `state` into a freshly created vCPU `vcpu` of a VM whose in-kernel irqchip exists.
/// The order follows KVM's constraints (as Firecracker documents them): CPUID first; MP state;
/// REGS before VCPU_EVENTS (SET_REGS clears pending exceptions); SREGS before LAPIC (the APIC
/// base); LAPIC before MSRs (the TSC deadline needs the APIC); VCPU_EVENTS last.
pub fn restore(
    fd: &VcpuFd,
    vcpu: u8,
    state: &VcpuState,
    caps: &VcpuStateCaps,
) -> Result<(), SnapshotError> {
    state.validate().map_err(SnapshotError::InvalidState)?;
    let what = |ioctl: &str| format!("vCPU {vcpu}: {ioctl}");

    let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(Into::into).collect();
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| SnapshotError::InvalidState(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid)
        .map_err(SnapshotError::kvm(what("KVM_SET_CPUID2")))?;

    if let Some(khz) = state.tsc_khz {
        restore_tsc_khz(fd, vcpu, khz)?;
    }

    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(SnapshotError::kvm(what("KVM_SET_MP_STATE")))?;
    fd.set_regs(&(&state.regs).into())
        .map_err(SnapshotError::kvm(what("KVM_SET_REGS")))?;
    fd.set_sregs(&(&state.sregs).into())
        .map_err(SnapshotError::kvm(what("KVM_SET_SREGS")))?;

    match &state.fp {
        FloatingPoint::Xsave(words) => {
            let bytes = caps
                .xsave_bytes
                .ok_or(SnapshotError::MissingCapability("KVM_CAP_XSAVE"))?;
            let fam = xsave_fam_len(bytes);
            if words.len() > XSAVE_LEGACY_WORDS + fam {
                return Err(SnapshotError::InvalidState(format!(
                    "the XSAVE area is {} bytes, this host's KVM takes {bytes}",
                    words.len() * 4
                )));
            }
            let mut xsave = Xsave::new(fam)
                .map_err(|e| SnapshotError::InvalidState(format!("XSAVE buffer: {e:?}")))?;
            let (legacy, extra) = words.split_at(XSAVE_LEGACY_WORDS.min(words.len()));
            // SAFETY: plain-data FAM header access; no length field is changed.
            unsafe { xsave.as_mut_fam_struct() }.xsave.region[..legacy.len()]
                .copy_from_slice(legacy);
            xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
            // SAFETY: `xsave` holds `bytes` bytes (rounded up to whole words), the size
            // KVM_CAP_XSAVE2 reports for this VM (4096 without it), so KVM_SET_XSAVE reads
            // nothing past it; no dynamic XSTATE feature is enabled after the probe.
            unsafe { fd.set_xsave2(&xsave) }.map_err(SnapshotError::kvm(what("KVM_SET_XSAVE")))?;
        }
        FloatingPoint::Fpu(f) => fd
            .set_fpu(&f.as_ref().into())
            .map_err(SnapshotError::kvm(what("KVM_SET_FPU")))?,
    }

    if let Some(xcrs) = &state.xcrs {
        if !caps.xcrs {
            return Err(SnapshotError::MissingCapability("KVM_CAP_XCRS"));
        }
        let mut k = kvm_xcrs {
            nr_xcrs: xcrs.len() as u32,
            ..Default::default()
        };
        for (slot, x) in k.xcrs.iter_mut().zip(xcrs) {
            *slot = kvm_xcr {
                xcr: x.xcr,
                reserved: 0,
                value: x.value,
            };
        }
        fd.set_xcrs(&k)
            .map_err(SnapshotError::kvm(what("KVM_SET_XCRS")))?;
    }

    if caps.debug_regs {
        let d = kvm_debugregs {
            db: state.debug_regs.db,
            dr6: state.debug_regs.dr6,
            dr7: state.debug_regs.dr7,
            flags: state.debug_regs.flags,
            ..Default::default()
        };
        fd.set_debug_regs(&d)
            .map_err(SnapshotError::kvm(what("KVM_SET_DEBUGREGS")))?;
    }

    let mut lapic = kvm_lapic_state::default();
    for (dst, src) in lapic.regs.iter_mut().zip(&state.lapic) {
        *dst = *src as std::os::raw::c_char;
    }
    fd.set_lapic(&lapic)
        .map_err(SnapshotError::kvm(what("KVM_SET_LAPIC")))?;

    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::InvalidState(format!("MSR list: {e:?}")))?;
        let written = fd
            .set_msrs(&msrs)
            .map_err(SnapshotError::kvm(what("KVM_SET_MSRS")))?;
        if written < chunk.len() {
            return Err(SnapshotError::MsrRefused {
                vcpu,
                index: chunk[written].index,
            });
        }
    }

    if caps.vcpu_events {
        fd.set_vcpu_events(&(&state.events).into())
            .map_err(SnapshotError::kvm(what("KVM_SET_VCPU_EVENTS")))?;
    }

    // Tells a kvmclock guest it was paused, so its watchdogs do not fire; EINVAL when the guest
    // has no kvmclock, which is fine.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

/// Scales the vCPU's TSC to the snapshot's frequency when this host's differs by more than 250
/// parts per million (calibration noise), as Firecracker does.
fn restore_tsc_khz(fd: &VcpuFd, vcpu: u8, khz: u32) -> Result<(), SnapshotError> {
    let Ok(here) = fd.get_tsc_khz() else {
        tracing::warn!(vcpu, "KVM cannot report the TSC frequency; not scaling it");
        return Ok(());
    };
    let diff = (i64::from(here) - i64::from(khz)).abs();
    if diff * 1_000_000 > i64::from(khz) * 250 {
        fd.set_tsc_khz(khz).map_err(SnapshotError::kvm(format!(
            "vCPU {vcpu}: KVM_SET_TSC_KHZ {khz}"
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_deadline_goes_last_and_a_zero_one_gets_the_tsc() {
        let mut m = vec![
            MsrEntry {
                index: MSR_IA32_TSC_DEADLINE,
                data: 0,
            },
            MsrEntry {
                index: 0x174,
                data: 1,
            },
            MsrEntry {
                index: MSR_IA32_TSC,
                data: 777,
            },
        ];
        order_msrs_for_restore(&mut m);
        assert_eq!(m[0].index, 0x174);
        assert_eq!(m[1].index, MSR_IA32_TSC);
        assert_eq!(
            m[2],
            MsrEntry {
                index: MSR_IA32_TSC_DEADLINE,
                data: 777
            }
        );
    }

    #[test]
    #[allow(clippy::field_reassign_with_default)]
    fn kvm_structs_round_trip() {
        let r = kvm_regs {
            rip: 0x1234,
            r15: 7,
            ..Default::default()
        };
        assert_eq!(kvm_regs::from(&Regs::from(&r)), r);
        let mut s = kvm_sregs::default();
        s.cs.selector = 8;
        s.cs.l = 1;
        s.efer = 0x500;
        s.gdt.base = 0x500;
        s.interrupt_bitmap[2] = 4;
        assert_eq!(kvm_sregs::from(&Sregs::from(&s)), s);
        let mut e = kvm_vcpu_events::default();
        e.exception.nr = 14;
        e.nmi.masked = 1;
        e.sipi_vector = 6;
        e.exception_payload = 99;
        assert_eq!(kvm_vcpu_events::from(&VcpuEvents::from(&e)), e);
        let f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        assert_eq!(kvm_fpu::from(&Fpu::from(&f)), f);
    }
}
