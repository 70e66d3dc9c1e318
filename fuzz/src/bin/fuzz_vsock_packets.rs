//! Fuzz binary for the `vsock_packets` target (see `fuzz::targets::vsock_packets` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("vsock_packets").expect("a known target"));
}
