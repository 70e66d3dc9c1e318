//! Whether the job's argv and environment fit the guest: each string within the guest kernel's
//! `MAX_ARG_STRLEN`, all of them within what `execve` takes under the job's stack limit, and the
//! whole start request within one protocol frame. Checked before any VM starts, so that a job
//! too large to start is the job's error, not a failure found after the guest booted (or an
//! exec failure charged to the queue).

use guest_agent::protocol::{encode, Frame, ProtocolError, Spawn, RLIM_INFINITY};

/// The kernel's longest single argument or environment string, its NUL included (32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// `execve` takes at least this much in strings and pointers, whatever the stack limit
/// (`ARG_MAX`, 32 pages).
const ARG_MAX: u64 = 32 * 4096;
/// The kernel's default stack limit (`_STK_LIM`); `execve` takes at most 3/4 of it.
const STK_LIM: u64 = 8 << 20;
/// A guest's stack limit when the job sets none.
const DEFAULT_STACK: u64 = 8 << 20;
/// Room for what the kernel adds: the program's path, a script's interpreter line.
const EXEC_SLACK: usize = 4096;

/// Why the job cannot be started in the guest.
#[derive(Debug, thiserror::Error)]
pub enum SpawnSizeError {
    #[error(
        "the job's {which} is {len} bytes; the guest's kernel takes at most {} in one",
        MAX_ARG_STRLEN - 1
    )]
    StringTooLong { which: String, len: usize },
    #[error(
        "the job's arguments and environment take {total} bytes; with its stack limit the \
         guest's kernel takes at most {limit}"
    )]
    TooLargeForExec { total: usize, limit: usize },
    #[error("the job's arguments and environment do not fit in one message to the guest: {0}")]
    Frame(ProtocolError),
}

/// Checks `spawn` (as it will be sent) against the guest's limits.
pub fn check(spawn: &Spawn) -> Result<(), SpawnSizeError> {
    let named = |what: &str, s: &[u8]| -> String {
        let name = s.split(|b| *b == b'=').next().unwrap_or_default();
        let name = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
        format!("{what} {name:?}")
    };
    for (i, a) in spawn.argv.iter().enumerate() {
        if a.len() >= MAX_ARG_STRLEN {
            return Err(SpawnSizeError::StringTooLong {
                which: format!("argument {i}"),
                len: a.len(),
            });
        }
    }
    if let Some(e) = spawn.env.iter().find(|e| e.len() >= MAX_ARG_STRLEN) {
        return Err(SpawnSizeError::StringTooLong {
            which: named("environment variable", e),
            len: e.len(),
        });
    }
    let strings: usize = spawn
        .argv
        .iter()
        .chain(&spawn.env)
        .map(|s| s.len() + 1)
        .sum();
    let pointers = (spawn.argv.len().max(1) + spawn.env.len()) * std::mem::size_of::<u64>();
    let limit = exec_limit(stack_limit(spawn));
    let total = strings + pointers + EXEC_SLACK;
    if total > limit {
        return Err(SpawnSizeError::TooLargeForExec { total, limit });
    }
    encode(&Frame::Spawn(spawn.clone())).map_err(SpawnSizeError::Frame)?;
    Ok(())
}

/// The soft stack limit the job's exec runs under in the guest.
fn stack_limit(spawn: &Spawn) -> u64 {
    spawn
        .rlimits
        .iter()
        .find(|r| r.resource == libc::RLIMIT_STACK)
        .map_or(DEFAULT_STACK, |r| r.soft)
}

/// What `execve` takes in strings and pointers under a stack limit of `stack` bytes (Linux
/// `bprm_stack_limits`: a quarter of the stack, at most 3/4 of `_STK_LIM`, at least `ARG_MAX`).
fn exec_limit(stack: u64) -> usize {
    let quarter = if stack == RLIM_INFINITY {
        u64::MAX
    } else {
        stack / 4
    };
    (STK_LIM / 4 * 3).min(quarter).max(ARG_MAX) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::{Rlimit, MAX_FRAME_LEN};

    fn spawn(argv: Vec<Vec<u8>>, env: Vec<Vec<u8>>) -> Spawn {
        Spawn {
            argv,
            env,
            ..Spawn::default()
        }
    }

    #[test]
    fn an_ordinary_job_fits() {
        let s = spawn(
            vec![b"/bin/sh".to_vec(), b"job.sh".to_vec()],
            vec![b"PATH=/bin".to_vec(); 100],
        );
        check(&s).unwrap();
    }

    #[test]
    fn one_string_beyond_the_kernels_limit_is_refused() {
        let mut long = b"BIG=".to_vec();
        long.resize(MAX_ARG_STRLEN, b'x');
        let err = check(&spawn(vec![b"/bin/true".to_vec()], vec![long.clone()])).unwrap_err();
        assert!(
            matches!(&err, SpawnSizeError::StringTooLong { which, .. } if which.contains("\"BIG\"")),
            "{err}"
        );
        let err = check(&spawn(vec![b"/bin/echo".to_vec(), long], vec![])).unwrap_err();
        assert!(
            matches!(&err, SpawnSizeError::StringTooLong { which, .. } if which == "argument 1"),
            "{err}"
        );
        // one byte less (with its NUL, exactly the limit) passes
        let mut fits = b"BIG=".to_vec();
        fits.resize(MAX_ARG_STRLEN - 1, b'x');
        check(&spawn(vec![b"/bin/true".to_vec()], vec![fits])).unwrap();
    }

    #[test]
    fn an_environment_beyond_one_frame_is_refused_before_any_vm() {
        // 60,000 variables of 20 bytes: 1.2 MB, which exec would take (under 2 MiB with the
        // default 8 MiB stack), but beyond one 1 MiB frame
        let env: Vec<Vec<u8>> = (0..60_000)
            .map(|i| format!("VARIABLE_{i:06}=value").into_bytes())
            .collect();
        let s = Spawn {
            rlimits: vec![Rlimit {
                resource: libc::RLIMIT_STACK,
                soft: RLIM_INFINITY,
                hard: RLIM_INFINITY,
            }],
            ..spawn(vec![b"/bin/true".to_vec()], env)
        };
        assert!(s.env.iter().map(Vec::len).sum::<usize>() > MAX_FRAME_LEN);
        assert!(matches!(check(&s), Err(SpawnSizeError::Frame(_))));
    }

    #[test]
    fn a_small_stack_limit_shrinks_what_exec_takes() {
        let env: Vec<Vec<u8>> = (0..300)
            .map(|i| format!("V{i}={}", "x".repeat(1000)).into_bytes())
            .collect();
        let with_stack = |soft| Spawn {
            rlimits: vec![Rlimit {
                resource: libc::RLIMIT_STACK,
                soft,
                hard: RLIM_INFINITY,
            }],
            ..spawn(vec![b"/bin/true".to_vec()], env.clone())
        };
        // about 300 kB: fine with the default 8 MiB stack (2 MiB), not with 1 MiB (256 KiB)
        check(&with_stack(8 << 20)).unwrap();
        check(&spawn(vec![b"/bin/true".to_vec()], env.clone())).unwrap();
        assert!(matches!(
            check(&with_stack(1 << 20)),
            Err(SpawnSizeError::TooLargeForExec { limit, .. }) if limit == 256 << 10
        ));
        // never below ARG_MAX
        assert_eq!(exec_limit(4096), 128 << 10);
        assert_eq!(exec_limit(RLIM_INFINITY), 6 << 20);
    }
}
