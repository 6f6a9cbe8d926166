//! Data capture on the controller's side. Operators turn capture on or off per device
//! (`PUT`/`DELETE /api/v1/devices/{id}/capture`, audited); the settings travel in the device's
//! signed assignment, re-issued at once with the same models. A device announces each closed
//! batch with a capture notice; once the notice's report is committed the ingest answers on the
//! device's ack topic with an upload URL on the device endpoint, or a refusal (capture is off
//! for the device, the model is not registered, the batch is too large). The upload must match
//! the announced size and SHA-256 and decode as the device's batch before it is stored
//! (`<data>/captures/<device>/<batch>.cbor`, temp file + fsync + rename). Operators list the
//! batches (`GET /api/v1/captures`) and download them as CSV for retraining
//! (`GET /api/v1/captures/download`): one row per captured input row, one column per input
//! element (named after the manifest's features), the outputs, and the ground truth fed back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use edgefleet_protocol::assignment::Assignment;
use edgefleet_protocol::capture::{
    CaptureBatch, CaptureRecord, CaptureSettings, MAX_CAPTURE_BATCH_BYTES, PPM, Truth,
};
use edgefleet_protocol::codec::{self, MAX_MANIFEST_BYTES, MAX_MESSAGE_BYTES};
use edgefleet_protocol::manifest::{Manifest, NamedTensor, TensorData, TensorSpec};
use edgefleet_protocol::messages::{CaptureNotice, ControllerBody};
use edgefleet_protocol::trust::Signed;
use edgefleet_protocol::{DeviceId, Sha256Digest};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::App;
use super::api::{ApiError, ApiResult, authorize, device_id, find_model, json_body};
use super::audit::AuditEntry;
use super::auth::Role;
use super::store::{CaptureRow, Store, StoreError};

/// Defaults for settings an operator leaves out.
const DEFAULT_BATCH_SAMPLES: u32 = 100;
const DEFAULT_BATCH_AGE_S: u32 = 300;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/api/v1/devices/{id}/capture",
            put(enable).delete(disable).get(show),
        )
        .route("/api/v1/captures", get(list))
        .route("/api/v1/captures/download", get(download))
}

/// `PUT /api/v1/devices/{id}/capture`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Fraction of answered inference requests captured, in (0, 1].
    pub sample_rate: f64,
    pub max_batch_samples: Option<u32>,
    pub max_batch_age_s: Option<u32>,
    /// Capture outputs too (default true).
    pub outputs: Option<bool>,
    /// Capture fed-back ground truth too (default true).
    pub feedback: Option<bool>,
}

impl CaptureRequest {
    fn settings(&self) -> ApiResult<CaptureSettings> {
        let rate = self.sample_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(ApiError::bad_request(format!(
                "sample_rate {rate} must be above 0 and at most 1 (e.g. 0.1 captures one request in ten)"
            )));
        }
        let settings = CaptureSettings {
            rate_ppm: ((rate * f64::from(PPM)).round() as u32).clamp(1, PPM),
            max_batch_samples: self.max_batch_samples.unwrap_or(DEFAULT_BATCH_SAMPLES),
            max_batch_age_s: self.max_batch_age_s.unwrap_or(DEFAULT_BATCH_AGE_S),
            outputs: self.outputs.unwrap_or(true),
            feedback: self.feedback.unwrap_or(true),
        };
        settings.validate().map_err(ApiError::bad_request)?;
        Ok(settings)
    }
}

/// The settings as the API shows them.
fn settings_json(settings: &CaptureSettings) -> Value {
    json!({
        "sample_rate": f64::from(settings.rate_ppm) / f64::from(PPM),
        "max_batch_samples": settings.max_batch_samples,
        "max_batch_age_s": settings.max_batch_age_s,
        "outputs": settings.outputs,
        "feedback": settings.feedback,
    })
}

