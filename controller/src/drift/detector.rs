//! The drift detector for one (model, scope): pure and deterministic. [`DriftDetector::handle`]
//! takes `now` and one window of the scope and returns what the driver records; the state
//! serializes, so the driver persists it with those records in one transaction.
//!
//! Rules (defaults in [`DetectorConfig::default`]):
//! - **Windows**: incoming windows are added up until the scope holds at least `window_samples`
//!   rows (500, what we ship: at that size a 0.25σ mean shift is found within 3 windows, see
//!   `BENCHMARKS.md`); then that sum is evaluated as one window. A window of any size above it
//!   is evaluated alone; past `max_samples` values it is tested at that effective size
//!   ([`super::math`]).
//! - **Feature flag**: a feature is flagged in a window when its χ² p-value against the
//!   reference is below `alpha / F` (Bonferroni over the `F` monitored features), so a window
//!   flags any feature by chance with probability ≤ `alpha` (1%).
//! - **Feature drift**: `consecutive` (2) flagged windows in a row.
//! - **Clearing** (hysteresis): a drifting feature clears after `clear_windows` (3) windows in a
//!   row with p ≥ `clear_alpha / F` (5%, a looser level than the one that flags), so a feature
//!   hovering near the threshold does not flap.
//! - **Model drift**: while a top-`top_k` (3) ranked feature drifts, or at least `min_share`
//!   (30%) of the features do. "Ranked" is feature importance as the configuration gives it
//!   (`importance`, most important first); features it does not list follow in manifest order,
//!   and with no list the manifest's feature order is the ranking. Detection and clearance are
//!   records carrying every feature's evidence.
//! - **Prediction drift**: each output sketch is tested the same way, against output shares the
//!   driver gives or, by default, against the scope's first `output_baseline_samples` outputs
//!   (a two-sample χ²); reported separately from input drift (Bonferroni over the outputs).
//! - **Score** for the rollout engine's drift gate: 1 when the window on its own meets the model
//!   rule with flagged features (before the consecutive-window requirement), else 0. The mean
//!   over a candidate's windows, which the gate compares with `max_drift_score`, is the share of
//!   its windows showing model-level drift: at most `alpha` without drift.

use edgefleet_protocol::messages::ModelRef;
use edgefleet_protocol::sketch::{FeatureSketch, ReferenceFeature};
use edgefleet_protocol::{TensorName, Timestamp};
use serde::{Deserialize, Serialize};

use super::math::{self, Expected, Stats};
use super::{DriftError, Scope, ScopeWindow};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Per-window chance of flagging any feature without drift (split over the features).
    pub alpha: f64,
    /// Flagged windows in a row that make a feature drift.
    pub consecutive: u32,
    /// A drifting feature's window counts towards clearing when p ≥ `clear_alpha / F`.
    pub clear_alpha: f64,
    pub clear_windows: u32,
    /// A drifting feature among the first `top_k` of the ranking makes the model drift.
    pub top_k: usize,
    /// So does this share of all features drifting.
    pub min_share: f64,
    /// Feature names, most important first.
    pub importance: Vec<TensorName>,
    /// Rows a scope accumulates before a window is evaluated.
    pub window_samples: u64,
    /// Larger windows are tested at this size.
    pub max_samples: u64,
    /// Sparse bins are merged until each group expects this many values.
    pub min_expected: f64,
    /// Outputs seen before the output baseline is frozen (when no output shares are given).
    pub output_baseline_samples: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            alpha: 0.01,
            consecutive: 2,
            clear_alpha: 0.05,
            clear_windows: 3,
            top_k: 3,
            min_share: 0.3,
            importance: Vec::new(),
            window_samples: 500,
            max_samples: 5000,
            min_expected: 5.0,
            output_baseline_samples: 5000,
        }
    }
}

