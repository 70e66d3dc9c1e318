//! The `environment` file execd writes (one `NAME=value` per line; in values `\` is written as
//! `\\` and a newline as `\n`) and the job environment built from it.

use std::collections::HashMap;
use std::path::Path;

/// Why `environment` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("can't read environment file {path}: {source}")]
pub struct EnvironmentError {
    path: String,
    source: std::io::Error,
}

/// An ordered environment; setting a name again replaces its value in place. Names are
/// indexed, so building one is linear in its size (execd's file may hold tens of thousands of
/// variables, read while execd's signals wait).
#[derive(Debug, Clone, Default)]
pub struct JobEnvironment {
    vars: Vec<(String, String)>,
    /// name → its position in `vars`
    index: HashMap<String, usize>,
}

impl PartialEq for JobEnvironment {
    fn eq(&self, other: &Self) -> bool {
        self.vars == other.vars
    }
}

impl Eq for JobEnvironment {}

/// Undoes execd's escaping: `\\` → `\`, `\n` → newline; any other `\x` stays as it is.
pub fn unescape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

impl JobEnvironment {
    /// Parses the text of an `environment` file; lines without `=` are skipped.
    pub fn parse(text: &str) -> Self {
        let mut env = JobEnvironment::default();
        for line in text.split('\n') {
            if let Some((name, value)) = line.split_once('=') {
                if !name.is_empty() {
                    env.set(name, &unescape_value(value));
                }
            }
        }
        env
    }

    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self, EnvironmentError> {
        let bytes = std::fs::read(path).map_err(|source| EnvironmentError {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// The job's environment: the file on top of `inherited` when `inherit_env` is set, else
    /// the file alone (`sge_set_environment`).
    pub fn for_job(file: &JobEnvironment, inherited: Option<JobEnvironment>) -> Self {
        let mut env = inherited.unwrap_or_default();
        for (k, v) in &file.vars {
            env.set(k, v);
        }
        env
    }

    /// This process's environment.
    pub fn from_process() -> Self {
        let mut env = JobEnvironment::default();
        for (k, v) in std::env::vars_os() {
            env.set(&k.to_string_lossy(), &v.to_string_lossy());
        }
        env
    }

    pub fn set(&mut self, name: &str, value: &str) {
        match self.index.get(name) {
            Some(&i) => self.vars[i].1 = value.to_string(),
            None => {
                self.index.insert(name.to_string(), self.vars.len());
                self.vars.push((name.to_string(), value.to_string()));
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.index.get(name).map(|&i| self.vars[i].1.as_str())
    }

    /// How many variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `NAME=value` entries, as the wire protocol and `execve` want them.
    pub fn to_entries(&self) -> Vec<Vec<u8>> {
        self.vars
            .iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// execd's escaping (`var_list_dump_to_file`), for the round-trip property.
    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\").replace('\n', "\\n")
    }

    #[test]
    fn parses_and_unescapes() {
        let env = JobEnvironment::parse("A=1\nB=x\\\\y\nC=line1\\nline2\nD=a=b\nnoequals\n");
        assert_eq!(env.get("A"), Some("1"));
        assert_eq!(env.get("B"), Some("x\\y"));
        assert_eq!(env.get("C"), Some("line1\nline2"));
        assert_eq!(env.get("D"), Some("a=b"));
        assert_eq!(env.iter().count(), 4);
    }

    #[test]
    fn file_overrides_inherited() {
        let file = JobEnvironment::parse("PATH=/job\nJOB_ID=3\n");
        let inherited = JobEnvironment::parse("PATH=/execd\nSGE_ROOT=/r\n");
        let env = JobEnvironment::for_job(&file, Some(inherited));
        assert_eq!(env.get("PATH"), Some("/job"));
        assert_eq!(env.get("SGE_ROOT"), Some("/r"));
        let alone = JobEnvironment::for_job(&file, None);
        assert_eq!(alone.get("SGE_ROOT"), None);
        assert_eq!(alone.to_entries()[0], b"PATH=/job".to_vec());
    }

    /// The parse of `n` distinct variables (with a repeated one at the end), timed.
    fn parse_timed(n: usize) -> (JobEnvironment, std::time::Duration) {
        let mut text: String = (0..n).map(|i| format!("VAR_{i}=value {i}\\n2\n")).collect();
        text.push_str("VAR_0=again\n");
        let start = std::time::Instant::now();
        let env = JobEnvironment::parse(&text);
        (env, start.elapsed())
    }

    #[test]
    fn sixty_thousand_variables_parse_in_well_under_a_second() {
        // Measured on the 2-core dev VM (debug build): about 0.1 s for 60,000 variables; the
        // old list search took about 12 s. The bound leaves room for a loaded machine.
        let (env, took) = parse_timed(60_000);
        assert_eq!(env.len(), 60_000);
        assert_eq!(env.get("VAR_0"), Some("again"));
        assert_eq!(env.get("VAR_59999"), Some("value 59999\n2"));
        assert_eq!(env.iter().nth(1), Some(("VAR_1", "value 1\n2")));
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn parsing_grows_linearly() {
        // 8 times the variables must not take anywhere near 64 times as long (quadratic);
        // the best of three runs each keeps a busy machine from deciding the answer.
        let best = |n| (0..3).map(|_| parse_timed(n).1).min().unwrap();
        let small = best(5_000).max(std::time::Duration::from_micros(500));
        let large = best(40_000);
        assert!(
            large < small * 24,
            "5,000 vars: {small:?}; 40,000 vars: {large:?}"
        );
    }

    proptest! {
        #[test]
        fn unescape_inverts_execd_escaping(v in "[^\u{0}]{0,60}") {
            prop_assert_eq!(unescape_value(&escape(&v)), v.clone());
            let env = JobEnvironment::parse(&format!("X={}\n", escape(&v)));
            prop_assert_eq!(env.get("X"), Some(v.as_str()));
        }
    }
}
