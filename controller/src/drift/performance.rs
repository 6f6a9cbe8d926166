//! Performance degradation from ground truth: a one-sided CUSUM control chart over the labelled
//! predictions each window reports ([`FeedbackStats`]). Pure, serializable state.
//!
//! Why CUSUM rather than EWMA: the number of labelled predictions varies from window to window
//! (feedback arrives when it arrives), and a log-likelihood-ratio CUSUM takes each window's
//! count exactly — a window of 3 labels moves the statistic a little, one of 3,000 a lot —
//! where an EWMA weighs windows, not labels. It is the quickest detector of a step change of the
//! size it is tuned for (Lorden, Moustakides), its state is one number, and its threshold has a
//! direct meaning: without degradation the chart crosses `h` less than once per `e^h` labelled
//! predictions on average (Wald's bound), 100,000 for the default `h = ln 10⁵ ≈ 11.5`.
//!
//! - Error rate (classification): each label is a Bernoulli trial; the chart tests the baseline
//!   error rate `p0` against `p1 = p0 + increase` (default 5 points). A window adds
//!   `x ln(p1/p0) + (n − x) ln((1 − p1)/(1 − p0))` for `x` errors out of `n`.
//! - Mean absolute error (regression): window means are treated as normal (central limit
//!   theorem); the chart tests `μ0` against `μ1 = μ0 (1 + relative_increase)` (default +20%)
//!   with the baseline's per-prediction deviation `σ0` of the absolute error. A window adds
//!   `n d (z − d/2)`, `d = (μ1 − μ0)/σ0`, `z = (mean − μ0)/σ0`.
//! - The statistic is `S = max(0, S + llr)`; degradation when `S ≥ h`. The evidence names the
//!   window where `S` last left 0 (the change point's estimate) and the metric since then.
//! - Recovery mirrors it: after a degradation a second CUSUM accumulates `−llr`; crossing `h`
//!   means the metric is back at the baseline.
//! - The baseline is either given (e.g. the validation set's counts) or the first
//!   `baseline_samples` labelled predictions in the field.

use edgefleet_protocol::Timestamp;
use edgefleet_protocol::messages::FeedbackStats;
use serde::{Deserialize, Serialize};

/// Which error the chart watches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Share of labelled predictions that were wrong; flags a rise by `increase` (absolute).
    ErrorRate { increase: f64 },
    /// Mean absolute error; flags a rise by `relative_increase` of the baseline.
    MeanAbsError { relative_increase: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChartConfig {
    pub metric: Metric,
    /// Known baseline feedback; `None` learns it from the field.
    pub baseline: Option<FeedbackStats>,
    /// Labelled predictions learned from before the chart starts.
    pub baseline_samples: u64,
    /// The CUSUM threshold `h`, in nats.
    pub threshold: f64,
}

impl ChartConfig {
    pub fn error_rate() -> Self {
        Self {
            metric: Metric::ErrorRate { increase: 0.05 },
            baseline: None,
            baseline_samples: 1000,
            threshold: 100_000f64.ln(),
        }
    }

    pub fn mean_abs_error() -> Self {
        Self {
            metric: Metric::MeanAbsError {
                relative_increase: 0.2,
            },
            ..Self::error_rate()
        }
    }
}

/// The baseline the chart compares with, as the chart uses it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Labelled predictions behind it.
    pub count: u64,
    /// Error rate or mean absolute error.
    pub value: f64,
    /// The value the chart is tuned to detect.
    pub degraded: f64,
    /// Per-prediction standard deviation of the absolute error (mean absolute error only).
    pub sd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub at: Timestamp,
    pub window: u64,
    pub count: u64,
    /// The window's error rate or mean absolute error (`None` without labels).
    pub value: Option<f64>,
    /// The degradation statistic after this window, and the recovery statistic while degraded.
    pub statistic: f64,
    pub recovery: Option<f64>,
    pub threshold: f64,
    pub degraded: bool,
}

