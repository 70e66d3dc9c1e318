//! `kvm_can_run_linux`: the calibration guest runs and the verdict follows the measured ring-0
//! speed and the CPU flags.

mod common;

use vmm::probe::HARDWARE_SPEED_THRESHOLD;

#[test]
fn probe_measures_ring0_speed_and_explains_its_verdict() {
    if !common::kvm_available() {
        return;
    }
    let start = std::time::Instant::now();
    let p = vmm::kvm_can_run_linux();
    eprintln!("probe took {:?}: {p:?}", start.elapsed());
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    assert_eq!(p.hardware_virtualization, hw);
    let speed = p
        .ring0_instructions_per_sec
        .expect("the calibration guest ran");
    assert!(speed > 0.0);
    assert_eq!(p.usable, hw || speed >= HARDWARE_SPEED_THRESHOLD);
    assert!(p.reason.contains("M instructions/s"), "{}", p.reason);
}
