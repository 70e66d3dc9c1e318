//! Fuzz binary for the `agent_frames` target (see `fuzz::targets::agent_frames` and `fuzz::driver`).

fn main() {
    fuzz::driver::main(fuzz::targets::by_name("agent_frames").expect("a known target"));
}
