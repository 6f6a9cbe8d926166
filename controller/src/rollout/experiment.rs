//! A/B experiments: two models on two device cohorts, compared with a stated significance test.
//! Pure and deterministic like the rollout engine ([`Experiment::handle_all`] takes `now` and
//! inputs, returns actions; [`Experiment::next_deadline`] says when to tick); the rollout driver
//! persists it the same way.
//!
//! Rules:
//! - Each member is in cohort A (control, model `a`) or B (treatment, model `b`), fixed at start.
//!   Members not already running their arm's model are assigned it at once.
//! - Telemetry counts for an arm only from members running that arm's model.
//! - The test runs **once**, when the experiment has run `duration` and both arms have
//!   `min_samples` (or when the operator concludes it early): no peeking, so the stated false
//!   positive rate `alpha` holds. An experiment still short of samples at `max_duration` ends
//!   without a winner.
//! - Tests, all two-sided at level `alpha`:
//!   - `error_rate`: two-proportion z-test on errors over requests (pooled variance).
//!   - `accuracy`: two-proportion z-test on correct predictions over ground-truth feedback.
//!   - `latency`: Mann–Whitney U on the latency histograms (values in one histogram bucket count
//!     as ties), normal approximation with tie correction.
//! - A winner is the arm that is significantly better on the chosen metric; `promote` then
//!   assigns the winner to the other cohort (with the rollback flag when the winner is the
//!   control, whose release may be the lower one). `abort` puts cohort B back on the control.

use edgefleet_protocol::messages::FeedbackStats;
use edgefleet_protocol::sketch::LatencyHistogram;
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};
use serde::{Deserialize, Serialize};

