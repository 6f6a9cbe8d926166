//! The local inference API, served by the worker on loopback TCP and a Unix socket.
//!
//! - `POST /v1/infer`: `{"inputs": {"<name>": {"shape": [..], "data": [..]}}, "outputs": [..]?}`
//!   as JSON or CBOR (by `content-type`; the answer uses the same encoding). Every answer names the
//!   model (name, version, release, manifest digest) in its body and in `x-edgefleet-model*`
//!   headers.
//! - `POST /v1/feedback`: `{"id": <prediction id>, "label": <class>}` or `{"id", "value"}`, the
//!   ground truth for a recent prediction, scored into the telemetry window ([`crate::feedback`]);
//!   404 unknown or expired id, 409 feedback already given, 422 a truth that does not fit.
//! - `GET /v1/model`: the active model and its input/output schema.
//! - `GET /v1/stats`: request and shadow counters of this worker.
//! - `GET /healthz`.
//!
//! Errors are `{"error": {"code", "message"}}`: 400 unreadable body, 413 too large, 415 other
//! media types, 422 inputs that do not fit the schema, 500 the model failed, 503 no model active.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_client::api::{
    ErrorBody, ErrorDetail, FeedbackRequest, FeedbackResponse, InferRequest, InferResponse,
    ModelInfo, ModelSummary, Tensor, TensorSchema,
};
use edgefleet_protocol::capture::{
    CaptureRecord, CaptureSettings, CapturedFeedback, CapturedSample, Truth,
};
use edgefleet_protocol::manifest::{
    DType, Manifest, NamedTensor, PredictionSpec, TensorData, TensorSpec,
};
use edgefleet_protocol::messages::ModelRef;
use edgefleet_protocol::{Clock, SystemClock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::control::{WorkerEvent, WorkerStats};
use crate::feedback::{FeedbackError, Prediction, PredictionLog};
use crate::runtime::{LoadedModel, RuntimeError, max_abs_diff};
use crate::telemetry::WindowAcc;

/// A loaded model and what the API says about it.
#[derive(Debug)]
pub struct Served {
    pub model: LoadedModel,
    pub manifest: Manifest,
    pub summary: ModelSummary,
    /// The model as reports and capture batches name it.
    pub model_ref: ModelRef,
    /// How ground truth is scored ([`Manifest::prediction_spec`]).
    pub prediction: Option<PredictionSpec>,
    /// Concurrent inferences allowed (the manifest's `runtime.threads`).
    pub permits: tokio::sync::Semaphore,
}

/// A request copied to the shadow model.
#[derive(Debug)]
pub struct ShadowJob {
    /// The active model's prediction id for this request.
    pub id: u64,
    pub inputs: Vec<NamedTensor>,
    pub primary: Vec<NamedTensor>,
}

#[derive(Debug)]
pub struct ApiState {
    pub active: Option<Arc<Served>>,
    pub shadow: Option<(ModelSummary, SyncSender<ShadowJob>)>,
    pub stats: Arc<Mutex<WorkerStats>>,
    /// The current telemetry window of the active model.
    pub window: Option<Arc<Mutex<WindowAcc>>>,
    /// Recent predictions, for feedback (shared with the shadow thread).
    pub predictions: Arc<Mutex<PredictionLog>>,
    /// Data capture in force (`None`: off).
    pub capture: RwLock<Option<CaptureSettings>>,
    /// Where captured records go (the worker's event stream to the supervisor).
    pub emit: fn(&WorkerEvent),
    pub max_body_bytes: usize,
}

impl ApiState {
    fn capture(&self) -> Option<CaptureSettings> {
        self.capture
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sends a captured record of `served` to the supervisor.
    fn captured(&self, served: &Served, record: &CaptureRecord) {
        let cbor = hex::encode(edgefleet_protocol::codec::encode(&(
            &served.model_ref,
            record,
        )));
        let event = WorkerEvent::Captured { cbor };
        tokio::task::block_in_place(|| (self.emit)(&event));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/feedback", post(feedback))
        .route("/v1/model", get(model_info))
        .route("/v1/stats", get(stats))
        .route("/healthz", get(health))
        .with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Cbor,
}

fn encoded<T: Serialize>(encoding: Encoding, status: StatusCode, value: &T) -> Response {
    match encoding {
        Encoding::Json => match serde_json::to_vec(value) {
            Ok(body) => {
                (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
            Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
        },
        Encoding::Cbor => (
            status,
            [(header::CONTENT_TYPE, "application/cbor")],
            edgefleet_protocol::codec::encode(value),
        )
            .into_response(),
    }
}

fn error(
    encoding: Encoding,
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> Response {
    encoded(
        encoding,
        status,
        &ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        },
    )
}

fn summary_headers(response: &mut Response, summary: &ModelSummary) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("{}@{}", summary.name, summary.version)) {
        headers.insert("x-edgefleet-model", value);
    }
    if let Ok(value) = HeaderValue::from_str(&summary.digest) {
        headers.insert("x-edgefleet-model-digest", value);
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
        DType::I8 => "i8",
        DType::Bool => "bool",
    }
}

/// Converts API numbers to the schema's element type, refusing values that do not fit.
fn to_named(spec: &TensorSpec, tensor: Tensor) -> Result<NamedTensor, RuntimeError> {
    fn ints<T: TryFrom<i64>>(spec: &TensorSpec, data: &[f64]) -> Result<Vec<T>, RuntimeError> {
        data.iter()
            .map(|v| {
                (v.fract() == 0.0 && v.is_finite())
                    .then(|| T::try_from(*v as i64).ok())
                    .flatten()
                    .ok_or_else(|| RuntimeError::Input {
                        name: spec.name.to_string(),
                        reason: format!("{v} is not a valid {}", dtype_name(spec.dtype)),
                    })
            })
            .collect()
    }
    let data = match spec.dtype {
        DType::F32 => TensorData::F32(tensor.data.iter().map(|v| *v as f32).collect()),
        DType::F64 => TensorData::F64(tensor.data),
        DType::I32 => TensorData::I32(ints(spec, &tensor.data)?),
        DType::I64 => TensorData::I64(ints(spec, &tensor.data)?),
        DType::U8 => TensorData::U8(ints(spec, &tensor.data)?),
        DType::I8 => TensorData::I8(ints(spec, &tensor.data)?),
        DType::Bool => TensorData::Bool(
            ints::<u8>(spec, &tensor.data)?
                .into_iter()
                .map(|v| v != 0)
                .collect(),
        ),
    };
    Ok(NamedTensor {
        name: spec.name.clone(),
        shape: tensor.shape,
        data,
    })
}

fn from_named(tensor: NamedTensor) -> Tensor {
    let (dtype, data): (DType, Vec<f64>) = match tensor.data {
        TensorData::F32(v) => (DType::F32, v.into_iter().map(f64::from).collect()),
        TensorData::F64(v) => (DType::F64, v),
        TensorData::I32(v) => (DType::I32, v.into_iter().map(f64::from).collect()),
        TensorData::I64(v) => (DType::I64, v.into_iter().map(|x| x as f64).collect()),
        TensorData::U8(v) => (DType::U8, v.into_iter().map(f64::from).collect()),
        TensorData::I8(v) => (DType::I8, v.into_iter().map(f64::from).collect()),
        TensorData::Bool(v) => (
            DType::Bool,
            v.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect(),
        ),
    };
    Tensor {
        shape: tensor.shape,
        data,
        dtype: Some(dtype_name(dtype).to_owned()),
    }
}

fn record(stats: &Mutex<WorkerStats>, f: impl FnOnce(&mut WorkerStats)) {
    let mut stats = stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut stats);
}

fn window(state: &ApiState, f: impl FnOnce(&mut WindowAcc)) {
    if let Some(window) = &state.window {
        f(&mut window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// An error answer not yet encoded.
#[derive(Debug)]
struct Refusal {
    encoding: Encoding,
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn into_response(self) -> Response {
        error(self.encoding, self.status, self.code, self.message)
    }
}

/// The body (within `api.max_body_bytes`) and its encoding (by `content-type`); else the 415
/// or 413 answer.
async fn read_body(
    state: &ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Encoding, Bytes), Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let encoding = if content_type.starts_with("application/cbor") {
        Encoding::Cbor
    } else if content_type.starts_with("application/json") {
        Encoding::Json
    } else {
        return Err(Refusal {
            encoding: Encoding::Json,
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: format!(
                "content-type {content_type:?} is not application/json or application/cbor"
            ),
        });
    };
    match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(bytes) => Ok((encoding, bytes)),
        Err(_) => Err(Refusal {
            encoding,
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: format!(
                "request body exceeds {} bytes (api.max_body_bytes)",
                state.max_body_bytes
            ),
        }),
    }
}

/// Decodes a JSON or CBOR body; the error says what is wrong with it.
fn parse<T: DeserializeOwned>(
    encoding: Encoding,
    bytes: &[u8],
    max_bytes: usize,
    what: &'static str,
) -> Result<T, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes)
            .map_err(|err| format!("body is not a valid {what}: {err}")),
        Encoding::Cbor => {
            edgefleet_protocol::codec::decode(what, bytes, max_bytes).map_err(|err| err.to_string())
        }
    }
}

