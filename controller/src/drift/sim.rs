//! The seeded drift simulator: a model whose features follow known distributions, a reference
//! built from training-like draws with [`ReferenceFeature::from_samples`], windows sketched with
//! `FeatureSketch::observe` exactly as the agent does, and the [`DriftDetector`] next to the
//! rules a user would otherwise pick (fixed PSI thresholds as in Evidently, a two-sample
//! Kolmogorov–Smirnov test against the training sample), all judged on the same windows.
//! Deterministic: a seed gives the same draws, so tests can assert on the figures.
//!
//! Distributions ([`Shape`]): standard normal; gamma (shape 2, scale 1: skewed, positive);
//! quantised normal (a standard normal rounded to steps of 0.5: few distinct values, so decile
//! edges collapse). Drifts ([`Scenario`]) act on the underlying draw before quantising: a mean
//! shift in units of the training σ, a scale change of the deviation from the training mean, or a
//! share of values replaced by 0 (a stuck sensor).

use edgefleet_protocol::messages::{ModelRef, NamedSketch};
use edgefleet_protocol::sketch::ReferenceFeature;
use edgefleet_protocol::{ModelName, ModelVersion, Sha256Digest, TensorName, Timestamp};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Gamma, StandardNormal};

use super::detector::{Action, DetectorConfig, DriftDetector, Evaluation};
use super::{DriftError, Scope, ScopeWindow};

/// Training rows each feature's reference is built from.
pub const TRAINING_ROWS: usize = 50_000;
/// The KS rule's level.
pub const KS_ALPHA: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Normal,
    Gamma,
    Quantised,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Normal, Shape::Gamma, Shape::Quantised];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Normal => "normal",
            Shape::Gamma => "gamma(2)",
            Shape::Quantised => "quantised",
        }
    }

    /// Mean and standard deviation of the underlying draw.
    fn moments(self) -> (f64, f64) {
        match self {
            Shape::Normal | Shape::Quantised => (0.0, 1.0),
            Shape::Gamma => (2.0, 2f64.sqrt()),
        }
    }

    fn draw(self, rng: &mut Xoshiro256PlusPlus, scenario: Scenario) -> f64 {
        let (mean, sd) = self.moments();
        let latent = match self {
            Shape::Normal | Shape::Quantised => StandardNormal.sample(rng),
            // Shape 2 and scale 1 are valid parameters.
            Shape::Gamma => Gamma::new(2.0, 1.0).map_or(mean, |g| g.sample(rng)),
        };
        let latent = match scenario {
            Scenario::Stationary | Scenario::StuckAtZero { .. } => latent,
            Scenario::MeanShift { sigmas } => latent + sigmas * sd,
            Scenario::Scale { factor } => mean + factor * (latent - mean),
        };
        if let Scenario::StuckAtZero { share } = scenario
            && rng.random::<f64>() < share
        {
            return 0.0;
        }
        match self {
            Shape::Quantised => (latent * 2.0).round() / 2.0,
            Shape::Normal | Shape::Gamma => latent,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    Stationary,
    MeanShift { sigmas: f64 },
    Scale { factor: f64 },
    StuckAtZero { share: f64 },
}

impl Scenario {
    /// The drifts the goals are stated for.
    pub const GOALS: [Scenario; 3] = [
        Scenario::MeanShift { sigmas: 0.25 },
        Scenario::Scale { factor: 1.5 },
        Scenario::StuckAtZero { share: 0.1 },
    ];

    pub fn name(self) -> String {
        match self {
            Scenario::Stationary => "no drift".into(),
            Scenario::MeanShift { sigmas } => format!("mean +{sigmas}σ"),
            Scenario::Scale { factor } => format!("σ ×{factor}"),
            Scenario::StuckAtZero { share } => format!("{:.0}% stuck at 0", share * 100.0),
        }
    }
}

/// A decision rule judged per feature and window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The detector: p < alpha / F in two consecutive windows.
    Detector,
    /// The detector's per-window flag alone (p < alpha / F, one window).
    ChiSquareWindow,
    /// PSI at or above a fixed threshold in one window (Evidently's rule, on the reference
    /// deciles).
    Psi(f64),
    /// Two-sample KS of the window's raw values against the training sample, p < 0.05.
    Ks,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::Detector,
        Rule::ChiSquareWindow,
        Rule::Psi(0.1),
        Rule::Psi(0.2),
        Rule::Ks,
    ];

    pub fn name(self) -> String {
        match self {
            Rule::Detector => "χ² p<α/F, 2 windows (detector)".into(),
            Rule::ChiSquareWindow => "χ² p<α/F, 1 window".into(),
            Rule::Psi(t) => format!("PSI ≥ {t}"),
            Rule::Ks => format!("KS p<{KS_ALPHA}"),
        }
    }
}

