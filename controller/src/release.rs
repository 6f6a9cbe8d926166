//! Building a release (manifest + bundle) from an ONNX model: shared by `edgefleet bundle build`
//! and the controller's model registry.
//!
//! [`build_release`] reads the model's declared schema with the runtime, parses the reference
//! CSV and golden JSON, generates golden vectors when none are given, loads the model with tract
//! against the final manifest and runs every golden vector once, so a release a device cannot
//! load or self-test is refused here, with a [`ReleaseError`] saying what to change.
//! [`write_bundle`] then writes the bundle file atomically.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use edgefleet_protocol::bundle::bundle_header;
use edgefleet_protocol::codec::{self, MAX_MANIFEST_BYTES};
use edgefleet_protocol::crypto::{Domain, Sha256Stream};
use edgefleet_protocol::manifest::{
    DType, FeatureSpec, GoldenVector, Lineage, MANIFEST_FORMAT, Manifest, NamedTensor, Payload,
    PayloadRole, PredictionKind, PredictionSpec, ReferenceStats, RuntimeSettings, Target,
    TensorData, TensorSpec,
};
use edgefleet_protocol::sketch::ReferenceFeature;
use edgefleet_protocol::trust::Signed;
use edgefleet_protocol::{
    Arch, ModelName, ModelVersion, SecretKey, Sha256Digest, TensorName, Timestamp,
};
use edgefleet_runtime::{GOLDEN_COUNT, LoadedModel, ModelInfo, ReferenceRows, RuntimeError};
use serde::{Deserialize, Serialize};

use crate::fsutil;

const CHUNK: usize = 256 * 1024;

/// Reference rows kept for golden-vector generation.
const KEPT_ROWS: usize = GOLDEN_COUNT;

/// Room left in the manifest size limit for signatures added after the build.
const SIGNATURE_ROOM: usize = 8 * 1024;

/// Why a release could not be built or written. Each message says what was wrong and what to
/// do; [`ReleaseError::code`] is a stable machine-readable code.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot read or write {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("the model is not a usable ONNX model: {reason}")]
    InvalidModel { reason: String },
    #[error(
        "the model uses ONNX operator `{op}` (node {node:?}), which the tract runtime cannot run; export the model without it (for `If`/`Loop`, export with fixed control flow)"
    )]
    UnsupportedOp { op: String, node: String },
    #[error(
        "model {tensor} has ONNX element type {dtype}, which EdgeFleet cannot carry (supported: float, double, int32, int64, uint8, int8, bool); export it as one of those or cast at the model's boundary"
    )]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("the declared schema does not match the model: {reason}")]
    SchemaMismatch { reason: String },
    /// `source_name` is e.g. `reference CSV ref.csv`, or an upload's label.
    #[error("{source_name}: {reason}")]
    BadReference { source_name: String, reason: String },
    #[error("{source_name}: {reason}")]
    BadGolden { source_name: String, reason: String },
    #[error("the model failed on its test inputs: {reason}")]
    ModelFailed { reason: String },
    #[error("the manifest is invalid: {reason}")]
    InvalidManifest { reason: String },
    #[error("{path} changed while the bundle was written ({reason}); build again")]
    PayloadChanged { path: PathBuf, reason: String },
}

