//! What a simulated device does with a model: whether installing and activating it fails, how
//! long activation takes, how many requests it serves, how many fail and how slowly, how a shadow
//! model agrees, which input values it sees (with optional drift) and which outputs it gives.
//!
//! Behaviour is keyed by model (`name@version`) over a default, and can be changed for a subset of
//! devices with [`DeviceRule`]s. In a behaviour file (TOML) every section is a patch: it sets only
//! the fields it names, over the default (models) or over the device's model behaviour (rules).

use std::collections::BTreeMap;
use std::path::Path;

use edgefleet_protocol::messages::FailureCode;
use rand::RngExt;
use rand_distr::{Distribution, LogNormal, Normal};
use serde::Deserialize;

/// `name@version` of a registered model, e.g. `pump-anomaly@1.0.0`.
pub type ModelKey = String;

/// The z-score of the 95th percentile of a standard normal distribution.
const Z_95: f64 = 1.644_853_626_951_472_2;

/// A distribution of numbers (the field it is used for names the unit).
///
/// In TOML: a number (always that value), `{ min, max }` (uniform), `{ mean, sd }` (normal), or
/// `{ median, p95 }` (log-normal with that median and 95th percentile).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Fixed(f64),
    Uniform { min: f64, max: f64 },
    Normal { mean: f64, sd: f64 },
    LogNormal { median: f64, p95: f64 },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistFields {
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
    sd: Option<f64>,
    median: Option<f64>,
    p95: Option<f64>,
}

impl DistFields {
    fn into_dist(self) -> Result<Dist, String> {
        let dist = match self {
            DistFields {
                min: Some(min),
                max: Some(max),
                mean: None,
                sd: None,
                median: None,
                p95: None,
            } => Dist::Uniform { min, max },
            DistFields {
                mean: Some(mean),
                sd: Some(sd),
                min: None,
                max: None,
                median: None,
                p95: None,
            } => Dist::Normal { mean, sd },
            DistFields {
                median: Some(median),
                p95: Some(p95),
                min: None,
                max: None,
                mean: None,
                sd: None,
            } => Dist::LogNormal { median, p95 },
            _ => {
                return Err(String::from(
                    "a distribution is a number, { min, max }, { mean, sd } or { median, p95 }",
                ));
            }
        };
        dist.check()?;
        Ok(dist)
    }
}

