//! `/api/v1/rollouts`: start a staged rollout, list and show rollouts with their progress and
//! gate values, and the operator's pause, resume, promote, abort and rollback; `/api/v1/experiments`:
//! A/B experiments, their test results, conclude, promote the winner, abort. Every request goes
//! through the rollout driver (`crate::rollout::driver`), which owns their state.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::api::{ApiError, ApiResult, authorize, json_body};
use super::auth::Role;
use crate::rollout::driver::{
    ExperimentRequest, FINISHED, KIND_EXPERIMENT, KIND_ROLLOUT, Operation, StartRequest,
};
use crate::rollout::engine::{Command, Rollout};
use crate::rollout::experiment::{Experiment, ExperimentCommand};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/rollouts", post(start).get(list))
        .route("/api/v1/rollouts/{id}", get(show))
        .route("/api/v1/rollouts/{id}/{action}", post(operate))
        .route(
            "/api/v1/experiments",
            post(start_experiment).get(list_experiments),
        )
        .route("/api/v1/experiments/{id}", get(show))
        .route(
            "/api/v1/experiments/{id}/{action}",
            post(operate_experiment),
        )
}

async fn start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<StartRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let request = json_body(body)?;
    let rollout = app.rollouts.start(request, caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(rollout)))
}

async fn start_experiment(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<ExperimentRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let request = json_body(body)?;
    let experiment = app
        .rollouts
        .start_experiment(request, caller.actor())
        .await?;
    Ok((StatusCode::CREATED, Json(experiment)))
}

async fn list_experiments(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let rows = app.store.list_rollouts().await?;
    let experiments: Vec<Value> = rows
        .iter()
        .filter(|row| row.kind == KIND_EXPERIMENT)
        .map(|row| {
            let progress = serde_json::from_value::<Experiment>(row.state.clone())
                .map(|e| crate::rollout::experiment::progress(&e))
                .unwrap_or(Value::Null);
            json!({
                "id": row.id,
                "a": row.baseline,
                "b": row.candidate,
                "selector": row.selector,
                "phase": row.phase,
                "metric": progress["metric"],
                "winner": progress["verdict"]["winner"],
                "p_value": progress["verdict"]["p_value"],
                "created_by": row.created_by,
                "created_at": row.created_at,
            })
        })
        .collect();
    Ok(Json(json!({ "experiments": experiments })))
}

async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    let rows = app.store.list_rollouts().await?;
    let rollouts: Vec<Value> = rows
        .iter()
        .filter(|row| row.kind == KIND_ROLLOUT)
        .map(|row| {
            let progress = serde_json::from_value::<Rollout>(row.state.clone())
                .map(|engine| serde_json::to_value(engine.progress()).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            json!({
                "id": row.id,
                "kind": row.kind,
                "candidate": row.candidate,
                "baseline": row.baseline,
                "selector": row.selector,
                "phase": row.phase,
                "finished": FINISHED.contains(&row.phase.as_str()),
                "created_by": row.created_by,
                "created_at": row.created_at,
                "updated_at": row.updated_at,
                "members": progress["members"],
                "stage": progress["stage"],
            })
        })
        .collect();
    Ok(Json(json!({ "rollouts": rollouts })))
}

async fn show(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&app, &headers, Role::Viewer).await?;
    Ok(Json(app.rollouts.show(id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperateRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn operate(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Option<Json<OperateRequest>>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    let needs_reason = |what: &str| {
        reason.clone().ok_or_else(|| {
            ApiError::bad_request(format!(
                "give a reason to {what} (`{{\"reason\": \"…\"}}`); it goes into the audit log"
            ))
        })
    };
    if reason.as_ref().is_some_and(|r| r.len() > 1000) {
        return Err(ApiError::bad_request("a reason is at most 1000 bytes"));
    }
    let command = match action.as_str() {
        "pause" => Command::Pause {
            reason: needs_reason("pause")?,
        },
        "approve" => Command::Approve,
        "resume" => Command::Resume,
        "promote" => Command::Promote,
        "abort" => Command::Abort {
            reason: needs_reason("abort")?,
        },
        "rollback" => Command::Rollback {
            reason: needs_reason("roll back")?,
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no rollout action {other:?}; use approve, pause, resume, promote, abort or rollback"
                ),
            ));
        }
    };
    Ok(Json(
        app.rollouts
            .command(id, caller.actor(), Operation::Rollout(command))
            .await?,
    ))
}

async fn operate_experiment(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Option<Json<OperateRequest>>,
) -> ApiResult<impl IntoResponse> {
    let caller = authorize(&app, &headers, Role::Operator).await?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty() && r.len() <= 1000);
    let command = match action.as_str() {
        "conclude" => ExperimentCommand::Conclude,
        "promote" => ExperimentCommand::Promote,
        "abort" => ExperimentCommand::Abort {
            reason: reason.ok_or_else(|| {
                ApiError::bad_request(
                    "give a reason to abort (`{\"reason\": \"…\"}`, at most 1000 bytes); it goes into the audit log",
                )
            })?,
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no experiment action {other:?}; use conclude, promote or abort"),
            ));
        }
    };
    Ok(Json(
        app.rollouts
            .command(id, caller.actor(), Operation::Experiment(command))
            .await?,
    ))
}
