//! The drift service's tables: policies per model name, detector state per (model version,
//! scope), drift events, and retraining requests (one per drift episode).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{AuditEntry, Result, Store, StoreError, append_audits, json_col, opt_json_col};

/// One detector's persisted state.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorRow {
    pub model_digest: String,
    /// The scope's JSON (`{"device":"d1"}`, `{"group":{…}}`, `"fleet"`).
    pub scope: String,
    pub model_name: String,
    pub detector: serde_json::Value,
    pub chart: Option<serde_json::Value>,
    /// The drift event that opened the current episode (while drifting).
    pub episode: Option<String>,
    pub drifting_since: Option<i64>,
    /// The last window's evaluation, as the status views show it.
    pub evaluation: Option<serde_json::Value>,
    pub evaluated_at: Option<i64>,
    pub updated_at: i64,
}

/// A recorded detection, clearance or performance change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DriftEventRow {
    pub id: String,
    pub at: i64,
    pub model_name: String,
    pub model_digest: String,
    pub scope: serde_json::Value,
    pub kind: String,
    pub details: serde_json::Value,
}

/// A retraining request and how it went.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetrainRow {
    pub event: String,
    pub model_name: String,
    pub model_digest: String,
    pub scope: serde_json::Value,
    /// `pending` (committed, being fired), `sent`, `failed`, `interrupted`.
    pub status: String,
    pub requested_at: i64,
    pub finished_at: Option<i64>,
    pub detail: Option<String>,
}

/// What one batch of windows changed, committed in one transaction.
#[derive(Debug, Clone, Default)]
pub struct DriftChange {
    pub detectors: Vec<DetectorRow>,
    pub events: Vec<DriftEventRow>,
    pub retrains: Vec<RetrainRow>,
    pub audits: Vec<AuditEntry>,
}

