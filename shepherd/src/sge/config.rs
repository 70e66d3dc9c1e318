//! The `config` file execd writes into the active job directory: parsing (`config_file.c`
//! rules) and typed access to the keys the shepherd uses.

use std::collections::HashMap;
use std::path::Path;

/// Why `config` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("can't read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file has no value for required key {0:?}")]
    Missing(&'static str),
    #[error("config key {key:?} has an invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
}

/// The parsed `config`: every key with its last value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobConfig {
    entries: HashMap<String, String>,
}

impl JobConfig {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parses the text of a `config` file. Per line the key is the first token delimited by
    /// spaces or `=`, the value the rest of the line after the one delimiter that ended it. A
    /// later duplicate wins. As in `read_config`, a line without any token ends the file.
    pub fn parse(text: &str) -> Self {
        let mut entries = HashMap::new();
        for line in text.split_inclusive('\n') {
            let line = line.strip_suffix('\n').unwrap_or(line);
            let start = line.trim_start_matches([' ', '=']);
            if start.is_empty() {
                break;
            }
            let key_len = start.find([' ', '=']).unwrap_or(start.len());
            let key = &start[..key_len];
            // skip exactly the one delimiter that ended the key (strtok semantics)
            let value = start.get(key_len + 1..).unwrap_or("");
            entries.insert(key.to_string(), value.to_string());
        }
        JobConfig { entries }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// The value of `key`, or an error naming it.
    pub fn require(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::Missing(key))
    }

    /// The value of `key` unless it is missing or `none` (any case): `search_nonone_conf_val`.
    pub fn get_not_none(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.eq_ignore_ascii_case("none"))
    }

    /// `key` as a flag: `1`, `true` or `yes` (any case) mean true; missing means false.
    pub fn flag(&self, key: &str) -> bool {
        matches!(
            self.get(key)
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref(),
            Some("1" | "true" | "yes")
        )
    }

    /// `key` as an unsigned number; missing → `default`.
    pub fn number(&self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| ConfigError::Invalid {
                key,
                value: v.to_string(),
            }),
        }
    }

    /// Sets a value in memory (the stock shepherd adds `job_pid` this way; the file stays).
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries.insert(key.to_string(), value.to_string());
    }

    /// The job's arguments `job_arg1..job_arg<njob_args>`.
    pub fn job_args(&self) -> Result<Vec<String>, ConfigError> {
        let n = self.number("njob_args", 0)?;
        (1..=n)
            .map(|i| {
                Ok(self
                    .get(&format!("job_arg{i}"))
                    .unwrap_or_default()
                    .to_string())
            })
            .collect()
    }
}

/// What kind of task execd handed us, from `script_file`, `pe_task_id` and `ckpt_job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// qsh/qlogin/qrsh/qrlogin.
    Interactive,
    /// A `qrsh -inherit` task of a tightly integrated PE.
    PeTask,
    /// A job with a checkpointing environment.
    Checkpointing,
    /// A batch job (script or `-b y` binary): the kind this shepherd runs in a VM.
    Batch,
}

impl JobConfig {
    /// Classifies the task.
    pub fn task_kind(&self) -> TaskKind {
        let script = self.get("script_file").unwrap_or_default();
        if matches!(script, "INTERACTIVE" | "QLOGIN" | "QRSH" | "QRLOGIN") {
            TaskKind::Interactive
        } else if self
            .get_not_none("pe_task_id")
            .is_some_and(|v| !v.is_empty())
        {
            TaskKind::PeTask
        } else if self.flag("ckpt_job") {
            TaskKind::Checkpointing
        } else {
            TaskKind::Batch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_value_forms() {
        let c = JobConfig::parse("a=1\nb value with spaces\nc=x=y\nd=\ne\n");
        assert_eq!(c.get("a"), Some("1"));
        assert_eq!(c.get("b"), Some("value with spaces"));
        assert_eq!(c.get("c"), Some("x=y"));
        assert_eq!(c.get("d"), Some(""));
        assert_eq!(c.get("e"), Some(""));
        assert_eq!(c.get("zz"), None);
    }

    #[test]
    fn later_duplicate_wins() {
        let c = JobConfig::parse("pe_task_id=\nx=1\npe_task_id=1.vm\n");
        assert_eq!(c.get("pe_task_id"), Some("1.vm"));
        assert_eq!(c.task_kind(), TaskKind::PeTask);
    }

    #[test]
    fn empty_line_ends_the_file() {
        let c = JobConfig::parse("a=1\n\nb=2\n");
        assert_eq!(c.get("a"), Some("1"));
        assert_eq!(c.get("b"), None);
    }

    #[test]
    fn only_one_delimiter_is_skipped() {
        let c = JobConfig::parse("key==v\nk2  two\n");
        assert_eq!(c.get("key"), Some("=v"));
        assert_eq!(c.get("k2"), Some(" two"));
    }

    #[test]
    fn task_kinds() {
        for s in ["INTERACTIVE", "QLOGIN", "QRSH", "QRLOGIN"] {
            let c = JobConfig::parse(&format!("script_file={s}\n"));
            assert_eq!(c.task_kind(), TaskKind::Interactive);
        }
        let c = JobConfig::parse("script_file=/x\nckpt_job=1\n");
        assert_eq!(c.task_kind(), TaskKind::Checkpointing);
        let c = JobConfig::parse("script_file=/x\nckpt_job=0\npe_task_id=none\n");
        assert_eq!(c.task_kind(), TaskKind::Batch);
    }

    #[test]
    fn job_args_and_numbers() {
        let c = JobConfig::parse("njob_args=2\njob_arg1=a b\njob_arg2=\nnotify=x\n");
        assert_eq!(
            c.job_args().unwrap(),
            vec!["a b".to_string(), String::new()]
        );
        assert!(c.number("notify", 0).is_err());
        assert_eq!(c.number("missing_key", 7).unwrap(), 7);
    }

    proptest! {
        #[test]
        fn roundtrip_of_written_entries(
            entries in proptest::collection::vec(("[a-z_][a-z0-9_]{0,12}", "[^\n]{0,40}"), 1..20)
        ) {
            let text: String = entries.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            let c = JobConfig::parse(&text);
            let mut last = HashMap::new();
            for (k, v) in &entries { last.insert(k.clone(), v.clone()); }
            for (k, v) in &last { prop_assert_eq!(c.get(k), Some(v.as_str())); }
        }
    }
}
