//! The model registry: `POST /api/v1/models` takes a multipart upload (`metadata` JSON, the
//! `model` ONNX file streamed to disk under a size limit, optional `reference` CSV and `golden`
//! JSON), validates and test-runs it with the same tract the agents run (`release`), builds the
//! manifest, signs it with the release keys held online, stores the bundle and records lineage.
//! Signatures made offline (`edgefleet bundle sign --detached`) are added with
//! `POST /api/v1/models/{digest}/signatures`.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgefleet_protocol::bundle::DetachedSignature;
use edgefleet_protocol::manifest::{Lineage, Metric, Param, PredictionKind, RuntimeSettings};
use edgefleet_protocol::trust::Signed;
use edgefleet_protocol::{Arch, ModelName, ModelVersion, Sha256Digest, TensorName, codec};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::App;
use super::api::{ApiError, ApiResult, authorize};
use super::audit::AuditEntry;
use super::auth::Role;
use super::store::{ModelRow, StoreError};
use super::validate::ValidationError;
use crate::release::{self, ReleaseSpec, SpecFile};

const MAX_REFERENCE_BYTES: usize = 64 * 1024 * 1024;
const MAX_SMALL_PART_BYTES: usize = 4 * 1024 * 1024;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/api/v1/models",
            post(register)
                .get(list_models)
                // The upload streams to disk and enforces `max_upload_bytes` itself.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/models/{digest}", get(show_model))
        .route("/api/v1/models/{digest}/lineage", get(lineage))
        .route("/api/v1/models/{digest}/bundle", get(download_bundle))
        .route("/api/v1/models/{digest}/signatures", post(add_signature))
}

