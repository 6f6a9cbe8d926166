//! Model execution on tract-onnx, shared by the agent and the controller's model registry so both
//! run one tract version. The only crate that imports tract: load a verified model against its
//! manifest schema, check inputs (names, dtypes, shapes, NaN policy), run it, and run the golden
//! self-test vectors. A panic inside tract becomes an error, never a crash. Also reads what a
//! model declares ([`inspect`]) and generates golden vectors ([`LoadedModel::generate_golden`])
//! for the controller's release builder.

mod golden;
mod inspect;

pub use golden::{
    GOLDEN_COUNT, GOLDEN_MAX_BYTES, GOLDEN_TOLERANCE, ReferenceRows, check_outputs, concrete_shape,
    generated_inputs, inputs_from_row,
};
pub use inspect::{ModelInfo, OpUse, check_ops, inspect};

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{
    DType, GoldenVector, Manifest, NamedTensor, NanPolicy, TensorData, TensorSpec,
};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceFact;

/// ONNX operators tract 0.23 cannot run; models using them are refused by name before loading.
pub const UNSUPPORTED_OPS: &[&str] = &["If", "Loop", "ZipMap"];

/// Why a model could not be loaded or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "model uses ONNX operator `{op}` (node {node:?}), which the tract runtime cannot run; export the model without it"
    )]
    UnsupportedOp { op: String, node: String },
    #[error(
        "model {kind} `{tensor}` has ONNX element type {dtype}, which EdgeFleet cannot carry (supported: float, double, int32, int64, uint8, int8, bool); export it as one of those or cast at the model's boundary"
    )]
    UnsupportedDtype {
        kind: &'static str,
        tensor: String,
        dtype: String,
    },
    #[error("model cannot be loaded: {0}")]
    Load(String),
    #[error("model does not match its manifest schema: {0}")]
    Schema(String),
    #[error("input {name}: {reason}")]
    Input { name: String, reason: String },
    #[error("model failed while running: {0}")]
    Run(String),
    #[error("model panicked: {0}; it is treated as a failed model")]
    Panic(String),
}

impl RuntimeError {
    /// Whether the caller (not the model) is at fault.
    pub fn is_input_error(&self) -> bool {
        matches!(self, RuntimeError::Input { .. })
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("unknown panic"))
}

fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
        DType::I8 => DatumType::I8,
        DType::Bool => DatumType::Bool,
    }
}

type Plan = Arc<TypedRunnableModel>;

