//! Property tests of the snapshot parser and memory loader on arbitrary bytes: no input panics,
//! and whatever parses loads only within the guest's RAM. (The `snapshot_file` fuzz target
//! explores the same code coverage-guided; the KVM round trips are in
//! `tests/snapshot_guests.rs`.)

use proptest::prelude::*;

use super::format::{self, Header};
use super::memory;
use crate::memory::create_guest_memory;

/// Guest RAM the memory sections are loaded into.
const RAM_MIB: u64 = 2;

fn header(vcpus: u8) -> Vec<u8> {
    format::encode(&Header {
        build_id: format::build_id(),
        vcpus,
        guest_ram_bytes: RAM_MIB << 20,
        cpuid: Vec::new(),
    })
    .unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        // Nothing to persist failures next to: the cases are printed on failure.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = format::parse_bytes(&bytes);
        let mut with_magic = format::prelude().to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = format::parse_bytes(&with_magic);
    }

    #[test]
    fn well_framed_arbitrary_sections_never_panic(
        vcpus in 0u8..4,
        vm in proptest::collection::vec(any::<u8>(), 0..1200),
        cpus in proptest::collection::vec(any::<u8>(), 0..600),
        memory in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let file = format::frame_file([&header(vcpus), &vm, &cpus, &memory]);
        if let Ok(parsed) = format::parse_bytes(&file) {
            let mem = create_guest_memory(RAM_MIB).unwrap();
            let start = parsed.memory.offset as usize;
            let _ = memory::load(&mut &file[start..], parsed.memory.len, &mem);
        }
        let mem = create_guest_memory(RAM_MIB).unwrap();
        let _ = memory::load(&mut memory.as_slice(), memory.len() as u64, &mem);
    }
}

/// What a scheduler may retry on another host (sound snapshot, this host cannot resume it) and
/// what it may not (the file itself is unusable).
#[test]
fn host_mismatches_are_told_apart_from_damage() {
    use super::cpu_compat::{MissingCpuFeature, Register};
    use super::{SectionKind, SnapshotError};
    let elsewhere = [
        SnapshotError::CpuIncompatible(vec![MissingCpuFeature {
            leaf: 7,
            subleaf: 0,
            register: Register::Ebx,
            bits: 1 << 5,
        }]),
        SnapshotError::BuildMismatch {
            snapshot: "a".into(),
            this: "b".into(),
        },
        SnapshotError::VersionMismatch {
            found: 2,
            supported: 1,
        },
        SnapshotError::MissingCapability("KVM_CAP_XSAVE2"),
    ];
    for e in &elsewhere {
        assert!(e.is_host_mismatch(), "{e}");
    }
    let damaged = [
        SnapshotError::BadMagic { found: [0; 8] },
        SnapshotError::ChecksumMismatch {
            section: SectionKind::Memory,
            stored: 1,
            computed: 2,
        },
        SnapshotError::TrailingData(3),
        SnapshotError::ConfigMismatch("vCPUs".into()),
        SnapshotError::InvalidState("x".into()),
    ];
    for e in &damaged {
        assert!(!e.is_host_mismatch(), "{e}");
    }
}
