//! Fuzz binary for the `snapshot_file` target (see `fuzz::targets::snapshot_file` and
//! `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("snapshot_file").expect("a known target"));
}