/// A model ready to run.
pub struct LoadedModel {
    plan: Plan,
    /// Schema of each model input, in the model's input order.
    inputs: Vec<TensorSpec>,
    /// Name of each model output, in the model's output order.
    outputs: Vec<TensorName>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl LoadedModel {
    /// Loads `path` with the manifest's schema as input facts and optimises it.
    pub fn load(path: &Path, manifest: &Manifest) -> Result<Self, RuntimeError> {
        Self::load_with_inputs(path, &manifest.inputs)
    }

    /// Loads `path` with `inputs` (every model input, by name) as input facts and optimises it.
    pub fn load_with_inputs(path: &Path, inputs: &[TensorSpec]) -> Result<Self, RuntimeError> {
        check_ops(path)?;
        catch_unwind(AssertUnwindSafe(|| Self::load_inner(path, inputs)))
            .map_err(|p| RuntimeError::Panic(panic_message(p)))?
    }

    fn load_inner(path: &Path, specs: &[TensorSpec]) -> Result<Self, RuntimeError> {
        let load = |err: TractError| RuntimeError::Load(format!("{err:#}"));
        let mut model = onnx().model_for_path(path).map_err(load)?;
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(load)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let mut inputs = Vec::with_capacity(input_names.len());
        for (ix, name) in input_names.iter().enumerate() {
            let spec = specs
                .iter()
                .find(|s| s.name.as_str() == name)
                .ok_or_else(|| {
                    RuntimeError::Schema(format!(
                        "the model has input {name:?}, which the manifest does not declare"
                    ))
                })?;
            let shape: TVec<TDim> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, dim)| match dim {
                    Some(n) => TDim::from(*n as i64),
                    None => model.symbols.sym(&format!("{name}_{axis}")).into(),
                })
                .collect();
            model
                .set_input_fact(ix, InferenceFact::dt_shape(datum_type(spec.dtype), shape))
                .map_err(load)?;
            inputs.push(spec.clone());
        }
        if let Some(extra) = specs
            .iter()
            .find(|s| !input_names.iter().any(|n| n == s.name.as_str()))
        {
            return Err(RuntimeError::Schema(format!(
                "the manifest declares input {}, which the model does not have",
                extra.name
            )));
        }
        let mut outputs = Vec::new();
        for outlet in model.output_outlets().map_err(load)? {
            let label = model
                .outlet_label(*outlet)
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            let name = TensorName::new(label.as_str()).map_err(|err| {
                RuntimeError::Schema(format!(
                    "model output {label:?} has an unusable name: {err}"
                ))
            })?;
            outputs.push(name);
        }
        let plan = model
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }

    pub fn output_names(&self) -> &[TensorName] {
        &self.outputs
    }

    pub fn input_specs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// Runs the model on named inputs, checked against the schema.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, RuntimeError> {
        let mut by_name: Vec<Option<NamedTensor>> = Vec::new();
        by_name.resize_with(self.inputs.len(), || None);
        for tensor in inputs {
            let Some(ix) = self.inputs.iter().position(|s| s.name == tensor.name) else {
                let known: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(RuntimeError::Input {
                    name: tensor.name.to_string(),
                    reason: format!(
                        "the model has no such input; its inputs are {}",
                        known.join(", ")
                    ),
                });
            };
            if by_name[ix].is_some() {
                return Err(RuntimeError::Input {
                    name: tensor.name.to_string(),
                    reason: String::from("given twice"),
                });
            }
            by_name[ix] = Some(tensor);
        }
        let mut values: TVec<TValue> = TVec::with_capacity(self.inputs.len());
        for (spec, tensor) in self.inputs.iter().zip(by_name) {
            let tensor = tensor.ok_or_else(|| RuntimeError::Input {
                name: spec.name.to_string(),
                reason: String::from("missing; every model input is required"),
            })?;
            values.push(to_tract(spec, tensor)?.into_tvalue());
        }
        let plan = &self.plan;
        let outputs = catch_unwind(AssertUnwindSafe(|| plan.run(values)))
            .map_err(|p| RuntimeError::Panic(panic_message(p)))?
            .map_err(|err| RuntimeError::Run(format!("{err:#}")))?;
        outputs
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, name)| from_tract(name, &value))
            .collect()
    }

    /// Runs every golden vector and compares outputs within tolerance. Returns the slowest run
    /// (after one warm-up run) in microseconds.
    pub fn check_golden(&self, golden: &[GoldenVector]) -> Result<u64, GoldenError> {
        let mut slowest = 0u64;
        for (i, vector) in golden.iter().enumerate() {
            // Warm-up run (first-run allocations), then the timed run.
            self.run(vector.inputs.clone())
                .map_err(GoldenError::Failed)?;
            let started = Instant::now();
            let outputs = self
                .run(vector.inputs.clone())
                .map_err(GoldenError::Failed)?;
            slowest = slowest.max(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            for expected in &vector.outputs {
                let got = outputs
                    .iter()
                    .find(|o| o.name == expected.name)
                    .ok_or_else(|| {
                        GoldenError::Mismatch(format!(
                            "golden vector {i}: the model has no output {}",
                            expected.name
                        ))
                    })?;
                if let Some(diff) = max_abs_diff(&got.data, &expected.data)
                    .filter(|d| d.is_nan() || *d > f64::from(vector.tolerance))
                    .or_else(|| (got.data.len() != expected.data.len()).then_some(f64::INFINITY))
                {
                    return Err(GoldenError::Mismatch(format!(
                        "golden vector {i}: output {} differs from the expected values by up to {diff} (tolerance {})",
                        expected.name, vector.tolerance
                    )));
                }
            }
        }
        Ok(slowest)
    }

    /// Runs one input of zeros (dynamic dimensions set to 1) and returns the latency in µs; the
    /// load check for models without golden vectors.
    pub fn smoke_run(&self) -> Result<u64, RuntimeError> {
        let inputs: Vec<NamedTensor> = self.inputs.iter().map(zeros).collect();
        self.run(inputs.clone())?;
        let started = Instant::now();
        self.run(inputs)?;
        Ok(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
    }
}

/// Why the golden self-test failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoldenError {
    #[error("golden vector could not run: {0}")]
    Failed(RuntimeError),
    #[error("{0}")]
    Mismatch(String),
}

fn zeros(spec: &TensorSpec) -> NamedTensor {
    let shape: Vec<u64> = spec.shape.iter().map(|d| d.unwrap_or(1)).collect();
    let n = shape.iter().product::<u64>() as usize;
    let data = match spec.dtype {
        DType::F32 => TensorData::F32(vec![0.0; n]),
        DType::F64 => TensorData::F64(vec![0.0; n]),
        DType::I32 => TensorData::I32(vec![0; n]),
        DType::I64 => TensorData::I64(vec![0; n]),
        DType::U8 => TensorData::U8(vec![0; n]),
        DType::I8 => TensorData::I8(vec![0; n]),
        DType::Bool => TensorData::Bool(vec![false; n]),
    };
    NamedTensor {
        name: spec.name.clone(),
        shape,
        data,
    }
}

