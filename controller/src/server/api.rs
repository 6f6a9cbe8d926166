//! The admin HTTP API, `/api/v1` (documented in `controller/openapi.json`, served at
//! `/api/v1/openapi.json`), plus `/metrics` and `/healthz`. Every handler starts by checking the
//! caller's token and role ([`authorize`]); errors are `{"error": {"code", "message"}}`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use edgefleet_protocol::assignment::{AssignedModel, Assignment};
use edgefleet_protocol::{DeviceId, ModelName, ModelVersion, Sha256Digest, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::audit::{self, AuditEntry};
use super::auth::{self, Caller, Role};
use super::store::{self, StoreError};

/// How long an assignment stays valid; the controller re-issues well before.
pub const ASSIGNMENT_TTL_MS: u64 = 24 * 3600 * 1000;
/// JSON request bodies (model uploads have their own limit).
const JSON_LIMIT: usize = 64 * 1024;

pub static OPENAPI: &str = include_str!("../../openapi.json");

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the controller hit an internal error; see its log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            StoreError::Conflict(msg) => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            StoreError::Refused(msg) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", msg)
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Checks the bearer token, its role against `min`, and the caller's rate limit.
pub async fn authorize(app: &App, headers: &HeaderMap, min: Role) -> ApiResult<Caller> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing `Authorization: Bearer efk_…` header; log in with `edgefleet login`",
            )
        })?;
    let invalid = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the API token is not valid (mistyped, revoked, or from another controller)",
        )
    };
    if !auth::well_formed(secret) {
        return Err(invalid());
    }
    let hash = auth::hash_secret(secret);
    if let Err(retry) = app.limits.take(&hash, Instant::now()) {
        app.metrics.rate_limited();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests for this token; retry in {retry} s"),
        ));
    }
    let row = app.store.find_api_token(&hash).await?.ok_or_else(invalid)?;
    if row.revoked_at.is_some() {
        return Err(invalid());
    }
    let role: Role = row.role.parse().map_err(ApiError::internal)?;
    if role < min {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs the {} role; token {:?} has {}",
                min.as_str(),
                row.name,
                role.as_str()
            ),
        ));
    }
    Ok(Caller {
        token_id: row.id,
        name: row.name,
        role,
    })
}

pub fn router(app: Arc<App>) -> Router {
    let metrics = app.metrics.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route(
            "/api/v1/enroll-tokens",
            post(create_enroll_token).get(list_enroll_tokens),
        )
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/reports", get(device_reports))
        .route("/api/v1/devices/{id}/labels", put(set_labels))
        .route("/api/v1/devices/{id}/assign", post(assign))
        .route("/api/v1/devices/{id}/revoke", post(revoke_device))
        .merge(super::rollouts::routes())
        .route("/api/v1/audit", get(audit_export))
        .route("/api/v1/audit/verify", get(audit_verify))
        .merge(super::registry::routes())
        .merge(super::capture::routes())
        .merge(super::drift::api::routes())
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .layer(axum::middleware::from_fn(move |req, next| {
            let metrics = metrics.clone();
            count_requests(metrics, req, next)
        }))
        .with_state(app)
}

async fn count_requests(
    metrics: Arc<super::metrics::Metrics>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    metrics.http(&route, response.status().as_u16());
    response
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics_handler(State(app): State<Arc<App>>) -> ApiResult<impl IntoResponse> {
    let devices = app.store.list_devices().await?;
    let online = devices
        .iter()
        .filter(|d| d.online && d.revoked_at.is_none())
        .count();
    let enrolled = devices.iter().filter(|d| d.revoked_at.is_none()).count();
    let gauges = [
        (
            "edgefleet_devices_enrolled",
            "Enrolled, unrevoked devices.",
            enrolled as f64,
        ),
        (
            "edgefleet_devices_online",
            "Devices whose last status said online.",
            online as f64,
        ),
    ];
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&gauges),
    ))
}

// ---- API tokens ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

fn check_name(what: &str, name: &str) -> ApiResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(ApiError::bad_request(format!(
            "{what} {name:?} must be 1–64 letters, digits, '-', '_', '.' or '@'"
        )));
    }
    Ok(())
}

pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<T> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(format!("unreadable JSON body: {}", e.body_text())))
}

async fn create_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Admin).await?;
    let req = json_body(body)?;
    check_name("token name", &req.name)?;
    let role: Role = req.role.parse().map_err(ApiError::bad_request)?;
    let secret = auth::new_secret();
    let now = app.now_ms();
    let row = store::ApiTokenRow {
        id: auth::new_id("tok"),
        name: req.name.clone(),
        role: role.as_str().into(),
        created_by: caller.actor(),
        created_at: now,
        revoked_at: None,
    };
    let audit = AuditEntry::new(
        caller.actor(),
        "token.create",
        format!("token:{}", row.name),
        json!({"id": row.id, "role": row.role}),
    );
    app.store
        .create_api_token(now, &row, &auth::hash_secret(&secret), audit)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": row.id, "name": row.name, "role": row.role, "token": secret})),
    ))
}

