//! The `usage` file (`shepherd_write_usage_file`, parsed by execd's `read_dusage`): the job's
//! wait status in Grid Engine's encoding, exit status, signal, times and rusage, in this order.

use std::time::{SystemTime, UNIX_EPOCH};

use guest_agent::protocol::Rusage;

use super::signals::sge_signal_number;

/// `wait_status` bits of `sge_report.h`.
const SGE_EXITED: u32 = 0x1;
const SGE_SIGNALED: u32 = 0x2;
const SGE_COREDUMP: u32 = 0x4;

/// How the job ended, in host terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Exited(i32),
    Signaled { signal: i32, core: bool },
}

impl JobEnd {
    /// From a raw `wait` status.
    pub fn from_wait_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            JobEnd::Signaled {
                signal: libc::WTERMSIG(status),
                core: libc::WCOREDUMP(status),
            }
        } else {
            JobEnd::Exited(libc::WEXITSTATUS(status))
        }
    }

    /// Exit code, or 128 + signal.
    pub fn exit_status(self) -> i32 {
        match self {
            JobEnd::Exited(c) => c,
            JobEnd::Signaled { signal, .. } => 128 + signal,
        }
    }

    /// Grid Engine's encoded wait status: flags, exit code in bits 4–11, SGE signal in 12–27.
    pub fn sge_wait_status(self) -> u32 {
        match self {
            JobEnd::Exited(c) => SGE_EXITED | (((c as u32) & 0xff) << 4),
            JobEnd::Signaled { signal, core } => {
                SGE_SIGNALED
                    | if core { SGE_COREDUMP } else { 0 }
                    | ((sge_signal_number(signal) & 0xffff) << 12)
            }
        }
    }

    pub fn signal(self) -> i32 {
        match self {
            JobEnd::Exited(_) => 0,
            JobEnd::Signaled { signal, .. } => signal,
        }
    }
}

/// One `usage` record.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub end: JobEnd,
    pub start_time: SystemTime,
    pub end_time: SystemTime,
    pub rusage: Rusage,
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl UsageRecord {
    /// The file text, keys in the stock shepherd's order.
    pub fn to_file_text(&self) -> String {
        let r = &self.rusage;
        let start = epoch_secs(self.start_time);
        let end = epoch_secs(self.end_time).max(start);
        let secs = |us: u64| us as f64 / 1e6;
        let mut s = String::new();
        let mut line = |k: &str, v: String| {
            s.push_str(k);
            s.push('=');
            s.push_str(&v);
            s.push('\n');
        };
        line("wait_status", self.end.sge_wait_status().to_string());
        line("exit_status", self.end.exit_status().to_string());
        line("signal", self.end.signal().to_string());
        line("start_time", start.to_string());
        line("end_time", end.to_string());
        line("ru_wallclock", (end - start).to_string());
        line("ru_utime", format!("{:.6}", secs(r.utime_us)));
        line("ru_stime", format!("{:.6}", secs(r.stime_us)));
        for (k, v) in [
            ("ru_maxrss", r.maxrss),
            ("ru_ixrss", r.ixrss),
            ("ru_idrss", r.idrss),
            ("ru_isrss", r.isrss),
            ("ru_minflt", r.minflt),
            ("ru_majflt", r.majflt),
            ("ru_nswap", r.nswap),
            ("ru_inblock", r.inblock),
            ("ru_oublock", r.oublock),
            ("ru_msgsnd", r.msgsnd),
            ("ru_msgrcv", r.msgrcv),
            ("ru_nsignals", r.nsignals),
            ("ru_nvcsw", r.nvcsw),
            ("ru_nivcsw", r.nivcsw),
        ] {
            line(k, v.to_string());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn encodes_exit_and_signal() {
        assert_eq!(JobEnd::from_wait_status(3 << 8), JobEnd::Exited(3));
        let killed = JobEnd::from_wait_status(libc::SIGKILL);
        assert_eq!(
            killed,
            JobEnd::Signaled {
                signal: 9,
                core: false
            }
        );
        assert_eq!(killed.exit_status(), 137);
        assert_eq!(killed.sge_wait_status(), 0x2 | (910 << 12));
        assert_eq!(JobEnd::Exited(3).sge_wait_status(), 0x1 | (3 << 4));
        let core = JobEnd::from_wait_status(libc::SIGSEGV | 0x80);
        assert_eq!(core.sge_wait_status(), 0x2 | 0x4 | (912 << 12));
    }

    #[test]
    fn file_has_every_key_in_order() {
        let start = UNIX_EPOCH + Duration::from_secs(1000);
        let rec = UsageRecord {
            end: JobEnd::Exited(1),
            start_time: start,
            end_time: start + Duration::from_millis(2500),
            rusage: Rusage {
                utime_us: 1_500_000,
                stime_us: 250,
                maxrss: 1234,
                ..Rusage::default()
            },
        };
        let text = rec.to_file_text();
        let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "wait_status",
                "exit_status",
                "signal",
                "start_time",
                "end_time",
                "ru_wallclock",
                "ru_utime",
                "ru_stime",
                "ru_maxrss",
                "ru_ixrss",
                "ru_idrss",
                "ru_isrss",
                "ru_minflt",
                "ru_majflt",
                "ru_nswap",
                "ru_inblock",
                "ru_oublock",
                "ru_msgsnd",
                "ru_msgrcv",
                "ru_nsignals",
                "ru_nvcsw",
                "ru_nivcsw"
            ]
        );
        assert!(text.contains("exit_status=1\n"));
        assert!(text.contains("start_time=1000\nend_time=1002\nru_wallclock=2\n"));
        assert!(text.contains("ru_utime=1.500000\nru_stime=0.000250\nru_maxrss=1234\n"));
    }
}
