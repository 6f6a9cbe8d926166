//! What operators ask the driver for — a rollout plan, an experiment — as the API receives it,
//! checked value by value and turned into the engines' specs. Defaults follow the knobs of AWS IoT
//! Jobs, Argo Rollouts and hawkBit: 1000 assignments a minute, a 600 s progress deadline, abort on
//! a breach.

use serde::Deserialize;
use serde_json::{Value, json};

use super::DriverError;
use crate::rollout::engine::{Gates, Labels, OnBreach, ShadowPlan, Spec, Wave, WaveSize};
use crate::rollout::experiment::{ExperimentSpec, Metric};
use edgefleet_protocol::Sha256Digest;

/// What the API asks for when it starts a rollout (`POST /api/v1/rollouts`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The model to roll out: manifest digest or `name@version`.
    pub candidate: String,
    /// The model the members run now; by default the one model every selected device runs.
    #[serde(default)]
    pub baseline: Option<String>,
    /// Only devices with all these labels take part.
    #[serde(default)]
    pub selector: Labels,
    #[serde(default)]
    pub shadow: Option<ShadowRequest>,
    /// Waves in order; by default 1 device, 10%, 50%, 100%, each baking 10 minutes but the last.
    #[serde(default)]
    pub waves: Option<Vec<WaveRequest>>,
    #[serde(default = "default_max_per_minute")]
    pub max_per_minute: u32,
    #[serde(default = "default_progress_deadline_s")]
    pub progress_deadline_s: u64,
    #[serde(default)]
    pub gates: GatesRequest,
    #[serde(default = "default_on_breach")]
    pub on_breach: String,
    /// Wait for an operator's `approve` before the first assignment.
    #[serde(default)]
    pub approval: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// What started it when the controller did (a drift policy's automatic rollout: the
    /// candidate, its drift event); recorded with `rollout.start`.
    #[serde(default)]
    pub trigger: Option<Value>,
}

fn default_max_per_minute() -> u32 {
    1000
}
fn default_progress_deadline_s() -> u64 {
    600
}
fn default_on_breach() -> String {
    "abort".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowRequest {
    /// A device count (`"5"`) or a percentage (`"10%"`) of the members.
    pub cohort: String,
    pub duration_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveRequest {
    /// A device count (`"1"`) or a percentage (`"50%"`), cumulative.
    pub size: String,
    #[serde(default)]
    pub bake_s: u64,
    #[serde(default)]
    pub select: Labels,
}

/// Gate limits; every field defaults to [`Gates::default`]'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesRequest {
    pub max_install_failure_rate: Option<f64>,
    pub min_installs: Option<u64>,
    pub max_error_rate_increase: Option<f64>,
    pub max_p95_latency_ratio: Option<f64>,
    pub min_inferences: Option<u64>,
    pub min_shadow_agreement: Option<f64>,
    pub min_shadow_compared: Option<u64>,
    pub max_drift_score: Option<f64>,
    pub min_drift_windows: Option<u64>,
    pub require_evidence: Option<bool>,
}

/// `"5"` or `"10%"`.
pub fn parse_size(text: &str) -> Result<WaveSize, String> {
    let text = text.trim();
    if let Some(percent) = text.strip_suffix('%') {
        match percent.trim().parse::<u8>() {
            Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
            _ => Err(format!("{text:?}: a percentage is 1% to 100%")),
        }
    } else {
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(WaveSize::Count(n)),
            _ => Err(format!(
                "{text:?}: give a device count (e.g. 5) or a percentage (e.g. 10%)"
            )),
        }
    }
}

fn fraction(name: &str, value: f64, max: f64) -> Result<f64, DriverError> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(value)
    } else {
        Err(DriverError::Invalid(format!(
            "gate {name} = {value} is out of range (0 to {max})"
        )))
    }
}