/// The capture settings of `device` (`None`: capture is off), as its assignments carry them.
pub async fn device_settings(
    store: &Store,
    device: &str,
) -> Result<Option<CaptureSettings>, StoreError> {
    store
        .capture_settings(device)
        .await?
        .map(|v| {
            serde_json::from_value::<CaptureSettings>(v)
                .map_err(|e| StoreError::Corrupt(format!("capture settings of {device}: {e}")))
        })
        .transpose()
}

async fn enable(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CaptureRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let device = device_id(&id)?;
    let request = json_body(body)?;
    let settings = request.settings()?;
    let shown = settings_json(&settings);
    change(&app, &caller.actor(), &device, Some(settings), shown).await
}

async fn disable(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let device = device_id(&id)?;
    change(&app, &caller.actor(), &device, None, Value::Null).await
}

/// Stores the new settings with their audit row, then re-signs the device's current assignment
/// with them (same models), so the device applies them at once.
async fn change(
    app: &App,
    actor: &str,
    device: &DeviceId,
    settings: Option<CaptureSettings>,
    shown: Value,
) -> ApiResult<Json<Value>> {
    let on = settings.is_some();
    let audit = AuditEntry::new(
        actor,
        if on {
            "device.capture_on"
        } else {
            "device.capture_off"
        },
        format!("device:{device}"),
        json!({"settings": shown}),
    );
    let stored = settings
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(ApiError::internal)?;
    app.store
        .set_capture_settings(app.now_ms(), device.as_str(), stored, actor, audit)
        .await?;
    let assignment = reissue(app, device, settings).await?;
    Ok(Json(json!({
        "device": device.as_str(),
        "capture": shown,
        "assignment": assignment,
    })))
}

/// Re-signs `device`'s stored assignment with `capture` and publishes it; `Null` when the device
/// has none yet (its first assignment will carry the settings).
async fn reissue(
    app: &App,
    device: &DeviceId,
    capture: Option<CaptureSettings>,
) -> ApiResult<Value> {
    let Some(bytes) = app.store.device_assignment(device.as_str()).await? else {
        return Ok(Value::Null);
    };
    let current = Signed::decode("assignment", &bytes, MAX_MESSAGE_BYTES)
        .map_err(ApiError::internal)
        .and_then(|signed| {
            codec::decode::<Assignment>("assignment", &signed.body, MAX_MESSAGE_BYTES)
                .map_err(ApiError::internal)
        })?;
    let audit = AuditEntry::new(
        "controller",
        "device.assign",
        format!("device:{device}"),
        json!({"reason": "capture settings changed", "replaces_seq": current.seq, "capture": capture.is_some()}),
    );
    let template = Assignment { capture, ..current };
    let signed = super::api::store_assignment(app, template, None, audit).await?;
    super::api::publish_assignment(app, device, signed).await
}