use super::engine::{Action, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ErrorRate,
    Accuracy,
    Latency,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::Accuracy => "accuracy",
            Metric::Latency => "latency",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arm {
    A,
    B,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentSpec {
    /// Control.
    pub a: Sha256Digest,
    /// Treatment.
    pub b: Sha256Digest,
    pub metric: Metric,
    pub alpha: f64,
    /// Per arm: requests (error rate, latency) or feedback (accuracy).
    pub min_samples: u64,
    pub duration_ms: u64,
    pub max_duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArmState {
    /// Given its arm's model, not running it yet.
    Assigned,
    Active,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmMember {
    pub device: DeviceId,
    pub arm: Arm,
    pub state: ArmState,
}

/// What the experiment measured on one arm.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ArmTotals {
    pub sample: Sample,
    pub feedback: u64,
    pub correct: u64,
}

/// The test's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub metric: Metric,
    pub test: String,
    /// The arms' values of the metric (error rate, accuracy, or mean latency in µs).
    pub a: Option<f64>,
    pub b: Option<f64>,
    pub n_a: u64,
    pub n_b: u64,
    pub statistic: f64,
    pub p_value: f64,
    pub alpha: f64,
    pub winner: Option<Arm>,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExperimentPhase {
    Running { since: Timestamp },
    Concluded { verdict: Verdict },
    Promoted { winner: Arm },
    Aborted { reason: String },
}

impl ExperimentPhase {
    pub fn name(&self) -> &'static str {
        match self {
            ExperimentPhase::Running { .. } => "running",
            ExperimentPhase::Concluded { .. } => "concluded",
            ExperimentPhase::Promoted { .. } => "promoted",
            ExperimentPhase::Aborted { .. } => "aborted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExperimentCommand {
    /// Run the test now (if both arms have their minimum sample).
    Conclude,
    /// Give the winner to the other cohort.
    Promote,
    Abort {
        reason: String,
    },
}

/// What a device told the controller that matters to the experiment.
#[derive(Debug, Clone, PartialEq)]
pub enum ArmReport {
    Activated(Sha256Digest),
    InstallFailed(Sha256Digest),
    Telemetry {
        model: Sha256Digest,
        sample: Sample,
        feedback: Option<FeedbackStats>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExperimentInput {
    Tick,
    Device { device: DeviceId, report: ArmReport },
    Operator(ExperimentCommand),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub spec: ExperimentSpec,
    pub members: Vec<ArmMember>,
    pub phase: ExperimentPhase,
    pub started: Timestamp,
    pub totals_a: ArmTotals,
    pub totals_b: ArmTotals,
    last_now: Timestamp,
}

impl Experiment {
    /// An experiment over `members` (device, cohort, the model it runs now), from `now`.
    pub fn start(
        now: Timestamp,
        spec: ExperimentSpec,
        members: Vec<(DeviceId, Arm, Option<Sha256Digest>)>,
    ) -> (Self, Vec<Action>) {
        let mut actions = Vec::new();
        let members = members
            .into_iter()
            .map(|(device, arm, running)| {
                let model = match arm {
                    Arm::A => spec.a,
                    Arm::B => spec.b,
                };
                let state = if running == Some(model) {
                    ArmState::Active
                } else {
                    actions.push(Action::Assign {
                        device: device.clone(),
                        model,
                        shadow: None,
                        rollback: false,
                    });
                    ArmState::Assigned
                };
                ArmMember { device, arm, state }
            })
            .collect::<Vec<_>>();
        let (n_a, n_b) = (
            members.iter().filter(|m| m.arm == Arm::A).count(),
            members.iter().filter(|m| m.arm == Arm::B).count(),
        );
        actions.insert(
            0,
            Action::Record(format!(
                "experiment started: {n_a} device(s) on A, {n_b} on B; {} compared by {} at alpha {}",
                spec.metric.name(),
                test_name(spec.metric),
                spec.alpha
            )),
        );
        let experiment = Self {
            spec,
            members,
            phase: ExperimentPhase::Running { since: now },
            started: now,
            totals_a: ArmTotals::default(),
            totals_b: ArmTotals::default(),
            last_now: now,
        };
        (experiment, actions)
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            ExperimentPhase::Promoted { .. } | ExperimentPhase::Aborted { .. }
        )
    }

    /// Still driven by inputs: running, or concluded and awaiting promote/abort.
    pub fn is_running(&self) -> bool {
        matches!(self.phase, ExperimentPhase::Running { .. })
    }

    pub fn next_deadline(&self) -> Option<Timestamp> {
        let ExperimentPhase::Running { since } = self.phase else {
            return None;
        };
        [
            Timestamp(since.0.saturating_add(self.spec.duration_ms)),
            Timestamp(since.0.saturating_add(self.spec.max_duration_ms)),
        ]
        .into_iter()
        .filter(|t| *t > self.last_now)
        .min()
    }

    fn model(&self, arm: Arm) -> Sha256Digest {
        match arm {
            Arm::A => self.spec.a,
            Arm::B => self.spec.b,
        }
    }

    pub fn handle_all(
        &mut self,
        now: Timestamp,
        inputs: impl IntoIterator<Item = ExperimentInput>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        self.last_now = self.last_now.max(now);
        for input in inputs {
            match input {
                ExperimentInput::Tick => {}
                ExperimentInput::Device { device, report } => self.on_device(&device, report),
                ExperimentInput::Operator(command) => self.on_command(command, &mut actions),
            }
        }
        if let ExperimentPhase::Running { since } = self.phase {
            let ran = now.0.saturating_sub(since.0);
            if ran >= self.spec.duration_ms && self.enough() {
                self.conclude(&mut actions);
            } else if ran >= self.spec.max_duration_ms {
                let verdict = self.verdict();
                actions.push(Action::Record(format!(
                    "maximum duration reached; no winner: {}",
                    verdict.summary
                )));
                self.phase = ExperimentPhase::Concluded { verdict };
            }
        }
        actions
    }

    fn on_device(&mut self, device: &DeviceId, report: ArmReport) {
        let Some(at) = self.members.iter().position(|m| &m.device == device) else {
            return;
        };
        let arm = self.members[at].arm;
        let model = self.model(arm);
        let member = &mut self.members[at];
        match report {
            ArmReport::Activated(m) if m == model && member.state == ArmState::Assigned => {
                member.state = ArmState::Active;
            }
            ArmReport::InstallFailed(m) if m == model => member.state = ArmState::Failed,
            ArmReport::Telemetry {
                model: m,
                sample,
                feedback,
            } if m == model && member.state == ArmState::Active => {
                if !matches!(self.phase, ExperimentPhase::Running { .. }) {
                    return;
                }
                let totals = match arm {
                    Arm::A => &mut self.totals_a,
                    Arm::B => &mut self.totals_b,
                };
                totals.sample.merge(&sample);
                if let Some(f) = feedback {
                    totals.feedback = totals.feedback.saturating_add(f.count);
                    totals.correct = totals.correct.saturating_add(f.correct);
                }
            }
            _ => {}
        }
    }

    fn samples(&self, totals: &ArmTotals) -> u64 {
        match self.spec.metric {
            Metric::ErrorRate | Metric::Latency => totals.sample.requests(),
            Metric::Accuracy => totals.feedback,
        }
    }

    fn enough(&self) -> bool {
        let need = self.spec.min_samples.max(1);
        self.samples(&self.totals_a) >= need && self.samples(&self.totals_b) >= need
    }

    fn conclude(&mut self, actions: &mut Vec<Action>) {
        let verdict = self.verdict();
        actions.push(Action::Record(format!("concluded: {}", verdict.summary)));
        self.phase = ExperimentPhase::Concluded { verdict };
    }

    fn on_command(&mut self, command: ExperimentCommand, actions: &mut Vec<Action>) {
        match (command, self.phase.clone()) {
            (_, ExperimentPhase::Promoted { .. } | ExperimentPhase::Aborted { .. }) => {
                actions.push(Action::Record(format!(
                    "the experiment is {}; command ignored",
                    self.phase.name()
                )));
            }
            (ExperimentCommand::Conclude, ExperimentPhase::Running { .. }) => {
                if self.enough() {
                    self.conclude(actions);
                } else {
                    actions.push(Action::Record(format!(
                        "cannot conclude yet: A has {} and B {} of the {} sample(s) each arm needs",
                        self.samples(&self.totals_a),
                        self.samples(&self.totals_b),
                        self.spec.min_samples
                    )));
                }
            }
            (ExperimentCommand::Promote, ExperimentPhase::Concluded { verdict }) => {
                let Some(winner) = verdict.winner else {
                    actions.push(Action::Record(
                        "no significant winner to promote; ignored".into(),
                    ));
                    return;
                };
                let model = self.model(winner);
                for member in &self.members {
                    if member.arm != winner {
                        actions.push(Action::Assign {
                            device: member.device.clone(),
                            model,
                            shadow: None,
                            rollback: winner == Arm::A,
                        });
                    }
                }
                actions.push(Action::Record(format!(
                    "promoted {}: every device of the experiment runs it",
                    arm_name(winner)
                )));
                self.phase = ExperimentPhase::Promoted { winner };
            }
            (ExperimentCommand::Abort { reason }, _) => {
                for member in &self.members {
                    if member.arm == Arm::B {
                        actions.push(Action::Assign {
                            device: member.device.clone(),
                            model: self.spec.a,
                            shadow: None,
                            rollback: true,
                        });
                    }
                }
                actions.push(Action::Record(format!(
                    "aborted by the operator: {reason}; cohort B back on A"
                )));
                self.phase = ExperimentPhase::Aborted { reason };
            }
            (command, phase) => actions.push(Action::Record(format!(
                "{command:?} does not apply while {}; ignored",
                phase.name()
            ))),
        }
    }

    /// The chosen metric's test over what was measured so far.
    pub fn verdict(&self) -> Verdict {
        let (ta, tb) = (&self.totals_a, &self.totals_b);
        let alpha = self.spec.alpha;
        let (a, b, n_a, n_b, statistic, p_value, better) = match self.spec.metric {
            Metric::ErrorRate => {
                let (n_a, n_b) = (ta.sample.requests(), tb.sample.requests());
                let (z, p) = two_proportion_z(ta.sample.errors, n_a, tb.sample.errors, n_b);
                // Fewer errors is better: a positive z means A errs more.
                (
                    rate(ta.sample.errors, n_a),
                    rate(tb.sample.errors, n_b),
                    n_a,
                    n_b,
                    z,
                    p,
                    if z > 0.0 { Arm::B } else { Arm::A },
                )
            }
            Metric::Accuracy => {
                let (z, p) = two_proportion_z(ta.correct, ta.feedback, tb.correct, tb.feedback);
                (
                    rate(ta.correct, ta.feedback),
                    rate(tb.correct, tb.feedback),
                    ta.feedback,
                    tb.feedback,
                    z,
                    p,
                    if z > 0.0 { Arm::A } else { Arm::B },
                )
            }
            Metric::Latency => {
                let (z, p) = mann_whitney(&ta.sample.latency, &tb.sample.latency);
                // z > 0: A's latencies rank higher (slower).
                (
                    mean_latency(&ta.sample.latency),
                    mean_latency(&tb.sample.latency),
                    ta.sample.latency.count(),
                    tb.sample.latency.count(),
                    z,
                    p,
                    if z > 0.0 { Arm::B } else { Arm::A },
                )
            }
        };
        let enough = self.enough();
        let winner = (enough && p_value < alpha && statistic != 0.0).then_some(better);
        let show = |v: Option<f64>| match (self.spec.metric, v) {
            (_, None) => "-".to_owned(),
            (Metric::Latency, Some(v)) => format!("{v:.0} µs"),
            (_, Some(v)) => format!("{:.2}%", v * 100.0),
        };
        let summary = format!(
            "{} A {} (n={n_a}) vs B {} (n={n_b}), {} = {statistic:.3}, p = {p_value:.4}: {}",
            self.spec.metric.name(),
            show(a),
            show(b),
            if self.spec.metric == Metric::Latency {
                "z(U)"
            } else {
                "z"
            },
            match winner {
                Some(arm) => format!("{} is better at alpha {alpha}", arm_name(arm)),
                None if !enough => format!(
                    "too few samples to judge ({} per arm needed)",
                    self.spec.min_samples
                ),
                None => format!("no significant difference at alpha {alpha}"),
            }
        );
        Verdict {
            metric: self.spec.metric,
            test: test_name(self.spec.metric).into(),
            a,
            b,
            n_a,
            n_b,
            statistic,
            p_value,
            alpha,
            winner,
            summary,
        }
    }
}

pub fn arm_name(arm: Arm) -> &'static str {
    match arm {
        Arm::A => "A",
        Arm::B => "B",
    }
}

fn test_name(metric: Metric) -> &'static str {
    match metric {
        Metric::ErrorRate | Metric::Accuracy => "two-proportion z-test, two-sided",
        Metric::Latency => "Mann-Whitney U, normal approximation with tie correction, two-sided",
    }
}

fn rate(x: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| x as f64 / n as f64)
}

fn mean_latency(h: &LatencyHistogram) -> Option<f64> {
    let n = h.count();
    (n > 0).then(|| {
        let sum: f64 = h
            .buckets
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (lo, hi) = (
                    LatencyHistogram::bucket_floor(i) as f64,
                    LatencyHistogram::bucket_floor(i + 1) as f64,
                );
                *c as f64 * (lo + hi) / 2.0
            })
            .sum();
        sum / n as f64
    })
}