async fn infer(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Response {
    let (encoding, bytes) = match read_body(&state, &headers, body).await {
        Ok(read) => read,
        Err(refusal) => return refusal.into_response(),
    };
    record(&state.stats, |s| s.requests += 1);
    let request: InferRequest =
        match parse(encoding, &bytes, state.max_body_bytes, "inference request") {
            Ok(request) => request,
            Err(message) => return bad_request(&state, encoding, message),
        };
    let Some(served) = state.active.clone() else {
        record(&state.stats, |s| s.unavailable += 1);
        window(&state, |w| w.data.errors.unavailable += 1);
        return error(
            encoding,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is active on this device yet; install one and retry",
        );
    };
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (name, tensor) in request.inputs {
        let Some(spec) = served
            .model
            .input_specs()
            .iter()
            .find(|s| s.name.as_str() == name)
        else {
            let known: Vec<&str> = served
                .model
                .input_specs()
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return invalid(
                &state,
                encoding,
                &served,
                RuntimeError::Input {
                    name,
                    reason: format!(
                        "the model has no such input; its inputs are {}",
                        known.join(", ")
                    ),
                },
            );
        };
        match to_named(spec, tensor) {
            Ok(tensor) => inputs.push(tensor),
            Err(err) => return invalid(&state, encoding, &served, err),
        }
    }
    let shadow_inputs = state.shadow.as_ref().map(|_| inputs.clone());
    let capture = state
        .capture()
        .filter(|settings| settings.selects(fastrand::f64()));
    let captured_inputs = capture.as_ref().map(|_| inputs.clone());
    // Features are counted only for inputs that pass the schema check (below).
    let mut features = Vec::new();
    window(&state, |w| features = w.feature_values(&inputs));
    let Ok(_permit) = served.permits.acquire().await else {
        return error(
            encoding,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the agent is stopping",
        );
    };
    let started = Instant::now();
    let result = tokio::task::block_in_place(|| served.model.run(inputs));
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(err) if err.is_input_error() => return invalid(&state, encoding, &served, err),
        Err(err) => {
            record(&state.stats, |s| s.runtime_errors += 1);
            window(&state, |w| {
                w.data.errors.runtime += 1;
                w.count_features(&features);
            });
            let mut response = error(
                encoding,
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_error",
                err.to_string(),
            );
            summary_headers(&mut response, &served.summary);
            return response;
        }
    };
    record(&state.stats, |s| {
        s.ok += 1;
        s.latency.record(latency_us);
    });
    window(&state, |w| {
        w.count_features(&features);
        w.data.inferences += 1;
        w.data.latency.record(latency_us);
        w.observe_outputs(&outputs);
    });
    let prediction = match &served.prediction {
        Some(spec) => Prediction::read(spec, &outputs),
        None => Prediction::Unscorable(String::from("the model has no outputs")),
    };
    let id = lock(&state.predictions).record(Instant::now(), prediction, capture.is_some());
    if let (Some(settings), Some(inputs)) = (&capture, captured_inputs) {
        let sample = CapturedSample {
            prediction: id,
            at: SystemClock.now(),
            inputs,
            outputs: if settings.outputs {
                outputs.clone()
            } else {
                Vec::new()
            },
        };
        state.captured(&served, &CaptureRecord::Sample(sample));
    }
    if let (Some((_, sender)), Some(inputs)) = (&state.shadow, shadow_inputs)
        && let Err(TrySendError::Full(_)) = sender.try_send(ShadowJob {
            id,
            inputs,
            primary: outputs.clone(),
        })
    {
        record(&state.stats, |s| s.shadow.dropped += 1);
    }
    let wanted = request.outputs;
    let response = InferResponse {
        id,
        captured: capture.is_some(),
        model: served.summary.clone(),
        latency_us,
        outputs: outputs
            .into_iter()
            .filter(|o| {
                wanted
                    .as_ref()
                    .is_none_or(|w| w.iter().any(|n| n == o.name.as_str()))
            })
            .map(|o| (o.name.to_string(), from_named(o)))
            .collect(),
    };
    let mut response = encoded(encoding, StatusCode::OK, &response);
    summary_headers(&mut response, &served.summary);
    response
}