impl ReleaseError {
    /// A stable machine-readable code (e.g. for an HTTP 422 body).
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::Io { .. } => "io_error",
            ReleaseError::InvalidModel { .. } => "invalid_model",
            ReleaseError::UnsupportedOp { .. } => "unsupported_op",
            ReleaseError::UnsupportedDtype { .. } => "unsupported_dtype",
            ReleaseError::SchemaMismatch { .. } => "schema_mismatch",
            ReleaseError::BadReference { .. } => "bad_reference",
            ReleaseError::BadGolden { .. } => "bad_golden",
            ReleaseError::ModelFailed { .. } => "model_failed",
            ReleaseError::InvalidManifest { .. } => "invalid_manifest",
            ReleaseError::PayloadChanged { .. } => "payload_changed",
        }
    }

    /// Every code [`ReleaseError::code`] gives, for mapping a code that crossed a process
    /// boundary back to its `'static` form.
    pub const CODES: [&'static str; 10] = [
        "io_error",
        "invalid_model",
        "unsupported_op",
        "unsupported_dtype",
        "schema_mismatch",
        "bad_reference",
        "bad_golden",
        "model_failed",
        "invalid_manifest",
        "payload_changed",
    ];

    /// Whether what was submitted is at fault (as opposed to this machine's files or disk).
    pub fn is_input_error(&self) -> bool {
        !matches!(
            self,
            ReleaseError::Io { .. } | ReleaseError::PayloadChanged { .. }
        )
    }

    fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        ReleaseError::Io {
            path: path.to_owned(),
            reason: err.to_string(),
        }
    }

    fn manifest(reason: impl Into<String>) -> Self {
        ReleaseError::InvalidManifest {
            reason: reason.into(),
        }
    }
}

/// A document given to the build: a file, or bytes (an upload) with a label for messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecFile {
    Path(PathBuf),
    Bytes { label: String, bytes: Vec<u8> },
}

impl SpecFile {
    /// How errors name this document: `{kind} {path}` for a file, the label for bytes.
    pub fn describe(&self, kind: &str) -> String {
        match self {
            SpecFile::Path(path) => format!("{kind} {}", path.display()),
            SpecFile::Bytes { label, .. } => label.clone(),
        }
    }

    fn read(&self) -> Result<Cow<'_, [u8]>, ReleaseError> {
        match self {
            SpecFile::Path(path) => std::fs::read(path)
                .map(Cow::Owned)
                .map_err(|err| ReleaseError::io(path, err)),
            SpecFile::Bytes { bytes, .. } => Ok(Cow::Borrowed(bytes)),
        }
    }
}

/// Everything about a release besides the model file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub name: ModelName,
    pub version: ModelVersion,
    /// Release counter: must grow with every release of this model name.
    pub release: u64,
    pub description: Option<String>,
    pub arch: Arch,
    pub min_agent_version: Option<String>,
    /// Payload name of the model on devices; by default the model file's name.
    pub model_file_name: Option<TensorName>,
    /// Input specs replacing the model's declared ones of the same name (to fix a dynamic
    /// dimension or allow NaN); inputs not listed keep what the model declares.
    pub inputs: Vec<TensorSpec>,
    /// Output specs replacing the model's declared ones of the same name.
    pub outputs: Vec<TensorSpec>,
    /// The output ground-truth feedback is scored against (default: the first output).
    pub prediction_output: Option<TensorName>,
    /// How it is scored (default: a classification at threshold 0.5). With neither set the
    /// manifest names no prediction and devices apply that default.
    pub prediction_kind: Option<PredictionKind>,
    /// Drift features; with none and a reference CSV, each CSV column becomes a feature of the
    /// model's single input at the column's index.
    pub features: Vec<FeatureSpec>,
    /// Training-data sample as CSV (header = feature names): reference statistics, and the
    /// first rows become the golden inputs when no golden vectors are given.
    pub reference: Option<SpecFile>,
    /// Golden vectors as JSON; generated when absent.
    pub golden: Option<SpecFile>,
    /// Extra payload files (labels, external tensor data, …), in bundle order.
    pub data: Vec<PathBuf>,
    pub lineage: Lineage,
    pub runtime: RuntimeSettings,
    pub expires_days: u64,
}

impl ReleaseSpec {
    /// A spec with defaults: any architecture, default runtime settings, one year to expiry,
    /// schema from the model, golden vectors generated.
    pub fn new(name: ModelName, version: ModelVersion, release: u64) -> Self {
        Self {
            name,
            version,
            release,
            description: None,
            arch: Arch::any(),
            min_agent_version: None,
            model_file_name: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            prediction_output: None,
            prediction_kind: None,
            features: Vec::new(),
            reference: None,
            golden: None,
            data: Vec::new(),
            lineage: Lineage::default(),
            runtime: RuntimeSettings::default(),
            expires_days: 365,
        }
    }
}

