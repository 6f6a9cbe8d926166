//! How the API shows a rollout or an experiment: plan, progress, gate values or test results,
//! and the records the audit log holds about it.

use serde_json::{Value, json};

use crate::rollout::engine::Rollout;
use crate::rollout::experiment::{self, Experiment};
use crate::server::audit::AuditRecord;
use crate::server::store::{ModelRow, RolloutRow};

pub fn model_json(row: &ModelRow) -> Value {
    json!({"digest": row.digest, "name": row.name, "version": row.version, "release": row.release})
}

pub fn rollout_json(
    row: &RolloutRow,
    engine: &Rollout,
    version: i64,
    candidate: &ModelRow,
    baseline: &ModelRow,
    records: &[AuditRecord],
) -> Value {
    let records = records_json(records);
    json!({
        "id": row.id,
        "kind": row.kind,
        "candidate": model_json(candidate),
        "baseline": model_json(baseline),
        "selector": row.selector,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "version": version,
        "next_deadline": engine.next_deadline().map(|t| t.0),
        "plan": super::plan::plan_json(&engine.spec),
        "progress": engine.progress(),
        "records": records,
    })
}

pub fn experiment_json(
    row: &RolloutRow,
    engine: &Experiment,
    version: i64,
    a: &ModelRow,
    b: &ModelRow,
    records: &[AuditRecord],
) -> Value {
    json!({
        "id": row.id,
        "kind": row.kind,
        "a": model_json(a),
        "b": model_json(b),
        "selector": row.selector,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "version": version,
        "next_deadline": engine.next_deadline().map(|t| t.0),
        "progress": experiment::progress(engine),
        "records": records_json(records),
    })
}

fn records_json(records: &[AuditRecord]) -> Vec<Value> {
    records
        .iter()
        .map(|r| {
            let details: Value = serde_json::from_str(&r.details).unwrap_or(Value::Null);
            json!({
                "at": r.at,
                "actor": r.actor,
                "action": r.action,
                "text": details.get("record").cloned().unwrap_or(Value::Null),
                "reason": details.get("reason").cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}