impl<'de> Deserialize<'de> for Dist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DistVisitor;
        impl<'de> serde::de::Visitor<'de> for DistVisitor {
            type Value = Dist;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, { min, max }, { mean, sd } or { median, p95 }")
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Dist, E> {
                let dist = Dist::Fixed(value);
                dist.check().map_err(E::custom)?;
                Ok(dist)
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Dist, E> {
                self.visit_f64(value as f64)
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Dist, E> {
                self.visit_f64(value as f64)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Dist, A::Error> {
                let fields =
                    DistFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                fields.into_dist().map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(DistVisitor)
    }
}

impl Dist {
    /// Why the parameters make no distribution, if they do not.
    pub fn check(&self) -> Result<(), String> {
        let finite = |values: &[f64]| values.iter().all(|v| v.is_finite());
        match *self {
            Dist::Fixed(value) if !value.is_finite() => Err(format!("{value} is not a number")),
            Dist::Uniform { min, max } if !finite(&[min, max]) || min > max => {
                Err(format!("min {min} must be a number not above max {max}"))
            }
            Dist::Normal { mean, sd } if !finite(&[mean, sd]) || sd < 0.0 => {
                Err(format!("mean {mean} and sd {sd} must be numbers, sd ≥ 0"))
            }
            Dist::LogNormal { median, p95 }
                if !finite(&[median, p95]) || median <= 0.0 || p95 < median =>
            {
                Err(format!(
                    "median {median} must be above 0 and p95 {p95} not below the median"
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn sample<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        match *self {
            Dist::Fixed(value) => value,
            Dist::Uniform { min, max } if min < max => rng.random_range(min..max),
            Dist::Uniform { min, .. } => min,
            Dist::Normal { mean, sd } => Normal::new(mean, sd).map_or(mean, |d| d.sample(rng)),
            Dist::LogNormal { median, p95 } => {
                let sigma = (p95 / median).ln() / Z_95;
                LogNormal::new(median.ln(), sigma).map_or(median, |d| d.sample(rng))
            }
        }
    }

    /// The distribution's mean and standard deviation.
    pub fn mean_sd(&self) -> (f64, f64) {
        match *self {
            Dist::Fixed(value) => (value, 0.0),
            Dist::Uniform { min, max } => ((min + max) / 2.0, (max - min) / 12f64.sqrt()),
            Dist::Normal { mean, sd } => (mean, sd),
            Dist::LogNormal { median, p95 } => {
                let sigma = (p95 / median).ln() / Z_95;
                let mean = median * (sigma * sigma / 2.0).exp();
                (mean, mean * ((sigma * sigma).exp() - 1.0).sqrt())
            }
        }
    }
}

/// Per-request probabilities of each kind of failure (at most 1 together).
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorRates {
    /// The model fails while running (counts towards the agent's grace-window error rate).
    pub runtime: f64,
    /// The request is refused by the input schema check.
    pub invalid_input: f64,
    /// The model exceeds its time limit.
    pub timeout: f64,
}

/// Input drift: how the values of the drifting features move away from their usual distribution.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drift {
    /// Shift of the mean, in standard deviations of the usual distribution.
    pub mean_shift_sd: f64,
    /// Factor on the variance (1 keeps it).
    pub variance_factor: f64,
    /// Fraction of values replaced by `stuck_value` (a stuck sensor).
    pub stuck_fraction: f64,
    pub stuck_value: f64,
    /// The features that drift (by manifest feature name); all of them when absent.
    pub features: Option<Vec<String>>,
}

impl Default for Drift {
    fn default() -> Self {
        Self {
            mean_shift_sd: 0.0,
            variance_factor: 1.0,
            stuck_fraction: 0.0,
            stuck_value: 0.0,
            features: None,
        }
    }
}

impl Drift {
    pub fn applies_to(&self, feature: &str) -> bool {
        self.features
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == feature))
    }

    /// `x` drawn from a distribution with `mean` and `sd`, moved as this drift says.
    pub fn apply<R: rand::Rng + ?Sized>(&self, rng: &mut R, x: f64, mean: f64, sd: f64) -> f64 {
        if self.stuck_fraction > 0.0 && rng.random_bool(self.stuck_fraction.min(1.0)) {
            return self.stuck_value;
        }
        mean + (x - mean) * self.variance_factor.sqrt() + self.mean_shift_sd * sd
    }
}

/// Defines [`Behaviour`], its defaults, and [`BehaviourPatch`] (every field optional) from one
/// field list, so the two cannot drift apart.
macro_rules! behaviour {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty = $default:expr,)*) => {
        /// Everything a simulated device does with one model. `Default` is a healthy model.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Behaviour {
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Default for Behaviour {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        /// Some fields of a [`Behaviour`]; [`BehaviourPatch::apply`] sets them and keeps the rest.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct BehaviourPatch {
            $($(#[doc = $doc])* pub $field: Option<$ty>,)*
        }

        impl BehaviourPatch {
            pub fn apply(&self, behaviour: &mut Behaviour) {
                $(if let Some(value) = &self.$field {
                    behaviour.$field = value.clone();
                })*
            }
        }
    };
}

behaviour! {
    /// Probability that installing fails after the download (the device reports
    /// `InstallFailed { reason: install_failure_reason }` and keeps its model).
    install_failure: f64 = 0.0,
    install_failure_reason: FailureCode = FailureCode::Download,
    /// Probability that the installed model fails its activation (self-test, load), so the
    /// device reports `RolledBack { reason: activation_failure_reason }`.
    activation_failure: f64 = 0.0,
    activation_failure_reason: FailureCode = FailureCode::GoldenMismatch,
    /// Time from `Installed` to `Activated` (a real agent spends its self-test and the
    /// manifest's grace window there), in milliseconds.
    activation_delay_ms: Dist = Dist::Uniform { min: 200.0, max: 1000.0 },
    /// Inference requests per second on each device.
    inference_rate: f64 = 1.0,
    errors: ErrorRates = ErrorRates::default(),
    /// Latency of a successful inference, in microseconds.
    latency_us: Dist = Dist::LogNormal { median: 500.0, p95: 1500.0 },
    /// When this model is the shadow: the share of requests where it agrees with the active
    /// model's argmax.
    shadow_agreement: f64 = 1.0,
    /// When this model is the shadow: the mean absolute output difference per request.
    shadow_mean_abs_diff: f64 = 0.0,
    /// Input values per manifest feature; a feature not named here follows the manifest's
    /// reference distribution (its decile bins), so a healthy device shows no drift.
    features: BTreeMap<String, Dist> = BTreeMap::new(),
    drift: Option<Drift> = None,
    /// Values of single-score outputs (clamped to [0, 1]).
    output: Dist = Dist::Uniform { min: 0.0, max: 1.0 },
    /// Weights of each class of class-score outputs (argmax); equal when empty.
    classes: Vec<f64> = Vec::new(),
    /// What the device reports as its agent's CPU use (percent of one core) and memory.
    cpu_percent: f64 = 2.0,
    rss_mib: f64 = 36.0,
}

impl Behaviour {
    /// Every field that is out of range, as `field: problem`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut probability = |name: &str, p: f64| {
            if !(0.0..=1.0).contains(&p) {
                out.push(format!("{name}: {p} is not a probability (0 to 1)"));
            }
        };
        probability("install_failure", self.install_failure);
        probability("activation_failure", self.activation_failure);
        probability("errors.runtime", self.errors.runtime);
        probability("errors.invalid_input", self.errors.invalid_input);
        probability("errors.timeout", self.errors.timeout);
        probability("shadow_agreement", self.shadow_agreement);
        if let Some(drift) = &self.drift {
            probability("drift.stuck_fraction", drift.stuck_fraction);
        }
        let errors = self.errors.runtime + self.errors.invalid_input + self.errors.timeout;
        if errors > 1.0 {
            out.push(format!("errors: the rates add up to {errors}, above 1"));
        }
        for (name, value) in [
            ("inference_rate", self.inference_rate),
            ("shadow_mean_abs_diff", self.shadow_mean_abs_diff),
            ("cpu_percent", self.cpu_percent),
            ("rss_mib", self.rss_mib),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                out.push(format!("{name}: {value} must be a number ≥ 0"));
            }
        }
        if let Some(drift) = &self.drift
            && !(drift.variance_factor.is_finite() && drift.variance_factor >= 0.0)
        {
            out.push(format!(
                "drift.variance_factor: {} must be a number ≥ 0",
                drift.variance_factor
            ));
        }
        if self.classes.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            out.push(String::from("classes: weights must be numbers ≥ 0"));
        }
        for (name, dist) in [
            ("activation_delay_ms", &self.activation_delay_ms),
            ("latency_us", &self.latency_us),
            ("output", &self.output),
        ] {
            if let Err(problem) = dist.check() {
                out.push(format!("{name}: {problem}"));
            }
        }
        for (feature, dist) in &self.features {
            if let Err(problem) = dist.check() {
                out.push(format!("features.{feature}: {problem}"));
            }
        }
        out
    }

    /// A class index drawn by the `classes` weights (uniform when they are empty or all zero).
    pub fn sample_class<R: rand::Rng + ?Sized>(&self, rng: &mut R, width: usize) -> usize {
        let weights: Vec<f64> = (0..width)
            .map(|i| self.classes.get(i).copied().unwrap_or(0.0))
            .collect();
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return rng.random_range(0..width.max(1));
        }
        let mut point = rng.random_range(0.0..total);
        for (i, weight) in weights.iter().enumerate() {
            if point < *weight {
                return i;
            }
            point -= weight;
        }
        width.saturating_sub(1)
    }
}