/// A built, validated, tested and still unsigned release.
#[derive(Debug, Clone)]
pub struct BuiltRelease {
    pub manifest: Manifest,
    /// What the model file declares.
    pub info: ModelInfo,
    /// Payload source files in manifest order (the model first).
    pub sources: Vec<PathBuf>,
    /// Whether the golden vectors were generated here (from reference rows or seeded inputs).
    pub golden_generated: bool,
    /// Slowest golden-vector run on this machine (a zero-input run when there are none), µs.
    pub latency_us: u64,
}

impl BuiltRelease {
    /// The manifest as a signed document with no signatures yet.
    pub fn unsigned(&self) -> Signed {
        Signed::unsigned(&self.manifest)
    }

    /// The manifest digest devices and assignments know this release by.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.unsigned().body)
    }
}

/// Adds each key's manifest signature (a key that signed already counts once).
pub fn sign(signed: &mut Signed, keys: &[SecretKey]) {
    for key in keys {
        signed.sign(Domain::Manifest, key);
    }
}

/// SHA-256 and size of a file, read in chunks.
pub fn hash_file(path: &Path) -> Result<(Sha256Digest, u64), ReleaseError> {
    stream_file(path, |_| Ok(()))
}

/// Reads `path` in chunks, handing each to `each`; returns the SHA-256 and size it read.
fn stream_file(
    path: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), ReleaseError>,
) -> Result<(Sha256Digest, u64), ReleaseError> {
    let mut file = File::open(path).map_err(|err| ReleaseError::io(path, err))?;
    let mut hasher = Sha256Stream::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|err| ReleaseError::io(path, err))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        each(&buf[..n])?;
        size += n as u64;
    }
    Ok((hasher.finish(), size))
}

fn payload(
    path: &Path,
    name: Option<&TensorName>,
    role: PayloadRole,
) -> Result<Payload, ReleaseError> {
    let name = match name {
        Some(name) => name.clone(),
        None => {
            let file_name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                ReleaseError::manifest(format!("{} has no usable file name", path.display()))
            })?;
            TensorName::new(file_name).map_err(|err| {
                ReleaseError::manifest(format!(
                    "payload file name {file_name:?} cannot be used ({err}); rename the file"
                ))
            })?
        }
    };
    let (sha256, size) = hash_file(path)?;
    Ok(Payload {
        name,
        role,
        sha256,
        size,
    })
}

/// Maps a runtime error to the release error that says what to change.
fn model_error(err: RuntimeError, info: Option<&ModelInfo>) -> ReleaseError {
    match err {
        RuntimeError::UnsupportedOp { op, node } => ReleaseError::UnsupportedOp { op, node },
        RuntimeError::UnsupportedDtype {
            kind,
            tensor,
            dtype,
        } => ReleaseError::UnsupportedDtype {
            tensor: format!("{kind} `{tensor}`"),
            dtype,
        },
        RuntimeError::Schema(reason) => ReleaseError::SchemaMismatch { reason },
        RuntimeError::Load(reason) => match info.and_then(|i| i.unimplemented.first()) {
            // tract parses operators it does not implement and fails later; name the operator.
            Some(op) => ReleaseError::UnsupportedOp {
                op: op.op.clone(),
                node: op.node.clone(),
            },
            None => ReleaseError::InvalidModel { reason },
        },
        RuntimeError::Panic(reason) => ReleaseError::InvalidModel {
            reason: format!("the runtime crashed on it ({reason})"),
        },
        err @ (RuntimeError::Input { .. } | RuntimeError::Run(_)) => ReleaseError::ModelFailed {
            reason: err.to_string(),
        },
    }
}

