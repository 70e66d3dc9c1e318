//! Fuzz binary for the `net_frames` target (see `fuzz::targets::net_frames` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("net_frames").expect("a known target"));
}
