//! Golden-vector generation: deterministic inputs (or the first reference rows) run through the
//! model once, recorded with a tolerance, so a device's self-test reproduces the build's run.

use edgefleet_protocol::manifest::{
    DType, FeatureSpec, GoldenVector, NamedTensor, TensorData, TensorSpec,
};

use crate::{LoadedModel, RuntimeError};

/// Golden vectors generated per release.
pub const GOLDEN_COUNT: usize = 3;

/// Absolute tolerance per output element, scaled by the largest float output magnitude (when
/// above 1): room for another CPU's kernels (SIMD width, FMA), far below a wrong model.
pub const GOLDEN_TOLERANCE: f32 = 1e-3;

/// Rough CBOR size budget of all generated golden vectors, well inside the manifest limit.
pub const GOLDEN_MAX_BYTES: usize = 512 * 1024;

/// Rows of reference (training) data to build golden inputs from: `rows[i][j]` is the value
/// of `features[j]`; NaN keeps the generated value.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferenceRows<'a> {
    pub features: &'a [FeatureSpec],
    pub rows: &'a [Vec<f64>],
}

/// A fixed-seed generator (SplitMix64), so the same specs always give the same inputs.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), on a 2^-23 grid (exact in f32).
    fn unit(&mut self) -> f64 {
        ((self.next() >> 40) as f64 / f64::from(1u32 << 23)) - 1.0
    }

    /// 0, 1, 2 or 3: valid as an index, a class or a token id for almost any model.
    fn small(&mut self) -> u8 {
        (self.next() >> 62) as u8
    }
}

/// The concrete shape golden inputs use: a dynamic dimension becomes 1, except a dynamic last
/// axis that features read, which becomes wide enough for the highest feature index.
pub fn concrete_shape(spec: &TensorSpec, features: &[FeatureSpec]) -> Vec<u64> {
    let last = spec.shape.len().saturating_sub(1);
    let width = features
        .iter()
        .filter(|f| f.tensor == spec.name)
        .map(|f| u64::from(f.index) + 1)
        .max()
        .unwrap_or(1);
    spec.shape
        .iter()
        .enumerate()
        .map(|(axis, dim)| match dim {
            Some(n) => *n,
            None if axis == last => width,
            None => 1,
        })
        .collect()
}

/// Deterministic inputs for golden vector `vector`: floats in [-1, 1), integers in 0..=3,
/// booleans at random, all from a generator seeded by the vector and input position.
pub fn generated_inputs(
    specs: &[TensorSpec],
    features: &[FeatureSpec],
    vector: usize,
) -> Vec<NamedTensor> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut rng = SplitMix(0x4564_6765_466C_6565 ^ ((vector as u64) << 32) ^ i as u64);
            let shape = concrete_shape(spec, features);
            let n = shape.iter().product::<u64>() as usize;
            let data = match spec.dtype {
                DType::F32 => TensorData::F32((0..n).map(|_| rng.unit() as f32).collect()),
                DType::F64 => TensorData::F64((0..n).map(|_| rng.unit()).collect()),
                DType::I32 => TensorData::I32((0..n).map(|_| i32::from(rng.small())).collect()),
                DType::I64 => TensorData::I64((0..n).map(|_| i64::from(rng.small())).collect()),
                DType::U8 => TensorData::U8((0..n).map(|_| rng.small()).collect()),
                DType::I8 => TensorData::I8((0..n).map(|_| rng.small() as i8).collect()),
                DType::Bool => TensorData::Bool((0..n).map(|_| rng.small() & 1 == 1).collect()),
            };
            NamedTensor {
                name: spec.name.clone(),
                shape,
                data,
            }
        })
        .collect()
}

/// Writes `value` at position `index` of every row (last axis) of `tensor`.
fn set_feature(tensor: &mut NamedTensor, index: usize, value: f64) {
    let width = tensor.shape.last().copied().unwrap_or(1).max(1) as usize;
    if index >= width {
        return;
    }
    let positions = (index..tensor.data.len()).step_by(width);
    let int = |lo: f64, hi: f64| value.round().clamp(lo, hi);
    match &mut tensor.data {
        TensorData::F32(v) => positions.for_each(|p| v[p] = value as f32),
        TensorData::F64(v) => positions.for_each(|p| v[p] = value),
        TensorData::I32(v) => {
            let x = int(f64::from(i32::MIN), f64::from(i32::MAX)) as i32;
            positions.for_each(|p| v[p] = x);
        }
        TensorData::I64(v) => {
            let x = int(i64::MIN as f64, i64::MAX as f64) as i64;
            positions.for_each(|p| v[p] = x);
        }
        TensorData::U8(v) => {
            let x = int(0.0, 255.0) as u8;
            positions.for_each(|p| v[p] = x);
        }
        TensorData::I8(v) => {
            let x = int(-128.0, 127.0) as i8;
            positions.for_each(|p| v[p] = x);
        }
        TensorData::Bool(v) => positions.for_each(|p| v[p] = value != 0.0),
    }
}