fn dims(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| String::from("?"), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// The model's declared specs with the given ones replacing those of the same name. A given
/// spec must name a model tensor and agree on dtype, rank and every fixed dimension.
fn merge_specs(
    kind: &str,
    declared: &[TensorSpec],
    given: &[TensorSpec],
) -> Result<Vec<TensorSpec>, ReleaseError> {
    let mismatch = |reason: String| ReleaseError::SchemaMismatch { reason };
    let mut seen = BTreeSet::new();
    for spec in given {
        if !seen.insert(spec.name.as_str()) {
            return Err(mismatch(format!("{kind} {} is given twice", spec.name)));
        }
        let Some(model) = declared.iter().find(|d| d.name == spec.name) else {
            let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
            return Err(mismatch(format!(
                "the model has no {kind} {}; its {kind}s are {}",
                spec.name,
                names.join(", ")
            )));
        };
        let fixed_ok = spec.shape.len() == model.shape.len()
            && spec
                .shape
                .iter()
                .zip(&model.shape)
                .all(|(given, declared)| declared.is_none() || given == declared);
        if spec.dtype != model.dtype || !fixed_ok {
            return Err(mismatch(format!(
                "{kind} {} is given as {:?} {} but the model declares {:?} {}; only dynamic (?) dimensions can be fixed",
                spec.name,
                spec.dtype,
                dims(&spec.shape),
                model.dtype,
                dims(&model.shape)
            )));
        }
    }
    Ok(declared
        .iter()
        .map(|d| given.iter().find(|g| g.name == d.name).unwrap_or(d).clone())
        .collect())
}

/// Reference statistics parsed from a CSV, with the features they describe.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub stats: ReferenceStats,
    /// The declared features, or one per column of the model's single input.
    pub features: Vec<FeatureSpec>,
    /// The first rows, one value per feature (NaN for an empty cell).
    pub first_rows: Vec<Vec<f64>>,
}

/// Parses a reference CSV (header row = feature names; an empty cell or `nan` is a missing
/// value) into decile bins per feature. With no declared features, each column becomes a
/// feature of the single input at the column's index.
pub fn parse_reference(
    file: &SpecFile,
    features: &[FeatureSpec],
    inputs: &[TensorSpec],
) -> Result<Reference, ReleaseError> {
    let source_name = file.describe("reference CSV");
    let bad = |reason: String| ReleaseError::BadReference {
        source_name: source_name.clone(),
        reason,
    };
    let bytes = file.read()?;
    // The line a record starts on, from its byte offset past any blank lines before it
    // (csv's own line count does not count the blank lines it skips).
    let line_at = |position: Option<&csv::Position>| {
        position.map(|p| {
            let mut at = usize::try_from(p.byte())
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            while at < bytes.len() && matches!(bytes[at], b'\n' | b'\r') {
                at += 1;
            }
            bytes[..at].iter().filter(|b| **b == b'\n').count() + 1
        })
    };
    let mut reader = csv::Reader::from_reader(bytes.as_ref());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|err| bad(csv_error(&err, line_at(err.position()))))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    if headers.is_empty() || headers.iter().all(String::is_empty) {
        return Err(bad(String::from(
            "it is empty; the first line must name the features (e.g. `temp,vibration`)",
        )));
    }
    let features: Vec<FeatureSpec> = if features.is_empty() {
        let [input] = inputs else {
            return Err(bad(format!(
                "the model has {} inputs, so say which input each column is: declare features as name=tensor:index",
                inputs.len()
            )));
        };
        headers
            .iter()
            .enumerate()
            .map(|(index, name)| {
                Ok(FeatureSpec {
                    name: TensorName::new(name.as_str()).map_err(|err| {
                        bad(format!("column {name:?} cannot be a feature name: {err}"))
                    })?,
                    tensor: input.name.clone(),
                    index: u32::try_from(index)
                        .map_err(|_| bad(String::from("too many columns")))?,
                })
            })
            .collect::<Result<_, ReleaseError>>()?
    } else {
        features.to_vec()
    };
    let mut columns_of_features = Vec::with_capacity(features.len());
    for feature in &features {
        let mut matching = headers
            .iter()
            .enumerate()
            .filter(|(_, h)| *h == feature.name.as_str());
        let Some((col, _)) = matching.next() else {
            return Err(bad(format!(
                "feature {} has no column; the columns are {}",
                feature.name,
                headers.join(", ")
            )));
        };
        if matching.next().is_some() {
            return Err(bad(format!("column {} appears twice", feature.name)));
        }
        columns_of_features.push(col);
    }
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); features.len()];
    let mut first_rows = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => return Err(bad(csv_error(&err, line_at(err.position())))),
        }
        let line = line_at(record.position()).unwrap_or(0);
        let mut row = Vec::with_capacity(features.len());
        for (feature, &col) in features.iter().zip(&columns_of_features) {
            let field = record.get(col).unwrap_or("").trim();
            let value = if field.is_empty() || field.eq_ignore_ascii_case("nan") {
                f64::NAN
            } else {
                match field.parse::<f64>() {
                    Ok(v) if v.is_finite() => v,
                    _ => {
                        return Err(bad(format!(
                            "line {line}, column {}: {field:?} is not a finite number; fix it, or leave the cell empty for a missing value",
                            feature.name
                        )));
                    }
                }
            };
            row.push(value);
        }
        for (column, value) in values.iter_mut().zip(&row) {
            column.push(*value);
        }
        if first_rows.len() < KEPT_ROWS {
            first_rows.push(row);
        }
    }
    if first_rows.is_empty() {
        return Err(bad(String::from(
            "it has a header but no rows; give a sample of the training data",
        )));
    }
    let stats = features
        .iter()
        .zip(&values)
        .map(|(feature, column)| {
            ReferenceFeature::from_samples(feature.name.clone(), column).map_err(bad)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reference {
        stats: ReferenceStats {
            sample_count: values.first().map_or(0, Vec::len) as u64,
            features: stats,
        },
        features,
        first_rows,
    })
}

