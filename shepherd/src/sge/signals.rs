//! Signals between execd and the shepherd: execd's translation (KILL → TSTP, XCPU → USR2,
//! everything else through the `signal` file + TTIN) undone, signal names as Grid Engine
//! writes them, and the portable SGE signal numbers used in `wait_status`.

use std::path::Path;

use nix::sys::signal::Signal;

/// Why the `signal` file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SignalFileError {
    #[error("can't read signal file: {0}")]
    Read(#[from] std::io::Error),
    #[error("signal file holds no signal number: {0:?}")]
    Invalid(String),
}

/// Reads the host signal number execd wrote to `signal` before sending SIGTTIN.
pub fn read_signal_file(path: &Path) -> Result<i32, SignalFileError> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|n| *n > 0 && *n < 65)
        .ok_or(SignalFileError::Invalid(text))
}

/// The signal execd meant when it sent `received` to the shepherd (`map_signal`). `SIGTTIN`
/// needs the `signal` file, read lazily through `signal_file`.
pub fn execd_intent(
    received: i32,
    signal_file: impl FnOnce() -> Result<i32, SignalFileError>,
) -> Result<i32, SignalFileError> {
    Ok(match received {
        libc::SIGTSTP => libc::SIGKILL,
        libc::SIGUSR2 => libc::SIGXCPU,
        libc::SIGTTIN => signal_file()?,
        other => other,
    })
}

/// Parses a signal as Grid Engine writes it in methods and notify settings: `SIGTERM`,
/// `TERM` or a number.
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok().map(|sig| sig as i32);
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().ok().map(|sig| sig as i32)
}

/// The portable SGE number of a host signal (`sge_map_signal`), 0 if it has none.
pub fn sge_signal_number(sig: i32) -> u32 {
    match sig {
        libc::SIGHUP => 901,
        libc::SIGINT => 902,
        libc::SIGQUIT => 903,
        libc::SIGILL => 904,
        libc::SIGTRAP => 905,
        libc::SIGABRT => 906,
        libc::SIGFPE => 909,
        libc::SIGKILL => 910,
        libc::SIGBUS => 911,
        libc::SIGSEGV => 912,
        libc::SIGPIPE => 914,
        libc::SIGALRM => 915,
        libc::SIGTERM => 916,
        libc::SIGURG => 917,
        libc::SIGSTOP => 918,
        libc::SIGTSTP => 919,
        libc::SIGCONT => 920,
        libc::SIGCHLD => 921,
        libc::SIGTTIN => 922,
        libc::SIGTTOU => 923,
        libc::SIGIO => 924,
        libc::SIGXCPU => 925,
        libc::SIGXFSZ => 926,
        libc::SIGVTALRM => 927,
        libc::SIGPROF => 928,
        libc::SIGWINCH => 929,
        libc::SIGUSR1 => 931,
        libc::SIGUSR2 => 932,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execd_translation_is_undone() {
        let no_file = || -> Result<i32, SignalFileError> { panic!("file not needed") };
        assert_eq!(execd_intent(libc::SIGTSTP, no_file).unwrap(), libc::SIGKILL);
        assert_eq!(execd_intent(libc::SIGUSR2, no_file).unwrap(), libc::SIGXCPU);
        assert_eq!(execd_intent(libc::SIGUSR1, no_file).unwrap(), libc::SIGUSR1);
        assert_eq!(execd_intent(libc::SIGCONT, no_file).unwrap(), libc::SIGCONT);
        assert_eq!(execd_intent(libc::SIGTTOU, no_file).unwrap(), libc::SIGTTOU);
        assert_eq!(
            execd_intent(libc::SIGTTIN, || Ok(libc::SIGSTOP)).unwrap(),
            libc::SIGSTOP
        );
    }

    #[test]
    fn signal_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("signal");
        std::fs::write(&p, "19\n").unwrap();
        assert_eq!(read_signal_file(&p).unwrap(), 19);
        std::fs::write(&p, "junk").unwrap();
        assert!(matches!(
            read_signal_file(&p),
            Err(SignalFileError::Invalid(_))
        ));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            read_signal_file(&p),
            Err(SignalFileError::Read(_))
        ));
        assert!(execd_intent(libc::SIGTTIN, || read_signal_file(&p)).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("usr1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("/bin/kill"), None);
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn sge_numbers() {
        assert_eq!(sge_signal_number(libc::SIGKILL), 910);
        assert_eq!(sge_signal_number(libc::SIGUSR1), 931);
        assert_eq!(sge_signal_number(libc::SIGUSR2), 932);
        assert_eq!(sge_signal_number(libc::SIGXCPU), 925);
        assert_eq!(sge_signal_number(64), 0);
    }
}
