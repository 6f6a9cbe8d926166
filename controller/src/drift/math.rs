//! Drift statistics over one feature's bin counts, against the reference proportions (or, for
//! model outputs, against counts observed in a baseline period).
//!
//! Which values enter: the sketch's bins cover the whole line (bin 0 is everything below the
//! first reference edge, the last bin everything at or above the last edge), so values outside
//! the training range are already counted in the outer bins; `out_of_range` is a subset of those
//! counts and is reported, never added again. NaNs are in no bin: they are not part of the tests
//! (the reference carries no NaN share to compare with) and are reported as the window's NaN
//! count. A window's `n` is the sum of its bins.
//!
//! - **χ²** (the decision): goodness of fit of the counts against `n · p`. Sparse bins are
//!   merged first (Cochran's rule): adjacent bins, in order along the line, are pooled until each
//!   group expects at least `min_expected` values (default 5); a last group short of that joins
//!   the one before. One group left means the window is too small to test this feature (no
//!   result). The p-value is the χ² survival function at `groups − 1` degrees of freedom
//!   (statrs, the regularized upper incomplete gamma function).
//! - **Effective size**: a window of more than `max_samples` values (a fleet-wide merge) is tested
//!   as `max_samples` values in the same shares, so a large scope flags the effect sizes a
//!   `max_samples` window would, not every negligible difference.
//! - **PSI** `Σ (q − p) ln(q / p)` over the shares, with every share below 10⁻⁴ (empty bins)
//!   raised to 10⁻⁴ first, as Evidently does. Each term is ≥ 0, so PSI is ≥ 0, and 0 only when
//!   the shares are equal.
//! - **Jensen–Shannon distance**, base 2 (NannyML's convention, in [0, 1]):
//!   `sqrt(½ KL(p‖m) + ½ KL(q‖m))`, `m = (p + q) / 2`. No smoothing is needed: a term with zero
//!   mass contributes 0 and `m` is positive wherever `p` or `q` is.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Shares below this are raised to it in PSI (empty bins would make it infinite).
pub const PSI_FLOOR: f64 = 1e-4;

/// Bins reported as the strongest contributors to a window's χ².
pub const TOP_BINS: usize = 3;

/// A χ² test's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChiSquare {
    pub statistic: f64,
    pub dof: u32,
    pub p_value: f64,
}

/// What a window is compared with.
#[derive(Debug, Clone, Copy)]
pub enum Expected<'a> {
    /// Reference shares per bin (training data); a goodness-of-fit test.
    Proportions(&'a [f64]),
    /// Counts from a baseline period; a two-sample (homogeneity) test on the 2 × bins table.
    Counts(&'a [u64]),
}

impl Expected<'_> {
    fn len(&self) -> usize {
        match self {
            Expected::Proportions(p) => p.len(),
            Expected::Counts(c) => c.len(),
        }
    }

    /// The expected shares, summing to 1 (all zero if there is no mass).
    pub fn shares(&self) -> Vec<f64> {
        match self {
            Expected::Proportions(p) => normalized(p.iter().map(|v| v.max(0.0))),
            Expected::Counts(c) => normalized(c.iter().map(|v| *v as f64)),
        }
    }
}

fn normalized(values: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let total: f64 = values.clone().sum();
    if total > 0.0 {
        values.map(|v| v / total).collect()
    } else {
        values.map(|_| 0.0).collect()
    }
}

/// One bin's part in a window's deviation from the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinEvidence {
    pub bin: usize,
    /// The bin's range `[lower, upper)`; `None` is unbounded.
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub observed: u64,
    /// Values expected at the window's size from the reference shares.
    pub expected: f64,
}

/// A window's statistics for one feature or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Values in the bins.
    pub n: u64,
    /// The size the χ² test used: `n`, or `max_samples` if `n` is larger.
    pub effective_n: u64,
    pub nan: u64,
    pub out_of_range: u64,
    /// `None`: the window was too small to test these bins.
    pub chi2: Option<ChiSquare>,
    pub psi: f64,
    pub js: f64,
    /// The bins contributing most to χ², largest first.
    pub top_bins: Vec<BinEvidence>,
}

/// Bins of `len` pooled, in order, until each group's `weight` reaches `min_weight`; a short
/// last group joins the one before. Empty when there is no weight at all.
pub fn group_bins(weights: &[f64], min_weight: f64) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    let (mut start, mut acc) = (0, 0.0);
    for (i, weight) in weights.iter().enumerate() {
        acc += weight;
        if acc >= min_weight && acc > 0.0 {
            groups.push(start..i + 1);
            start = i + 1;
            acc = 0.0;
        }
    }
    if start < weights.len() {
        match groups.last_mut() {
            Some(last) => last.end = weights.len(),
            None if acc > 0.0 => groups.push(start..weights.len()),
            None => {}
        }
    }
    groups
}

fn survival(statistic: f64, dof: u32) -> Option<f64> {
    let distribution = ChiSquared::new(f64::from(dof)).ok()?;
    Some(distribution.sf(statistic.max(0.0)).clamp(0.0, 1.0))
}