impl DetectorConfig {
    pub fn validate(&self) -> Result<(), DriftError> {
        let bad = |field, message: &str| {
            Err(DriftError::Config {
                field,
                message: message.to_owned(),
            })
        };
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return bad("alpha", "must be between 0 and 1, e.g. 0.01");
        }
        if !(self.clear_alpha >= self.alpha && self.clear_alpha < 1.0) {
            return bad(
                "clear_alpha",
                "must be at least alpha and below 1, e.g. 0.05",
            );
        }
        if self.consecutive == 0 || self.clear_windows == 0 {
            return bad(
                "consecutive",
                "consecutive and clear_windows must be at least 1",
            );
        }
        if !(self.min_share > 0.0 && self.min_share <= 1.0) {
            return bad("min_share", "must be above 0 and at most 1, e.g. 0.3");
        }
        if self.window_samples == 0 || self.max_samples < self.window_samples {
            return bad(
                "window_samples",
                "must be at least 1 and at most max_samples",
            );
        }
        if !(self.min_expected > 0.0 && self.min_expected.is_finite()) {
            return bad("min_expected", "must be a positive number, e.g. 5");
        }
        Ok(())
    }
}

/// Where a feature or output stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesState {
    /// Not drifting; `flagged` windows in a row so far.
    Stable { flagged: u32 },
    /// Drifting since window `since`; `clear` windows in a row so far below the clearing level.
    Drifting { since: u64, clear: u32 },
}

impl SeriesState {
    pub fn is_drifting(&self) -> bool {
        matches!(self, SeriesState::Drifting { .. })
    }

    /// The next state after an evaluated window (`None`: the window could not be tested).
    fn step(self, test: Option<(bool, bool)>, window: u64, config: &DetectorConfig) -> Self {
        let Some((flagged, calm)) = test else {
            return self;
        };
        match self {
            SeriesState::Stable { flagged: run } => {
                let run = if flagged { run + 1 } else { 0 };
                if run >= config.consecutive {
                    SeriesState::Drifting {
                        since: window,
                        clear: 0,
                    }
                } else {
                    SeriesState::Stable { flagged: run }
                }
            }
            SeriesState::Drifting { since, clear } => {
                let clear = if calm { clear + 1 } else { 0 };
                if clear >= config.clear_windows {
                    SeriesState::Stable { flagged: 0 }
                } else {
                    SeriesState::Drifting { since, clear }
                }
            }
        }
    }
}

/// One feature's or output's part in a window's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub name: TensorName,
    #[serde(flatten)]
    pub stats: Stats,
    /// The p-value below which this window flags the series (`alpha / F`).
    pub threshold: f64,
    pub flagged: bool,
    pub state: SeriesState,
}

/// Why the model counts as drifting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRule {
    /// Drifting (or, for a window's score, flagged) features among the top-ranked.
    pub top_ranked: Vec<TensorName>,
    /// All drifting (or flagged) features.
    pub features: Vec<TensorName>,
    pub monitored: usize,
}

impl ModelRule {
    pub fn share(&self) -> f64 {
        self.features.len() as f64 / self.monitored.max(1) as f64
    }
}

/// A window's evaluation, recorded for every window tested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub at: Timestamp,
    /// Windows evaluated by this detector, this one included.
    pub window: u64,
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    pub device_windows: u64,
    pub rows: u64,
    /// 1 if this window alone meets the model rule with its flagged features, else 0.
    pub score: f64,
    pub model_drifting: bool,
    pub prediction_drifting: bool,
    /// In manifest order.
    pub features: Vec<Evidence>,
    pub outputs: Vec<Evidence>,
}

/// A change of the model's (or its predictions') drift state, with the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub at: Timestamp,
    pub model: ModelRef,
    pub scope: Scope,
    pub window: u64,
    /// For a clearance: the window the drift was detected at.
    pub since: Option<u64>,
    pub rule: ModelRule,
    /// Every series' evidence in this window, the most shifted (Jensen–Shannon) first.
    pub evidence: Vec<Evidence>,
}

