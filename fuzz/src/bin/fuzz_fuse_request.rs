//! Fuzz binary for the `fuse_request` target (see `fuzz::targets::fuse_request` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("fuse_request").expect("a known target"));
}