fn csv_error(err: &csv::Error, line: Option<usize>) -> String {
    let line = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    match err.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "{line}the row has {len} fields but the header has {expected_len}; every row needs one value per column"
        ),
        csv::ErrorKind::Utf8 { .. } => format!("{line}not valid UTF-8; save the CSV as UTF-8"),
        _ => format!("{line}{err}"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenTensorJson {
    shape: Vec<u64>,
    data: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenJson {
    inputs: std::collections::BTreeMap<String, GoldenTensorJson>,
    outputs: std::collections::BTreeMap<String, GoldenTensorJson>,
    #[serde(default = "default_tolerance")]
    tolerance: f32,
}

fn default_tolerance() -> f32 {
    1e-4
}

fn tensor_data(dtype: DType, values: &[serde_json::Value]) -> Result<TensorData, String> {
    fn each<T>(
        values: &[serde_json::Value],
        f: impl Fn(&serde_json::Value) -> Option<T>,
        what: &str,
    ) -> Result<Vec<T>, String> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| f(v).ok_or_else(|| format!("value {i} ({v}) is not {what}")))
            .collect()
    }
    let int = |v: &serde_json::Value| v.as_i64();
    Ok(match dtype {
        DType::F32 => TensorData::F32(each(values, |v| v.as_f64().map(|x| x as f32), "a number")?),
        DType::F64 => TensorData::F64(each(values, serde_json::Value::as_f64, "a number")?),
        DType::I32 => TensorData::I32(each(
            values,
            |v| int(v).and_then(|x| i32::try_from(x).ok()),
            "an int32",
        )?),
        DType::I64 => TensorData::I64(each(values, int, "an integer")?),
        DType::U8 => TensorData::U8(each(
            values,
            |v| int(v).and_then(|x| u8::try_from(x).ok()),
            "a uint8",
        )?),
        DType::I8 => TensorData::I8(each(
            values,
            |v| int(v).and_then(|x| i8::try_from(x).ok()),
            "an int8",
        )?),
        DType::Bool => TensorData::Bool(each(values, serde_json::Value::as_bool, "a boolean")?),
    })
}