async fn show(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    device_id(&id)?;
    app.store.get_device(&id).await?;
    let settings = device_settings(&app.store, &id).await?;
    Ok(Json(json!({
        "device": id,
        "capture": settings.as_ref().map(settings_json),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureQuery {
    /// Manifest digest, `name@version`, or a model name (every version).
    model: Option<String>,
    device: Option<String>,
    /// `csv` (the only format).
    format: Option<String>,
}

/// The manifest digests `model` names.
async fn model_digests(app: &App, model: Option<&str>) -> ApiResult<Vec<String>> {
    let Some(model) = model else {
        return Ok(Vec::new());
    };
    if model.contains('@') || Sha256Digest::from_str(model).is_ok() {
        return Ok(vec![find_model(app, model).await?.digest]);
    }
    let digests: Vec<String> = app
        .store
        .list_models()
        .await?
        .into_iter()
        .filter(|m| m.name == model)
        .map(|m| m.digest)
        .collect();
    if digests.is_empty() {
        return Err(StoreError::NotFound(format!("model {model:?}")).into());
    }
    Ok(digests)
}

async fn selected(app: &App, q: &CaptureQuery) -> ApiResult<Vec<CaptureRow>> {
    if let Some(device) = &q.device {
        device_id(device)?;
    }
    let digests = model_digests(app, q.model.as_deref()).await?;
    Ok(app
        .store
        .list_captures(&digests, q.device.as_deref())
        .await?)
}

async fn list(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<CaptureQuery>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let rows = selected(&app, &q).await?;
    let samples: i64 = rows
        .iter()
        .filter(|r| r.uploaded_at.is_some())
        .map(|r| r.samples)
        .sum();
    Ok(Json(json!({"captures": rows, "uploaded_samples": samples})))
}

// ---- answers to notices (called by the MQTT ingest once a notice is committed) ----

/// Answers capture notices; built once, used by the ingest.
#[derive(Debug, Clone)]
pub struct NoticeAnswers {
    store: Arc<Store>,
    /// The device endpoint's base URL (`https://host:port`).
    device_url: String,
}

impl NoticeAnswers {
    pub fn new(store: Arc<Store>, device_url: String) -> Self {
        Self { store, device_url }
    }

    /// The answer for `notice` from `device`: an upload URL, or a refusal (the device then
    /// deletes the batch). `None` when the controller cannot decide now (its store failed): the
    /// device announces the batch again later.
    pub async fn answer(
        &self,
        now: i64,
        device: &DeviceId,
        notice: &CaptureNotice,
    ) -> Option<ControllerBody> {
        let url = match self.accept(now, device, notice).await {
            Ok(()) => Some(format!(
                "{}/api/v1/captures/{}",
                self.device_url, notice.batch
            )),
            Err(Some(reason)) => {
                tracing::info!(%device, batch = notice.batch, %reason, "refused a capture batch");
                None
            }
            Err(None) => return None,
        };
        Some(ControllerBody::CaptureUpload {
            batch: notice.batch,
            url,
        })
    }

    /// `Err(Some(reason))` refuses the batch; `Err(None)` is a store failure (logged).
    async fn accept(
        &self,
        now: i64,
        device: &DeviceId,
        notice: &CaptureNotice,
    ) -> Result<(), Option<String>> {
        let internal = |e: StoreError| {
            tracing::error!(%e, "cannot answer a capture notice; the device announces it again");
            None
        };
        if device_settings(&self.store, device.as_str())
            .await
            .map_err(internal)?
            .is_none()
        {
            return Err(Some(String::from("capture is off for this device")));
        }
        if notice.bytes > MAX_CAPTURE_BATCH_BYTES {
            return Err(Some(format!(
                "{} bytes exceed the batch limit {MAX_CAPTURE_BATCH_BYTES}",
                notice.bytes
            )));
        }
        let digest = notice.model.manifest_digest.to_hex();
        match self.store.get_model(&digest).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => {
                return Err(Some(format!("model {digest} is not registered")));
            }
            Err(e) => return Err(internal(e)),
        }
        let batch = i64::try_from(notice.batch)
            .map_err(|_| Some(String::from("batch number too large")))?;
        let row = CaptureRow {
            device: device.to_string(),
            batch,
            model_digest: digest,
            samples: i64::from(notice.samples),
            bytes: notice.bytes as i64,
            sha256: notice.sha256.to_hex(),
            first_at: notice.first_at.as_millis() as i64,
            last_at: notice.last_at.as_millis() as i64,
            noticed_at: now,
            uploaded_at: None,
            path: None,
        };
        let stored = self
            .store
            .record_capture(now, &row)
            .await
            .map_err(internal)?;
        if (stored.sha256.as_str(), stored.bytes) != (row.sha256.as_str(), row.bytes) {
            return Err(Some(format!(
                "batch {} was announced before with other contents",
                notice.batch
            )));
        }
        Ok(())
    }
}

// ---- uploads (device endpoint) ----

/// `PUT /api/v1/captures/{batch}` from an enrolled device (its client certificate names it).
pub async fn receive_upload(app: &App, device: &str, batch: &str, body: Body) -> Response {
    let Ok(batch) = batch.parse::<i64>() else {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_batch", "not a batch number")
            .into_response();
    };
    let row = match app.store.capture(device, batch).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "not_announced",
                format!(
                    "batch {batch} of {device} was not announced; send its capture notice first"
                ),
            )
            .into_response();
        }
        Err(err) => {
            tracing::error!(%err, "cannot look up a capture batch");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "internal", "retry later")
                .into_response();
        }
    };
    if row.uploaded_at.is_some() {
        return (
            StatusCode::OK,
            Json(json!({"batch": batch, "stored": true})),
        )
            .into_response();
    }
    match store_upload(app, &row, body).await {
        Ok(path) => {
            let stored = app
                .store
                .capture_uploaded(app.now_ms(), device, batch, &path.to_string_lossy())
                .await;
            if let Err(err) = stored {
                tracing::error!(%err, "cannot record a capture upload");
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "internal", "retry later")
                    .into_response();
            }
            tracing::info!(device, batch, samples = row.samples, "capture batch stored");
            (
                StatusCode::CREATED,
                Json(json!({"batch": batch, "stored": true})),
            )
                .into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

fn captures_dir(app: &App, device: &str) -> PathBuf {
    app.data_dir.join("captures").join(device)
}

/// Streams the body to a temp file, checks it against the notice, decodes it, and moves it in.
async fn store_upload(app: &App, row: &CaptureRow, body: Body) -> Result<PathBuf, ApiError> {
    let io = |err: std::io::Error| {
        tracing::error!(%err, "cannot store a capture upload");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io",
            "the controller cannot store the batch",
        )
    };
    let dir = captures_dir(app, &row.device);
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let path = dir.join(format!("{:020}.cbor", row.batch));
    let tmp = dir.join(format!(".{:020}.cbor.tmp", row.batch));
    let expected = row.bytes as u64;
    let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut received: Vec<u8> = Vec::with_capacity(expected as usize);
    let mut stream = body.into_data_stream();
    let result = async {
        while let Some(chunk) = stream.next().await {
            let chunk: Bytes = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "broken_upload",
                    format!("the upload broke off: {e}"),
                )
            })?;
            if (received.len() + chunk.len()) as u64 > expected {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "size_mismatch",
                    format!("the batch was announced with {expected} bytes; the upload is longer"),
                ));
            }
            hasher.update(&chunk);
            received.extend_from_slice(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        if received.len() as u64 != expected {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "size_mismatch",
                format!(
                    "the batch was announced with {expected} bytes; {} arrived",
                    received.len()
                ),
            ));
        }
        if hex::encode(hasher.finalize()) != row.sha256 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "sha256_mismatch",
                "the upload's SHA-256 differs from the announced one",
            ));
        }
        let batch = CaptureBatch::decode(&received).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_batch",
                format!("not a capture batch: {e}"),
            )
        })?;
        if batch.device.as_str() != row.device
            || batch.batch as i64 != row.batch
            || batch.model.manifest_digest.to_hex() != row.model_digest
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_batch",
                "the batch names another device, number or model than its notice",
            ));
        }
        file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        tokio::fs::File::open(&dir)
            .await
            .map_err(io)?
            .sync_all()
            .await
            .map_err(io)?;
        Ok(path.clone())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

