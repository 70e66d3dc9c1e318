//! The job's resource requests (`qsub -l name=value`) as the qmaster knows them. Execd's
//! `config` carries the job's limits but not its consumable requests (such as `mem_free`), so
//! the shepherd asks `qstat -j`, with a deadline: a qmaster that does not answer must not hold
//! up the job, which then starts as if it had made no request (the trace says why).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long `qstat` may take.
pub const QSTAT_DEADLINE: Duration = Duration::from_secs(5);

/// Why the requests could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestsError {
    #[error("no qstat found (looked in $SGE_ROOT/bin and /usr/bin)")]
    NoQstat,
    #[error("can't run {0}: {1}")]
    Spawn(String, String),
    #[error("qstat did not answer within {0:?}")]
    Deadline(Duration),
    #[error("qstat -j {job} failed: {message}")]
    Failed { job: String, message: String },
}

/// `qstat`: `$SGE_ROOT/bin/$SGE_ARCH/qstat`, any `$SGE_ROOT/bin/*/qstat`, else Debian's
/// `/usr/bin/qstat`.
fn qstat_path() -> Option<PathBuf> {
    let root = std::env::var_os("SGE_ROOT").map(PathBuf::from);
    let mut candidates = Vec::new();
    if let Some(root) = &root {
        let bin = root.join("bin");
        if let Ok(arch) = std::env::var("SGE_ARCH") {
            candidates.push(bin.join(arch).join("qstat"));
        }
        if let Ok(dirs) = std::fs::read_dir(&bin) {
            let mut arches: Vec<PathBuf> = dirs.flatten().map(|d| d.path()).collect();
            arches.sort();
            candidates.extend(arches.into_iter().map(|d| d.join("qstat")));
        }
    }
    candidates.push(PathBuf::from("/usr/bin/qstat"));
    candidates.into_iter().find(|p| p.is_file())
}

/// The job's hard resource requests, `name → value` as written (`4G`), from `qstat -j JOB`.
pub fn hard_requests(job_id: &str) -> Result<Vec<(String, String)>, RequestsError> {
    let qstat = qstat_path().ok_or(RequestsError::NoQstat)?;
    let text = run_with_deadline(&qstat, job_id, QSTAT_DEADLINE)?;
    Ok(parse_hard_requests(&text))
}

fn run_with_deadline(
    qstat: &Path,
    job_id: &str,
    deadline: Duration,
) -> Result<String, RequestsError> {
    let mut child = Command::new(qstat)
        .args(["-j", job_id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RequestsError::Spawn(qstat.display().to_string(), e.to_string()))?;
    let pid = child.id();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RequestsError::Spawn(
            qstat.display().to_string(),
            "no pipes".into(),
        ));
    };
    // Read on a thread, so a large answer cannot fill the pipe while this one waits.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let mut err = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        let status = child.wait();
        let _ = tx.send((status, out, err));
    });
    match rx.recv_timeout(deadline) {
        Ok((Ok(status), out, _)) if status.success() => Ok(out),
        Ok((status, out, err)) => Err(RequestsError::Failed {
            job: job_id.into(),
            message: format!(
                "{}: {}",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                err.trim()
                    .lines()
                    .chain(out.trim().lines())
                    .next()
                    .unwrap_or("")
            ),
        }),
        Err(_) => {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped until
            // the reading thread's wait returns, so the pid is still the child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(RequestsError::Deadline(deadline))
        }
    }
}

/// The `hard resource_list:` line of `qstat -j` (`name=value,name=value`).
fn parse_hard_requests(text: &str) -> Vec<(String, String)> {
    text.lines()
        .find_map(|l| l.strip_prefix("hard resource_list:"))
        .map(|list| {
            list.trim()
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The first of `names` the job requested, with its value.
pub fn first_of<'a>(
    requests: &'a [(String, String)],
    names: &[String],
) -> Option<(&'a str, &'a str)> {
    names.iter().find_map(|n| {
        requests
            .iter()
            .find(|(k, _)| k == n)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QSTAT: &str = "==============================================================\n\
job_number:                 42\n\
owner:                      sgetest\n\
hard resource_list:         h_rt=600,mem_free=4G,m_mem_free=2G\n\
mail_list:                  sgetest@host\n";

    #[test]
    fn reads_the_hard_resource_list() {
        let r = parse_hard_requests(QSTAT);
        assert_eq!(
            r,
            [
                ("h_rt".to_string(), "600".to_string()),
                ("mem_free".into(), "4G".into()),
                ("m_mem_free".into(), "2G".into())
            ]
        );
        assert!(parse_hard_requests("job_number: 1\n").is_empty());
    }

    #[test]
    fn the_first_configured_name_wins() {
        let r = parse_hard_requests(QSTAT);
        let names = ["m_mem_free".to_string(), "mem_free".to_string()];
        assert_eq!(first_of(&r, &names), Some(("m_mem_free", "2G")));
        assert_eq!(first_of(&r, &["bigmem".to_string()]), None);
    }

    #[test]
    fn a_qstat_that_hangs_is_cut_off_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qstat");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        let mut perm = std::fs::metadata(&fake).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&fake, perm).unwrap();
        let start = std::time::Instant::now();
        let e = run_with_deadline(&fake, "1", Duration::from_millis(300)).unwrap_err();
        assert_eq!(e, RequestsError::Deadline(Duration::from_millis(300)));
        assert!(start.elapsed() < Duration::from_secs(5));
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'job 1 does not exist' >&2\nexit 1\n",
        )
        .unwrap();
        let e = run_with_deadline(&fake, "1", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