/// What the driver records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The window was added to the scope's pending sum, which is still below `window_samples`.
    Accumulating {
        rows: u64,
        needed: u64,
    },
    /// The window was refused (sketches taken with other bins); the state did not change.
    Refused {
        reason: String,
    },
    Evaluated(Box<Evaluation>),
    DriftDetected(Box<Change>),
    DriftCleared(Box<Change>),
    PredictionDriftDetected(Box<Change>),
    PredictionDriftCleared(Box<Change>),
    /// The output baseline is complete; outputs are tested from the next window on.
    OutputBaselineSet {
        outputs: Vec<TensorName>,
        rows: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Feature {
    reference: ReferenceFeature,
    state: SeriesState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum OutputBaseline {
    Shares(Vec<f64>),
    Counts(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Output {
    name: TensorName,
    baseline: OutputBaseline,
    state: SeriesState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftDetector {
    pub model: ModelRef,
    pub scope: Scope,
    config: DetectorConfig,
    features: Vec<Feature>,
    /// Feature indices, most important first.
    ranking: Vec<usize>,
    /// Outputs with a baseline to test against.
    outputs: Vec<Output>,
    /// Output sketches summed while the baseline is being learned; `None` once it is set.
    output_learning: Option<Vec<(TensorName, FeatureSketch)>>,
    pending: Option<ScopeWindow>,
    windows: u64,
    drifting: Option<u64>,
    prediction_drifting: Option<u64>,
}

impl DriftDetector {
    /// A detector for `model`'s windows in `scope`, tested against the manifest's reference
    /// features (in manifest order).
    pub fn new(
        model: ModelRef,
        scope: Scope,
        reference: &[ReferenceFeature],
        config: DetectorConfig,
    ) -> Result<Self, DriftError> {
        config.validate()?;
        if reference.is_empty() {
            return Err(DriftError::NoFeatures);
        }
        for feature in reference {
            feature.validate().map_err(DriftError::Reference)?;
        }
        let mut ranking = Vec::with_capacity(reference.len());
        for name in &config.importance {
            let Some(i) = reference.iter().position(|f| &f.name == name) else {
                return Err(DriftError::Config {
                    field: "importance",
                    message: format!("{name} is not one of the model's reference features"),
                });
            };
            if !ranking.contains(&i) {
                ranking.push(i);
            }
        }
        let unranked: Vec<usize> = (0..reference.len())
            .filter(|i| !ranking.contains(i))
            .collect();
        ranking.extend(unranked);
        Ok(Self {
            model,
            scope,
            config,
            features: reference
                .iter()
                .map(|reference| Feature {
                    reference: reference.clone(),
                    state: SeriesState::Stable { flagged: 0 },
                })
                .collect(),
            ranking,
            outputs: Vec::new(),
            output_learning: Some(Vec::new()),
            pending: None,
            windows: 0,
            drifting: None,
            prediction_drifting: None,
        })
    }

    /// Tests outputs against known shares per bin (e.g. the model run over its reference data)
    /// instead of learning a baseline from the first windows.
    pub fn with_output_shares(mut self, outputs: Vec<(TensorName, Vec<f64>)>) -> Self {
        self.outputs = outputs
            .into_iter()
            .map(|(name, shares)| Output {
                name,
                baseline: OutputBaseline::Shares(shares),
                state: SeriesState::Stable { flagged: 0 },
            })
            .collect();
        self.output_learning = None;
        self
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Windows evaluated so far.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// The window the current model-level drift was detected at.
    pub fn drifting_since(&self) -> Option<u64> {
        self.drifting
    }

    pub fn prediction_drifting_since(&self) -> Option<u64> {
        self.prediction_drifting
    }

    /// Each feature's state, in manifest order.
    pub fn feature_states(&self) -> impl Iterator<Item = (&TensorName, SeriesState)> {
        self.features.iter().map(|f| (&f.reference.name, f.state))
    }

    /// Takes one window of this detector's scope.
    pub fn handle(&mut self, now: Timestamp, window: &ScopeWindow) -> Vec<Action> {
        if let Err(err) = self.check_bins(window) {
            return vec![Action::Refused {
                reason: err.to_string(),
            }];
        }
        let merged = match self.pending.take() {
            Some(mut pending) => match pending.merge(window) {
                Ok(()) => pending,
                Err(err) => {
                    self.pending = Some(pending);
                    return vec![Action::Refused {
                        reason: err.to_string(),
                    }];
                }
            },
            None => window.clone(),
        };
        let rows = merged.rows();
        if rows < self.config.window_samples {
            self.pending = Some(merged);
            return vec![Action::Accumulating {
                rows,
                needed: self.config.window_samples,
            }];
        }
        self.evaluate(now, &merged)
    }

    fn check_bins(&self, window: &ScopeWindow) -> Result<(), DriftError> {
        for feature in &self.features {
            if let Some(sketch) = window.feature(&feature.reference.name) {
                let expected = feature.reference.proportions.len();
                if sketch.sketch.bins.len() != expected {
                    return Err(DriftError::BinsMismatch {
                        kind: "feature",
                        name: feature.reference.name.clone(),
                        expected,
                        got: sketch.sketch.bins.len(),
                    });
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, now: Timestamp, window: &ScopeWindow) -> Vec<Action> {
        self.windows += 1;
        let n_window = self.windows;
        let config = self.config.clone();
        let n_features = self.features.len() as f64;
        let threshold = config.alpha / n_features;
        let calm_level = config.clear_alpha / n_features;

        let mut features = Vec::with_capacity(self.features.len());
        for feature in &mut self.features {
            let reference = &feature.reference;
            let empty = reference.sketch();
            let sketch = window
                .feature(&reference.name)
                .map_or(&empty, |s| &s.sketch);
            let stats = series_stats(
                sketch,
                Expected::Proportions(&reference.proportions),
                &reference.edges,
                &config,
            );
            let (evidence, state) = judge(
                reference.name.clone(),
                stats,
                feature.state,
                threshold,
                calm_level,
                n_window,
                &config,
            );
            feature.state = state;
            features.push(evidence);
        }

        let flagged_rule = self.rule(|i| features[i].flagged);
        let score = if self.meets(&flagged_rule) { 1.0 } else { 0.0 };
        let drifting_rule = self.rule(|i| features[i].state.is_drifting());
        let model_drifts = self.meets(&drifting_rule);

        let outputs = self.evaluate_outputs(window, n_window);
        let mut actions = Vec::new();
        let baseline_set = self.learn_outputs(window);
        let prediction_drifts = outputs.iter().any(|o| o.state.is_drifting());

        let mut changes = Vec::new();
        match (self.drifting, model_drifts) {
            (None, true) => {
                self.drifting = Some(n_window);
                changes.push(Action::DriftDetected(Box::new(self.change(
                    now,
                    n_window,
                    None,
                    drifting_rule,
                    &features,
                ))));
            }
            (Some(since), false) => {
                self.drifting = None;
                changes.push(Action::DriftCleared(Box::new(self.change(
                    now,
                    n_window,
                    Some(since),
                    drifting_rule,
                    &features,
                ))));
            }
            _ => {}
        }
        let output_rule = ModelRule {
            top_ranked: Vec::new(),
            features: outputs
                .iter()
                .filter(|o| o.state.is_drifting())
                .map(|o| o.name.clone())
                .collect(),
            monitored: outputs.len(),
        };
        match (self.prediction_drifting, prediction_drifts) {
            (None, true) => {
                self.prediction_drifting = Some(n_window);
                changes.push(Action::PredictionDriftDetected(Box::new(self.change(
                    now,
                    n_window,
                    None,
                    output_rule,
                    &outputs,
                ))));
            }
            (Some(since), false) if !outputs.is_empty() => {
                self.prediction_drifting = None;
                changes.push(Action::PredictionDriftCleared(Box::new(self.change(
                    now,
                    n_window,
                    Some(since),
                    output_rule,
                    &outputs,
                ))));
            }
            _ => {}
        }

        actions.push(Action::Evaluated(Box::new(Evaluation {
            at: now,
            window: n_window,
            window_start: window.window_start,
            window_end: window.window_end,
            device_windows: window.device_windows,
            rows: window.rows(),
            score,
            model_drifting: self.drifting.is_some(),
            prediction_drifting: self.prediction_drifting.is_some(),
            features,
            outputs,
        })));
        actions.extend(changes);
        actions.extend(baseline_set);
        actions
    }

    /// The features `selected` picks, and those of them among the top-ranked.
    fn rule(&self, selected: impl Fn(usize) -> bool) -> ModelRule {
        let top_ranked = self
            .ranking
            .iter()
            .take(self.config.top_k)
            .filter(|i| selected(**i))
            .map(|i| self.features[*i].reference.name.clone())
            .collect();
        let features = (0..self.features.len())
            .filter(|i| selected(*i))
            .map(|i| self.features[i].reference.name.clone())
            .collect();
        ModelRule {
            top_ranked,
            features,
            monitored: self.features.len(),
        }
    }

    fn meets(&self, rule: &ModelRule) -> bool {
        !rule.top_ranked.is_empty()
            || (!rule.features.is_empty() && rule.share() >= self.config.min_share - 1e-12)
    }

    fn change(
        &self,
        now: Timestamp,
        window: u64,
        since: Option<u64>,
        rule: ModelRule,
        evidence: &[Evidence],
    ) -> Change {
        let mut evidence = evidence.to_vec();
        evidence.sort_by(|a, b| b.stats.js.total_cmp(&a.stats.js));
        Change {
            at: now,
            model: self.model.clone(),
            scope: self.scope.clone(),
            window,
            since,
            rule,
            evidence,
        }
    }

    fn evaluate_outputs(&mut self, window: &ScopeWindow, n_window: u64) -> Vec<Evidence> {
        let config = &self.config;
        let n_outputs = self.outputs.len().max(1) as f64;
        let threshold = config.alpha / n_outputs;
        let calm_level = config.clear_alpha / n_outputs;
        let mut evidence = Vec::new();
        for output in &mut self.outputs {
            let Some(sketch) = window.outputs.iter().find(|o| o.name == output.name) else {
                continue;
            };
            let expected = match &output.baseline {
                OutputBaseline::Shares(shares) => Expected::Proportions(shares),
                OutputBaseline::Counts(counts) => Expected::Counts(counts),
            };
            // Output bins are class indices or tenths of [0, 1]; no edges to name.
            let Some(stats) = (sketch.sketch.bins.len() == expected_len(&output.baseline))
                .then(|| series_stats(&sketch.sketch, expected, &[], config))
                .flatten()
            else {
                continue;
            };
            let (item, state) = judge(
                output.name.clone(),
                Some(stats),
                output.state,
                threshold,
                calm_level,
                n_window,
                config,
            );
            output.state = state;
            evidence.push(item);
        }
        evidence
    }

    /// Adds the window's outputs to the baseline being learned; sets it once it is complete.
    fn learn_outputs(&mut self, window: &ScopeWindow) -> Option<Action> {
        let learning = self.output_learning.as_mut()?;
        for output in &window.outputs {
            match learning.iter_mut().find(|(name, _)| name == &output.name) {
                Some((_, sketch)) => {
                    // An output whose bins changed restarts its baseline.
                    if sketch.merge(&output.sketch).is_err() {
                        *sketch = output.sketch.clone();
                    }
                }
                None => learning.push((output.name.clone(), output.sketch.clone())),
            }
        }
        let rows = learning
            .iter()
            .map(|(_, s)| super::bin_total(&s.bins))
            .min()?;
        if rows < self.config.output_baseline_samples {
            return None;
        }
        let learned = self.output_learning.take()?;
        self.outputs = learned
            .into_iter()
            .map(|(name, sketch)| Output {
                name,
                baseline: OutputBaseline::Counts(sketch.bins),
                state: SeriesState::Stable { flagged: 0 },
            })
            .collect();
        Some(Action::OutputBaselineSet {
            outputs: self.outputs.iter().map(|o| o.name.clone()).collect(),
            rows,
        })
    }
}

fn expected_len(baseline: &OutputBaseline) -> usize {
    match baseline {
        OutputBaseline::Shares(s) => s.len(),
        OutputBaseline::Counts(c) => c.len(),
    }
}

fn series_stats(
    sketch: &FeatureSketch,
    expected: Expected<'_>,
    edges: &[f64],
    config: &DetectorConfig,
) -> Option<Stats> {
    math::window_stats(
        &sketch.bins,
        sketch.nan,
        sketch.out_of_range,
        expected,
        edges,
        config.max_samples,
        config.min_expected,
    )
}

/// A series' evidence for this window and its next state.
fn judge(
    name: TensorName,
    stats: Option<Stats>,
    state: SeriesState,
    threshold: f64,
    calm_level: f64,
    window: u64,
    config: &DetectorConfig,
) -> (Evidence, SeriesState) {
    let stats = stats.unwrap_or(Stats {
        n: 0,
        effective_n: 0,
        nan: 0,
        out_of_range: 0,
        chi2: None,
        psi: 0.0,
        js: 0.0,
        top_bins: Vec::new(),
    });
    let test = stats
        .chi2
        .map(|chi2| (chi2.p_value < threshold, chi2.p_value >= calm_level));
    let state = state.step(test, window, config);
    let flagged = test.is_some_and(|(flagged, _)| flagged);
    (
        Evidence {
            name,
            stats,
            threshold,
            flagged,
            state,
        },
        state,
    )
}
