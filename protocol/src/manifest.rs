//! The bundle manifest: what a model is, how to run and self-test it, what its input data looked
//! like in training, and where it came from. Signed by the release keys; see [`crate::bundle`].

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::codec::{self, MAX_MANIFEST_BYTES};
use crate::crypto::{Domain, Sha256Digest};
use crate::ids::{Arch, ModelName, ModelVersion, TensorName};
use crate::sketch::ReferenceFeature;
use crate::time::Timestamp;
use crate::trust::{ReleaseKeyring, RoleName, Signed, TrustError, Verified};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u16 = 1;
/// Upper bound on payload files in one bundle.
pub const MAX_PAYLOADS: usize = 16;
/// Upper bound on one payload (a model file), in bytes.
pub const MAX_PAYLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u16,
    pub name: ModelName,
    pub version: ModelVersion,
    /// Monotonic per model name; devices refuse a lower one unless told to roll back.
    pub release: u64,
    pub description: Option<String>,
    pub target: Target,
    /// Files in the bundle, in the order they follow the manifest.
    pub payloads: Vec<Payload>,
    pub runtime: RuntimeSettings,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How a prediction is read from the outputs, for ground-truth feedback; absent: see
    /// [`Manifest::prediction_spec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionSpec>,
    /// Which input elements are tracked as features for drift.
    pub features: Vec<FeatureSpec>,
    /// Inputs with known outputs, run on the device before a model is activated.
    pub golden: Vec<GoldenVector>,
    /// Reference distribution of each feature (decile bins) from the training data.
    pub reference: Option<ReferenceStats>,
    pub lineage: Lineage,
    pub created_at: Timestamp,
    pub expires: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub arch: Arch,
    /// Lowest agent version (dotted numbers, e.g. `0.3.0`) that can run this bundle.
    pub min_agent_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum PayloadRole {
    /// The ONNX model the runtime loads; exactly one per bundle.
    Model,
    /// Any other file the model needs (labels, tokenizer, …).
    Data,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// File name on the device; a plain name (no `/`, `\`, `..`).
    pub name: TensorName,
    pub role: PayloadRole,
    pub sha256: Sha256Digest,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads tract may use for one inference (1 = single-threaded, the default).
    pub threads: u16,
    /// A golden-vector inference slower than this fails activation.
    pub latency_budget_ms: u32,
    /// Seconds the live error rate is watched after activation.
    pub grace_window_s: u32,
    /// Live error rate (0..1) above which the activation is rolled back.
    pub max_error_rate: f32,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            threads: 1,
            latency_budget_ms: 1000,
            grace_window_s: 60,
            max_error_rate: 0.05,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
    U8,
    I8,
    Bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: TensorName,
    pub dtype: DType,
    /// `None` marks a dynamic dimension (e.g. the batch).
    pub shape: Vec<Option<u64>>,
    /// What to do with NaN inputs.
    pub nan: NanPolicy,
}

impl TensorSpec {
    /// Whether a concrete `shape` fits: same rank, every fixed dimension equal.
    pub fn fits_shape(&self, shape: &[u64]) -> bool {
        shape.len() == self.shape.len()
            && shape
                .iter()
                .zip(&self.shape)
                .all(|(got, want)| want.is_none_or(|w| w == *got))
    }
}

/// The threshold a single score is read at when the manifest names none.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Which output holds the prediction and what kind it is, so that ground truth fed back for a
/// prediction can be scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct PredictionSpec {
    pub output: TensorName,
    pub kind: PredictionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum PredictionKind {
    /// The predicted class is the index of the largest element along the output's last axis;
    /// a single score (a last axis of one) is class 1 at or above `threshold`, else class 0.
    Classification { threshold: f32 },
    /// The output's single element (per row) is the predicted value.
    Regression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    Reject,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: TensorName,
    /// The input tensor the feature is read from.
    pub tensor: TensorName,
    /// Position along the tensor's last axis.
    pub index: u32,
}

