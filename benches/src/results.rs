//! The raw results of one benchmark as stored in `benches/results/<id>.json`: every sample of
//! every metric of every variant, plus how the run was made. The report is rendered from these.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::context::BenchContext;
use crate::machine::MachineInfo;
use crate::stats::Summary;

/// One metric of one variant over all measured (non-warm-up) runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub variant: String,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
}

impl Series {
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }
}

/// How one variant fared: runs that failed and their first errors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VariantOutcome {
    pub variant: String,
    pub ok: usize,
    pub failed: usize,
    pub errors: Vec<String>,
}

/// The results of one benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// Short id, also the file name (`boot`, `job`, `memory`, `relay`, `signal`, `gridengine`).
    pub id: String,
    pub title: String,
    /// The command line that reproduces this result.
    pub command: String,
    /// UTC time the run finished.
    pub finished_utc: String,
    pub machine: MachineInfo,
    /// The sge_virtualizer binary and guest image measured, and their revision.
    #[serde(default)]
    pub under_test: String,
    pub warmup: usize,
    pub runs: usize,
    /// /proc/loadavg (1, 5, 15 min) before and after the run: other work on the machine.
    #[serde(default)]
    pub load_average: String,
    pub series: Vec<Series>,
    pub outcomes: Vec<VariantOutcome>,
    /// What was measured how, caveats, what could not be measured and why.
    pub notes: Vec<String>,
}

impl BenchResult {
    /// A result of benchmark `id` run just now in `ctx`, reproduced by `ctx.reproduce(id)` and
    /// measuring `ctx`'s software under test (callers override fields that differ).
    pub fn measured(
        ctx: &BenchContext,
        id: &str,
        title: &str,
        series: Vec<Series>,
        outcomes: Vec<VariantOutcome>,
        notes: Vec<String>,
    ) -> BenchResult {
        BenchResult {
            id: id.into(),
            title: title.into(),
            command: ctx.reproduce(id),
            finished_utc: utc_now(),
            machine: ctx.machine.clone(),
            under_test: ctx.under_test.describe(),
            warmup: ctx.warmup,
            runs: ctx.runs,
            load_average: String::new(),
            series,
            outcomes,
            notes,
        }
    }

    /// A result that records why a benchmark could not run.
    pub fn not_measured(ctx: &BenchContext, id: &str, title: &str, why: &str) -> BenchResult {
        BenchResult::measured(
            ctx,
            id,
            title,
            Vec::new(),
            Vec::new(),
            vec![format!("Not measured: {why}")],
        )
    }

    /// The series of `variant`'s `metric`, if measured.
    pub fn series(&self, variant: &str, metric: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.variant == variant && s.metric == metric)
    }

    /// Variants in first-appearance order.
    pub fn variants(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        for s in &self.series {
            if !v.contains(&s.variant.as_str()) {
                v.push(&s.variant);
            }
        }
        for o in &self.outcomes {
            if !v.contains(&o.variant.as_str()) {
                v.push(&o.variant);
            }
        }
        v
    }

    pub fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = Self::path(dir, &self.id);
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Loads `<dir>/<id>.json`; `Ok(None)` if it does not exist.
    pub fn load(dir: &Path, id: &str) -> anyhow::Result<Option<BenchResult>> {
        let path = Self::path(dir, id);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// The 1/5/15-minute load averages now.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
