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
    /// Prediction id, unique per model worker; quote it when sending feedback.
    pub id: u64,
    pub model: ModelSummary,
    pub latency_us: u64,
    pub outputs: BTreeMap<String, Tensor>,
    /// Whether this request was captured for retraining (data capture is on for the device).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub captured: bool,
}

/// `POST /v1/feedback`: the ground truth for a prediction, exactly one of `label` and `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The `id` `/v1/infer` answered with.
    pub id: u64,
    /// The true class index (classification models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<i64>,
    /// The true value (regression models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// How the ground truth compared with the prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackResponse {
    pub id: u64,
    pub model: ModelSummary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_class: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_value: Option<f64>,
    /// Classification: whether the predicted class was the label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    /// Regression: prediction minus the true value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<f64>,
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