/// A tensor with its data, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct NamedTensor {
    pub name: TensorName,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(#[serde(with = "crate::codec::byte_vec")] Vec<u8>),
    I8(Vec<i8>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f64` (booleans as 0 and 1), for statistics.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::I8(_) => DType::I8,
            TensorData::Bool(_) => DType::Bool,
        }
    }
}

impl NamedTensor {
    /// The element count the shape promises, or `None` on overflow.
    pub fn shape_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, dim| acc.checked_mul(*dim))
            .and_then(|n| usize::try_from(n).ok())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct GoldenVector {
    pub inputs: Vec<NamedTensor>,
    pub outputs: Vec<NamedTensor>,
    /// Largest accepted absolute difference per output element.
    pub tolerance: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ReferenceStats {
    /// Rows the statistics were computed from.
    pub sample_count: u64,
    pub features: Vec<ReferenceFeature>,
}

/// Where the model came from: enough to answer "trained on which data, by which code".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    pub training_data_digest: Option<Sha256Digest>,
    pub training_data_uri: Option<String>,
    pub code_commit: Option<String>,
    pub parameters: Vec<Param>,
    pub metrics: Vec<Metric>,
    pub mlflow_run_id: Option<String>,
    /// The model this one was derived from (e.g. retrained from), as `name@version`.
    pub parent: Option<String>,
    /// This model is a retrained candidate to replace the named model.
    pub candidate_for: Option<ModelName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Param {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}

impl Manifest {
    /// Structural checks every manifest must pass, signed or not.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format {} is not supported; this build reads format {MANIFEST_FORMAT}",
                self.format
            ));
        }
        if self.payloads.is_empty() || self.payloads.len() > MAX_PAYLOADS {
            return Err(format!(
                "a bundle has 1 to {MAX_PAYLOADS} payloads, not {}",
                self.payloads.len()
            ));
        }
        let mut names = BTreeSet::new();
        for payload in &self.payloads {
            if !crate::ids::is_file_name(payload.name.as_str()) {
                return Err(format!(
                    "payload name {} must be a plain file name (no `/`)",
                    payload.name
                ));
            }
            if !names.insert(payload.name.as_str()) {
                return Err(format!("payload {} is listed twice", payload.name));
            }
            if payload.size > MAX_PAYLOAD_BYTES {
                return Err(format!(
                    "payload {} is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
                    payload.name, payload.size
                ));
            }
        }
        let n_models = self
            .payloads
            .iter()
            .filter(|p| p.role == PayloadRole::Model)
            .count();
        if n_models != 1 {
            return Err(format!(
                "a bundle has exactly one model payload, this one has {n_models}"
            ));
        }
        if self.runtime.threads == 0 {
            return Err(String::from("runtime.threads must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.runtime.max_error_rate) {
            return Err(format!(
                "runtime.max_error_rate {} must be between 0 and 1",
                self.runtime.max_error_rate
            ));
        }
        if self.expires <= self.created_at {
            return Err(format!(
                "expires ({}) must be after created_at ({})",
                self.expires, self.created_at
            ));
        }
        let input_names = unique_names("input", &self.inputs)?;
        let output_names = unique_names("output", &self.outputs)?;
        for feature in &self.features {
            if !input_names.contains(feature.tensor.as_str()) {
                return Err(format!(
                    "feature {} reads input {}, which the schema does not list",
                    feature.name, feature.tensor
                ));
            }
        }
        if let Some(prediction) = &self.prediction {
            if !output_names.contains(prediction.output.as_str()) {
                return Err(format!(
                    "the prediction is read from output {}, which the schema does not list",
                    prediction.output
                ));
            }
            if let PredictionKind::Classification { threshold } = prediction.kind
                && !threshold.is_finite()
            {
                return Err(String::from(
                    "the prediction's classification threshold must be a finite number",
                ));
            }
        }
        for (i, golden) in self.golden.iter().enumerate() {
            check_tensors(i, "input", &golden.inputs, &self.inputs, &input_names)?;
            check_tensors(i, "output", &golden.outputs, &self.outputs, &output_names)?;
            if golden.tolerance.is_nan() || golden.tolerance < 0.0 {
                return Err(format!("golden vector {i}: tolerance must be a number ≥ 0"));
            }
        }
        if let Some(reference) = &self.reference {
            for feature in &reference.features {
                if !self.features.iter().any(|f| f.name == feature.name) {
                    return Err(format!(
                        "reference statistics name feature {}, which the schema does not list",
                        feature.name
                    ));
                }
                feature.validate()?;
            }
        }
        Ok(())
    }

    /// The features that have reference statistics, in manifest order, each with its
    /// reference: the ones a device counts into bins (a feature without a reference has no
    /// bins to count into).
    pub fn referenced_features(&self) -> impl Iterator<Item = (&FeatureSpec, &ReferenceFeature)> {
        self.features.iter().filter_map(|spec| {
            let reference = self
                .reference
                .as_ref()?
                .features
                .iter()
                .find(|r| r.name == spec.name)?;
            Some((spec, reference))
        })
    }

    /// The prediction ground truth is scored against: the manifest's, else the first output
    /// read as a classification at [`DEFAULT_THRESHOLD`]. `None` for a model without outputs.
    pub fn prediction_spec(&self) -> Option<PredictionSpec> {
        if let Some(spec) = &self.prediction {
            return Some(spec.clone());
        }
        self.outputs.first().map(|output| PredictionSpec {
            output: output.name.clone(),
            kind: PredictionKind::Classification {
                threshold: DEFAULT_THRESHOLD,
            },
        })
    }

    /// The single model payload (validation guarantees there is one).
    pub fn model_payload(&self) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.role == PayloadRole::Model)
    }

    /// Total payload bytes that follow the manifest in a bundle file.
    pub fn payload_bytes(&self) -> u64 {
        self.payloads
            .iter()
            .map(|p| p.size)
            .fold(0u64, u64::saturating_add)
    }
}

fn unique_names<'a>(kind: &str, specs: &'a [TensorSpec]) -> Result<BTreeSet<&'a str>, String> {
    let mut names = BTreeSet::new();
    for spec in specs {
        if !names.insert(spec.name.as_str()) {
            return Err(format!(
                "{kind} {} is listed twice in the schema",
                spec.name
            ));
        }
    }
    Ok(names)
}

fn check_tensors(
    i: usize,
    kind: &str,
    tensors: &[NamedTensor],
    specs: &[TensorSpec],
    names: &BTreeSet<&str>,
) -> Result<(), String> {
    for tensor in tensors {
        if !names.contains(tensor.name.as_str()) {
            return Err(format!(
                "golden vector {i}: {kind} {} is not in the schema",
                tensor.name
            ));
        }
        if tensor.shape_len() != Some(tensor.data.len()) {
            return Err(format!(
                "golden vector {i}: {kind} {} has shape {:?} but {} values",
                tensor.name,
                tensor.shape,
                tensor.data.len()
            ));
        }
        if let Some(spec) = specs.iter().find(|s| s.name == tensor.name)
            && spec.dtype != tensor.data.dtype()
        {
            return Err(format!(
                "golden vector {i}: {kind} {} is {:?} but the schema says {:?}",
                tensor.name,
                tensor.data.dtype(),
                spec.dtype
            ));
        }
    }
    Ok(())
}

/// Requests a model must have answered in its grace window before its error rate counts.
pub const MIN_GRACE_SAMPLES: u64 = 20;

/// Whether a model's live error rate in its grace window breaks the manifest's
/// `runtime.max_error_rate`, once [`MIN_GRACE_SAMPLES`] requests were answered (`ok` plus
/// `runtime_errors`; refused inputs do not count). The reason, if it does.
pub fn error_rate_breach(ok: u64, runtime_errors: u64, max_error_rate: f32) -> Option<String> {
    let answered = ok + runtime_errors;
    if answered < MIN_GRACE_SAMPLES {
        return None;
    }
    let rate = runtime_errors as f64 / answered as f64;
    (rate > f64::from(max_error_rate)).then(|| {
        format!(
            "live error rate {:.1}% ({runtime_errors} of {answered} requests) is above the manifest's limit {:.1}%",
            rate * 100.0,
            max_error_rate * 100.0
        )
    })
}

/// What a manifest must satisfy besides its signatures. Fields left `None` are not checked (the
/// offline `edgefleet bundle verify` knows no device); a device fills in all of them.
#[derive(Debug, Clone, Default)]
pub struct ManifestPolicy {
    pub now: Timestamp,
    pub device_arch: Option<Arch>,
    pub agent_version: Option<String>,
    /// The highest release of this model the device has installed.
    pub release_floor: Option<u64>,
    /// An explicit rollback assignment may go below the floor.
    pub allow_downgrade: bool,
    /// The manifest digest the assignment names (mix-and-match protection).
    pub expected_digest: Option<Sha256Digest>,
}

/// Verifies a signed manifest: digest binding, release-key threshold over the exact bytes, then
/// parsing, structural validation, expiry, architecture, agent version and release floor.
pub fn verify_manifest(
    signed_bytes: &[u8],
    keyring: &Verified<ReleaseKeyring>,
    policy: &ManifestPolicy,
) -> Result<Verified<Manifest>, TrustError> {
    let signed = Signed::decode("signed manifest", signed_bytes, MAX_MANIFEST_BYTES)?;
    if let Some(expected) = policy.expected_digest {
        let got = Sha256Digest::of(&signed.body);
        if got != expected {
            return Err(TrustError::ManifestMismatch {
                expected: expected.to_hex(),
                got: got.to_hex(),
            });
        }
    }
    keyring.release.check(
        RoleName::Release,
        Domain::Manifest,
        &signed.body,
        &signed.signatures,
    )?;
    let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)?;
    manifest.validate().map_err(TrustError::InvalidManifest)?;
    if policy.now >= manifest.expires {
        return Err(TrustError::Expired {
            what: "manifest",
            expired: manifest.expires,
            now: policy.now,
        });
    }
    if let Some(device) = &policy.device_arch
        && !manifest.target.arch.accepts(device)
    {
        return Err(TrustError::WrongArch {
            device: device.to_string(),
            got: manifest.target.arch.to_string(),
        });
    }
    if let (Some(have), Some(needed)) = (&policy.agent_version, &manifest.target.min_agent_version)
        && version_lt(have, needed)
    {
        return Err(TrustError::AgentTooOld {
            needed: needed.clone(),
            have: have.clone(),
        });
    }
    if let Some(floor) = policy.release_floor
        && manifest.release < floor
        && !policy.allow_downgrade
    {
        return Err(TrustError::Downgrade {
            model: manifest.name.to_string(),
            have: floor,
            got: manifest.release,
        });
    }
    Ok(Verified::new(manifest, signed.body))
}

/// The digest a manifest is known by: SHA-256 of its signed body (signatures excluded, so adding
/// a signature does not change it).
pub fn manifest_digest(signed_bytes: &[u8]) -> Result<Sha256Digest, TrustError> {
    let signed = Signed::decode("signed manifest", signed_bytes, MAX_MANIFEST_BYTES)?;
    Ok(Sha256Digest::of(&signed.body))
}

/// Compares dotted numeric versions (`0.10.2` > `0.9`); non-numeric parts compare as 0.
fn version_lt(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(['.', '-', '+'])
            .take(3)
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    let (mut a, mut b) = (parse(a), parse(b));
    a.resize(3, 0);
    b.resize(3, 0);
    a < b
}

#[cfg(test)]
mod tests {
    use super::{DType, NanPolicy, PredictionKind, PredictionSpec, TensorSpec, version_lt};
    use crate::TensorName;

    #[test]
    fn a_shape_fits_when_rank_and_fixed_dimensions_match() {
        let spec = TensorSpec {
            name: TensorName::new("features").unwrap(),
            dtype: DType::F32,
            shape: vec![None, Some(4)],
            nan: NanPolicy::Reject,
        };
        assert!(spec.fits_shape(&[1, 4]));
        assert!(spec.fits_shape(&[32, 4]));
        assert!(!spec.fits_shape(&[1, 5]));
        assert!(!spec.fits_shape(&[4]));
        assert!(!spec.fits_shape(&[1, 4, 1]));
    }

    #[test]
    fn the_prediction_defaults_to_the_first_output_at_threshold_one_half() {
        let mut manifest = crate::trust::tests::manifest(1, "any");
        assert_eq!(
            manifest.prediction_spec(),
            None,
            "no outputs, nothing to score"
        );
        let output = |name: &str| TensorSpec {
            name: TensorName::new(name).unwrap(),
            dtype: DType::F32,
            shape: vec![Some(1), Some(1)],
            nan: NanPolicy::Reject,
        };
        manifest.outputs = vec![output("score"), output("aux")];
        assert_eq!(
            manifest.prediction_spec(),
            Some(PredictionSpec {
                output: TensorName::new("score").unwrap(),
                kind: PredictionKind::Classification { threshold: 0.5 },
            })
        );
        manifest.prediction = Some(PredictionSpec {
            output: TensorName::new("aux").unwrap(),
            kind: PredictionKind::Regression,
        });
        assert!(manifest.validate().is_ok());
        assert_eq!(manifest.prediction_spec(), manifest.prediction);
        manifest.prediction = Some(PredictionSpec {
            output: TensorName::new("missing").unwrap(),
            kind: PredictionKind::Regression,
        });
        let err = manifest.validate().unwrap_err();
        assert!(err.contains("output missing"), "{err}");
        manifest.prediction = Some(PredictionSpec {
            output: TensorName::new("score").unwrap(),
            kind: PredictionKind::Classification {
                threshold: f32::NAN,
            },
        });
        assert!(manifest.validate().unwrap_err().contains("finite"));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_lt("0.9.0", "0.10.0"));
        assert!(!version_lt("1.0", "1.0.0"));
        assert!(version_lt("1.2.3", "1.2.4"));
        assert!(!version_lt("2.0.0-rc1", "1.9.9"));
    }
}