struct SimFeature {
    shape: Shape,
    /// The training draws, sorted (the KS rule's reference sample).
    training: Vec<f64>,
}

/// A simulated model: `per_shape` features of each [`Shape`], in the order normal, gamma,
/// quantised, repeated; the first three (one of each) are the top-ranked.
pub struct Simulation {
    features: Vec<SimFeature>,
    reference: Vec<ReferenceFeature>,
    pub config: DetectorConfig,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("features", &self.reference.len())
            .field("config", &self.config)
            .finish()
    }
}

/// Per rule, the alarms on drift-free windows.
#[derive(Debug, Clone, PartialEq)]
pub struct FalseAlarms {
    pub rule: Rule,
    pub shape: Shape,
    /// Feature-windows judged.
    pub feature_windows: u64,
    pub alarms: u64,
}

impl FalseAlarms {
    /// Alarms per feature per 100 windows.
    pub fn per_100_windows(&self) -> f64 {
        100.0 * self.alarms as f64 / self.feature_windows.max(1) as f64
    }
}

/// How many runs a delay measurement makes, how long each may take, and its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub runs: u32,
    /// Windows a run may take before it counts as not detected.
    pub max_windows: u32,
    pub seed: u64,
}

/// Per rule, how many windows after the drift began it took to raise the alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct Delays {
    pub rule: Rule,
    /// Windows to the alarm (1 = the first drifted window), per detecting run.
    pub delays: Vec<u32>,
    pub runs: u32,
    pub max_windows: u32,
}

impl Delays {
    pub fn detected_share(&self) -> f64 {
        self.delays.len() as f64 / f64::from(self.runs.max(1))
    }

    pub fn mean(&self) -> Option<f64> {
        (!self.delays.is_empty()).then(|| {
            self.delays.iter().map(|d| f64::from(*d)).sum::<f64>() / self.delays.len() as f64
        })
    }

    /// The `q` quantile over all runs; `None` when it falls among runs that never detected.
    pub fn quantile(&self, q: f64) -> Option<u32> {
        let mut sorted = self.delays.clone();
        sorted.sort_unstable();
        let rank = ((q * f64::from(self.runs)).ceil() as usize).max(1);
        sorted.get(rank - 1).copied()
    }
}

fn model_ref() -> ModelRef {
    ModelRef {
        name: ModelName::new("simulated").expect("a valid model name"),
        version: ModelVersion::new("1").expect("a valid version"),
        release: 1,
        manifest_digest: Sha256Digest([0; 32]),
    }
}