/// The `metadata` part of an upload.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetadata {
    pub name: String,
    pub version: String,
    /// Release counter; default: one above the highest registered for this name.
    pub release: Option<u64>,
    pub description: Option<String>,
    /// `x86_64`, `aarch64`, `arm` or `any` (default).
    pub arch: Option<String>,
    pub min_agent_version: Option<String>,
    /// Schema overrides in the CLI's syntax, e.g. `input:f32:1x576`.
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Drift features, `name=tensor:index`.
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub lineage: LineageMetadata,
    #[serde(default)]
    pub runtime: Option<RuntimeMetadata>,
    pub expires_days: Option<u64>,
    /// How devices score ground-truth feedback (default: the first output, a classification
    /// at threshold 0.5).
    #[serde(default)]
    pub prediction: Option<PredictionMetadata>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionMetadata {
    pub output: Option<String>,
    pub kind: Option<PredictionKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineageMetadata {
    pub training_data_digest: Option<String>,
    pub training_data_uri: Option<String>,
    pub code_commit: Option<String>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub mlflow_run_id: Option<String>,
    /// The registered model this one was derived from (manifest digest or name@version).
    pub parent: Option<String>,
    /// A retraining candidate for this model name.
    pub candidate_for: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeMetadata {
    pub threads: Option<u16>,
    pub latency_budget_ms: Option<u32>,
    pub grace_window_s: Option<u32>,
    pub max_error_rate: Option<f32>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// A release error code reported by the validator process, as the registry's `'static` code.
fn refusal_code(code: &str) -> &'static str {
    release::ReleaseError::CODES
        .into_iter()
        .find(|known| *known == code)
        .unwrap_or("invalid_model")
}

fn release_error(err: release::ReleaseError) -> ApiError {
    if err.is_input_error() {
        unprocessable(err.code(), err.to_string())
    } else {
        ApiError::internal(err)
    }
}

/// Removes the upload's temp file however the request ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn read_small(
    field: &mut axum::extract::multipart::Field<'_>,
    what: &str,
    max: usize,
) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("the upload broke off in `{what}`: {e}")))?
    {
        if out.len() + chunk.len() > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("`{what}` is larger than {} MiB", max / (1024 * 1024)),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn register(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Response> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(format!(
            "expected a multipart/form-data upload with `metadata` and `model` parts: {}",
            e.body_text()
        ))
    })?;
    let mut metadata: Option<ModelMetadata> = None;
    let mut model: Option<(TempFile, u64, String)> = None;
    let mut reference: Option<Vec<u8>> = None;
    let mut golden: Option<Vec<u8>> = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("unreadable multipart upload: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "metadata" => {
                let bytes = read_small(&mut field, "metadata", 64 * 1024).await?;
                metadata = Some(serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!(
                        "`metadata` is not valid model metadata JSON: {e}"
                    ))
                })?);
            }
            "model" => {
                let file_name = field
                    .file_name()
                    .and_then(|n| FsPath::new(n).file_name())
                    .and_then(|n| n.to_str())
                    .unwrap_or("model.onnx")
                    .to_owned();
                let path = app
                    .data_dir
                    .join("uploads")
                    .join(format!("{}.onnx", super::auth::new_id("up")));
                let temp = TempFile(path.clone());
                let mut out = tokio::fs::File::create(&path)
                    .await
                    .map_err(ApiError::internal)?;
                let mut size = 0u64;
                let drain_until = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while let Some(chunk) = field.chunk().await.map_err(|e| {
                    ApiError::bad_request(format!("the model upload broke off: {e}"))
                })? {
                    size += chunk.len() as u64;
                    if size > app.max_upload_bytes {
                        // Read (and drop) a bounded rest of the body so the client is still
                        // listening when the 413 arrives, instead of seeing a reset.
                        if size > app.max_upload_bytes.saturating_mul(2) + (64 << 20)
                            || std::time::Instant::now() > drain_until
                        {
                            break;
                        }
                        continue;
                    }
                    out.write_all(&chunk).await.map_err(ApiError::internal)?;
                }
                if size > app.max_upload_bytes {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!(
                            "the model is larger than this controller's limit of {} MiB (--max-upload-mib)",
                            app.max_upload_bytes / (1024 * 1024)
                        ),
                    ));
                }
                out.sync_all().await.map_err(ApiError::internal)?;
                model = Some((temp, size, file_name));
            }
            "reference" => {
                reference = Some(read_small(&mut field, "reference", MAX_REFERENCE_BYTES).await?)
            }
            "golden" => {
                golden = Some(read_small(&mut field, "golden", MAX_SMALL_PART_BYTES).await?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown upload part {other:?}; expected metadata, model, reference, golden"
                )));
            }
        }
    }
    let metadata =
        metadata.ok_or_else(|| ApiError::bad_request("the `metadata` part is missing"))?;
    let (temp, size, file_name) = model
        .ok_or_else(|| ApiError::bad_request("the `model` part (the ONNX file) is missing"))?;
    if size == 0 {
        return Err(unprocessable(
            "invalid_model",
            "the uploaded model file is empty",
        ));
    }
    let spec = spec_from(&app, metadata, reference, golden, &file_name).await?;
    let now = app.clock.now();
    let model_path = temp.0.clone();
    super::validate::check(
        &app.validator,
        &model_path,
        &spec,
        now,
        app.validation_memory_mib,
    )
    .await
    .map_err(|err| match err {
        ValidationError::Refused { code, message } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            refusal_code(&code),
            message,
        ),
        ValidationError::Crashed(_) => unprocessable("model_crashed", err.to_string()),
        ValidationError::TimedOut(_) => unprocessable("validation_timeout", err.to_string()),
        ValidationError::Internal(_) => ApiError::internal(err),
    })?;
    let built =
        tokio::task::spawn_blocking(move || release::build_release(&model_path, &spec, now))
            .await
            .map_err(ApiError::internal)?
            .map_err(release_error)?;
    let mut signed = built.unsigned();
    app.keys.sign_manifest(&mut signed);
    let digest = built.digest().to_hex();
    let bundle_path = app
        .bundles_dir()
        .join(format!("{digest}-{}.efb", signed.signatures.len()));
    let mut sources = built.sources.clone();
    sources[0] = temp.0.clone();
    {
        let (signed, sources, out) = (signed.clone(), sources.clone(), bundle_path.clone());
        tokio::task::spawn_blocking(move || release::write_bundle(&signed, &sources, &out))
            .await
            .map_err(ApiError::internal)?
            .map_err(release_error)?;
    }
    let bundle_size = std::fs::metadata(&bundle_path)
        .map_err(ApiError::internal)?
        .len();
    let manifest_json = serde_json::to_value(&built.manifest).map_err(ApiError::internal)?;
    let row = ModelRow {
        digest: digest.clone(),
        name: built.manifest.name.to_string(),
        version: built.manifest.version.to_string(),
        release: built.manifest.release as i64,
        signed_manifest: signed.encode(),
        manifest: manifest_json,
        signatures: signed.signatures.len() as i64,
        bundle_size: bundle_size as i64,
        bundle_path: bundle_path.display().to_string(),
        parent: built.manifest.lineage.parent.clone(),
        created_by: caller.actor(),
        created_at: now.as_millis() as i64,
    };
    let audit = AuditEntry::new(
        caller.actor(),
        "model.register",
        format!("model:{digest}"),
        json!({
            "name": row.name, "version": row.version, "release": row.release,
            "model_sha256": built.manifest.payloads[0].sha256.to_hex(),
            "signatures": row.signatures, "parent": row.parent,
            "training_data_digest": built.manifest.lineage.training_data_digest.map(|d| d.to_hex()),
            "code_commit": built.manifest.lineage.code_commit,
            "mlflow_run_id": built.manifest.lineage.mlflow_run_id,
            "candidate_for": built.manifest.lineage.candidate_for,
            "drift_event": built.manifest.lineage.parameters.iter()
                .find(|p| p.name == "drift_event").map(|p| p.value.clone()),
        }),
    );
    if let Err(err) = app
        .store
        .insert_model(now.as_millis() as i64, &row, audit)
        .await
    {
        let _ = std::fs::remove_file(&bundle_path);
        return Err(err.into());
    }
    tracing::info!(model = %row.name, version = %row.version, digest, "model registered");
    let mut answer = model_json(&app, &row, Some(built.latency_us));
    if built.manifest.lineage.candidate_for.is_some()
        && let Some(rollout) = super::drift::auto_rollout(&app, &row, &caller.actor()).await
    {
        answer["auto_rollout"] = rollout;
    }
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