async fn list_tokens(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Admin).await?;
    Ok(Json(json!({"tokens": app.store.list_api_tokens().await?})))
}

async fn revoke_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Admin).await?;
    if caller.token_id == id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "a token cannot revoke itself; use another admin token",
        ));
    }
    let audit = AuditEntry::new(
        caller.actor(),
        "token.revoke",
        format!("token:{id}"),
        json!({}),
    );
    app.store.revoke_api_token(app.now_ms(), &id, audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- enrollment tokens ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollToken {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Seconds until the token expires (default one day, at most 30 days).
    #[serde(default)]
    expires_in_s: Option<u64>,
}

fn check_labels(labels: &BTreeMap<String, String>) -> ApiResult<()> {
    if labels.len() > 32 {
        return Err(ApiError::bad_request("at most 32 labels per device"));
    }
    for (k, v) in labels {
        check_name("label key", k)?;
        if v.len() > 128 || v.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "label {k}: the value must be at most 128 printable characters"
            )));
        }
    }
    Ok(())
}

async fn create_enroll_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<NewEnrollToken>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let req = json_body(body)?;
    check_labels(&req.labels)?;
    let ttl = req.expires_in_s.unwrap_or(86_400);
    if ttl == 0 || ttl > 30 * 86_400 {
        return Err(ApiError::bad_request(
            "expires_in_s must be between 1 and 2592000 (30 days)",
        ));
    }
    let now = app.now_ms();
    let secret = auth::new_secret();
    let row = store::EnrollTokenRow {
        id: auth::new_id("enr"),
        labels: serde_json::to_value(&req.labels).map_err(ApiError::internal)?,
        created_by: caller.actor(),
        created_at: now,
        expires_at: now + (ttl as i64) * 1000,
        used_at: None,
        used_by: None,
    };
    let audit = AuditEntry::new(
        caller.actor(),
        "enroll_token.create",
        format!("enroll_token:{}", row.id),
        json!({"labels": row.labels, "expires_at": row.expires_at}),
    );
    app.store
        .create_enroll_token(now, &row, &auth::hash_secret(&secret), audit)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": row.id,
            "token": secret,
            "labels": row.labels,
            "expires_at": row.expires_at,
            "enroll_url": app.device_url,
        })),
    ))
}

async fn list_enroll_tokens(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Operator).await?;
    Ok(Json(
        json!({"enroll_tokens": app.store.list_enroll_tokens().await?}),
    ))
}

// ---- devices ----

#[derive(Debug, Deserialize)]
struct DeviceFilter {
    /// `key=value`: only devices with this label.
    label: Option<String>,
}

async fn list_devices(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(filter): Query<DeviceFilter>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let wanted = match &filter.label {
        Some(l) => Some(l.split_once('=').ok_or_else(|| {
            ApiError::bad_request(format!("label filter {l:?} must be key=value"))
        })?),
        None => None,
    };
    let devices: Vec<_> = app
        .store
        .list_devices()
        .await?
        .into_iter()
        .filter(|d| match wanted {
            Some((k, v)) => d.labels.get(k).and_then(Value::as_str) == Some(v),
            None => true,
        })
        .collect();
    Ok(Json(json!({"devices": devices})))
}

pub(crate) fn device_id(id: &str) -> ApiResult<DeviceId> {
    DeviceId::new(id).map_err(|e| ApiError::bad_request(format!("device id {id:?}: {e}")))
}