/// Largest absolute element difference, or `None` when the two are of different types.
pub fn max_abs_diff(a: &TensorData, b: &TensorData) -> Option<f64> {
    fn diff<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((*x).into() - (*y).into()).abs())
            .fold(0.0, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) })
    }
    Some(match (a, b) {
        (TensorData::F32(a), TensorData::F32(b)) => diff(a, b),
        (TensorData::F64(a), TensorData::F64(b)) => diff(a, b),
        (TensorData::I32(a), TensorData::I32(b)) => diff(a, b),
        (TensorData::I64(a), TensorData::I64(b)) => a
            .iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .fold(0.0, f64::max),
        (TensorData::U8(a), TensorData::U8(b)) => diff(a, b),
        (TensorData::I8(a), TensorData::I8(b)) => diff(a, b),
        (TensorData::Bool(a), TensorData::Bool(b)) => {
            a.iter().zip(b).filter(|(x, y)| x != y).count() as f64
        }
        _ => return None,
    })
}

fn input_error(spec: &TensorSpec, reason: String) -> RuntimeError {
    RuntimeError::Input {
        name: spec.name.to_string(),
        reason,
    }
}

fn to_tract(spec: &TensorSpec, tensor: NamedTensor) -> Result<Tensor, RuntimeError> {
    if tensor.data.dtype() != spec.dtype {
        return Err(input_error(
            spec,
            format!(
                "is {:?} but the model takes {:?}",
                tensor.data.dtype(),
                spec.dtype
            ),
        ));
    }
    if !spec.fits_shape(&tensor.shape) {
        let want: Vec<String> = spec
            .shape
            .iter()
            .map(|d| d.map_or_else(|| String::from("?"), |d| d.to_string()))
            .collect();
        return Err(input_error(
            spec,
            format!(
                "has shape {:?} but the model takes [{}]",
                tensor.shape,
                want.join(", ")
            ),
        ));
    }
    if tensor.shape_len() != Some(tensor.data.len()) {
        return Err(input_error(
            spec,
            format!(
                "shape {:?} needs {} values but {} were given",
                tensor.shape,
                tensor.shape.iter().product::<u64>(),
                tensor.data.len()
            ),
        ));
    }
    if spec.nan == NanPolicy::Reject {
        let has_nan = match &tensor.data {
            TensorData::F32(v) => v.iter().any(|x| !x.is_finite()),
            TensorData::F64(v) => v.iter().any(|x| !x.is_finite()),
            _ => false,
        };
        if has_nan {
            return Err(input_error(
                spec,
                String::from("contains NaN or infinite values, which this model's schema rejects"),
            ));
        }
    }
    let shape: Vec<usize> = tensor.shape.iter().map(|d| *d as usize).collect();
    let build =
        |err: tract_onnx::tract_core::ndarray::ShapeError| input_error(spec, err.to_string());
    use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn};
    Ok(match tensor.data {
        TensorData::F32(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::F64(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::I32(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::I64(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::U8(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::I8(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
        TensorData::Bool(v) => ArrayD::from_shape_vec(IxDyn(&shape), v)
            .map_err(build)?
            .into(),
    })
}

fn from_tract(name: &TensorName, value: &Tensor) -> Result<NamedTensor, RuntimeError> {
    let shape: Vec<u64> = value.shape().iter().map(|d| *d as u64).collect();
    let run = |err: TractError| RuntimeError::Run(format!("output {name}: {err:#}"));
    let data = match value.datum_type() {
        DatumType::F32 => TensorData::F32(
            value
                .to_plain_array_view::<f32>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::F64 => TensorData::F64(
            value
                .to_plain_array_view::<f64>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I32 => TensorData::I32(
            value
                .to_plain_array_view::<i32>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I64 => TensorData::I64(
            value
                .to_plain_array_view::<i64>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::U8 => TensorData::U8(
            value
                .to_plain_array_view::<u8>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I8 => TensorData::I8(
            value
                .to_plain_array_view::<i8>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::Bool => TensorData::Bool(
            value
                .to_plain_array_view::<bool>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        other => {
            return Err(RuntimeError::Run(format!(
                "output {name} has type {other:?}, which the local API cannot return"
            )));
        }
    };
    Ok(NamedTensor {
        name: name.clone(),
        shape,
        data,
    })
}

#[cfg(test)]
mod tests;