/// The engine's plan from the API's request, every value checked.
pub fn spec_of(
    request: &StartRequest,
    candidate: Sha256Digest,
    baseline: Sha256Digest,
) -> Result<Spec, DriverError> {
    let invalid = DriverError::Invalid;
    let waves = match &request.waves {
        None => vec![
            Wave {
                size: WaveSize::Count(1),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(10),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(50),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(100),
                bake_ms: 0,
                select: Labels::new(),
            },
        ],
        Some(waves) if waves.is_empty() => return Err(invalid("give at least one wave".into())),
        Some(waves) if waves.len() > 32 => return Err(invalid("at most 32 waves".into())),
        Some(waves) => waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Ok(Wave {
                    size: parse_size(&w.size)
                        .map_err(|e| invalid(format!("wave {}: size {e}", i + 1)))?,
                    bake_ms: w.bake_s.saturating_mul(1000),
                    select: w.select.clone(),
                })
            })
            .collect::<Result<_, DriverError>>()?,
    };
    let shadow = request
        .shadow
        .as_ref()
        .map(|s| {
            Ok::<_, DriverError>(ShadowPlan {
                cohort: parse_size(&s.cohort).map_err(|e| invalid(format!("shadow cohort {e}")))?,
                duration_ms: s.duration_s.saturating_mul(1000),
            })
        })
        .transpose()?;
    if request.max_per_minute == 0 {
        return Err(invalid("max_per_minute must be at least 1".into()));
    }
    if request.progress_deadline_s == 0 {
        return Err(invalid("progress_deadline_s must be at least 1".into()));
    }
    let on_breach = match request.on_breach.as_str() {
        "abort" => OnBreach::Abort,
        "pause" => OnBreach::Pause,
        other => {
            return Err(invalid(format!(
                "on_breach {other:?}: use \"abort\" (roll back) or \"pause\""
            )));
        }
    };
    let given = &request.gates;
    let default = Gates::default();
    let gates = Gates {
        max_install_failure_rate: fraction(
            "max_install_failure_rate",
            given
                .max_install_failure_rate
                .unwrap_or(default.max_install_failure_rate),
            1.0,
        )?,
        min_installs: given.min_installs.unwrap_or(default.min_installs),
        max_error_rate_increase: fraction(
            "max_error_rate_increase",
            given
                .max_error_rate_increase
                .unwrap_or(default.max_error_rate_increase),
            1.0,
        )?,
        max_p95_latency_ratio: fraction(
            "max_p95_latency_ratio",
            given
                .max_p95_latency_ratio
                .unwrap_or(default.max_p95_latency_ratio),
            1e6,
        )?,
        min_inferences: given.min_inferences.unwrap_or(default.min_inferences),
        min_shadow_agreement: given
            .min_shadow_agreement
            .map(|v| fraction("min_shadow_agreement", v, 1.0))
            .transpose()?,
        min_shadow_compared: given
            .min_shadow_compared
            .unwrap_or(default.min_shadow_compared),
        max_drift_score: given
            .max_drift_score
            .map(|v| fraction("max_drift_score", v, 1e6))
            .transpose()?,
        min_drift_windows: given.min_drift_windows.unwrap_or(default.min_drift_windows),
        require_evidence: given.require_evidence.unwrap_or(default.require_evidence),
    };
    Ok(Spec {
        candidate,
        baseline,
        shadow,
        waves,
        max_per_minute: request.max_per_minute,
        progress_deadline_ms: request.progress_deadline_s.saturating_mul(1000),
        gates,
        on_breach,
        approval: request.approval,
    })
}

pub fn plan_json(spec: &Spec) -> Value {
    json!({
        "shadow": spec.shadow.map(|s| json!({"cohort": s.cohort.to_string(), "duration_s": s.duration_ms / 1000})),
        "waves": spec.waves.iter().map(|w| json!({"size": w.size.to_string(), "bake_s": w.bake_ms / 1000, "select": w.select})).collect::<Vec<_>>(),
        "max_per_minute": spec.max_per_minute,
        "progress_deadline_s": spec.progress_deadline_ms / 1000,
        "gates": spec.gates,
        "on_breach": match spec.on_breach { OnBreach::Abort => "abort", OnBreach::Pause => "pause" },
        "approval": spec.approval,
    })
}

/// What the API asks for when it starts an A/B experiment (`POST /api/v1/experiments`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentRequest {
    /// The control model (manifest digest or `name@version`).
    pub a: String,
    /// The treatment model.
    pub b: String,
    /// Only devices with all these labels take part.
    #[serde(default)]
    pub selector: Labels,
    /// Percentage of the devices in cohort B (default 50); devices are split by a hash of the
    /// experiment and device ids, so the split is random but stable.
    #[serde(default = "default_split")]
    pub split_percent: u8,
    /// `error_rate`, `accuracy` (needs ground-truth feedback) or `latency`.
    #[serde(default = "default_metric")]
    pub metric: String,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Per arm: requests, or feedback labels for `accuracy`.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// The test runs once, no earlier than this.
    #[serde(default = "default_duration_s")]
    pub duration_s: u64,
    /// An experiment still short of samples then ends without a winner.
    #[serde(default = "default_max_duration_s")]
    pub max_duration_s: u64,
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_split() -> u8 {
    50
}
fn default_metric() -> String {
    "error_rate".into()
}
fn default_alpha() -> f64 {
    0.05
}
fn default_min_samples() -> u64 {
    1000
}
fn default_duration_s() -> u64 {
    3600
}
fn default_max_duration_s() -> u64 {
    7 * 86_400
}

pub fn experiment_spec_of(
    request: &ExperimentRequest,
    a: Sha256Digest,
    b: Sha256Digest,
) -> Result<ExperimentSpec, DriverError> {
    let invalid = DriverError::Invalid;
    let metric = match request.metric.as_str() {
        "error_rate" => Metric::ErrorRate,
        "accuracy" => Metric::Accuracy,
        "latency" => Metric::Latency,
        other => {
            return Err(invalid(format!(
                "metric {other:?}: use error_rate, accuracy (needs feedback) or latency"
            )));
        }
    };
    if !(request.alpha > 0.0 && request.alpha < 0.5) {
        return Err(invalid(format!(
            "alpha {} must be above 0 and below 0.5 (0.05 is usual)",
            request.alpha
        )));
    }
    if !(1..=99).contains(&request.split_percent) {
        return Err(invalid("split_percent must be 1 to 99".into()));
    }
    if request.max_duration_s < request.duration_s {
        return Err(invalid(format!(
            "max_duration_s ({}) is shorter than duration_s ({})",
            request.max_duration_s, request.duration_s
        )));
    }
    Ok(ExperimentSpec {
        a,
        b,
        metric,
        alpha: request.alpha,
        min_samples: request.min_samples.max(1),
        duration_ms: request.duration_s.saturating_mul(1000),
        max_duration_ms: request.max_duration_s.saturating_mul(1000),
    })
}
