//! The null check of a reference at the deployed window size: windows of `window_samples`
//! values drawn from the reference's own bin shares (what sub-sampling the training data gives,
//! binned), each tested as the detector tests a live window. It shows whether the χ² p-value
//! holds its level at that size for these bins (sparse bins, few distinct values), and gives the
//! PSI and Jensen–Shannon values a drift-free window of that size reaches, for display. Pure
//! and seeded: the same reference, configuration and seed give the same result.

use edgefleet_protocol::TensorName;
use edgefleet_protocol::sketch::ReferenceFeature;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::DriftError;
use super::detector::DetectorConfig;
use super::math::{self, Expected};

/// How one feature's drift-free windows tested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureCheck {
    pub name: TensorName,
    /// Windows the χ² test could judge (enough values for two bin groups).
    pub tested: u32,
    /// Share of windows with p < `alpha` (nominal: `alpha`).
    pub rate_at_alpha: f64,
    /// Share of windows with p < `alpha / F`, the detector's flag (nominal: `alpha / F`).
    pub rate_at_threshold: f64,
    /// 99th percentile of PSI and of the Jensen–Shannon distance over the windows.
    pub psi_p99: f64,
    pub js_p99: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdCheck {
    pub window_samples: u64,
    pub windows: u32,
    pub alpha: f64,
    pub threshold: f64,
    pub features: Vec<FeatureCheck>,
}

impl ThresholdCheck {
    /// The highest per-feature rate at `alpha`: the level a drift-free window actually has.
    pub fn worst_rate_at_alpha(&self) -> f64 {
        self.features
            .iter()
            .map(|f| f.rate_at_alpha)
            .fold(0.0, f64::max)
    }
}

/// Counts of `n` values drawn from `shares` into their bins.
pub fn draw_counts(rng: &mut Xoshiro256PlusPlus, shares: &[f64], n: u64) -> Vec<u64> {
    let mut cumulative = Vec::with_capacity(shares.len());
    let mut acc = 0.0;
    for share in shares {
        acc += share.max(0.0);
        cumulative.push(acc);
    }
    let mut counts = vec![0u64; shares.len()];
    if acc <= 0.0 || counts.is_empty() {
        return counts;
    }
    for _ in 0..n {
        let u = rng.random::<f64>() * acc;
        let bin = cumulative
            .partition_point(|c| *c <= u)
            .min(counts.len() - 1);
        counts[bin] += 1;
    }
    counts
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Tests `windows` drift-free windows of `config.window_samples` values per reference feature.
pub fn check_thresholds(
    reference: &[ReferenceFeature],
    config: &DetectorConfig,
    windows: u32,
    seed: u64,
) -> Result<ThresholdCheck, DriftError> {
    config.validate()?;
    if reference.is_empty() {
        return Err(DriftError::NoFeatures);
    }
    let threshold = config.alpha / reference.len() as f64;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut features = Vec::with_capacity(reference.len());
    for feature in reference {
        feature.validate().map_err(DriftError::Reference)?;
        let shares = Expected::Proportions(&feature.proportions).shares();
        let (mut tested, mut at_alpha, mut at_threshold) = (0u32, 0u32, 0u32);
        let mut psis = Vec::with_capacity(windows as usize);
        let mut jss = Vec::with_capacity(windows as usize);
        for _ in 0..windows {
            let counts = draw_counts(&mut rng, &shares, config.window_samples);
            let Some(stats) = math::window_stats(
                &counts,
                0,
                0,
                Expected::Proportions(&feature.proportions),
                &feature.edges,
                config.max_samples,
                config.min_expected,
            ) else {
                continue;
            };
            psis.push(stats.psi);
            jss.push(stats.js);
            if let Some(chi2) = stats.chi2 {
                tested += 1;
                at_alpha += u32::from(chi2.p_value < config.alpha);
                at_threshold += u32::from(chi2.p_value < threshold);
            }
        }
        let rate = |k: u32| {
            if tested == 0 {
                0.0
            } else {
                f64::from(k) / f64::from(tested)
            }
        };
        features.push(FeatureCheck {
            name: feature.name.clone(),
            tested,
            rate_at_alpha: rate(at_alpha),
            rate_at_threshold: rate(at_threshold),
            psi_p99: percentile(&mut psis, 0.99),
            js_p99: percentile(&mut jss, 0.99),
        });
    }
    Ok(ThresholdCheck {
        window_samples: config.window_samples,
        windows,
        alpha: config.alpha,
        threshold,
        features,
    })
}