/// Golden inputs from one reference row: the generated inputs with each feature's value
/// written at its index along the tensor's last axis (in every row of the tensor).
pub fn inputs_from_row(
    specs: &[TensorSpec],
    reference: ReferenceRows<'_>,
    row: &[f64],
    vector: usize,
) -> Vec<NamedTensor> {
    let mut inputs = generated_inputs(specs, reference.features, vector);
    for (feature, value) in reference.features.iter().zip(row) {
        if value.is_nan() {
            continue;
        }
        if let Some(tensor) = inputs.iter_mut().find(|t| t.name == feature.tensor) {
            set_feature(tensor, feature.index as usize, *value);
        }
    }
    inputs
}

/// Checks run outputs against the declared output schema: every declared output is produced,
/// with its dtype, rank and fixed dimensions.
pub fn check_outputs(specs: &[TensorSpec], got: &[NamedTensor]) -> Result<(), RuntimeError> {
    for spec in specs {
        let Some(tensor) = got.iter().find(|t| t.name == spec.name) else {
            let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
            return Err(RuntimeError::Schema(format!(
                "output {} is declared but the model does not produce it; its outputs are {}",
                spec.name,
                names.join(", ")
            )));
        };
        if tensor.data.dtype() != spec.dtype || !spec.fits_shape(&tensor.shape) {
            return Err(RuntimeError::Schema(format!(
                "output {} is declared as {:?} {} but the model produced {:?} {:?}",
                spec.name,
                spec.dtype,
                dims(&spec.shape),
                tensor.data.dtype(),
                tensor.shape
            )));
        }
    }
    Ok(())
}

fn dims(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| String::from("?"), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Approximate CBOR bytes of a tensor's values.
fn encoded_bytes(data: &TensorData) -> usize {
    let per = match data {
        TensorData::F32(_) | TensorData::I32(_) => 5,
        TensorData::F64(_) | TensorData::I64(_) => 9,
        TensorData::I8(_) => 2,
        TensorData::U8(_) | TensorData::Bool(_) => 1,
    };
    data.len() * per + 16
}

fn tolerance(outputs: &[NamedTensor]) -> f32 {
    let largest = outputs
        .iter()
        .filter(|t| matches!(t.data, TensorData::F32(_) | TensorData::F64(_)))
        .flat_map(|t| t.data.to_f64_vec())
        .fold(1.0f64, |m, x| m.max(x.abs()));
    (f64::from(GOLDEN_TOLERANCE) * largest) as f32
}

impl LoadedModel {
    /// Runs the model on golden inputs (from the first reference rows when given, else
    /// generated) and records the declared outputs with a tolerance. Stops early rather than
    /// exceed [`GOLDEN_MAX_BYTES`]; the result is empty only when one vector alone exceeds it.
    /// Fails if an output is missing, mistyped, NaN or infinite.
    pub fn generate_golden(
        &self,
        outputs: &[TensorSpec],
        reference: ReferenceRows<'_>,
        count: usize,
    ) -> Result<Vec<GoldenVector>, RuntimeError> {
        let specs = self.input_specs().to_vec();
        let mut golden = Vec::new();
        let mut bytes = 0usize;
        for vector in 0..count {
            let inputs = if reference.rows.is_empty() {
                generated_inputs(&specs, reference.features, vector)
            } else {
                let Some(row) = reference.rows.get(vector) else {
                    break;
                };
                inputs_from_row(&specs, reference, row, vector)
            };
            let got = self.run(inputs.clone())?;
            check_outputs(outputs, &got)?;
            let kept: Vec<NamedTensor> = got
                .into_iter()
                .filter(|t| outputs.iter().any(|s| s.name == t.name))
                .collect();
            if let Some(bad) = kept
                .iter()
                .find(|t| t.data.to_f64_vec().iter().any(|x| !x.is_finite()))
            {
                return Err(RuntimeError::Run(format!(
                    "output {} is NaN or infinite for golden input {vector}; give golden vectors or reference rows the model is defined on",
                    bad.name
                )));
            }
            bytes += inputs
                .iter()
                .chain(&kept)
                .map(|t| encoded_bytes(&t.data))
                .sum::<usize>();
            if bytes > GOLDEN_MAX_BYTES {
                break;
            }
            golden.push(GoldenVector {
                tolerance: tolerance(&kept),
                inputs,
                outputs: kept,
            });
        }
        Ok(golden)
    }
}