fn named_tensors(
    kind: &str,
    map: &std::collections::BTreeMap<String, GoldenTensorJson>,
    specs: &[TensorSpec],
) -> Result<Vec<NamedTensor>, String> {
    map.iter()
        .map(|(name, tensor)| {
            let spec = specs
                .iter()
                .find(|s| s.name.as_str() == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                    format!(
                        "{kind} {name:?} is not a model {kind}; the {kind}s are {}",
                        names.join(", ")
                    )
                })?;
            let data = tensor_data(spec.dtype, &tensor.data)
                .map_err(|err| format!("{kind} {name}: {err}"))?;
            Ok(NamedTensor {
                name: spec.name.clone(),
                shape: tensor.shape.clone(),
                data,
            })
        })
        .collect()
}

/// Parses golden vectors from JSON:
/// `[{"inputs": {"x": {"shape": [1,2], "data": [..]}}, "outputs": {..}, "tolerance": 1e-4}]`.
pub fn parse_golden(
    file: &SpecFile,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<Vec<GoldenVector>, ReleaseError> {
    let source_name = file.describe("golden vectors");
    let bad = |reason: String| ReleaseError::BadGolden {
        source_name: source_name.clone(),
        reason,
    };
    let bytes = file.read()?;
    let vectors: Vec<GoldenJson> = serde_json::from_slice(&bytes).map_err(|err| {
        bad(format!(
            "not golden-vector JSON ({err}); expected [{{\"inputs\": {{name: {{\"shape\": [..], \"data\": [..]}}}}, \"outputs\": {{..}}, \"tolerance\": 1e-4}}]"
        ))
    })?;
    vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if v.tolerance.is_nan() || v.tolerance < 0.0 {
                return Err(bad(format!("vector {i}: tolerance must be a number ≥ 0")));
            }
            Ok(GoldenVector {
                inputs: named_tensors("input", &v.inputs, inputs)
                    .map_err(|err| bad(format!("vector {i}: {err}")))?,
                outputs: named_tensors("output", &v.outputs, outputs)
                    .map_err(|err| bad(format!("vector {i}: {err}")))?,
                tolerance: v.tolerance,
            })
        })
        .collect()
}

/// Feature indices must fall inside the tensor's last axis when it is fixed.
/// The manifest's prediction from the spec's output and kind; `None` when the spec sets neither.
fn prediction_spec(
    spec: &ReleaseSpec,
    outputs: &[TensorSpec],
) -> Result<Option<PredictionSpec>, ReleaseError> {
    if spec.prediction_output.is_none() && spec.prediction_kind.is_none() {
        return Ok(None);
    }
    let output = match &spec.prediction_output {
        Some(name) => name.clone(),
        None => outputs
            .first()
            .map(|o| o.name.clone())
            .ok_or_else(|| ReleaseError::manifest("the model has no output to predict from"))?,
    };
    let kind = spec
        .prediction_kind
        .unwrap_or(PredictionKind::Classification {
            threshold: edgefleet_protocol::manifest::DEFAULT_THRESHOLD,
        });
    Ok(Some(PredictionSpec { output, kind }))
}

fn check_features(features: &[FeatureSpec], inputs: &[TensorSpec]) -> Result<(), ReleaseError> {
    for feature in features {
        let Some(input) = inputs.iter().find(|i| i.name == feature.tensor) else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(ReleaseError::manifest(format!(
                "feature {} reads input {}, which the model does not have; its inputs are {}",
                feature.name,
                feature.tensor,
                names.join(", ")
            )));
        };
        let width = match input.shape.last() {
            None => Some(1),
            Some(dim) => *dim,
        };
        if let Some(width) = width
            && u64::from(feature.index) >= width
        {
            return Err(ReleaseError::manifest(format!(
                "feature {} reads index {} of input {}, whose last axis has {width} element(s)",
                feature.name, feature.index, feature.tensor
            )));
        }
    }
    Ok(())
}

