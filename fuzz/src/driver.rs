//! The `main` of every fuzz binary. Built with the `afl` feature (by `cargo afl build`), it is
//! an AFL++ persistent-mode harness: AFL++ feeds inputs, a panic aborts and is a crash. Built
//! without it, on any toolchain, it takes a command:
//!
//! * `fuzz_<target> FILE...` replays inputs (a crash AFL++ saved, say) and reports each;
//! * `fuzz_<target> --random N [SEED]` plays N random inputs (xorshift from SEED);
//! * `fuzz_<target> --write-seeds DIR` writes the target's seed inputs to DIR (the AFL++
//!   build does it when `FUZZ_WRITE_SEEDS=DIR` is set).

use std::path::Path;

use crate::targets::Target;

/// Runs `target` as the binary's `main`. With `FUZZ_WRITE_SEEDS=DIR` in the environment it
/// writes the target's seeds to DIR and exits instead (scripts/fuzz.sh starts AFL++ from them).
#[cfg(feature = "afl")]
pub fn main(target: &Target) {
    if let Some(dir) = std::env::var_os("FUZZ_WRITE_SEEDS") {
        std::process::exit(write_seeds(target, Path::new(&dir)));
    }
    let run = target.run;
    afl::fuzz!(|data: &[u8]| run(data));
}

/// Runs `target` as the binary's `main`.
#[cfg(not(feature = "afl"))]
pub fn main(target: &Target) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("--write-seeds") if args.len() == 2 => write_seeds(target, Path::new(&args[1])),
        Some("--random") if (2..=3).contains(&args.len()) => {
            let count = args[1].parse().ok();
            let seed = args
                .get(2)
                .map_or(Some(0x5eed_cafe_f00d_d00d), |s| s.parse().ok());
            match (count, seed) {
                (Some(count), Some(seed)) => {
                    let start = std::time::Instant::now();
                    random_cases(target, count, seed);
                    println!(
                        "{}: {count} random cases, no failure, {:.1} s",
                        target.name,
                        start.elapsed().as_secs_f64()
                    );
                    0
                }
                _ => usage(target),
            }
        }
        Some(a) if !a.starts_with('-') => replay(target, &args),
        _ => usage(target),
    };
    std::process::exit(code);
}

#[cfg(not(feature = "afl"))]
fn usage(target: &Target) -> i32 {
    eprintln!(
        "usage: fuzz_{0} FILE... | fuzz_{0} --random N [SEED] | fuzz_{0} --write-seeds DIR\n\
         (built with --features afl by `cargo afl build`, it is an AFL++ harness)",
        target.name
    );
    2
}

#[cfg(not(feature = "afl"))]
fn replay(target: &Target, files: &[String]) -> i32 {
    let mut failed = 0;
    for file in files {
        let data = match std::fs::read(file) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{file}: {e}");
                failed += 1;
                continue;
            }
        };
        match std::panic::catch_unwind(|| (target.run)(&data)) {
            Ok(()) => println!("{file}: ok"),
            Err(_) => {
                println!("{file}: FAILED");
                failed += 1;
            }
        }
    }
    i32::from(failed > 0)
}

fn write_seeds(target: &Target, dir: &Path) -> i32 {
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        for (i, seed) in (target.seeds)().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        Ok(())
    });
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            1
        }
    }
}

/// Plays `count` random inputs (up to 4 KiB each, from an xorshift stream seeded with `seed`)
/// and the target's seeds each mutated at random; panics, with the case's number and seed, on
/// the first failure.
pub fn random_cases(target: &Target, count: u64, seed: u64) {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = (target.seeds)();
    for i in 0..count {
        let data: Vec<u8> = if i % 2 == 1 && !seeds.is_empty() {
            // A seed with a few bytes flipped reaches deeper than noise.
            let mut d = seeds[(next() as usize) % seeds.len()].clone();
            for _ in 0..(next() % 8) {
                if d.is_empty() {
                    break;
                }
                let at = (next() as usize) % d.len();
                d[at] ^= next() as u8;
            }
            d
        } else {
            let len = (next() % 4096) as usize;
            (0..len).map(|_| next() as u8).collect()
        };
        let result = std::panic::catch_unwind(|| (target.run)(&data));
        if result.is_err() {
            panic!(
                "{}: random case {i} (seed {seed}) failed; input ({} bytes): {data:?}",
                target.name,
                data.len()
            );
        }
    }
}
