//! Fuzz binary for the `virtqueue_chains` target (see `fuzz::targets::virtqueue_chains` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("virtqueue_chains").expect("a known target"));
}