/// A model reading ONNX external data may only read files that travel in the bundle: data
/// payloads with the same plain file name, next to the model.
fn check_external_data(
    model_path: &Path,
    info: &ModelInfo,
    data: &[PathBuf],
) -> Result<(), ReleaseError> {
    let model_dir = model_path.parent().unwrap_or(Path::new("."));
    for location in &info.external_data {
        let shipped = edgefleet_protocol::ids::is_file_name(location)
            && data.iter().any(|d| {
                d.file_name().and_then(|n| n.to_str()) == Some(location.as_str())
                    && matches!(
                        (d.canonicalize(), model_dir.join(location).canonicalize()),
                        (Ok(a), Ok(b)) if a == b
                    )
            });
        if !shipped {
            return Err(ReleaseError::InvalidModel {
                reason: format!(
                    "it reads tensor data from the external file {location:?}, which the bundle would not carry; save the model with its data inside the .onnx file, or put the file next to the model and add it as a data payload"
                ),
            });
        }
    }
    Ok(())
}

/// Builds and checks a release of the model at `model_path`; see the module documentation.
/// Nothing is written. `now` becomes `created_at`.
pub fn build_release(
    model_path: &Path,
    spec: &ReleaseSpec,
    now: Timestamp,
) -> Result<BuiltRelease, ReleaseError> {
    let mut payloads = vec![payload(
        model_path,
        spec.model_file_name.as_ref(),
        PayloadRole::Model,
    )?];
    for data in &spec.data {
        payloads.push(payload(data, None, PayloadRole::Data)?);
    }
    let info = edgefleet_runtime::inspect(model_path).map_err(|err| model_error(err, None))?;
    check_external_data(model_path, &info, &spec.data)?;
    let inputs = merge_specs("input", &info.inputs, &spec.inputs)?;
    let outputs = merge_specs("output", &info.outputs, &spec.outputs)?;
    let (features, reference) = match &spec.reference {
        Some(file) => {
            let reference = parse_reference(file, &spec.features, &inputs)?;
            (reference.features.clone(), Some(reference))
        }
        None => (spec.features.clone(), None),
    };
    check_features(&features, &inputs)?;
    let given_golden = spec
        .golden
        .as_ref()
        .map(|file| parse_golden(file, &inputs, &outputs))
        .transpose()?;
    let prediction = prediction_spec(spec, &outputs)?;
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: spec.name.clone(),
        version: spec.version.clone(),
        release: spec.release,
        description: spec.description.clone(),
        target: Target {
            arch: spec.arch.clone(),
            min_agent_version: spec.min_agent_version.clone(),
        },
        payloads,
        runtime: spec.runtime.clone(),
        inputs,
        outputs,
        prediction,
        features,
        golden: given_golden.clone().unwrap_or_default(),
        reference: reference.as_ref().map(|r| r.stats.clone()),
        lineage: spec.lineage.clone(),
        created_at: now,
        expires: now.plus_secs(spec.expires_days.saturating_mul(86_400)),
    };
    manifest.validate().map_err(ReleaseError::manifest)?;

    let model =
        LoadedModel::load(model_path, &manifest).map_err(|err| model_error(err, Some(&info)))?;
    let golden_generated = given_golden.is_none();
    match &given_golden {
        None => {
            let rows = reference.as_ref().map_or(&[][..], |r| &r.first_rows[..]);
            let reference_rows = ReferenceRows {
                features: &manifest.features,
                rows,
            };
            manifest.golden = model
                .generate_golden(&manifest.outputs, reference_rows, GOLDEN_COUNT)
                .map_err(|err| model_error(err, Some(&info)))?;
        }
        Some(golden) => {
            // Check the declared outputs against a real run before comparing values.
            let inputs = match golden.first() {
                Some(vector) => vector.inputs.clone(),
                None => {
                    edgefleet_runtime::generated_inputs(model.input_specs(), &manifest.features, 0)
                }
            };
            let got = model.run(inputs).map_err(|err| match err {
                err @ RuntimeError::Input { .. } => ReleaseError::BadGolden {
                    source_name: spec
                        .golden
                        .as_ref()
                        .map(|f| f.describe("golden vectors"))
                        .unwrap_or_default(),
                    reason: format!("vector 0: {err}"),
                },
                err => model_error(err, Some(&info)),
            })?;
            edgefleet_runtime::check_outputs(&manifest.outputs, &got)
                .map_err(|err| model_error(err, Some(&info)))?;
        }
    }
    manifest.validate().map_err(ReleaseError::manifest)?;
    let latency_us = if manifest.golden.is_empty() {
        model
            .smoke_run()
            .map_err(|err| model_error(err, Some(&info)))?
    } else {
        model.check_golden(&manifest.golden).map_err(|err| {
            let reason = match err {
                edgefleet_runtime::GoldenError::Failed(err) => err.to_string(),
                edgefleet_runtime::GoldenError::Mismatch(detail) => detail,
            };
            match &spec.golden {
                Some(file) => ReleaseError::BadGolden {
                    source_name: file.describe("golden vectors"),
                    reason: format!("{reason}; the model's actual outputs differ from the file, so check the file or the model"),
                },
                None => ReleaseError::ModelFailed {
                    reason: format!("{reason}; the model does not give the same outputs twice for the same input (nondeterministic operators?)"),
                },
            }
        })?
    };
    let size = Signed::unsigned(&manifest).encode().len();
    if size + SIGNATURE_ROOM > MAX_MANIFEST_BYTES {
        return Err(ReleaseError::manifest(format!(
            "the signed manifest would be {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit; use fewer or smaller golden vectors"
        )));
    }
    let mut sources = vec![model_path.to_owned()];
    sources.extend(spec.data.iter().cloned());
    Ok(BuiltRelease {
        manifest,
        info,
        sources,
        golden_generated,
        latency_us,
    })
}

