//! The drift API: a model's policy (`/api/v1/models/{name}/drift-policy`), the status of every
//! watched (model version, scope) (`/api/v1/drift`), and one model's per-feature evidence and
//! events (`/api/v1/drift/{model}`). Read from the store, so every replica answers the same.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::policy::DriftPolicy;
use crate::server::App;
use crate::server::api::{ApiError, ApiResult, authorize, find_model, json_body};
use crate::server::audit::AuditEntry;
use crate::server::auth::Role;
use crate::server::store::DetectorRow;

/// Events a model's view lists.
const EVENTS_SHOWN: i64 = 50;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        // `{digest}` names the segment as the registry's routes do; here it holds a model name.
        .route(
            "/api/v1/models/{digest}/drift-policy",
            get(show_policy).put(put_policy),
        )
        .route("/api/v1/drift", get(status))
        .route("/api/v1/drift/{model}", get(show))
}

async fn stored_policy(app: &App, model: &str) -> ApiResult<Option<(Value, String, i64)>> {
    Ok(app
        .store
        .drift_policies()
        .await?
        .into_iter()
        .find(|(name, ..)| name == model)
        .map(|(_, policy, by, at)| (policy, by, at)))
}

async fn show_policy(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let answer = match stored_policy(&app, &model).await? {
        Some((policy, by, at)) => {
            json!({"model": model, "policy": policy, "stored": true, "updated_by": by, "updated_at": at})
        }
        None => json!({"model": model, "policy": DriftPolicy::default(), "stored": false}),
    };
    Ok(Json(answer))
}

/// Stores a policy. Admin only: it names commands the controller runs and files it reads.
async fn put_policy(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(model): Path<String>,
    body: Result<Json<DriftPolicy>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Admin).await?;
    let policy = json_body(body)?;
    edgefleet_protocol::ModelName::new(&model)
        .map_err(|e| ApiError::bad_request(format!("model name {model:?}: {e}")))?;
    policy.validate().map_err(|message| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
            message,
        )
    })?;
    let stored = serde_json::to_value(&policy).map_err(ApiError::internal)?;
    let audit = AuditEntry::new(
        caller.actor(),
        "drift.policy",
        format!("model-name:{model}"),
        json!({
            "policy": stored,
        }),
    );
    app.store
        .put_drift_policy(app.now_ms(), &model, &stored, &caller.actor(), audit)
        .await?;
    app.drift.policy_changed(model.clone(), policy).await;
    Ok(Json(
        json!({"model": model, "policy": stored, "stored": true, "updated_by": caller.actor()}),
    ))
}

fn is_drifting(row: &DetectorRow) -> bool {
    row.episode.is_some()
}

/// The summary of one watched (model version, scope).
fn scope_summary(row: &DetectorRow, versions: &std::collections::HashMap<String, String>) -> Value {
    let scope: Value = serde_json::from_str(&row.scope).unwrap_or(Value::Null);
    let scope_text = serde_json::from_value::<crate::drift::Scope>(scope.clone())
        .map(|s| s.to_string())
        .unwrap_or_else(|_| row.scope.clone());
    let evaluation = row.evaluation.clone().unwrap_or(Value::Null);
    let chart_degraded = row
        .chart
        .as_ref()
        .and_then(|c| serde_json::from_value::<crate::drift::PerformanceChart>(c.clone()).ok())
        .map(|c| c.is_degraded());
    json!({
        "model": {"name": row.model_name, "version": versions.get(&row.model_digest), "digest": row.model_digest},
        "scope": scope,
        "scope_text": scope_text,
        "drifting": is_drifting(row),
        "since": row.drifting_since,
        "event": row.episode,
        "last_evaluated_at": row.evaluated_at,
        "windows": evaluation["window"],
        "score": evaluation["score"],
        "rows": evaluation["rows"],
        "prediction_drifting": evaluation["prediction_drifting"],
        "performance_degraded": chart_degraded,
    })
}

async fn versions(app: &App) -> ApiResult<std::collections::HashMap<String, String>> {
    Ok(app
        .store
        .list_models()
        .await?
        .into_iter()
        .map(|m| (m.digest, m.version))
        .collect())
}

async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let versions = versions(&app).await?;
    let rows = app.store.drift_detectors().await?;
    let scopes: Vec<Value> = rows.iter().map(|r| scope_summary(r, &versions)).collect();
    let retrains = app.store.retrain_requests(None).await?;
    Ok(Json(json!({"scopes": scopes, "retrains": retrains})))
}

/// `/api/v1/drift/{model}`: a name (every version), `name@version` or a manifest digest.
async fn show(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let (name, digest) = if model.contains('@') || model.len() == 64 {
        let row = find_model(&app, &model).await?;
        (row.name, Some(row.digest))
    } else {
        (model.clone(), None)
    };
    let versions = versions(&app).await?;
    let rows: Vec<DetectorRow> = app
        .store
        .drift_detectors()
        .await?
        .into_iter()
        .filter(|r| r.model_name == name && digest.as_ref().is_none_or(|d| d == &r.model_digest))
        .collect();
    let scopes: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut summary = scope_summary(row, &versions);
            let evaluation = row.evaluation.clone().unwrap_or(Value::Null);
            let features = |key: &str| -> Vec<Value> {
                evaluation[key]
                    .as_array()
                    .map(|all| all.iter().map(feature_row).collect())
                    .unwrap_or_default()
            };
            summary["features"] = json!(features("features"));
            summary["outputs"] = json!(features("outputs"));
            summary
        })
        .collect();
    let events: Vec<Value> = app
        .store
        .drift_events(Some(&name), EVENTS_SHOWN)
        .await?
        .into_iter()
        .filter(|e| digest.as_ref().is_none_or(|d| d == &e.model_digest))
        .map(|e| {
            let scope_text = serde_json::from_value::<crate::drift::Scope>(e.scope.clone())
                .map(|s| s.to_string())
                .unwrap_or_default();
            json!({
                "id": e.id, "at": e.at, "kind": e.kind, "model_digest": e.model_digest,
                "version": versions.get(&e.model_digest),
                "scope": e.scope, "scope_text": scope_text, "details": e.details,
            })
        })
        .collect();
    let retrains = app.store.retrain_requests(Some(&name)).await?;
    let policy = stored_policy(&app, &name).await?.map(|(p, ..)| p);
    Ok(Json(json!({
        "model": name, "digest": digest, "policy": policy,
        "scopes": scopes, "events": events, "retrains": retrains,
    })))
}

/// One feature's evidence as the tables show it.
fn feature_row(evidence: &Value) -> Value {
    let state = &evidence["state"];
    let state_text = if state.get("drifting").is_some() {
        "drifting"
    } else {
        "stable"
    };
    json!({
        "name": evidence["name"],
        "p": evidence["chi2"]["p_value"],
        "threshold": evidence["threshold"],
        "psi": evidence["psi"],
        "js": evidence["js"],
        "n": evidence["n"],
        "flagged": evidence["flagged"],
        "state": state_text,
        "top_bins": evidence["top_bins"],
    })
}
