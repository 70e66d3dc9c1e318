//! Can this host's KVM run a Linux guest at useful speed? Hardware virtualization (`vmx`/`svm`
//! in `/proc/cpuinfo`) says yes. Without it, `/dev/kvm` may still exist but emulate guest
//! kernel code in software (nested PVM): a calibration guest times a ring-0 loop and anything
//! under [`HARDWARE_SPEED_THRESHOLD`] instructions per second is too slow for Linux.

use std::time::Duration;

use crate::config::VmConfig;
use crate::vm::{start_vm, KernelImage};

/// Ring-0 speed (instructions/s) taken to mean hardware-assisted virtualization.
pub const HARDWARE_SPEED_THRESHOLD: f64 = 100e6;
/// Loop iterations of the calibration guest (two instructions each).
const CALIBRATION_ITERATIONS: u32 = 200_000;
/// Give up on the calibration guest after this long (it then counts as too slow).
const CALIBRATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The result of [`kvm_can_run_linux`].
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Whether the embedded VMM can run a Linux guest here.
    pub usable: bool,
    /// `vmx` or `svm` is in `/proc/cpuinfo`.
    pub hardware_virtualization: bool,
    /// Measured ring-0 guest speed, if the calibration guest ran.
    pub ring0_instructions_per_sec: Option<f64>,
    /// Human-readable explanation, for logs and `--backend auto`.
    pub reason: String,
}

/// The calibration guest, entered in 64-bit mode at ring 0:
/// ```text
///   b9 NN NN NN NN    mov ecx, CALIBRATION_ITERATIONS
/// 1:ff c9             dec ecx
///   75 fc             jnz 1b
///   b0 fe             mov al, 0xfe
///   e6 64             out 0x64, al      ; i8042 reset: ends the VM
/// 2:eb fe             jmp 2b
/// ```
fn calibration_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    code
}

fn cpu_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Runs the calibration guest and returns ring-0 instructions per second.
pub fn measure_ring0_speed() -> Result<f64, String> {
    let mut config = VmConfig::new("calibration");
    config.mem_mib = 4;
    config.seccomp = false;
    let handle = start_vm(
        &config,
        KernelImage::RawCode(calibration_code(CALIBRATION_ITERATIONS)),
    )
    .map_err(|e| format!("calibration VM failed to start: {e}"))?;
    let reason = match handle.wait_timeout(CALIBRATION_TIMEOUT) {
        Some(r) => r,
        None => {
            handle.request_stop();
            return Ok(f64::from(CALIBRATION_ITERATIONS) * 2.0 / CALIBRATION_TIMEOUT.as_secs_f64());
        }
    };
    if reason != crate::ExitReason::GuestReset {
        return Err(format!("calibration guest ended unexpectedly: {reason}"));
    }
    let ts = handle.timestamps();
    let (Some(start), Some(end)) = (ts.first_vcpu_run(), ts.exited()) else {
        return Err("calibration guest left no timestamps".into());
    };
    let secs = end.saturating_duration_since(start).as_secs_f64().max(1e-6);
    Ok(f64::from(CALIBRATION_ITERATIONS) * 2.0 / secs)
}

/// Decides whether the embedded VMM can run a Linux guest on this host.
pub fn kvm_can_run_linux() -> Probe {
    let hw = cpu_has_hardware_virtualization();
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Probe {
            usable: false,
            hardware_virtualization: hw,
            ring0_instructions_per_sec: None,
            reason: format!("/dev/kvm cannot be opened: {e}"),
        };
    }
    match measure_ring0_speed() {
        Ok(speed) if hw || speed >= HARDWARE_SPEED_THRESHOLD => Probe {
            usable: true,
            hardware_virtualization: hw,
            ring0_instructions_per_sec: Some(speed),
            reason: format!(
                "KVM usable: {}ring-0 guest code runs at {:.0} M instructions/s",
                if hw { "vmx/svm present; " } else { "" },
                speed / 1e6
            ),
        },
        Ok(speed) => Probe {
            usable: false,
            hardware_virtualization: hw,
            ring0_instructions_per_sec: Some(speed),
            reason: format!(
                "KVM emulates guest kernel code in software here: ring-0 code runs at {:.1} M \
                 instructions/s (hardware: >= {:.0} M), no vmx/svm in /proc/cpuinfo",
                speed / 1e6,
                HARDWARE_SPEED_THRESHOLD / 1e6
            ),
        },
        Err(e) => Probe {
            usable: false,
            hardware_virtualization: hw,
            ring0_instructions_per_sec: None,
            reason: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_code_encodes_the_loop() {
        let c = calibration_code(0x0102_0304);
        assert_eq!(&c[..5], &[0xb9, 0x04, 0x03, 0x02, 0x01]);
        // The jnz jumps back to the dec.
        assert_eq!(c[7], 0x75);
        assert_eq!(7 + 2 + (c[8] as i8) as isize, 5);
    }
}