fn detector_row(row: &AnyRow) -> Result<DetectorRow> {
    Ok(DetectorRow {
        model_digest: row.try_get("model_digest")?,
        scope: row.try_get("scope")?,
        model_name: row.try_get("model_name")?,
        detector: json_col(row, "detector")?,
        chart: opt_json_col(row, "chart")?,
        episode: row.try_get("episode")?,
        drifting_since: row.try_get("drifting_since")?,
        evaluation: opt_json_col(row, "evaluation")?,
        evaluated_at: row.try_get("evaluated_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn event_row(row: &AnyRow) -> Result<DriftEventRow> {
    Ok(DriftEventRow {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        model_name: row.try_get("model_name")?,
        model_digest: row.try_get("model_digest")?,
        scope: json_col(row, "scope")?,
        kind: row.try_get("kind")?,
        details: json_col(row, "details")?,
    })
}

fn retrain_row(row: &AnyRow) -> Result<RetrainRow> {
    Ok(RetrainRow {
        event: row.try_get("event")?,
        model_name: row.try_get("model_name")?,
        model_digest: row.try_get("model_digest")?,
        scope: json_col(row, "scope")?,
        status: row.try_get("status")?,
        requested_at: row.try_get("requested_at")?,
        finished_at: row.try_get("finished_at")?,
        detail: row.try_get("detail")?,
    })
}

const DETECTOR_COLUMNS: &str = "model_digest, scope, model_name, detector, chart, episode, \
     drifting_since, evaluation, evaluated_at, updated_at";
const EVENT_COLUMNS: &str = "id, at, model_name, model_digest, scope, kind, details";
const RETRAIN_COLUMNS: &str =
    "event, model_name, model_digest, scope, status, requested_at, finished_at, detail";

impl Store {
    /// Stores `model`'s drift policy (JSON), audited in the same transaction.
    pub async fn put_drift_policy(
        &self,
        now: i64,
        model: &str,
        policy: &serde_json::Value,
        actor: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (model, policy, actor) = (model.to_owned(), policy.to_string(), actor.to_owned());
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                sqlx::query("DELETE FROM drift_policies WHERE model = $1")
                    .bind(&model)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO drift_policies (model, policy, updated_by, updated_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&model)
                .bind(&policy)
                .bind(&actor)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Every stored policy: (model name, policy JSON, updated by, updated at).
    pub async fn drift_policies(&self) -> Result<Vec<(String, serde_json::Value, String, i64)>> {
        sqlx::query("SELECT model, policy, updated_by, updated_at FROM drift_policies")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("model")?,
                    json_col(r, "policy")?,
                    r.try_get("updated_by")?,
                    r.try_get("updated_at")?,
                ))
            })
            .collect()
    }

    pub async fn drift_detectors(&self) -> Result<Vec<DetectorRow>> {
        let sql =
            format!("SELECT {DETECTOR_COLUMNS} FROM drift_detectors ORDER BY model_digest, scope");
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(detector_row)
            .collect()
    }

    /// The latest `limit` events of `model` (a name; all models when `None`), newest first.
    pub async fn drift_events(
        &self,
        model: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DriftEventRow>> {
        let rows = match model {
            Some(model) => {
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM drift_events WHERE model_name = $1 \
                     ORDER BY at DESC, id DESC LIMIT $2"
                );
                sqlx::query(&sql)
                    .bind(model)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM drift_events ORDER BY at DESC, id DESC LIMIT $1"
                );
                sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(event_row).collect()
    }

    pub async fn drift_event(&self, id: &str) -> Result<DriftEventRow> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM drift_events WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| event_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("drift event {id:?}")))
    }

    /// Retraining requests, newest first (of `model` only, when given).
    pub async fn retrain_requests(&self, model: Option<&str>) -> Result<Vec<RetrainRow>> {
        let sql = format!(
            "SELECT {RETRAIN_COLUMNS} FROM retrain_requests ORDER BY requested_at DESC, event DESC"
        );
        let mut out = Vec::new();
        for row in sqlx::query(&sql).fetch_all(&self.pool).await?.iter() {
            let row = retrain_row(row)?;
            if model.is_none_or(|m| m == row.model_name) {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Commits a batch's detector states, events, retraining requests and audit rows together.
    pub async fn save_drift(&self, now: i64, change: DriftChange) -> Result<()> {
        let audited = !change.audits.is_empty();
        self.transaction(now, audited, move |tx| {
            Box::pin(async move {
                for d in &change.detectors {
                    sqlx::query(
                        "INSERT INTO drift_detectors (model_digest, scope, model_name, detector, \
                         chart, episode, drifting_since, evaluation, evaluated_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                         ON CONFLICT (model_digest, scope) DO UPDATE SET \
                         detector = excluded.detector, chart = excluded.chart, \
                         episode = excluded.episode, drifting_since = excluded.drifting_since, \
                         evaluation = excluded.evaluation, evaluated_at = excluded.evaluated_at, \
                         updated_at = excluded.updated_at",
                    )
                    .bind(&d.model_digest)
                    .bind(&d.scope)
                    .bind(&d.model_name)
                    .bind(d.detector.to_string())
                    .bind(d.chart.as_ref().map(|c| c.to_string()))
                    .bind(&d.episode)
                    .bind(d.drifting_since)
                    .bind(d.evaluation.as_ref().map(|e| e.to_string()))
                    .bind(d.evaluated_at)
                    .bind(d.updated_at)
                    .execute(&mut **tx)
                    .await?;
                }
                for e in &change.events {
                    sqlx::query(
                        "INSERT INTO drift_events (id, at, model_name, model_digest, scope, kind, \
                         details) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&e.id)
                    .bind(e.at)
                    .bind(&e.model_name)
                    .bind(&e.model_digest)
                    .bind(e.scope.to_string())
                    .bind(&e.kind)
                    .bind(e.details.to_string())
                    .execute(&mut **tx)
                    .await?;
                }
                for r in &change.retrains {
                    sqlx::query(
                        "INSERT INTO retrain_requests (event, model_name, model_digest, scope, \
                         status, requested_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&r.event)
                    .bind(&r.model_name)
                    .bind(&r.model_digest)
                    .bind(r.scope.to_string())
                    .bind(&r.status)
                    .bind(r.requested_at)
                    .execute(&mut **tx)
                    .await?;
                }
                append_audits(tx, &change.audits, now).await?;
                Ok(((), None))
            })
        })
        .await
    }

    /// Records how a retraining request ended, audited in the same transaction.
    pub async fn finish_retrain(
        &self,
        now: i64,
        event: &str,
        status: &str,
        detail: &str,
        audit: AuditEntry,
    ) -> Result<()> {
        let (event, status, detail) = (event.to_owned(), status.to_owned(), detail.to_owned());
        self.write(now, Some(audit), move |tx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE retrain_requests SET status = $1, finished_at = $2, detail = $3 \
                     WHERE event = $4",
                )
                .bind(&status)
                .bind(now)
                .bind(&detail)
                .bind(&event)
                .execute(&mut **tx)
                .await?;
                Ok(())
            })
        })
        .await
    }
}