/// A crossing of the threshold, with the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crossing {
    pub at: Timestamp,
    pub window: u64,
    /// The first window of the run that crossed (where the statistic last left 0).
    pub since_window: u64,
    pub baseline: Baseline,
    /// Labelled predictions since `since_window`, and their error rate or mean absolute error.
    pub count: u64,
    pub value: f64,
    pub statistic: f64,
    pub threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The baseline is still being learned.
    Learning {
        count: u64,
        needed: u64,
    },
    BaselineSet(Baseline),
    Evaluated(Point),
    Degraded(Crossing),
    Recovered(Crossing),
}

/// Feedback summed over a run of windows.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct Run {
    since_window: u64,
    count: u64,
    wrong: u64,
    abs_error_sum: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerformanceChart {
    config: ChartConfig,
    learning: FeedbackStats,
    baseline: Option<Baseline>,
    windows: u64,
    statistic: f64,
    run: Run,
    /// While degraded: the recovery statistic and its run.
    recovery: Option<(f64, Run)>,
}

fn add(total: &mut FeedbackStats, window: &FeedbackStats) {
    total.count = total.count.saturating_add(window.count);
    total.correct = total
        .correct
        .saturating_add(window.correct.min(window.count));
    total.abs_error_sum += window.abs_error_sum;
    total.sq_error_sum += window.sq_error_sum;
}

impl PerformanceChart {
    pub fn new(config: ChartConfig) -> Self {
        let mut chart = Self {
            config,
            learning: empty_feedback(),
            baseline: None,
            windows: 0,
            statistic: 0.0,
            run: Run::default(),
            recovery: None,
        };
        if let Some(given) = chart.config.baseline.clone() {
            chart.baseline = chart.make_baseline(&given);
        }
        chart
    }

    pub fn baseline(&self) -> Option<Baseline> {
        self.baseline
    }

    pub fn is_degraded(&self) -> bool {
        self.recovery.is_some()
    }

    fn make_baseline(&self, stats: &FeedbackStats) -> Option<Baseline> {
        if stats.count == 0 {
            return None;
        }
        let n = stats.count as f64;
        Some(match self.config.metric {
            Metric::ErrorRate { increase } => {
                let wrong = stats.count - stats.correct.min(stats.count);
                // A perfect or hopeless baseline still needs a finite likelihood ratio.
                let value = (wrong as f64 / n).clamp(1e-3, 0.99);
                Baseline {
                    count: stats.count,
                    value,
                    degraded: (value + increase.abs().max(1e-3)).min(0.999),
                    sd: (value * (1.0 - value)).sqrt(),
                }
            }
            Metric::MeanAbsError { relative_increase } => {
                let mean = (stats.abs_error_sum / n).max(0.0);
                let variance = (stats.sq_error_sum / n - mean * mean).max(0.0);
                let sd = variance.sqrt().max(1e-9 * mean.max(1.0));
                Baseline {
                    count: stats.count,
                    value: mean,
                    degraded: mean + (relative_increase.abs() * mean).max(1e-9),
                    sd,
                }
            }
        })
    }

    /// The log-likelihood ratio of one window's feedback, degraded against baseline.
    fn llr(&self, baseline: &Baseline, window: &FeedbackStats) -> f64 {
        let n = window.count as f64;
        match self.config.metric {
            Metric::ErrorRate { .. } => {
                let wrong = (window.count - window.correct.min(window.count)) as f64;
                let (p0, p1) = (baseline.value, baseline.degraded);
                wrong * (p1 / p0).ln() + (n - wrong) * ((1.0 - p1) / (1.0 - p0)).ln()
            }
            Metric::MeanAbsError { .. } => {
                let mean = window.abs_error_sum / n;
                let d = (baseline.degraded - baseline.value) / baseline.sd;
                let z = (mean - baseline.value) / baseline.sd;
                n * d * (z - d / 2.0)
            }
        }
    }

