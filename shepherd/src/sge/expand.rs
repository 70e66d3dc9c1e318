//! `$variable` expansion in prolog/epilog/pe_start/pe_stop and control-method command lines
//! (`replace_params` in `config_file.c`): a `$` is followed by a name of letters, digits and
//! `_`; only the names allowed for that use may appear, and each takes its `config` value.

use super::config::JobConfig;

/// Variables allowed in prolog and epilog.
pub const PROLOG_EPILOG_VARIABLES: &[&str] = &[
    "host",
    "job_owner",
    "job_id",
    "job_name",
    "processors",
    "queue",
    "stdin_path",
    "stdout_path",
    "stderr_path",
    "merge_stderr",
    "fs_stdin_host",
    "fs_stdin_path",
    "fs_stdin_tmp_path",
    "fs_stdin_file_staging",
    "fs_stdout_host",
    "fs_stdout_path",
    "fs_stdout_tmp_path",
    "fs_stdout_file_staging",
    "fs_stderr_host",
    "fs_stderr_path",
    "fs_stderr_tmp_path",
    "fs_stderr_file_staging",
    "ja_task_id",
    "sge_root",
    "sge_cell",
];

/// Variables allowed in pe_start and pe_stop.
pub const PE_VARIABLES: &[&str] = &[
    "pe_hostfile",
    "host",
    "job_owner",
    "job_id",
    "job_name",
    "pe",
    "pe_slots",
    "processors",
    "queue",
    "stdin_path",
    "stdout_path",
    "stderr_path",
    "merge_stderr",
    "ja_task_id",
    "sge_root",
    "sge_cell",
];

/// Variables allowed in suspend/resume/terminate methods.
pub const CTRL_METHOD_VARIABLES: &[&str] = &[
    "host",
    "job_owner",
    "job_id",
    "job_name",
    "queue",
    "job_pid",
    "ja_task_id",
    "sge_root",
    "sge_cell",
];

/// Why a command line could not be expanded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpandError {
    #[error("variable name expected after '$' in {0:?}")]
    EmptyName(String),
    #[error("unknown variable ${0}")]
    NotAllowed(String),
    #[error("no value for variable ${0}")]
    NoValue(String),
}

/// Expands `src` with values from `config`; `$sge_root`/`$sge_cell` fall back to the
/// environment variables `SGE_ROOT`/`SGE_CELL` when `config` lacks them.
pub fn expand(src: &str, allowed: &[&str], config: &JobConfig) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if name.is_empty() {
            return Err(ExpandError::EmptyName(src.to_string()));
        }
        if !allowed.contains(&name) {
            return Err(ExpandError::NotAllowed(name.to_string()));
        }
        let value = match config.get(name) {
            Some(v) => v.to_string(),
            None => match name {
                "sge_root" => std::env::var("SGE_ROOT").unwrap_or_default(),
                "sge_cell" => std::env::var("SGE_CELL").unwrap_or_default(),
                _ => return Err(ExpandError::NoValue(name.to_string())),
            },
        };
        out.push_str(&value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JobConfig {
        JobConfig::parse("host=vm\njob_id=42\njob_owner=u\nqueue=all.q\njob_pid=77\n")
    }

    #[test]
    fn expands_allowed_names() {
        let s = expand(
            "/x/p.sh $host-$job_id $job_owner/$queue",
            PROLOG_EPILOG_VARIABLES,
            &cfg(),
        );
        assert_eq!(s.unwrap(), "/x/p.sh vm-42 u/all.q");
        let s = expand("kill -STOP $job_pid", CTRL_METHOD_VARIABLES, &cfg()).unwrap();
        assert_eq!(s, "kill -STOP 77");
    }

    #[test]
    fn name_ends_at_non_word_character() {
        let s = expand("$job_id.log", PROLOG_EPILOG_VARIABLES, &cfg()).unwrap();
        assert_eq!(s, "42.log");
    }

    #[test]
    fn rejects_unknown_and_empty_and_valueless() {
        assert_eq!(
            expand("$job_pid", PROLOG_EPILOG_VARIABLES, &cfg()),
            Err(ExpandError::NotAllowed("job_pid".into()))
        );
        assert!(matches!(
            expand("a $ b", PROLOG_EPILOG_VARIABLES, &cfg()),
            Err(ExpandError::EmptyName(_))
        ));
        assert_eq!(
            expand("$job_name", PROLOG_EPILOG_VARIABLES, &cfg()),
            Err(ExpandError::NoValue("job_name".into()))
        );
    }

    #[test]
    fn text_without_variables_is_unchanged() {
        assert_eq!(
            expand("/bin/true a b", PE_VARIABLES, &cfg()).unwrap(),
            "/bin/true a b"
        );
    }
}