/// Copies `source` into `out`, checking it still has the size and SHA-256 the manifest lists.
fn copy_payload(source: &Path, payload: &Payload, out: &mut File) -> Result<(), ReleaseError> {
    let (sha256, size) = stream_file(source, |chunk| {
        out.write_all(chunk)
            .map_err(|err| ReleaseError::io(source, format!("writing the bundle: {err}")))
    })?;
    if size != payload.size || sha256 != payload.sha256 {
        return Err(ReleaseError::PayloadChanged {
            path: source.to_owned(),
            reason: format!(
                "the manifest lists {} bytes with sha256 {}, the file now has {size} bytes with sha256 {sha256}",
                payload.size, payload.sha256
            ),
        });
    }
    Ok(())
}

/// Writes the bundle (header, signed manifest, payloads in manifest order) to `out`
/// atomically; `sources` are the payload files in the manifest's order. Refuses a payload
/// whose size or SHA-256 no longer matches the manifest.
pub fn write_bundle(signed: &Signed, sources: &[PathBuf], out: &Path) -> Result<(), ReleaseError> {
    let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)
        .map_err(|err| ReleaseError::manifest(err.to_string()))?;
    if sources.len() != manifest.payloads.len() {
        return Err(ReleaseError::manifest(format!(
            "the manifest lists {} payloads but {} source files were given",
            manifest.payloads.len(),
            sources.len()
        )));
    }
    let header =
        bundle_header(&signed.encode()).map_err(|err| ReleaseError::manifest(err.to_string()))?;
    let mut failure = None;
    let written = fsutil::write_atomic_with(out, fsutil::PUBLIC_MODE, |file| {
        file.write_all(&header)?;
        for (source, payload) in sources.iter().zip(&manifest.payloads) {
            if let Err(err) = copy_payload(source, payload, file) {
                failure = Some(err);
                anyhow::bail!("payload {} failed", payload.name);
            }
        }
        Ok(())
    });
    match (written, failure) {
        (_, Some(err)) => Err(err),
        (Err(err), None) => Err(ReleaseError::io(out, format!("{err:#}"))),
        (Ok(()), None) => Ok(()),
    }
}