    fn value(&self, run: &Run) -> f64 {
        let n = run.count.max(1) as f64;
        match self.config.metric {
            Metric::ErrorRate { .. } => run.wrong as f64 / n,
            Metric::MeanAbsError { .. } => run.abs_error_sum / n,
        }
    }

    /// Takes one window's feedback (`None`: the window had none).
    pub fn handle(&mut self, now: Timestamp, feedback: Option<&FeedbackStats>) -> Vec<Action> {
        let window = feedback.cloned().unwrap_or_else(empty_feedback);
        let window_ok = window.abs_error_sum.is_finite() && window.sq_error_sum.is_finite();
        let Some(baseline) = self.baseline else {
            if window_ok {
                add(&mut self.learning, &window);
            }
            if self.learning.count < self.config.baseline_samples.max(1) {
                return vec![Action::Learning {
                    count: self.learning.count,
                    needed: self.config.baseline_samples.max(1),
                }];
            }
            let learning = std::mem::replace(&mut self.learning, empty_feedback());
            self.baseline = self.make_baseline(&learning);
            return self.baseline.map(Action::BaselineSet).into_iter().collect();
        };
        self.windows += 1;
        let window_no = self.windows;
        let threshold = self.config.threshold;
        let mut actions = Vec::new();
        let value = (window.count > 0 && window_ok).then(|| {
            self.value(&Run {
                since_window: window_no,
                count: window.count,
                wrong: window.count - window.correct.min(window.count),
                abs_error_sum: window.abs_error_sum,
            })
        });
        if value.is_some() {
            let llr = self.llr(&baseline, &window);
            let extend = |run: &mut Run| {
                run.count = run.count.saturating_add(window.count);
                run.wrong = run
                    .wrong
                    .saturating_add(window.count - window.correct.min(window.count));
                run.abs_error_sum += window.abs_error_sum;
            };
            match &mut self.recovery {
                None => {
                    if self.statistic <= 0.0 {
                        self.run = Run {
                            since_window: window_no,
                            ..Run::default()
                        };
                    }
                    self.statistic = (self.statistic + llr).max(0.0);
                    extend(&mut self.run);
                    if self.statistic >= threshold {
                        actions.push(Action::Degraded(self.crossing(
                            now,
                            window_no,
                            &baseline,
                            self.run,
                            self.statistic,
                        )));
                        self.recovery = Some((
                            0.0,
                            Run {
                                since_window: window_no + 1,
                                ..Run::default()
                            },
                        ));
                    }
                }
                Some((statistic, run)) => {
                    if *statistic <= 0.0 {
                        *run = Run {
                            since_window: window_no,
                            ..Run::default()
                        };
                    }
                    *statistic = (*statistic - llr).max(0.0);
                    extend(run);
                    if *statistic >= threshold {
                        let (statistic, run) = (*statistic, *run);
                        actions.push(Action::Recovered(
                            self.crossing(now, window_no, &baseline, run, statistic),
                        ));
                        self.recovery = None;
                        self.statistic = 0.0;
                    }
                }
            }
        }
        actions.insert(
            0,
            Action::Evaluated(Point {
                at: now,
                window: window_no,
                count: window.count,
                value,
                statistic: self.statistic,
                recovery: self.recovery.map(|(s, _)| s),
                threshold,
                degraded: self.recovery.is_some(),
            }),
        );
        actions
    }

    fn crossing(
        &self,
        now: Timestamp,
        window: u64,
        baseline: &Baseline,
        run: Run,
        statistic: f64,
    ) -> Crossing {
        Crossing {
            at: now,
            window,
            since_window: run.since_window,
            baseline: *baseline,
            count: run.count,
            value: self.value(&run),
            statistic,
            threshold: self.config.threshold,
        }
    }
}

fn empty_feedback() -> FeedbackStats {
    FeedbackStats {
        count: 0,
        correct: 0,
        abs_error_sum: 0.0,
        sq_error_sum: 0.0,
    }
}
