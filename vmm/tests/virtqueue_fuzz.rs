//! Property test standing in for `cargo fuzz` (which needs nightly): random guest memory,
//! descriptor tables, rings, headers and register writes through the virtio-mmio transport, the
//! virtqueues and the vsock packet path never panic and never touch memory outside guest RAM.
//! `cargo run -p vmm --example fuzz_vsock_queue -- <iterations>` runs the same case generator
//! for as long as wanted.

mod fuzz_support;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_queues_and_packets_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let dir = tempfile::tempdir().unwrap();
        fuzz_support::run_case(&data, &dir.path().join("v.sock"));
    }
}

/// The generator is not stuck at the set-up: an all-zero input (rings in RAM, sizes 8) brings
/// the device to DRIVER_OK.
#[test]
fn a_plain_case_reaches_driver_ok() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = fuzz_support::run_case(&[0u8; 512], &dir.path().join("v.sock"));
    assert!(outcome.activated && !outcome.needs_reset, "{outcome:?}");
}