async fn spec_from(
    app: &App,
    m: ModelMetadata,
    reference: Option<Vec<u8>>,
    golden: Option<Vec<u8>>,
    file_name: &str,
) -> ApiResult<ReleaseSpec> {
    let name = ModelName::new(&m.name)
        .map_err(|e| ApiError::bad_request(format!("model name {:?}: {e}", m.name)))?;
    let version = ModelVersion::new(&m.version)
        .map_err(|e| ApiError::bad_request(format!("model version {:?}: {e}", m.version)))?;
    let release = match m.release {
        Some(r) => r,
        None => {
            app.store
                .list_models()
                .await?
                .iter()
                .filter(|row| row.name == m.name)
                .map(|row| row.release as u64)
                .max()
                .unwrap_or(0)
                + 1
        }
    };
    let mut spec = ReleaseSpec::new(name, version, release);
    spec.description = m.description;
    if let Some(arch) = &m.arch {
        spec.arch = arch
            .parse::<Arch>()
            .map_err(|e| ApiError::bad_request(format!("arch {arch:?}: {e}")))?;
    }
    spec.min_agent_version = m.min_agent_version;
    spec.model_file_name = TensorName::new(file_name).ok();
    let parse_all = |items: &[String], parse: fn(&str) -> anyhow::Result<_>, what: &str| {
        items
            .iter()
            .map(|s| parse(s).map_err(|e| ApiError::bad_request(format!("{what} {s:?}: {e:#}"))))
            .collect::<ApiResult<Vec<_>>>()
    };
    spec.inputs = parse_all(&m.inputs, crate::cli::spec::tensor_spec, "input")?;
    spec.outputs = parse_all(&m.outputs, crate::cli::spec::tensor_spec, "output")?;
    spec.features = m
        .features
        .iter()
        .map(|s| {
            crate::cli::spec::feature_spec(s)
                .map_err(|e| ApiError::bad_request(format!("feature {s:?}: {e:#}")))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    spec.reference = reference.map(|bytes| SpecFile::Bytes {
        label: "the uploaded reference CSV".into(),
        bytes,
    });
    spec.golden = golden.map(|bytes| SpecFile::Bytes {
        label: "the uploaded golden vectors".into(),
        bytes,
    });
    let l = m.lineage;
    let parent = match &l.parent {
        Some(p) => Some(super::api::resolve_model(app, p).await.map_err(|e| {
            unprocessable(
                "unknown_parent",
                format!("lineage.parent {p:?}: {}", e.message),
            )
        })?),
        None => None,
    };
    spec.lineage = Lineage {
        training_data_digest: l
            .training_data_digest
            .as_deref()
            .map(|d| {
                Sha256Digest::from_str(d).map_err(|_| {
                    ApiError::bad_request("lineage.training_data_digest must be 64 hex digits")
                })
            })
            .transpose()?,
        training_data_uri: l.training_data_uri,
        code_commit: l.code_commit,
        parameters: l
            .parameters
            .into_iter()
            .map(|(name, value)| Param { name, value })
            .collect(),
        metrics: l
            .metrics
            .into_iter()
            .map(|(name, value)| Metric { name, value })
            .collect(),
        mlflow_run_id: l.mlflow_run_id,
        parent: parent.map(|p| p.digest),
        candidate_for: l
            .candidate_for
            .as_deref()
            .map(|n| {
                ModelName::new(n)
                    .map_err(|e| ApiError::bad_request(format!("lineage.candidate_for: {e}")))
            })
            .transpose()?,
    };
    if let Some(r) = m.runtime {
        let d = RuntimeSettings::default();
        spec.runtime = RuntimeSettings {
            threads: r.threads.unwrap_or(d.threads),
            latency_budget_ms: r.latency_budget_ms.unwrap_or(d.latency_budget_ms),
            grace_window_s: r.grace_window_s.unwrap_or(d.grace_window_s),
            max_error_rate: r.max_error_rate.unwrap_or(d.max_error_rate),
        };
    }
    if let Some(days) = m.expires_days {
        spec.expires_days = days;
    }
    if let Some(p) = m.prediction {
        spec.prediction_output = p
            .output
            .as_deref()
            .map(|o| {
                TensorName::new(o)
                    .map_err(|e| ApiError::bad_request(format!("prediction.output: {e}")))
            })
            .transpose()?;
        spec.prediction_kind = p.kind;
    }
    Ok(spec)
}

fn model_json(app: &App, row: &ModelRow, latency_us: Option<u64>) -> Value {
    let need = app.keys.release_threshold() as i64;
    json!({
        "digest": row.digest,
        "name": row.name,
        "version": row.version,
        "release": row.release,
        "signatures": row.signatures,
        "signatures_needed": need,
        "state": if row.signatures >= need { "ready" } else { "awaiting_signatures" },
        "bundle_size": row.bundle_size,
        "parent": row.parent,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "manifest": row.manifest,
        "validation_latency_us": latency_us,
    })
}

async fn list_models(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let models: Vec<Value> = app
        .store
        .list_models()
        .await?
        .iter()
        .map(|m| {
            let mut v = model_json(&app, m, None);
            if let Some(obj) = v.as_object_mut() {
                obj.remove("manifest");
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({"models": models})))
}

async fn show_model(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let row = super::api::find_model(&app, &digest).await?;
    Ok(axum::Json(model_json(&app, &row, None)))
}

/// The model's ancestors (via `lineage.parent`) and descendants.
async fn lineage(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let row = super::api::find_model(&app, &digest).await?;
    let all = app.store.list_models().await?;
    let summary = |m: &ModelRow| {
        json!({
            "digest": m.digest, "name": m.name, "version": m.version, "release": m.release,
            "created_at": m.created_at, "lineage": m.manifest.get("lineage"),
        })
    };
    let mut ancestors = Vec::new();
    let mut cursor = row.parent.clone();
    while let Some(parent) = cursor {
        if ancestors.len() > 1000 {
            break;
        }
        match all.iter().find(|m| m.digest == parent) {
            Some(m) => {
                ancestors.push(summary(m));
                cursor = m.parent.clone();
            }
            None => {
                ancestors.push(json!({"digest": parent, "missing": true}));
                break;
            }
        }
    }
    let children: Vec<Value> = all
        .iter()
        .filter(|m| m.parent.as_deref() == Some(row.digest.as_str()))
        .map(summary)
        .collect();
    Ok(axum::Json(json!({
        "model": summary(&row),
        "ancestors": ancestors,
        "children": children,
    })))
}

/// The bundle as stored, for offline signing (`edgefleet bundle sign --detached`).
async fn download_bundle(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authorize(&app, &headers, Role::Viewer).await?;
    let row = super::api::find_model(&app, &digest).await?;
    let file = tokio::fs::File::open(&row.bundle_path)
        .await
        .map_err(ApiError::internal)?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, row.bundle_size)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}-{}.efb\"", row.name, row.version),
        )
        .body(Body::from_stream(tokio_util::io::ReaderStream::new(file)))
        .map_err(ApiError::internal)
}