impl Simulation {
    /// Builds the references from [`TRAINING_ROWS`] draws per feature.
    pub fn new(per_shape: usize, config: DetectorConfig, seed: u64) -> Result<Self, DriftError> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut features = Vec::new();
        let mut reference = Vec::new();
        for i in 0..per_shape * Shape::ALL.len() {
            let shape = Shape::ALL[i % Shape::ALL.len()];
            let mut training: Vec<f64> = (0..TRAINING_ROWS)
                .map(|_| shape.draw(&mut rng, Scenario::Stationary))
                .collect();
            training.sort_by(f64::total_cmp);
            let name = TensorName::new(format!("{}_{}", shape.name().replace(['(', ')'], ""), i))
                .map_err(|e| DriftError::Reference(e.to_string()))?;
            reference.push(
                ReferenceFeature::from_samples(name, &training).map_err(DriftError::Reference)?,
            );
            features.push(SimFeature { shape, training });
        }
        Ok(Self {
            features,
            reference,
            config,
        })
    }

    pub fn reference(&self) -> &[ReferenceFeature] {
        &self.reference
    }

    pub fn n_features(&self) -> usize {
        self.features.len()
    }

    fn detector(&self) -> Result<DriftDetector, DriftError> {
        DriftDetector::new(
            model_ref(),
            Scope::Fleet,
            &self.reference,
            DetectorConfig {
                window_samples: 1,
                ..self.config.clone()
            },
        )
    }

    /// One window of `n` rows; `drift` applies a scenario to one feature. Raw values are kept
    /// only if `raw` (the KS rule needs them).
    fn window(
        &self,
        rng: &mut Xoshiro256PlusPlus,
        n: u64,
        drift: Option<(usize, Scenario)>,
        raw: bool,
    ) -> (ScopeWindow, Vec<Vec<f64>>) {
        let mut sketches = Vec::with_capacity(self.features.len());
        let mut values = Vec::new();
        for (i, (feature, reference)) in self.features.iter().zip(&self.reference).enumerate() {
            let scenario = match drift {
                Some((at, scenario)) if at == i => scenario,
                _ => Scenario::Stationary,
            };
            let mut sketch = reference.sketch();
            let mut kept = Vec::with_capacity(if raw { n as usize } else { 0 });
            for _ in 0..n {
                let x = feature.shape.draw(rng, scenario);
                sketch.observe(reference, x);
                if raw {
                    kept.push(x);
                }
            }
            sketches.push(NamedSketch {
                name: reference.name.clone(),
                sketch,
            });
            values.push(kept);
        }
        (
            ScopeWindow {
                window_start: Timestamp(0),
                window_end: Timestamp(0),
                device_windows: 1,
                features: sketches,
                outputs: Vec::new(),
            },
            values,
        )
    }

    /// `windows` drift-free windows of `n` rows through one detector; alarms per rule and shape.
    pub fn false_alarms(
        &self,
        n: u64,
        windows: u32,
        rules: &[Rule],
        seed: u64,
    ) -> Result<Vec<FalseAlarms>, DriftError> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut detector = self.detector()?;
        let needs_raw = rules.contains(&Rule::Ks);
        let mut alarms = vec![vec![0u64; self.features.len()]; rules.len()];
        for _ in 0..windows {
            let (window, raw) = self.window(&mut rng, n, None, needs_raw);
            let before: Vec<bool> = detector
                .feature_states()
                .map(|(_, s)| s.is_drifting())
                .collect();
            let evaluation = evaluation(&mut detector, &window)?;
            for (r, rule) in rules.iter().enumerate() {
                for i in 0..self.features.len() {
                    if self.alarm(*rule, &evaluation, &raw, before[i], i) {
                        alarms[r][i] += 1;
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            for shape in Shape::ALL {
                let of_shape: Vec<usize> = (0..self.features.len())
                    .filter(|i| self.features[*i].shape == shape)
                    .collect();
                out.push(FalseAlarms {
                    rule: *rule,
                    shape,
                    feature_windows: of_shape.len() as u64 * u64::from(windows),
                    alarms: of_shape.iter().map(|i| alarms[r][*i]).sum(),
                });
            }
        }
        Ok(out)
    }

    /// `runs.runs` runs, each a fresh detector whose first feature of `shape` drifts by
    /// `scenario` from the first window on, up to `runs.max_windows` windows of `n` rows.
    pub fn delays(
        &self,
        n: u64,
        shape: Shape,
        scenario: Scenario,
        rules: &[Rule],
        runs: Runs,
    ) -> Result<Vec<Delays>, DriftError> {
        let Runs {
            runs,
            max_windows,
            seed,
        } = runs;
        let Some(target) = self.features.iter().position(|f| f.shape == shape) else {
            return Ok(Vec::new());
        };
        let needs_raw = rules.contains(&Rule::Ks);
        let mut delays: Vec<Vec<u32>> = vec![Vec::new(); rules.len()];
        for run in 0..runs {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ (u64::from(run) << 32));
            let mut detector = self.detector()?;
            let mut found = vec![false; rules.len()];
            for w in 1..=max_windows {
                let (window, raw) = self.window(&mut rng, n, Some((target, scenario)), needs_raw);
                let before = detector
                    .feature_states()
                    .nth(target)
                    .is_some_and(|(_, s)| s.is_drifting());
                let evaluation = evaluation(&mut detector, &window)?;
                for (r, rule) in rules.iter().enumerate() {
                    if !found[r] && self.alarm(*rule, &evaluation, &raw, before, target) {
                        found[r] = true;
                        delays[r].push(w);
                    }
                }
                if found.iter().all(|f| *f) {
                    break;
                }
            }
        }
        Ok(rules
            .iter()
            .zip(delays)
            .map(|(rule, delays)| Delays {
                rule: *rule,
                delays,
                runs,
                max_windows,
            })
            .collect())
    }

    fn alarm(
        &self,
        rule: Rule,
        evaluation: &Evaluation,
        raw: &[Vec<f64>],
        was_drifting: bool,
        feature: usize,
    ) -> bool {
        let evidence = &evaluation.features[feature];
        match rule {
            Rule::Detector => !was_drifting && evidence.state.is_drifting(),
            Rule::ChiSquareWindow => evidence.flagged,
            Rule::Psi(threshold) => evidence.stats.psi >= threshold,
            Rule::Ks => raw.get(feature).is_some_and(|values| {
                ks_two_sample(&self.features[feature].training, values).1 < KS_ALPHA
            }),
        }
    }
}

