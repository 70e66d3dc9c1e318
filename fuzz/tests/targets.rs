//! Every fuzz target over its seed inputs and a few thousand random ones, on the plain
//! toolchain, so CI exercises the harnesses and the code behind them without AFL++ (the long
//! coverage-guided runs are scripts/fuzz.sh). Also checks that the seeds get past the set-up,
//! so a harness that silently does nothing would fail here.

use fuzz::driver::random_cases;
use fuzz::targets::{
    block_request, by_name, fuse_request, net_frames, snapshot_file, virtqueue_chains,
    vsock_packets, TARGETS,
};

/// Random cases per target (the queue-level targets make a guest RAM and a scratch directory
/// per case, about a millisecond each in a debug build).
const RANDOM_CASES: u64 = 2000;

fn seeds_then_random(name: &str) {
    let target = by_name(name).expect("a known target");
    let seeds = (target.seeds)();
    assert!(!seeds.is_empty(), "{name} has no seeds");
    for seed in &seeds {
        (target.run)(seed);
    }
    random_cases(target, RANDOM_CASES, 0x5eed_0000 ^ name.len() as u64);
}

#[test]
fn virtqueue_chains_seeds_and_random_inputs() {
    seeds_then_random("virtqueue_chains");
}

#[test]
fn vsock_packets_seeds_and_random_inputs() {
    seeds_then_random("vsock_packets");
}

#[test]
fn fuse_request_seeds_and_random_inputs() {
    seeds_then_random("fuse_request");
}

#[test]
fn block_request_seeds_and_random_inputs() {
    seeds_then_random("block_request");
}

#[test]
fn agent_frames_seeds_and_random_inputs() {
    seeds_then_random("agent_frames");
}

#[test]
fn net_frames_seeds_and_random_inputs() {
    seeds_then_random("net_frames");
}

#[test]
fn snapshot_file_seeds_and_random_inputs() {
    seeds_then_random("snapshot_file");
}

/// The snapshot seeds, in each mode, get past the checksums, the decoders and the memory
/// checks.
#[test]
fn snapshot_file_seeds_parse_and_load() {
    for (i, seed) in snapshot_file::seeds().iter().enumerate() {
        assert!(snapshot_file::parses(seed), "seed {i}");
    }
}

#[test]
fn every_target_has_a_binary() {
    for t in TARGETS {
        let bin = format!("{}/src/bin/fuzz_{}.rs", env!("CARGO_MANIFEST_DIR"), t.name);
        assert!(std::path::Path::new(&bin).exists(), "{bin} is missing");
    }
}

/// The queue generator is not stuck at the set-up: an all-zero input (rings in RAM, sizes 8)
/// brings each device to DRIVER_OK.
#[test]
fn plain_queue_cases_reach_driver_ok() {
    for device in 0..3u8 {
        let mut data = vec![0u8; 512];
        data[0] = device;
        let outcome = virtqueue_chains::run_case(&data);
        assert!(
            outcome.activated && !outcome.needs_reset,
            "device {device}: {outcome:?}"
        );
    }
}

/// The vsock seeds get a connection through the muxer to the host listener and packets back
/// to the guest.
#[test]
fn vsock_seed_session_connects_and_delivers() {
    let outcome = vsock_packets::play(&vsock_packets::seeds()[0]);
    assert!(
        outcome.accepted >= 1 && outcome.delivered >= 2,
        "{outcome:?}"
    );
}

/// The FUSE seeds get past INIT: most of a session's requests succeed.
#[test]
fn fuse_seed_session_is_served() {
    let outcome = fuse_request::play(&fuse_request::seeds()[0]);
    assert!(outcome.successes >= 10, "{outcome:?}");
}

/// The block seeds are served, and on the read-only disk their reads are checked byte for byte.
#[test]
fn block_seed_sessions_are_served_and_reads_checked() {
    let writable = block_request::play(&block_request::seeds()[0]);
    assert!(writable.ok >= 4, "{writable:?}");
    let read_only = block_request::play(&block_request::seeds()[1]);
    assert!(read_only.verified_reads >= 2, "{read_only:?}");
}

/// The net seeds move frames both ways through the device, and the filter passes some and
/// refuses others (each refusal checked).
#[test]
fn net_seed_session_moves_frames_and_is_judged() {
    let outcome = net_frames::play(&net_frames::seeds()[0]);
    assert!(
        outcome.to_passt >= 5 && outcome.to_guest >= 3,
        "{outcome:?}"
    );
    assert!(outcome.refusals >= 2 && outcome.passed >= 3, "{outcome:?}");
}