/// Adds detached signatures (CBOR, as `edgefleet bundle sign --detached` writes them).
async fn add_signature(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let row = super::api::find_model(&app, &digest).await?;
    let detached: DetachedSignature =
        codec::decode("detached signature", &body, 64 * 1024).map_err(|e| {
            ApiError::bad_request(format!(
                "not a detached signature file (make one with `edgefleet bundle sign --detached`): {e}"
            ))
        })?;
    let mut signed = Signed::decode(
        "signed manifest",
        &row.signed_manifest,
        codec::MAX_MANIFEST_BYTES,
    )
    .map_err(ApiError::internal)?;
    if detached.manifest_digest.to_hex() != row.digest {
        return Err(unprocessable(
            "wrong_manifest",
            format!(
                "the signature is for manifest {}, not {}",
                detached.manifest_digest, row.digest
            ),
        ));
    }
    let before = signed.signatures.len();
    let signature = detached.signature;
    let Some(key) = app
        .keys
        .keyring
        .release
        .keys
        .iter()
        .find(|k| k.key_id() == signature.key_id)
    else {
        return Err(unprocessable(
            "unknown_key",
            format!(
                "key {} is not a release key of the keyring",
                signature.key_id
            ),
        ));
    };
    if !key.verify(
        edgefleet_protocol::crypto::Domain::Manifest,
        &signed.body,
        &signature.signature,
    ) {
        return Err(unprocessable(
            "bad_signature",
            format!(
                "the signature by {} does not verify over this manifest",
                signature.key_id
            ),
        ));
    }
    signed.add_signature(signature);
    let added = signed.signatures.len() - before;
    if added == 0 {
        return Ok(axum::Json(model_json(&app, &row, None)));
    }
    // The bundle's header carries the signatures: write a new bundle file next to the old.
    let old = PathBuf::from(&row.bundle_path);
    let new = app
        .bundles_dir()
        .join(format!("{}-{}.efb", row.digest, signed.signatures.len()));
    // The payloads follow the header; their length is what the manifest lists.
    let manifest: edgefleet_protocol::manifest::Manifest =
        codec::decode("manifest", &signed.body, codec::MAX_MANIFEST_BYTES)
            .map_err(ApiError::internal)?;
    let payload_len = manifest.payload_bytes();
    {
        let (signed, old, new) = (signed.clone(), old.clone(), new.clone());
        tokio::task::spawn_blocking(move || rewrite_bundle(&signed, &old, payload_len, &new))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
    }
    let size = std::fs::metadata(&new).map_err(ApiError::internal)?.len();
    let audit = AuditEntry::new(
        caller.actor(),
        "model.sign",
        format!("model:{}", row.digest),
        json!({"added": added, "signatures": signed.signatures.len()}),
    );
    app.store
        .update_signatures(
            app.now_ms(),
            &row.digest,
            signed.encode(),
            signed.signatures.len() as i64,
            new.display().to_string(),
            size as i64,
            audit,
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "model vanished")
            }
            other => other.into(),
        })?;
    let row = app.store.get_model(&row.digest).await?;
    Ok(axum::Json(model_json(&app, &row, None)))
}

fn rewrite_bundle(
    signed: &Signed,
    old: &FsPath,
    payload_len: u64,
    new: &FsPath,
) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let header = edgefleet_protocol::bundle::bundle_header(&signed.encode())?;
    let mut src = std::fs::File::open(old)?;
    let total = src.metadata()?.len();
    src.seek(SeekFrom::Start(total - payload_len))?;
    crate::fsutil::write_atomic_with(new, crate::fsutil::PUBLIC_MODE, |out| {
        out.write_all(&header)?;
        let copied = std::io::copy(&mut (&mut src).take(payload_len), out)?;
        anyhow::ensure!(
            copied == payload_len,
            "the stored bundle is shorter than expected"
        );
        Ok(())
    })
}