// ---- CSV download ----

/// The CSV layout of one model schema: which input and output elements become which columns.
#[derive(Debug)]
struct Layout {
    /// (tensor, width) per input and output, in column order.
    inputs: Vec<(String, usize)>,
    outputs: Vec<(String, usize)>,
    header: Vec<String>,
}

/// The width of a tensor's last axis (1 for a scalar), when the schema fixes it.
fn fixed_width(spec: &TensorSpec) -> Option<usize> {
    match spec.shape.last() {
        None => Some(1),
        Some(last) => last.map(|w| w.max(1) as usize),
    }
}

fn tensor_width(tensors: &[NamedTensor], name: &str) -> Option<usize> {
    tensors
        .iter()
        .find(|t| t.name.as_str() == name)
        .map(|t| t.shape.last().copied().unwrap_or(1).max(1) as usize)
}

impl Layout {
    /// Columns from `manifest`'s schema; a dynamic last axis takes its width from `first`.
    fn new(manifest: &Manifest, first: Option<&CaptureRecord>) -> Self {
        let (first_inputs, first_outputs) = match first {
            Some(CaptureRecord::Sample(s)) => (s.inputs.as_slice(), s.outputs.as_slice()),
            _ => (&[][..], &[][..]),
        };
        let mut header: Vec<String> = ["time", "device", "model", "prediction"]
            .map(String::from)
            .to_vec();
        let mut inputs = Vec::new();
        for spec in &manifest.inputs {
            let name = spec.name.as_str();
            let width = fixed_width(spec)
                .or_else(|| tensor_width(first_inputs, name))
                .unwrap_or(1);
            for i in 0..width {
                let feature = manifest
                    .features
                    .iter()
                    .find(|f| f.tensor.as_str() == name && f.index as usize == i);
                header.push(match feature {
                    Some(f) => f.name.to_string(),
                    None if width == 1 => name.to_owned(),
                    None => format!("{name}[{i}]"),
                });
            }
            inputs.push((name.to_owned(), width));
        }
        let mut outputs = Vec::new();
        for spec in &manifest.outputs {
            let name = spec.name.as_str();
            let width = fixed_width(spec)
                .or_else(|| tensor_width(first_outputs, name))
                .unwrap_or(1);
            for i in 0..width {
                header.push(if width == 1 {
                    name.to_owned()
                } else {
                    format!("{name}[{i}]")
                });
            }
            outputs.push((name.to_owned(), width));
        }
        header.extend(["feedback_label", "feedback_value"].map(String::from));
        Self {
            inputs,
            outputs,
            header,
        }
    }
}