async fn show_device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    device_id(&id)?;
    let device = app.store.get_device(&id).await?;
    let telemetry = app.store.recent_reports(&id, Some("telemetry"), 1).await?;
    let events = app.store.recent_reports(&id, Some("event"), 20).await?;
    let mut models = serde_json::Map::new();
    for (slot, digest) in [
        ("active", &device.active_digest),
        ("previous", &device.previous_digest),
        ("shadow", &device.shadow_digest),
    ] {
        let value = match digest {
            Some(d) => match app.store.get_model(d).await {
                Ok(m) => {
                    json!({"digest": d, "name": m.name, "version": m.version, "release": m.release})
                }
                Err(StoreError::NotFound(_)) => json!({"digest": d}),
                Err(e) => return Err(e.into()),
            },
            None => Value::Null,
        };
        models.insert(slot.into(), value);
    }
    Ok(Json(json!({
        "device": device,
        "models": models,
        "last_telemetry": telemetry.into_iter().next(),
        "events": events,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    kind: Option<String>,
    limit: Option<i64>,
}

/// A device's stored reports, newest first: each (device, seq) once, as ingested.
async fn device_reports(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    device_id(&id)?;
    if let Some(kind) = &q.kind
        && !["telemetry", "event", "capture"].contains(&kind.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "report kind {kind:?} is unknown; use telemetry, event or capture"
        )));
    }
    app.store.get_device(&id).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let reports = app
        .store
        .recent_reports(&id, q.kind.as_deref(), limit)
        .await?;
    Ok(Json(json!({"device": id, "reports": reports})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Labels {
    labels: BTreeMap<String, String>,
}

async fn set_labels(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Labels>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let device = device_id(&id)?;
    let req = json_body(body)?;
    check_labels(&req.labels)?;
    let labels = serde_json::to_value(&req.labels).map_err(ApiError::internal)?;
    let audit = AuditEntry::new(
        caller.actor(),
        "device.label",
        format!("device:{id}"),
        json!({"labels": labels}),
    );
    app.store
        .set_labels(app.now_ms(), &id, labels.clone(), audit)
        .await?;
    app.rollouts.device_changed(device).await;
    Ok(Json(json!({"id": id, "labels": labels})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// The model to run: its manifest digest, or `name@version`; `null` runs no model.
    pub model: Option<String>,
    /// A model to run in shadow on copies of live inputs.
    #[serde(default)]
    pub shadow: Option<String>,
    /// An explicit rollback: the device may install a lower release than it has seen.
    #[serde(default)]
    pub rollback: bool,
}

/// The registered model named by its manifest digest or `name@version`.
pub async fn find_model(app: &App, reference: &str) -> ApiResult<store::ModelRow> {
    match reference.split_once('@') {
        Some((name, version)) => Ok(app.store.find_model(name, version).await?),
        None => Ok(app.store.get_model(reference).await?),
    }
}

/// Resolves `digest` or `name@version` to a registered, fully signed model.
pub async fn resolve_model(app: &App, reference: &str) -> ApiResult<store::ModelRow> {
    if !reference.contains('@') {
        Sha256Digest::from_str(reference).map_err(|_| {
            ApiError::bad_request(format!(
                "model {reference:?}: give a manifest digest (64 hex digits) or name@version"
            ))
        })?;
    }
    let model = find_model(app, reference).await?;
    let need = app.keys.release_threshold() as i64;
    if model.signatures < need {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "awaiting_signatures",
            format!(
                "model {} {} has {} of the {need} release signatures it needs; add them with `edgefleet bundle sign` and `edgefleet model add-signature`",
                model.name, model.version, model.signatures
            ),
        ));
    }
    Ok(model)
}

pub(crate) fn assigned(app: &App, model: &store::ModelRow) -> ApiResult<AssignedModel> {
    Ok(AssignedModel {
        name: ModelName::new(&model.name).map_err(ApiError::internal)?,
        version: ModelVersion::new(&model.version).map_err(ApiError::internal)?,
        release: model.release as u64,
        manifest_digest: Sha256Digest::from_str(&model.digest).map_err(ApiError::internal)?,
        bundle_url: format!("{}/api/v1/bundles/{}", app.device_url, model.digest),
        bundle_size: model.bundle_size as u64,
    })
}

/// The JSON summary stored next to a signed assignment (what `GET /devices/{id}` shows).
pub(crate) fn assignment_summary(a: &Assignment) -> Value {
    let model = |m: &Option<AssignedModel>| {
        m.as_ref().map(|m| {
            json!({"name": m.name.as_str(), "version": m.version.as_str(), "release": m.release, "digest": m.manifest_digest.to_hex()})
        })
    };
    json!({
        "seq": a.seq,
        "issued_at": a.issued_at.as_millis(),
        "expires": a.expires.as_millis(),
        "rollback": a.rollback,
        "active": model(&a.active),
        "shadow": model(&a.shadow),
        "capture": a.capture.is_some(),
    })
}

/// Signs `template` under the device's next sequence number, issued now and valid for
/// [`ASSIGNMENT_TTL_MS`], and stores it with `audit` in one transaction. With `replaces`, the
/// write is refused if the device's sequence has moved past that number meanwhile (a refresh must
/// never overwrite a newer assignment).
pub(crate) async fn store_assignment(
    app: &App,
    template: Assignment,
    replaces: Option<u64>,
    audit: AuditEntry,
) -> Result<Vec<u8>, StoreError> {
    let now = app.clock.now();
    let device = template.device.to_string();
    let build = signer(app, now, template, replaces);
    app.store
        .assign(now.as_millis() as i64, &device, build, audit)
        .await
}

/// Signs `template` as the assignment numbered `seq` (the store picks it inside its
/// transaction), issued at `now` and valid for [`ASSIGNMENT_TTL_MS`]; returns the signed bytes and
/// the summary stored beside them. With `replaces`, refuses any `seq` but the next one.
pub(crate) fn signer(
    app: &App,
    now: Timestamp,
    template: Assignment,
    replaces: Option<u64>,
) -> impl FnOnce(u64) -> Result<(Vec<u8>, Value), String> + Send + 'static {
    let keys = app.keys.clone();
    move |seq: u64| {
        if let Some(old) = replaces
            && seq != old + 1
        {
            return Err(format!(
                "assignment {old} was superseded by {} before it could be refreshed",
                seq - 1
            ));
        }
        let assignment = Assignment {
            seq,
            issued_at: now,
            expires: Timestamp(now.as_millis() + ASSIGNMENT_TTL_MS),
            ..template
        };
        Ok((
            assignment.sign(keys.controller_key()),
            assignment_summary(&assignment),
        ))
    }
}

/// Signs, stores and publishes `device`'s next assignment. Shared with the rollout engine.
pub async fn issue_assignment(
    app: &App,
    actor: &str,
    device: &DeviceId,
    active: Option<&store::ModelRow>,
    shadow: Option<&store::ModelRow>,
    rollback: bool,
) -> ApiResult<Value> {
    let template = Assignment {
        device: device.clone(),
        seq: 0,
        issued_at: Timestamp(0),
        expires: Timestamp(0),
        rollback,
        active: active.map(|m| assigned(app, m)).transpose()?,
        shadow: shadow.map(|m| assigned(app, m)).transpose()?,
        rollout: None,
        capture: super::capture::device_settings(&app.store, device.as_str()).await?,
    };
    let summary = assignment_summary(&template);
    let audit = AuditEntry::new(
        actor,
        "device.assign",
        format!("device:{device}"),
        json!({"active": summary["active"], "shadow": summary["shadow"], "rollback": rollback}),
    );
    let signed = store_assignment(app, template, None, audit).await?;
    publish_assignment(app, device, signed).await
}

/// Publishes `device`'s newly stored assignment (retained) and returns its stored summary.
pub(crate) async fn publish_assignment(
    app: &App,
    device: &DeviceId,
    signed: Vec<u8>,
) -> ApiResult<Value> {
    app.publisher
        .assignment(device, signed)
        .await
        .map_err(ApiError::internal)?;
    let row = app.store.get_device(device.as_str()).await?;
    Ok(row.assignment.unwrap_or(Value::Null))
}

async fn assign(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<AssignRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let device = device_id(&id)?;
    let req = json_body(body)?;
    let active = match &req.model {
        Some(r) => Some(resolve_model(&app, r).await?),
        None => None,
    };
    let shadow = match &req.shadow {
        Some(r) => Some(resolve_model(&app, r).await?),
        None => None,
    };
    let row = app.store.get_device(&id).await?;
    if let Some(m) = &active {
        let arch = m.manifest["target"]["arch"].as_str().unwrap_or("any");
        if arch != "any" && arch != row.arch {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong_arch",
                format!(
                    "model {} {} targets {arch}, device {id} is {}",
                    m.name, m.version, row.arch
                ),
            ));
        }
    }
    let assignment = issue_assignment(
        &app,
        &caller.actor(),
        &device,
        active.as_ref(),
        shadow.as_ref(),
        req.rollback,
    )
    .await?;
    Ok(Json(json!({"device": id, "assignment": assignment})))
}

async fn revoke_device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Admin).await?;
    let device = device_id(&id)?;
    let audit = AuditEntry::new(
        caller.actor(),
        "device.revoke",
        format!("device:{id}"),
        json!({}),
    );
    app.store.revoke_device(app.now_ms(), &id, audit).await?;
    super::revocation::cut_off(&app, &device).await;
    Ok(Json(json!({"device": id, "revoked": true})))
}

// ---- audit ----

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: i64,
    limit: Option<i64>,
}

async fn audit_export(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Admin).await?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let rows = app.store.audit_rows(q.after, limit).await?;
    let mut out = String::new();
    for row in rows {
        out.push_str(&serde_json::to_string(&row).map_err(ApiError::internal)?);
        out.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out))
}

async fn audit_verify(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = app.store.audit_rows(after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    match audit::verify(all, None) {
        Ok(head) => Ok(Json(json!({"ok": true, "head": head}))),
        Err(broken) => Ok(Json(json!({
            "ok": false,
            "break": broken,
            "message": broken.to_string(),
        }))),
    }
}
