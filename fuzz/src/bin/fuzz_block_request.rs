//! Fuzz binary for the `block_request` target (see `fuzz::targets::block_request` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("block_request").expect("a known target"));
}