/// One value as text: `f32` values printed as `f32` (so 45.39 stays 45.39), integers exact.
fn values(data: &TensorData) -> Vec<String> {
    match data {
        TensorData::F32(v) => v.iter().map(f32::to_string).collect(),
        TensorData::F64(v) => v.iter().map(f64::to_string).collect(),
        TensorData::I32(v) => v.iter().map(i32::to_string).collect(),
        TensorData::I64(v) => v.iter().map(i64::to_string).collect(),
        TensorData::U8(v) => v.iter().map(u8::to_string).collect(),
        TensorData::I8(v) => v.iter().map(i8::to_string).collect(),
        TensorData::Bool(v) => v.iter().map(|b| u8::from(*b).to_string()).collect(),
    }
}

/// Row `row` (along the last axis) of each tensor in `columns`, blank where it is missing.
fn cells(out: &mut Vec<String>, tensors: &[NamedTensor], columns: &[(String, usize)], row: usize) {
    for (name, width) in columns {
        let data = tensors
            .iter()
            .find(|t| t.name.as_str() == name)
            .map(|t| values(&t.data))
            .unwrap_or_default();
        for i in 0..*width {
            out.push(data.get(row * width + i).cloned().unwrap_or_default());
        }
    }
}

/// The CSV lines of one batch's samples.
fn batch_csv(
    layout: &Layout,
    batch: &CaptureBatch,
    truth: &HashMap<(String, u64), Truth>,
) -> Result<Vec<u8>, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let model = format!("{}@{}", batch.model.name, batch.model.version);
    for record in &batch.records {
        let CaptureRecord::Sample(sample) = record else {
            continue;
        };
        let (first, first_width) = layout
            .inputs
            .first()
            .map_or(("", 1), |(name, width)| (name.as_str(), *width));
        let rows = sample
            .inputs
            .iter()
            .find(|t| t.name.as_str() == first)
            .map_or(1, |t| (t.data.len() / first_width.max(1)).max(1));
        let feedback = truth.get(&(batch.device.to_string(), sample.prediction));
        for row in 0..rows {
            let mut line = vec![
                sample.at.to_rfc3339(),
                batch.device.to_string(),
                model.clone(),
                sample.prediction.to_string(),
            ];
            cells(&mut line, &sample.inputs, &layout.inputs, row);
            cells(&mut line, &sample.outputs, &layout.outputs, row);
            line.push(match feedback {
                Some(Truth::Label(label)) => label.to_string(),
                _ => String::new(),
            });
            line.push(match feedback {
                Some(Truth::Value(value)) => value.to_string(),
                _ => String::new(),
            });
            writer.write_record(&line)?;
        }
    }
    writer.into_inner().map_err(|e| e.into_error().into())
}