/// Which devices a rule or a label applies to, by index (0-based, in enrollment order) or id.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceSelector {
    All,
    Indices(Vec<usize>),
    Ids(Vec<String>),
    /// This share of the fleet (rounded to the nearest device), picked by the fleet's seed.
    Fraction(f64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorFields {
    all: Option<bool>,
    indices: Option<Vec<usize>>,
    ids: Option<Vec<String>>,
    fraction: Option<f64>,
}

impl<'de> Deserialize<'de> for DeviceSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = SelectorFields::deserialize(d)?;
        let selector = match fields {
            SelectorFields {
                all: Some(true),
                indices: None,
                ids: None,
                fraction: None,
            } => DeviceSelector::All,
            SelectorFields {
                indices: Some(indices),
                all: None,
                ids: None,
                fraction: None,
            } => DeviceSelector::Indices(indices),
            SelectorFields {
                ids: Some(ids),
                all: None,
                indices: None,
                fraction: None,
            } => DeviceSelector::Ids(ids),
            SelectorFields {
                fraction: Some(fraction),
                all: None,
                indices: None,
                ids: None,
            } if (0.0..=1.0).contains(&fraction) => DeviceSelector::Fraction(fraction),
            _ => {
                return Err(serde::de::Error::custom(
                    "select exactly one of { all = true }, { indices = [...] }, { ids = [...] } or { fraction = 0..1 }",
                ));
            }
        };
        Ok(selector)
    }
}

impl DeviceSelector {
    /// Which of the fleet's devices are selected, as one flag per device index.
    pub fn resolve(&self, ids: &[String], seed: u64) -> Vec<bool> {
        let n = ids.len();
        match self {
            DeviceSelector::All => vec![true; n],
            DeviceSelector::Indices(indices) => {
                let mut out = vec![false; n];
                for &i in indices {
                    if let Some(flag) = out.get_mut(i) {
                        *flag = true;
                    }
                }
                out
            }
            DeviceSelector::Ids(wanted) => ids.iter().map(|id| wanted.contains(id)).collect(),
            DeviceSelector::Fraction(fraction) => {
                let k = ((fraction * n as f64).round() as usize).min(n);
                // A seeded shuffle: the same seed picks the same devices.
                let mut order: Vec<usize> = (0..n).collect();
                let mut rng = crate::device_rng(seed, u64::MAX);
                for i in (1..n).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                let mut out = vec![false; n];
                for &i in &order[..k] {
                    out[i] = true;
                }
                out
            }
        }
    }
}