async fn feedback(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Response {
    let (encoding, bytes) = match read_body(&state, &headers, body).await {
        Ok(read) => read,
        Err(refusal) => return refusal.into_response(),
    };
    let request: FeedbackRequest =
        match parse(encoding, &bytes, state.max_body_bytes, "feedback request") {
            Ok(request) => request,
            Err(message) => {
                return error(encoding, StatusCode::BAD_REQUEST, "bad_request", message);
            }
        };
    let truth = match (request.label, request.value) {
        (Some(label), None) => match u32::try_from(label) {
            Ok(label) => Truth::Label(label),
            Err(_) => {
                return error(
                    encoding,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unfit_feedback",
                    format!("label {label} is not a class index (0, 1, 2, …)"),
                );
            }
        },
        (None, Some(value)) => Truth::Value(value),
        _ => {
            return error(
                encoding,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give exactly one of `label` (the true class, for classification) and `value` (the true value, for regression)",
            );
        }
    };
    let Some(served) = state.active.clone() else {
        return error(
            encoding,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is active on this device, so it has no predictions to give feedback on",
        );
    };
    let joined = lock(&state.predictions).feedback(Instant::now(), request.id, truth);
    let joined = match joined {
        Ok(joined) => joined,
        Err(err) => {
            let (status, code) = match err {
                FeedbackError::Unknown { .. } => (StatusCode::NOT_FOUND, "unknown_prediction"),
                FeedbackError::Expired { .. } => (StatusCode::NOT_FOUND, "expired_prediction"),
                FeedbackError::Twice { .. } => (StatusCode::CONFLICT, "feedback_given"),
                FeedbackError::Unfit(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unfit_feedback"),
            };
            let mut response = error(encoding, status, code, err.to_string());
            summary_headers(&mut response, &served.summary);
            return response;
        }
    };
    window(&state, |w| {
        joined.outcome.count(&mut w.data.feedback);
        if let Some(shadow) = &joined.shadow {
            shadow.count(&mut w.data.shadow_feedback);
        }
    });
    if joined.captured && state.capture().is_some_and(|c| c.feedback) {
        let record = CaptureRecord::Feedback(CapturedFeedback {
            prediction: request.id,
            at: SystemClock.now(),
            truth,
        });
        state.captured(&served, &record);
    }
    let (predicted_class, predicted_value) = match joined.prediction {
        Prediction::Class { class, .. } => (Some(class), None),
        Prediction::Value(value) => (None, Some(value)),
        Prediction::Unscorable(_) => (None, None),
    };
    let response = FeedbackResponse {
        id: request.id,
        model: served.summary.clone(),
        predicted_class,
        predicted_value,
        correct: joined.outcome.correct,
        error: joined.outcome.error,
    };
    let mut response = encoded(encoding, StatusCode::OK, &response);
    summary_headers(&mut response, &served.summary);
    response
}

fn bad_request(state: &ApiState, encoding: Encoding, message: String) -> Response {
    record(&state.stats, |s| s.invalid_input += 1);
    error(encoding, StatusCode::BAD_REQUEST, "bad_request", message)
}

fn invalid(state: &ApiState, encoding: Encoding, served: &Served, err: RuntimeError) -> Response {
    record(&state.stats, |s| s.invalid_input += 1);
    window(state, |w| w.data.errors.invalid_input += 1);
    let mut response = error(
        encoding,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
        err.to_string(),
    );
    summary_headers(&mut response, &served.summary);
    response
}

fn schema(specs: &[TensorSpec]) -> Vec<TensorSchema> {
    specs
        .iter()
        .map(|s| TensorSchema {
            name: s.name.to_string(),
            dtype: dtype_name(s.dtype).to_owned(),
            shape: s.shape.clone(),
        })
        .collect()
}

async fn model_info(State(state): State<Arc<ApiState>>) -> Response {
    let Some(served) = &state.active else {
        return error(
            Encoding::Json,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_model",
            "no model is active on this device yet",
        );
    };
    let info = ModelInfo {
        model: served.summary.clone(),
        inputs: schema(&served.manifest.inputs),
        outputs: schema(&served.manifest.outputs),
        shadow: state.shadow.as_ref().map(|(summary, _)| summary.clone()),
    };
    encoded(Encoding::Json, StatusCode::OK, &info)
}

async fn stats(State(state): State<Arc<ApiState>>) -> Response {
    let stats = state
        .stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    encoded(Encoding::Json, StatusCode::OK, &stats)
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let body = serde_json::json!({
        "status": if state.active.is_some() { "serving" } else { "no_model" },
        "model": state.active.as_ref().map(|s| &s.summary),
    });
    encoded(Encoding::Json, StatusCode::OK, &body)
}

/// Runs shadow jobs on their own thread, off the request path, and accumulates agreement.
pub fn shadow_loop(
    model: Arc<Served>,
    jobs: std::sync::mpsc::Receiver<ShadowJob>,
    stats: Arc<Mutex<WorkerStats>>,
    predictions: Arc<Mutex<PredictionLog>>,
) {
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let result = model.model.run(job.inputs);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if let (Ok(outputs), Some(spec)) = (&result, &model.prediction) {
            lock(&predictions).record_shadow(job.id, Prediction::read(spec, outputs));
        }
        let mut stats = stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let shadow = &mut stats.shadow;
        match result {
            Err(_) => shadow.errors += 1,
            Ok(outputs) => {
                shadow.compared += 1;
                shadow.latency.record(micros);
                if let (Some(primary), Some(candidate)) = (
                    job.primary.first(),
                    outputs
                        .iter()
                        .find(|o| Some(&o.name) == job.primary.first().map(|p| &p.name))
                        .or(outputs.first()),
                ) {
                    if argmax(&primary.data) == argmax(&candidate.data) {
                        shadow.argmax_agree += 1;
                    }
                    let n = primary.data.len().max(1) as f64;
                    if let Some(diff) = mean_abs_diff(&primary.data, &candidate.data) {
                        shadow.abs_diff_sum += diff / n;
                    } else if let Some(max) = max_abs_diff(&primary.data, &candidate.data) {
                        shadow.abs_diff_sum += max;
                    }
                }
            }
        }
    }
}

/// Index of the largest element; for a single score, which side of 0.5 it falls on.
fn argmax(data: &TensorData) -> Option<usize> {
    let values = data.to_f64_vec();
    if values.len() == 1 {
        return Some(usize::from(values[0] > 0.5));
    }
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

/// Sum of absolute differences, element by element (same length required).
fn mean_abs_diff(a: &TensorData, b: &TensorData) -> Option<f64> {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    (a.len() == b.len()).then(|| a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum())
}