async fn read_batch(row: &CaptureRow) -> Result<CaptureBatch, String> {
    let path = row
        .path
        .as_ref()
        .ok_or_else(|| format!("batch {} of {} has no file", row.batch, row.device))?;
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    CaptureBatch::decode(&bytes).map_err(|e| format!("{path}: {e}"))
}

async fn download(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<CaptureQuery>,
) -> ApiResult<Response> {
    authorize(&app, &headers, Role::Operator).await?;
    if let Some(format) = &q.format
        && format != "csv"
    {
        return Err(ApiError::bad_request(format!(
            "format {format:?} is not offered; use csv"
        )));
    }
    let rows: Vec<CaptureRow> = selected(&app, &q)
        .await?
        .into_iter()
        .filter(|r| r.uploaded_at.is_some())
        .collect();
    // One schema per download: every selected model must have the first one's inputs and outputs.
    let mut manifests: HashMap<String, Manifest> = HashMap::new();
    for row in &rows {
        if !manifests.contains_key(&row.model_digest) {
            let model = app.store.get_model(&row.model_digest).await?;
            let signed = Signed::decode("manifest", &model.signed_manifest, MAX_MANIFEST_BYTES)
                .map_err(ApiError::internal)?;
            let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)
                .map_err(ApiError::internal)?;
            manifests.insert(row.model_digest.clone(), manifest);
        }
    }
    let schema = |m: &Manifest| (m.inputs.clone(), m.outputs.clone());
    let first_manifest = rows.first().and_then(|r| manifests.get(&r.model_digest));
    if let Some(first) = first_manifest
        && manifests.values().any(|m| schema(m) != schema(first))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "mixed_schemas",
            "the selected batches come from model versions with different inputs or outputs; download one version at a time (model=name@version)",
        ));
    }
    // Feedback may arrive in a later batch than its sample: collect it first.
    // The first sample gives the width of a dynamic last axis.
    let mut truth: HashMap<(String, u64), Truth> = HashMap::new();
    let mut first_record = None;
    for row in &rows {
        let batch = read_batch(row).await.map_err(ApiError::internal)?;
        for record in batch.records {
            match record {
                CaptureRecord::Feedback(f) => {
                    truth.insert((row.device.clone(), f.prediction), f.truth);
                }
                sample @ CaptureRecord::Sample(_) if first_record.is_none() => {
                    first_record = Some(sample);
                }
                CaptureRecord::Sample(_) => {}
            }
        }
    }
    let layout = Arc::new(match first_manifest {
        Some(manifest) => Layout::new(manifest, first_record.as_ref()),
        None => Layout {
            inputs: Vec::new(),
            outputs: Vec::new(),
            header: [
                "time",
                "device",
                "model",
                "prediction",
                "feedback_label",
                "feedback_value",
            ]
            .map(String::from)
            .to_vec(),
        },
    });
    let mut head = csv::Writer::from_writer(Vec::new());
    head.write_record(&layout.header)
        .map_err(ApiError::internal)?;
    let head = head.into_inner().map_err(ApiError::internal)?;
    let truth = Arc::new(truth);
    // The header, then one chunk per batch, read from disk as the response streams.
    let chunks = futures_util::stream::iter(rows).then(move |row| {
        let (layout, truth) = (layout.clone(), truth.clone());
        async move {
            let batch = read_batch(&row).await.map_err(std::io::Error::other)?;
            batch_csv(&layout, &batch, &truth)
                .map(Bytes::from)
                .map_err(std::io::Error::other)
        }
    });
    let body =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) })
            .chain(chunks);
    let name = q
        .model
        .as_deref()
        .unwrap_or("captures")
        .replace(['@', '/'], "-");
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.csv\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests;
