//! The local API's request and response bodies (JSON or CBOR, same shape).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A tensor: row-major values and their shape. Values are numbers (booleans as 0/1); in a
/// response `dtype` says which element type the model produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub shape: Vec<u64>,
    pub data: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl Tensor {
    pub fn f32(shape: Vec<u64>, data: Vec<f32>) -> Self {
        Self {
            shape,
            data: data.into_iter().map(f64::from).collect(),
            dtype: None,
        }
    }

    pub fn new(shape: Vec<u64>, data: Vec<f64>) -> Self {
        Self {
            shape,
            data,
            dtype: None,
        }
    }

    /// Values as `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|v| *v as f32).collect()
    }

    /// Index of the largest value.
    pub fn argmax(&self) -> Option<usize> {
        self.data
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    pub inputs: BTreeMap<String, Tensor>,
    /// Only these outputs (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
}

/// Which model answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub version: String,
    pub release: u64,
    /// Manifest digest (64 hex digits).
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    /// Prediction id, unique per agent run; quote it when sending feedback.
    pub id: u64,
    pub model: ModelSummary,
    pub latency_us: u64,
    pub outputs: BTreeMap<String, Tensor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSchema {
    pub name: String,
    pub dtype: String,
    /// `null` for a dynamic dimension.
    pub shape: Vec<Option<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model: ModelSummary,
    pub inputs: Vec<TensorSchema>,
    pub outputs: Vec<TensorSchema>,
    pub shadow: Option<ModelSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
