//! Long-running fuzz driver for the virtio-mmio + virtqueue + vsock packet path (the same case
//! generator as tests/virtqueue_fuzz.rs), on a seeded xorshift stream of random inputs:
//! `cargo run -p vmm --release --example fuzz_vsock_queue -- [iterations] [seed]`.
//! A panic aborts with the iteration and seed to replay.

#[path = "../tests/fuzz_support/mod.rs"]
mod fuzz_support;

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seed: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0x5eed_cafe_f00d_d00d);
    let dir = std::env::temp_dir().join(format!("vmm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let uds = dir.join("v.sock");
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let start = std::time::Instant::now();
    let (mut activated, mut needs_reset) = (0u64, 0u64);
    for i in 0..iterations {
        let len = (next() % 4096) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let result = std::panic::catch_unwind(|| fuzz_support::run_case(&data, &uds));
        match result {
            Ok(outcome) => {
                activated += u64::from(outcome.activated);
                needs_reset += u64::from(outcome.needs_reset);
            }
            Err(_) => {
                eprintln!("iteration {i} (seed {seed}) panicked; input: {data:?}");
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{iterations} cases, no panic, {activated} reached DRIVER_OK, {needs_reset} ended in NEEDS_RESET, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