/// χ² goodness of fit of `observed` (counts, possibly scaled) against `proportions`, with
/// sparse bins merged until each group expects `min_expected` values.
pub fn chi_square_gof(
    observed: &[f64],
    proportions: &[f64],
    min_expected: f64,
) -> Option<ChiSquare> {
    if observed.len() != proportions.len() {
        return None;
    }
    let n: f64 = observed.iter().sum();
    if n <= 0.0 {
        return None;
    }
    let shares = Expected::Proportions(proportions).shares();
    let expected: Vec<f64> = shares.iter().map(|p| p * n).collect();
    let groups = group_bins(&expected, min_expected.max(f64::MIN_POSITIVE));
    if groups.len() < 2 {
        return None;
    }
    let statistic = groups
        .iter()
        .map(|g| {
            let o: f64 = observed[g.clone()].iter().sum();
            let e: f64 = expected[g.clone()].iter().sum();
            (o - e).powi(2) / e
        })
        .sum();
    let dof = (groups.len() - 1) as u32;
    Some(ChiSquare {
        statistic,
        dof,
        p_value: survival(statistic, dof)?,
    })
}

/// χ² test of homogeneity of `window` and `baseline` (the 2 × bins contingency table, no
/// continuity correction), with adjacent bins merged until both rows expect `min_expected`.
pub fn chi_square_two_sample(
    window: &[f64],
    baseline: &[f64],
    min_expected: f64,
) -> Option<ChiSquare> {
    if window.len() != baseline.len() {
        return None;
    }
    let n_window: f64 = window.iter().sum();
    let n_baseline: f64 = baseline.iter().sum();
    let total = n_window + n_baseline;
    if n_window <= 0.0 || n_baseline <= 0.0 {
        return None;
    }
    let smaller = n_window.min(n_baseline);
    let weights: Vec<f64> = window
        .iter()
        .zip(baseline)
        .map(|(w, b)| (w + b) * smaller / total)
        .collect();
    let groups = group_bins(&weights, min_expected.max(f64::MIN_POSITIVE));
    if groups.len() < 2 {
        return None;
    }
    let mut statistic = 0.0;
    for g in &groups {
        let w: f64 = window[g.clone()].iter().sum();
        let b: f64 = baseline[g.clone()].iter().sum();
        let column = w + b;
        let (ew, eb) = (n_window * column / total, n_baseline * column / total);
        statistic += (w - ew).powi(2) / ew + (b - eb).powi(2) / eb;
    }
    let dof = (groups.len() - 1) as u32;
    Some(ChiSquare {
        statistic,
        dof,
        p_value: survival(statistic, dof)?,
    })
}

/// Population stability index of the shares `q` (window) against `p` (reference), natural log,
/// shares below [`PSI_FLOOR`] raised to it.
pub fn psi(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(p, q)| {
            let (p, q) = (p.max(PSI_FLOOR), q.max(PSI_FLOOR));
            (q - p) * (q / p).ln()
        })
        .sum::<f64>()
        .max(0.0)
}

/// Jensen–Shannon distance, base 2, of two share vectors (each normalized to sum 1 first).
pub fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let p = normalized(p.iter().map(|v| v.max(0.0)));
    let q = normalized(q.iter().map(|v| v.max(0.0)));
    let kl_to_mid = |a: &[f64], b: &[f64]| -> f64 {
        a.iter()
            .zip(b)
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, b)| a * (2.0 * a / (a + b)).log2())
            .sum()
    };
    let divergence = 0.5 * kl_to_mid(&p, &q) + 0.5 * kl_to_mid(&q, &p);
    divergence.clamp(0.0, 1.0).sqrt()
}

/// Everything the detector needs about one window of one series: the sketch's `bins` (with its
/// `nan` and `out_of_range` counts) against `expected`, at most `max_samples` values tested,
/// sparse bins merged at `min_expected`. `edges` name the bins' ranges in the evidence.
pub fn window_stats(
    bins: &[u64],
    nan: u64,
    out_of_range: u64,
    expected: Expected<'_>,
    edges: &[f64],
    max_samples: u64,
    min_expected: f64,
) -> Option<Stats> {
    if bins.len() != expected.len() || bins.is_empty() {
        return None;
    }
    let n = super::bin_total(bins);
    let effective_n = n.min(max_samples.max(1));
    let scale = if n == 0 {
        0.0
    } else {
        effective_n as f64 / n as f64
    };
    let observed: Vec<f64> = bins.iter().map(|c| *c as f64 * scale).collect();
    let chi2 = match expected {
        Expected::Proportions(p) => chi_square_gof(&observed, p, min_expected),
        Expected::Counts(c) => {
            let baseline: Vec<f64> = c.iter().map(|v| *v as f64).collect();
            chi_square_two_sample(&observed, &baseline, min_expected)
        }
    };
    let reference = expected.shares();
    let shares = normalized(bins.iter().map(|c| *c as f64));
    let (psi, js) = if n == 0 {
        (0.0, 0.0)
    } else {
        (psi(&reference, &shares), js_distance(&reference, &shares))
    };
    let mut top_bins: Vec<(f64, BinEvidence)> = bins
        .iter()
        .enumerate()
        .filter_map(|(bin, observed)| {
            let expected = reference[bin] * n as f64;
            let contribution = if expected > 0.0 {
                (*observed as f64 - expected).powi(2) / expected
            } else if *observed > 0 {
                f64::INFINITY
            } else {
                return None;
            };
            (contribution > 0.0).then(|| {
                (
                    contribution,
                    BinEvidence {
                        bin,
                        lower: bin.checked_sub(1).and_then(|i| edges.get(i).copied()),
                        upper: edges.get(bin).copied(),
                        observed: *observed,
                        expected,
                    },
                )
            })
        })
        .collect();
    top_bins.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.bin.cmp(&b.1.bin)));
    Some(Stats {
        n,
        effective_n,
        nan,
        out_of_range,
        chi2,
        psi,
        js,
        top_bins: top_bins
            .into_iter()
            .take(TOP_BINS)
            .map(|(_, bin)| bin)
            .collect(),
    })
}
