//! Drift detection over the devices' feature sketches: pure math, a detector state machine per
//! (model, scope), and a control chart over ground-truth feedback. No I/O and no clock here: the
//! driver feeds windows in with `now` and records what comes out.
//!
//! - [`math`]: χ² goodness of fit of a window's bin counts against the reference proportions (the
//!   decision), PSI and Jensen–Shannon (ranking and display).
//! - [`detector`]: [`DriftDetector`], Bonferroni-corrected per-feature tests, two consecutive
//!   windows, the model-level rule, hysteresis to clear; prediction drift on the outputs.
//! - [`performance`]: [`PerformanceChart`], a CUSUM over per-window accuracy or error.
//! - [`calibrate`]: the null check of a reference at the deployed window size.
//! - [`sim`]: the seeded drift simulator the tests and `benches/drift.rs` measure with.
//!
//! Scopes: a device's windows feed the detectors of its own scope, of each label group it is in
//! and of the fleet ([`scopes_of`]); sketches of one model merge by addition
//! ([`ScopeWindow::merge`]), so a group or the fleet is tested exactly like one device.

pub mod calibrate;
pub mod detector;
pub mod math;
pub mod performance;
pub mod sim;

use std::collections::BTreeMap;

use edgefleet_protocol::messages::{NamedSketch, TelemetryWindow};
use edgefleet_protocol::{DeviceId, TensorName, Timestamp};
use serde::{Deserialize, Serialize};

pub use detector::{DetectorConfig, DriftDetector};
pub use performance::{ChartConfig, PerformanceChart};

/// What a detector watches: one device, the devices sharing a label value, or the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Device(DeviceId),
    Group { label: String, value: String },
    Fleet,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Device(device) => write!(f, "device {device}"),
            Scope::Group { label, value } => write!(f, "group {label}={value}"),
            Scope::Fleet => f.write_str("fleet"),
        }
    }
}

/// The scopes a device's window feeds: the device itself, one group per label in `group_by`
/// that the device carries, and the fleet.
pub fn scopes_of(
    device: &DeviceId,
    labels: &BTreeMap<String, String>,
    group_by: &[String],
) -> Vec<Scope> {
    let mut scopes = vec![Scope::Device(device.clone())];
    for label in group_by {
        if let Some(value) = labels.get(label) {
            scopes.push(Scope::Group {
                label: label.clone(),
                value: value.clone(),
            });
        }
    }
    scopes.push(Scope::Fleet);
    scopes
}

/// The drift boundary's errors: a reference, a configuration or a window that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriftError {
    #[error(
        "{kind} {name} has {got} bins but {expected} were expected; merge and test only windows taken with the same model bundle"
    )]
    BinsMismatch {
        kind: &'static str,
        name: TensorName,
        expected: usize,
        got: usize,
    },
    #[error(
        "the reference statistics are not usable: {0}; rebuild the bundle's reference from training data"
    )]
    Reference(String),
    #[error(
        "the model has no reference features to watch; build its bundle with a reference sample (--reference)"
    )]
    NoFeatures,
    #[error("drift detector setting {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
}

/// One window of a scope: the sketches of one or more device windows of the same model, added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeWindow {
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    /// Device windows summed into this one.
    pub device_windows: u64,
    pub features: Vec<NamedSketch>,
    pub outputs: Vec<NamedSketch>,
}

impl ScopeWindow {
    pub fn from_telemetry(window: &TelemetryWindow) -> Self {
        Self {
            window_start: window.window_start,
            window_end: window.window_end,
            device_windows: 1,
            features: window.features.clone(),
            outputs: window.outputs.clone(),
        }
    }

    /// Adds `other` into `self`, sketch by sketch matched by name (a name only one side has is
    /// kept as it is). Fails, leaving `self` unchanged, if a sketch has different bins on the
    /// two sides.
    pub fn merge(&mut self, other: &ScopeWindow) -> Result<(), DriftError> {
        check_mergeable("feature", &self.features, &other.features)?;
        check_mergeable("output", &self.outputs, &other.outputs)?;
        merge_named(&mut self.features, &other.features);
        merge_named(&mut self.outputs, &other.outputs);
        self.window_start = self.window_start.min(other.window_start);
        self.window_end = self.window_end.max(other.window_end);
        self.device_windows = self.device_windows.saturating_add(other.device_windows);
        Ok(())
    }

    /// Rows this window counted: the largest number of values (binned or NaN) of any feature.
    pub fn rows(&self) -> u64 {
        self.features
            .iter()
            .map(|f| bin_total(&f.sketch.bins).saturating_add(f.sketch.nan))
            .max()
            .unwrap_or(0)
    }

    pub fn feature(&self, name: &TensorName) -> Option<&NamedSketch> {
        self.features.iter().find(|f| &f.name == name)
    }
}

/// The sum of a sketch's bin counts: the values the tests see (NaNs are in no bin).
pub fn bin_total(bins: &[u64]) -> u64 {
    bins.iter().fold(0u64, |acc, c| acc.saturating_add(*c))
}

fn check_mergeable(
    kind: &'static str,
    ours: &[NamedSketch],
    theirs: &[NamedSketch],
) -> Result<(), DriftError> {
    for theirs in theirs {
        if let Some(ours) = ours.iter().find(|s| s.name == theirs.name)
            && ours.sketch.bins.len() != theirs.sketch.bins.len()
        {
            return Err(DriftError::BinsMismatch {
                kind,
                name: theirs.name.clone(),
                expected: ours.sketch.bins.len(),
                got: theirs.sketch.bins.len(),
            });
        }
    }
    Ok(())
}

fn merge_named(ours: &mut Vec<NamedSketch>, theirs: &[NamedSketch]) {
    for theirs in theirs {
        match ours.iter_mut().find(|s| s.name == theirs.name) {
            // Bins were checked to match, so the merge cannot fail.
            Some(ours) => {
                let _ = ours.sketch.merge(&theirs.sketch);
            }
            None => ours.push(theirs.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