/// Pooled two-proportion z statistic of `x_a/n_a - x_b/n_b` and its two-sided p-value; (0, 1)
/// when it is undefined (an empty arm, or both proportions 0 or 1).
pub fn two_proportion_z(x_a: u64, n_a: u64, x_b: u64, n_b: u64) -> (f64, f64) {
    if n_a == 0 || n_b == 0 {
        return (0.0, 1.0);
    }
    let (na, nb) = (n_a as f64, n_b as f64);
    let (pa, pb) = (x_a as f64 / na, x_b as f64 / nb);
    let pooled = (x_a + x_b) as f64 / (na + nb);
    let se = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    if se == 0.0 || !se.is_finite() {
        return (0.0, 1.0);
    }
    let z = (pa - pb) / se;
    (z, (2.0 * normal_sf(z.abs())).min(1.0))
}

/// Mann–Whitney U of A against B from two latency histograms (equal buckets are ties): the z
/// of U_A (positive when A's values rank higher) and the two-sided p-value.
pub fn mann_whitney(a: &LatencyHistogram, b: &LatencyHistogram) -> (f64, f64) {
    let (n_a, n_b) = (a.count() as f64, b.count() as f64);
    if n_a == 0.0 || n_b == 0.0 {
        return (0.0, 1.0);
    }
    let buckets = a.buckets.len().max(b.buckets.len());
    let get = |h: &LatencyHistogram, i: usize| h.buckets.get(i).copied().unwrap_or(0) as f64;
    let (mut u_a, mut below_b, mut ties) = (0.0, 0.0, 0.0);
    for i in 0..buckets {
        let (ca, cb) = (get(a, i), get(b, i));
        u_a += ca * (below_b + cb / 2.0);
        below_b += cb;
        let t = ca + cb;
        ties += t * t * t - t;
    }
    let n = n_a + n_b;
    let mean = n_a * n_b / 2.0;
    let variance = n_a * n_b / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 || !variance.is_finite() {
        return (0.0, 1.0);
    }
    let z = (u_a - mean) / variance.sqrt();
    (z, (2.0 * normal_sf(z.abs())).min(1.0))
}

