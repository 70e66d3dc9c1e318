//! An imported image's `Env` under the job's environment: the image's variables come first and
//! the job's own win, as Apptainer does it, so a job finds what its image's software expects
//! (`PATH`, `LANG`, tool homes) and still sees every variable Grid Engine set for it.

/// The job's environment over the image's: every `KEY=value` of `image` whose key the job does
/// not set, then the job's entries. Image entries without `=` or with an empty key are ignored.
pub fn under_job(job: &[Vec<u8>], image: &[String]) -> Vec<Vec<u8>> {
    let key = |entry: &[u8]| -> Option<Vec<u8>> {
        let at = entry.iter().position(|&b| b == b'=')?;
        (at > 0).then(|| entry[..at].to_vec())
    };
    let job_keys: std::collections::HashSet<Vec<u8>> = job.iter().filter_map(|e| key(e)).collect();
    image
        .iter()
        .map(|e| e.as_bytes().to_vec())
        .filter(|e| key(e).is_some_and(|k| !job_keys.contains(&k)))
        .chain(job.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn the_images_variables_come_first_and_the_jobs_win() {
        let job = entries(&["PATH=/job/bin", "JOB_ID=7"]);
        let image = [
            "PATH=/usr/local/sbin:/usr/bin".to_string(),
            "LANG=C.UTF-8".into(),
            "=broken".into(),
            "NOEQUALS".into(),
        ];
        assert_eq!(
            under_job(&job, &image),
            entries(&["LANG=C.UTF-8", "PATH=/job/bin", "JOB_ID=7"])
        );
        assert_eq!(under_job(&job, &[]), job);
    }
}
