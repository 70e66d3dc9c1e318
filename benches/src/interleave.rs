//! Runs the variants of one comparison interleaved (A, B, C, A, B, C, …; the starting variant
//! rotates each round so no variant always follows the same one), discards the warm-up rounds,
//! and collects every metric's samples.

use std::io::Write;

use crate::results::{Series, VariantOutcome};

/// One measured run: (metric, value) pairs in the metric's unit.
pub type Sample = Vec<(&'static str, f64)>;

/// One contender of a comparison.
pub struct Variant<'a> {
    pub name: String,
    /// Unit of every metric this variant reports.
    pub unit: &'static str,
    pub run: Box<dyn FnMut() -> anyhow::Result<Sample> + 'a>,
}

impl<'a> Variant<'a> {
    pub fn new(
        name: impl Into<String>,
        unit: &'static str,
        run: impl FnMut() -> anyhow::Result<Sample> + 'a,
    ) -> Self {
        Self {
            name: name.into(),
            unit,
            run: Box::new(run),
        }
    }
}

/// Errors kept per variant for the report.
const KEPT_ERRORS: usize = 3;

/// Runs `warmup + runs` rounds; returns the measured series and each variant's outcome.
pub fn run_interleaved(
    variants: &mut [Variant<'_>],
    warmup: usize,
    runs: usize,
) -> (Vec<Series>, Vec<VariantOutcome>) {
    let mut series: Vec<Series> = Vec::new();
    let mut outcomes: Vec<VariantOutcome> = variants
        .iter()
        .map(|v| VariantOutcome {
            variant: v.name.clone(),
            ..VariantOutcome::default()
        })
        .collect();
    let n = variants.len();
    for round in 0..warmup + runs {
        let measured = round >= warmup;
        // Progress only: a closed stderr must not end the run (a benchmark may have changed
        // shared state, e.g. the Grid Engine cell's shepherd_cmd, that it restores at the end).
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r  {} {}/{} ",
            if measured { "run" } else { "warm-up" },
            if measured {
                round - warmup + 1
            } else {
                round + 1
            },
            if measured { runs } else { warmup }
        );
        let _ = err.flush();
        for k in 0..n {
            let i = (round + k) % n;
            let v = &mut variants[i];
            match (v.run)() {
                Ok(sample) if measured => {
                    outcomes[i].ok += 1;
                    for (metric, value) in sample {
                        match series
                            .iter_mut()
                            .find(|s| s.variant == v.name && s.metric == metric)
                        {
                            Some(s) => s.samples.push(value),
                            None => series.push(Series {
                                variant: v.name.clone(),
                                metric: metric.to_string(),
                                unit: v.unit.to_string(),
                                samples: vec![value],
                            }),
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "\n  {}: {e:#}", v.name);
                    if measured {
                        outcomes[i].failed += 1;
                    }
                    if outcomes[i].errors.len() < KEPT_ERRORS {
                        outcomes[i].errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let _ = writeln!(std::io::stderr());
    // Group by variant (in variant order), metrics in first-appearance order.
    let order: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    series.sort_by_key(|s| order.iter().position(|o| *o == s.variant));
    (series, outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_discards_warmup_and_counts_failures() {
        let log = std::cell::RefCell::new(Vec::new());
        let mut calls_b = 0;
        let mut variants = vec![
            Variant::new("a", "ms", || {
                log.borrow_mut().push('a');
                Ok(vec![("x", 1.0)])
            }),
            Variant::new("b", "ms", || {
                log.borrow_mut().push('b');
                calls_b += 1;
                if calls_b == 3 {
                    anyhow::bail!("boom")
                }
                Ok(vec![("x", 2.0), ("y", 3.0)])
            }),
        ];
        let (series, outcomes) = run_interleaved(&mut variants, 1, 3);
        drop(variants);
        assert_eq!(log.into_inner().iter().collect::<String>(), "abbaabba");
        assert_eq!(series.len(), 3);
        assert_eq!(series[0].samples, vec![1.0; 3]);
        assert_eq!(series[1].samples, vec![2.0; 2]);
        assert_eq!((outcomes[1].ok, outcomes[1].failed), (2, 1));
    }
}