/// A patch of behaviour for some devices, on one model or on every model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    #[serde(rename = "select")]
    pub devices: DeviceSelector,
    /// `name@version`; the rule applies to every model when absent.
    pub model: Option<ModelKey>,
    #[serde(default)]
    pub behaviour: BehaviourPatch,
}

/// Behaviour for every model on every device: per model over a default, then device rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BehaviourTable {
    pub default: Behaviour,
    pub models: BTreeMap<ModelKey, Behaviour>,
    /// Applied in order over the model's behaviour on the devices they select.
    pub rules: Vec<DeviceRule>,
}

/// A behaviour file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    #[error("cannot read the behaviour file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("behaviour file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("behaviour file {path}: {}; fix these fields", problems.join("; "))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourFile {
    #[serde(default)]
    default: BehaviourPatch,
    #[serde(default)]
    models: BTreeMap<ModelKey, BehaviourPatch>,
    #[serde(default)]
    devices: Vec<DeviceRule>,
}

impl BehaviourTable {
    /// Reads a behaviour file (TOML).
    pub fn load(path: &Path) -> Result<Self, BehaviourError> {
        let text = std::fs::read_to_string(path).map_err(|source| BehaviourError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses a behaviour file's text; `path` names it in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, BehaviourError> {
        let file: BehaviourFile = toml::from_str(text).map_err(|err| BehaviourError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        let mut problems = Vec::new();
        let mut default = Behaviour::default();
        file.default.apply(&mut default);
        problems.extend(
            default
                .problems()
                .into_iter()
                .map(|p| format!("default.{p}")),
        );
        let mut models = BTreeMap::new();
        for (key, patch) in file.models {
            if !key.contains('@') {
                problems.push(format!(
                    "models.{key:?}: name models as name@version (e.g. pump-anomaly@1.0.0)"
                ));
            }
            let mut behaviour = default.clone();
            patch.apply(&mut behaviour);
            problems.extend(
                behaviour
                    .problems()
                    .into_iter()
                    .map(|p| format!("models.{key:?}.{p}")),
            );
            models.insert(key, behaviour);
        }
        let table = Self {
            default,
            models,
            rules: file.devices,
        };
        for (i, rule) in table.rules.iter().enumerate() {
            let mut behaviour = table.for_model(rule.model.as_deref().unwrap_or(""));
            rule.behaviour.apply(&mut behaviour);
            problems.extend(
                behaviour
                    .problems()
                    .into_iter()
                    .map(|p| format!("devices[{i}].behaviour.{p}")),
            );
        }
        if problems.is_empty() {
            Ok(table)
        } else {
            Err(BehaviourError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The behaviour of `model` before device rules.
    pub fn for_model(&self, model: &str) -> Behaviour {
        self.models.get(model).unwrap_or(&self.default).clone()
    }
}

/// A [`BehaviourTable`] with its rules resolved against one fleet.
#[derive(Debug, Clone)]
pub(crate) struct Behaviours {
    table: BehaviourTable,
    /// Per rule: which device indices it selects.
    selected: Vec<Vec<bool>>,
    ids: Vec<String>,
    seed: u64,
}

impl Behaviours {
    pub fn new(table: BehaviourTable, ids: Vec<String>, seed: u64) -> Self {
        let selected = table
            .rules
            .iter()
            .map(|rule| rule.devices.resolve(&ids, seed))
            .collect();
        Self {
            table,
            selected,
            ids,
            seed,
        }
    }

    /// What device `index` does with `model`.
    pub fn get(&self, index: usize, model: &str) -> Behaviour {
        let mut behaviour = self.table.for_model(model);
        for (rule, selected) in self.table.rules.iter().zip(&self.selected) {
            let applies = rule.model.as_deref().is_none_or(|m| m == model);
            if applies && selected.get(index).copied().unwrap_or(false) {
                rule.behaviour.apply(&mut behaviour);
            }
        }
        behaviour
    }

    pub fn set_model(&mut self, model: ModelKey, behaviour: Behaviour) {
        self.table.models.insert(model, behaviour);
    }

    pub fn add_rule(&mut self, rule: DeviceRule) {
        self.selected
            .push(rule.devices.resolve(&self.ids, self.seed));
        self.table.rules.push(rule);
    }
}

#[cfg(test)]
mod tests;