fn evaluation(
    detector: &mut DriftDetector,
    window: &ScopeWindow,
) -> Result<Evaluation, DriftError> {
    for action in detector.handle(Timestamp(0), window) {
        if let Action::Evaluated(evaluation) = action {
            return Ok(*evaluation);
        }
    }
    Err(DriftError::Config {
        field: "window_samples",
        message: "the simulated window was not evaluated".into(),
    })
}

/// Two-sample Kolmogorov–Smirnov statistic and asymptotic p-value (Kolmogorov's distribution at
/// `D √(n m / (n + m))`, as statrs' `TwoSidedAsymptotic` and scipy's `kstwobign`) of `sample`
/// against the sorted `reference`.
pub fn ks_two_sample(reference: &[f64], sample: &[f64]) -> (f64, f64) {
    let mut sample = sample.to_vec();
    sample.sort_by(f64::total_cmp);
    let (m, n) = (reference.len(), sample.len());
    if m == 0 || n == 0 {
        return (0.0, 1.0);
    }
    // Walk both sorted samples; after all values ≤ x are taken, compare the two ECDFs.
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < m || j < n {
        let x = match (reference.get(i), sample.get(j)) {
            (Some(a), Some(b)) => a.min(*b),
            (Some(a), None) => *a,
            (None, Some(b)) => *b,
            (None, None) => break,
        };
        while i < m && reference[i] <= x {
            i += 1;
        }
        while j < n && sample[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / m as f64 - j as f64 / n as f64).abs());
    }
    let en = (m as f64 * n as f64) / (m as f64 + n as f64);
    (d, kolmogorov_sf(d * en.sqrt()))
}

/// `P(K > x)` for Kolmogorov's distribution: `2 Σ (−1)^(k−1) exp(−2 k² x²)`.
pub fn kolmogorov_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=10_000u32 {
        let kf = f64::from(k);
        let term = (-2.0 * kf * kf * x * x).exp();
        sum += if k % 2 == 1 { term } else { -term };
        if term < 1e-12 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// The CUSUM chart's behaviour on simulated labels: false alarms and delays.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartRuns {
    /// Degradations flagged over all drift-free windows.
    pub false_alarms: u64,
    pub stationary_windows: u64,
    /// Windows from the change to the flag, per run that flagged within its limit.
    pub delays: Delays,
}

/// Error-rate chart runs: `labels` labelled predictions per window at error rate `p0`, then
/// (fresh chart per run, baseline given) at `p1` from the first window on, up to
/// `runs.max_windows`. The drift-free part runs `stationary_windows` windows through one chart.
pub fn chart_runs(
    config: &super::performance::ChartConfig,
    (p0, p1): (f64, f64),
    labels: u64,
    stationary_windows: u32,
    runs: Runs,
) -> ChartRuns {
    let Runs {
        runs,
        max_windows,
        seed,
    } = runs;
    use super::performance::{Action as ChartAction, PerformanceChart};
    use edgefleet_protocol::messages::FeedbackStats;

    let window = |rng: &mut Xoshiro256PlusPlus, p: f64| {
        let wrong = (0..labels).filter(|_| rng.random::<f64>() < p).count() as u64;
        FeedbackStats {
            count: labels,
            correct: labels - wrong,
            abs_error_sum: wrong as f64,
            sq_error_sum: wrong as f64,
        }
    };
    let baseline = FeedbackStats {
        count: 100_000,
        correct: 100_000 - (p0 * 100_000.0).round() as u64,
        abs_error_sum: 0.0,
        sq_error_sum: 0.0,
    };
    let config = super::performance::ChartConfig {
        baseline: Some(baseline),
        ..config.clone()
    };
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut chart = PerformanceChart::new(config.clone());
    let mut false_alarms = 0;
    for _ in 0..stationary_windows {
        let feedback = window(&mut rng, p0);
        let actions = chart.handle(Timestamp(0), Some(&feedback));
        if actions
            .iter()
            .any(|a| matches!(a, ChartAction::Degraded(_)))
        {
            false_alarms += 1;
            // Start over, as an operator acknowledging a false alarm would.
            chart = PerformanceChart::new(config.clone());
        }
    }
    let mut delays = Vec::new();
    for run in 0..runs {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ (u64::from(run) << 32) ^ 1);
        let mut chart = PerformanceChart::new(config.clone());
        for w in 1..=max_windows {
            let feedback = window(&mut rng, p1);
            let actions = chart.handle(Timestamp(0), Some(&feedback));
            if actions
                .iter()
                .any(|a| matches!(a, ChartAction::Degraded(_)))
            {
                delays.push(w);
                break;
            }
        }
    }
    ChartRuns {
        false_alarms,
        stationary_windows: u64::from(stationary_windows),
        delays: Delays {
            rule: Rule::Detector,
            delays,
            runs,
            max_windows,
        },
    }
}