/// The standard normal survival function, 1 − Φ(z), from the complementary error function.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// erfc by the Chebyshev fit of Numerical Recipes (`erfcc`, fractional error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Where an experiment stands, for the API.
pub fn progress(experiment: &Experiment) -> serde_json::Value {
    let count = |arm: Arm, state: ArmState| {
        experiment
            .members
            .iter()
            .filter(|m| m.arm == arm && m.state == state)
            .count()
    };
    let arm = |arm: Arm, totals: &ArmTotals| {
        serde_json::json!({
            "model": experiment.model(arm).to_hex(),
            "devices": experiment.members.iter().filter(|m| m.arm == arm).count(),
            "active": count(arm, ArmState::Active),
            "installing": count(arm, ArmState::Assigned),
            "failed": count(arm, ArmState::Failed),
            "requests": totals.sample.requests(),
            "errors": totals.sample.errors,
            "error_rate": rate(totals.sample.errors, totals.sample.requests()),
            "p95_latency_us": totals.sample.latency.quantile(0.95),
            "mean_latency_us": mean_latency(&totals.sample.latency),
            "feedback": totals.feedback,
            "accuracy": rate(totals.correct, totals.feedback),
        })
    };
    let verdict = match &experiment.phase {
        ExperimentPhase::Concluded { verdict } => Some(verdict.clone()),
        _ => None,
    };
    serde_json::json!({
        "phase": experiment.phase.name(),
        "metric": experiment.spec.metric.name(),
        "test": test_name(experiment.spec.metric),
        "alpha": experiment.spec.alpha,
        "min_samples": experiment.spec.min_samples,
        "started": experiment.started.0,
        "ends_no_earlier_than": experiment.started.0.saturating_add(experiment.spec.duration_ms),
        "ends_at_the_latest": experiment.started.0.saturating_add(experiment.spec.max_duration_ms),
        "a": arm(Arm::A, &experiment.totals_a),
        "b": arm(Arm::B, &experiment.totals_b),
        "current": experiment.verdict(),
        "verdict": verdict,
        "winner": match &experiment.phase {
            ExperimentPhase::Promoted { winner } => Some(arm_name(*winner)),
            _ => None,
        },
        "reason": match &experiment.phase {
            ExperimentPhase::Aborted { reason } => Some(reason.clone()),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests;
