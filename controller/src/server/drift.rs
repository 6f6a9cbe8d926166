//! The drift service: where the pure detectors (`crate::drift`) meet I/O. One task owns every
//! detector; the ingest sends it each newly committed telemetry window ([`DriftHandle::observe`],
//! from the same place and with the same reports the rollout driver sees).
//!
//! For each window it finds the device's scopes (the device, its group for each `group_by`
//! label of the model's policy, the fleet), feeds the detector of each (model version, scope) —
//! built from the manifest's reference features with the policy's settings — and the
//! performance chart where ground truth arrives, then commits in one transaction: the detectors'
//! new state, the drift events (detected, cleared, with the evidence), the retraining requests
//! and their audit rows. After the commit it sends each device scope's per-window score to the
//! rollout driver (`DeviceReport::Drift`, the drift gate's input), posts alerts and fires
//! retraining. A restart loads the detectors and goes on where they were.
//!
//! Retraining fires once per drift episode of a (model version, scope) — a detection opens the
//! episode, its clearance closes it — and at most one request is open per model version: a
//! detection in a second scope while one is open is recorded (`retrain.skipped`) but not fired.
//! Delivery is **at most once**: the request is committed (`pending`, with `retrain.requested`)
//! in the transaction that records the detection, before it is fired; a controller that stops
//! while firing finds it still pending on start, marks it `interrupted` and audits
//! `retrain.failed` instead of firing again, so a retraining job (which registers a model) never
//! runs twice on its own. Failures are audited (`retrain.failed`) and shown in the status.

pub mod api;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::manifest::{Manifest, PredictionKind};
use edgefleet_protocol::messages::{ModelRef, TelemetryWindow};
use edgefleet_protocol::sketch::ReferenceFeature;
use edgefleet_protocol::{DeviceId, ModelName, ModelVersion, Sha256Digest, Timestamp};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use self::policy::{DriftPolicy, ScopeKind};
use super::App;
use super::audit::AuditEntry;
use super::store::{DetectorRow, DriftChange, DriftEventRow, ModelRow, RetrainRow};
use crate::drift::detector::{self, Evaluation};
use crate::drift::performance::{self, ChartConfig, PerformanceChart};
use crate::drift::{DriftDetector, Scope, ScopeWindow, scopes_of};
use crate::rollout::engine::DeviceReport;

/// Who the service's audit rows name.
pub const ACTOR: &str = "drift";

pub(crate) enum Request {
    /// Telemetry windows the ingest committed (new ones only).
    Windows(Vec<(DeviceId, TelemetryWindow)>),
    /// A model's policy was stored.
    Policy {
        model: String,
        policy: Box<DriftPolicy>,
    },
}

/// The way into the drift service; cheap to clone.
#[derive(Debug, Clone)]
pub struct DriftHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Windows(_) => "Windows",
            Request::Policy { .. } => "Policy",
        })
    }
}

impl DriftHandle {
    /// Committed telemetry windows (the ingest calls this after each commit, new ones only).
    pub async fn observe(&self, windows: Vec<(DeviceId, TelemetryWindow)>) {
        if !windows.is_empty() {
            let _ = self.tx.send(Request::Windows(windows)).await;
        }
    }

    pub async fn policy_changed(&self, model: String, policy: DriftPolicy) {
        let _ = self
            .tx
            .send(Request::Policy {
                model,
                policy: Box::new(policy),
            })
            .await;
    }
}

/// The receiving end of the service's queue.
#[derive(Debug)]
pub struct DriftQueue(mpsc::Receiver<Request>);

pub fn channel() -> (DriftHandle, DriftQueue) {
    let (tx, rx) = mpsc::channel(4096);
    (DriftHandle { tx }, DriftQueue(rx))
}

/// Loads the policies and detectors, settles requests a stop interrupted, and serves.
pub fn spawn(app: Arc<App>, DriftQueue(mut rx): DriftQueue) {
    tokio::spawn(async move {
        let mut service = Service {
            app,
            policies: HashMap::new(),
            models: HashMap::new(),
            watches: BTreeMap::new(),
            http: reqwest::Client::new(),
        };
        if let Err(err) = service.load().await {
            tracing::error!(error = %err, "cannot load the drift detectors; they start afresh");
        }
        while let Some(first) = rx.recv().await {
            let mut windows = Vec::new();
            let mut request = Some(first);
            while let Some(next) = request.take() {
                match next {
                    Request::Windows(mut batch) => windows.append(&mut batch),
                    Request::Policy { model, policy } => {
                        service.policies.insert(model, *policy);
                    }
                }
                if windows.len() < 10_000 {
                    request = rx.try_recv().ok();
                }
            }
            if !windows.is_empty() {
                service.handle(windows).await;
            }
        }
    });
}

/// What the service knows of a model version.
#[derive(Debug, Clone)]
struct ModelInfo {
    name: String,
    version: String,
    model: ModelRef,
    reference: Vec<ReferenceFeature>,
    regression: bool,
}

/// One (model version, scope) watched.
#[derive(Debug)]
struct Watch {
    name: String,
    detector: DriftDetector,
    chart: Option<PerformanceChart>,
    /// The drift event that opened the current episode.
    episode: Option<String>,
    drifting_since: Option<i64>,
    /// The retraining request this episode fired (open until the episode clears).
    retrain: Option<String>,
    evaluation: Option<Value>,
    evaluated_at: Option<i64>,
}

type Key = (String, Scope);

struct Service {
    app: Arc<App>,
    policies: HashMap<String, DriftPolicy>,
    /// By manifest digest; `None`: unknown or without reference features (not watched).
    models: HashMap<String, Option<ModelInfo>>,
    watches: BTreeMap<Key, Watch>,
    http: reqwest::Client,
}

/// What a batch leaves to do once it is committed.
#[derive(Default)]
struct After {
    drift_reports: Vec<(DeviceId, DeviceReport)>,
    alerts: Vec<(policy::Alert, String, Value)>,
    retrains: Vec<(policy::Retrain, String, Value)>,
}

fn scope_json(scope: &Scope) -> Value {
    serde_json::to_value(scope).unwrap_or(Value::Null)
}

fn scope_key(scope: &Scope) -> String {
    scope_json(scope).to_string()
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis() as i64
}

impl Service {
    async fn load(&mut self) -> Result<(), super::store::StoreError> {
        let store = self.app.store.clone();
        for (model, policy, _, _) in store.drift_policies().await? {
            match serde_json::from_value::<DriftPolicy>(policy) {
                Ok(policy) => {
                    self.policies.insert(model, policy);
                }
                Err(err) => {
                    tracing::error!(model, %err, "a stored drift policy is unreadable; set it again with `edgefleet drift policy set`")
                }
            }
        }
        for row in store.drift_detectors().await? {
            let scope: Scope = match serde_json::from_str(&row.scope) {
                Ok(scope) => scope,
                Err(err) => {
                    tracing::error!(scope = row.scope, %err, "a stored drift scope is unreadable; its detector starts afresh");
                    continue;
                }
            };
            let detector = match serde_json::from_value::<DriftDetector>(row.detector.clone()) {
                Ok(detector) => detector,
                Err(err) => {
                    tracing::error!(scope = row.scope, %err, "a stored drift detector is unreadable; it starts afresh");
                    continue;
                }
            };
            let chart = row
                .chart
                .clone()
                .and_then(|c| serde_json::from_value::<PerformanceChart>(c).ok());
            self.watches.insert(
                (row.model_digest.clone(), scope),
                Watch {
                    name: row.model_name,
                    detector,
                    chart,
                    episode: row.episode,
                    drifting_since: row.drifting_since,
                    retrain: None,
                    evaluation: row.evaluation,
                    evaluated_at: row.evaluated_at,
                },
            );
        }
        let now = self.app.now_ms();
        for request in store.retrain_requests(None).await? {
            let Ok(scope) = serde_json::from_value::<Scope>(request.scope.clone()) else {
                continue;
            };
            if let Some(watch) = self.watches.get_mut(&(request.model_digest.clone(), scope))
                && watch.episode.as_deref() == Some(request.event.as_str())
            {
                watch.retrain = Some(request.event.clone());
            }
            if request.status == "pending" {
                let detail = "the controller stopped while this retraining request was being fired; it is not fired again (at most once): check whether the job ran, and run it by hand if not";
                let audit = AuditEntry::new(
                    ACTOR,
                    "retrain.failed",
                    format!("drift:{}", request.event),
                    json!({"event": request.event, "model": request.model_name, "scope": request.scope, "status": "interrupted", "error": detail}),
                );
                store
                    .finish_retrain(now, &request.event, "interrupted", detail, audit)
                    .await?;
            }
        }
        Ok(())
    }

    async fn model(&mut self, digest: &Sha256Digest) -> Option<ModelInfo> {
        let hex = digest.to_hex();
        if let Some(known) = self.models.get(&hex) {
            return known.clone();
        }
        let info = match self.app.store.get_model(&hex).await {
            Ok(row) => model_info(&row),
            Err(err) => {
                tracing::debug!(%err, digest = hex, "telemetry for a model the registry does not hold");
                None
            }
        };
        self.models.insert(hex, info.clone());
        info
    }

    async fn handle(&mut self, windows: Vec<(DeviceId, TelemetryWindow)>) {
        let now = self.app.clock.now();
        let labels: HashMap<String, BTreeMap<String, String>> = match self
            .app
            .store
            .list_devices()
            .await
        {
            Ok(devices) => devices
                .into_iter()
                .map(|d| {
                    (
                        d.id.clone(),
                        serde_json::from_value(d.labels).unwrap_or_default(),
                    )
                })
                .collect(),
            Err(err) => {
                tracing::error!(%err, "cannot load the devices' labels; drift windows are grouped by device and fleet only");
                HashMap::new()
            }
        };
        let mut change = DriftChange::default();
        let mut after = After::default();
        let mut touched: Vec<Key> = Vec::new();
        for (device, window) in windows {
            let Some(info) = self.model(&window.model.manifest_digest).await else {
                continue;
            };
            let policy = self.policies.get(&info.name).cloned().unwrap_or_default();
            let device_labels = labels.get(device.as_str()).cloned().unwrap_or_default();
            let scope_window = ScopeWindow::from_telemetry(&window);
            for scope in scopes_of(&device, &device_labels, &policy.group_by) {
                let key = (info.model.manifest_digest.to_hex(), scope.clone());
                self.step(
                    now,
                    &key,
                    &info,
                    &policy,
                    &device,
                    &scope_window,
                    &window,
                    &mut change,
                    &mut after,
                );
                if !touched.contains(&key) {
                    touched.push(key);
                }
            }
        }
        for key in &touched {
            if let Some(watch) = self.watches.get(key) {
                change.detectors.push(DetectorRow {
                    model_digest: key.0.clone(),
                    scope: scope_key(&key.1),
                    model_name: watch.name.clone(),
                    detector: serde_json::to_value(&watch.detector).unwrap_or(Value::Null),
                    chart: watch
                        .chart
                        .as_ref()
                        .and_then(|c| serde_json::to_value(c).ok()),
                    episode: watch.episode.clone(),
                    drifting_since: watch.drifting_since,
                    evaluation: watch.evaluation.clone(),
                    evaluated_at: watch.evaluated_at,
                    updated_at: ms(now),
                });
            }
        }
        self.commit(ms(now), change).await;
        self.app.rollouts.observe(after.drift_reports).await;
        for (alert, kind, payload) in after.alerts {
            let (app, http) = (self.app.clone(), self.http.clone());
            tokio::spawn(async move { send_alert(&app, &http, &alert, &kind, &payload).await });
        }
        for (retrain, event, payload) in after.retrains {
            let (app, http) = (self.app.clone(), self.http.clone());
            tokio::spawn(
                async move { fire_retrain(&app, &http, &retrain, &event, &payload).await },
            );
        }
    }

    /// The batch's change, retried until it commits (the state in memory is already ahead).
    async fn commit(&self, now: i64, change: DriftChange) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.app.store.save_drift(now, change.clone()).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::error!(%err, "cannot commit drift detector state; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        now: Timestamp,
        key: &Key,
        info: &ModelInfo,
        policy: &DriftPolicy,
        device: &DeviceId,
        scope_window: &ScopeWindow,
        window: &TelemetryWindow,
        change: &mut DriftChange,
        after: &mut After,
    ) {
        let scope = &key.1;
        let stale = self
            .watches
            .get(key)
            .is_some_and(|w| w.detector.config() != &policy.detector);
        if stale || !self.watches.contains_key(key) {
            let detector = match DriftDetector::new(
                info.model.clone(),
                scope.clone(),
                &info.reference,
                policy.detector.clone(),
            ) {
                Ok(detector) => detector,
                Err(err) => {
                    tracing::warn!(model = info.name, %err, "cannot watch this model for drift");
                    return;
                }
            };
            // A changed policy starts the scope afresh; an open episode stays recorded.
            let old = self.watches.remove(key);
            self.watches.insert(
                key.clone(),
                Watch {
                    name: info.name.clone(),
                    detector,
                    chart: old.as_ref().and_then(|w| w.chart.clone()),
                    episode: None,
                    drifting_since: None,
                    retrain: None,
                    evaluation: None,
                    evaluated_at: None,
                },
            );
        }
        let open_retrain = self
            .watches
            .iter()
            .filter(|((digest, _), _)| digest == &key.0)
            .find_map(|(_, w)| w.retrain.clone());
        let Some(watch) = self.watches.get_mut(key) else {
            return;
        };
        let scope_text = scope.to_string();
        let model_json = json!({"name": info.name, "version": info.version, "digest": key.0});
        let record = Record {
            now,
            info,
            digest: &key.0,
            scope,
            model: &model_json,
        };
        for action in watch.detector.handle(now, scope_window) {
            match action {
                detector::Action::Evaluated(evaluation) => {
                    if matches!(scope, Scope::Device(_)) {
                        after.drift_reports.push((
                            device.clone(),
                            DeviceReport::Drift {
                                model: info.model.manifest_digest,
                                score: evaluation.score,
                            },
                        ));
                    }
                    watch.evaluation = Some(evaluation_json(&evaluation));
                    watch.evaluated_at = Some(ms(now));
                }
                detector::Action::Refused { reason } => {
                    tracing::warn!(
                        model = info.name,
                        scope = scope_text,
                        reason,
                        "a telemetry window was not used for drift"
                    );
                }
                detector::Action::Accumulating { .. }
                | detector::Action::OutputBaselineSet { .. } => {}
                detector::Action::DriftDetected(found) => {
                    let id = record.event(
                        change,
                        "detected",
                        json!({"change": *found, "devices_reporting": [device]}),
                        json!({
                            "window": found.window,
                            "features": found.rule.features, "top_ranked": found.rule.top_ranked,
                            "evidence": brief_evidence(&found.evidence),
                        }),
                    );
                    watch.episode = Some(id.clone());
                    watch.drifting_since = Some(ms(now));
                    let payload = json!({
                        "type": "drift.detected", "event": id, "at": ms(now), "model": model_json,
                        "scope": scope_json(scope), "scope_text": scope_text, "change": *found,
                    });
                    if let Some(alert) = &policy.alert
                        && alert.scopes.contains(&ScopeKind::of(scope))
                    {
                        after.alerts.push((
                            alert.clone(),
                            "drift.detected".into(),
                            payload.clone(),
                        ));
                    }
                    if let Some(retrain) = &policy.retrain
                        && retrain.scopes.contains(&ScopeKind::of(scope))
                    {
                        match &open_retrain {
                            Some(open) => change.audits.push(AuditEntry::new(
                                ACTOR,
                                "retrain.skipped",
                                format!("drift:{id}"),
                                json!({"event": id, "model": model_json, "scope": scope_json(scope), "open_request": open,
                                       "reason": "a retraining request for this model version is still open (its scope has not cleared)"}),
                            )),
                            None => {
                                watch.retrain = Some(id.clone());
                                let via = if retrain.command.is_some() { "command" } else { "webhook" };
                                change.retrains.push(RetrainRow {
                                    event: id.clone(),
                                    model_name: info.name.clone(),
                                    model_digest: key.0.clone(),
                                    scope: scope_json(scope),
                                    status: "pending".into(),
                                    requested_at: ms(now),
                                    finished_at: None,
                                    detail: None,
                                });
                                change.audits.push(AuditEntry::new(
                                    ACTOR,
                                    "retrain.requested",
                                    format!("drift:{id}"),
                                    json!({"event": id, "model": model_json, "scope": scope_json(scope), "via": via}),
                                ));
                                after.retrains.push((retrain.clone(), id.clone(), payload));
                            }
                        }
                    }
                }
                detector::Action::DriftCleared(cleared) => {
                    let opened = watch.episode.take();
                    watch.drifting_since = None;
                    watch.retrain = None;
                    let id = record.event(
                        change,
                        "cleared",
                        json!({"change": *cleared, "detected_event": opened}),
                        json!({"detected_event": opened, "window": cleared.window, "since_window": cleared.since}),
                    );
                    if let Some(alert) = &policy.alert
                        && alert.scopes.contains(&ScopeKind::of(scope))
                    {
                        after.alerts.push((
                            alert.clone(),
                            "drift.cleared".into(),
                            json!({"type": "drift.cleared", "event": id, "detected_event": opened, "at": ms(now),
                                   "model": model_json, "scope": scope_json(scope), "scope_text": scope_text, "change": *cleared}),
                        ));
                    }
                }
                detector::Action::PredictionDriftDetected(found)
                | detector::Action::PredictionDriftCleared(found) => {
                    let detected = watch.detector.prediction_drifting_since().is_some();
                    let kind = if detected {
                        "prediction_detected"
                    } else {
                        "prediction_cleared"
                    };
                    record.event(
                        change,
                        kind,
                        json!({"change": *found}),
                        json!({"window": found.window, "outputs": brief_evidence(&found.evidence)}),
                    );
                }
            }
        }
        // Ground truth: a chart per scope from the first window that brings any.
        let has_feedback = window.feedback.as_ref().is_some_and(|f| f.count > 0);
        if watch.chart.is_none() && has_feedback {
            watch.chart = Some(PerformanceChart::new(if info.regression {
                ChartConfig::mean_abs_error()
            } else {
                ChartConfig::error_rate()
            }));
        }
        if let Some(chart) = &mut watch.chart {
            for action in chart.handle(now, window.feedback.as_ref()) {
                let (kind, crossing) = match action {
                    performance::Action::Degraded(c) => ("performance_degraded", c),
                    performance::Action::Recovered(c) => ("performance_recovered", c),
                    _ => continue,
                };
                let id = record.event(
                    change,
                    kind,
                    json!({"crossing": crossing}),
                    json!({"crossing": crossing}),
                );
                let action = action_of(kind);
                if let Some(alert) = &policy.alert
                    && alert.scopes.contains(&ScopeKind::of(scope))
                {
                    after.alerts.push((
                        alert.clone(),
                        action.clone(),
                        json!({"type": action, "event": id, "at": ms(now), "model": model_json,
                               "scope": scope_json(scope), "scope_text": scope_text, "crossing": crossing}),
                    ));
                }
            }
        }
    }
}

/// The audit action of an event kind: `detected` → `drift.detected`, `performance_degraded` →
/// `performance.degraded`.
fn action_of(kind: &str) -> String {
    match kind.strip_prefix("performance_") {
        Some(rest) => format!("performance.{rest}"),
        None => format!("drift.{kind}"),
    }
}

/// Records a scope's events: the event row and its audit row, in the batch's change.
struct Record<'a> {
    now: Timestamp,
    info: &'a ModelInfo,
    digest: &'a str,
    scope: &'a Scope,
    model: &'a Value,
}

impl Record<'_> {
    /// Adds an event of `kind` with `details`, and its audit row with `audit`'s fields plus the
    /// event id, model and scope; returns the event id.
    fn event(
        &self,
        change: &mut DriftChange,
        kind: &str,
        details: Value,
        mut audit: Value,
    ) -> String {
        let id = super::auth::new_id("dre");
        change.events.push(DriftEventRow {
            id: id.clone(),
            at: ms(self.now),
            model_name: self.info.name.clone(),
            model_digest: self.digest.to_owned(),
            scope: scope_json(self.scope),
            kind: kind.to_owned(),
            details,
        });
        audit["event"] = json!(id);
        audit["model"] = self.model.clone();
        audit["scope"] = scope_json(self.scope);
        change.audits.push(AuditEntry::new(
            ACTOR,
            action_of(kind),
            format!("drift:{id}"),
            audit,
        ));
        id
    }
}

/// Per series: name, p, PSI, JS, flagged (for audit rows, which stay small).
fn brief_evidence(evidence: &[detector::Evidence]) -> Value {
    Value::Array(
        evidence
            .iter()
            .map(|e| {
                json!({
                    "name": e.name, "p": e.stats.chi2.as_ref().map(|c| c.p_value),
                    "psi": e.stats.psi, "js": e.stats.js, "flagged": e.flagged,
                })
            })
            .collect(),
    )
}

fn evaluation_json(evaluation: &Evaluation) -> Value {
    serde_json::to_value(evaluation).unwrap_or(Value::Null)
}

fn model_info(row: &ModelRow) -> Option<ModelInfo> {
    let manifest: Manifest = serde_json::from_value(row.manifest.clone()).ok()?;
    let reference: Vec<ReferenceFeature> = manifest
        .referenced_features()
        .map(|(_, reference)| reference.clone())
        .collect();
    if reference.is_empty() {
        return None;
    }
    let regression = matches!(
        manifest.prediction_spec().map(|p| p.kind),
        Some(PredictionKind::Regression)
    );
    Some(ModelInfo {
        name: row.name.clone(),
        version: row.version.clone(),
        model: ModelRef {
            name: ModelName::new(&row.name).ok()?,
            version: ModelVersion::new(&row.version).ok()?,
            release: row.release as u64,
            manifest_digest: row.digest.parse().ok()?,
        },
        reference,
        regression,
    })
}

fn read_secret(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| {
            format!(
                "cannot read the secret file {}: {e}; create it on the controller's host",
                path.display()
            )
        })
}

async fn send_alert(
    app: &App,
    http: &reqwest::Client,
    alert: &policy::Alert,
    kind: &str,
    payload: &Value,
) {
    let event = payload["event"].as_str().unwrap_or_default().to_owned();
    let result = match read_secret(&alert.secret_file) {
        Ok(secret) => super::webhook::post(http, &alert.url, &secret, kind, &event, payload)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        tracing::warn!(event, error = %err, "a drift alert was not delivered");
        let audit = AuditEntry::new(
            ACTOR,
            "alert.failed",
            format!("drift:{event}"),
            json!({"event": event, "kind": kind, "url": alert.url, "error": err}),
        );
        if let Err(err) = app.store.audit(app.now_ms(), audit).await {
            tracing::error!(%err, "cannot audit a failed alert");
        }
    }
}

/// The devices of `scope` that run `digest`, and those of them capturing.
async fn scope_devices(app: &App, scope: &Scope, digest: &str) -> (Vec<String>, Vec<String>) {
    let mut devices = Vec::new();
    let mut capturing = Vec::new();
    let Ok(rows) = app.store.list_devices().await else {
        return (devices, capturing);
    };
    for row in rows {
        if row.revoked_at.is_some() || row.active_digest.as_deref() != Some(digest) {
            continue;
        }
        let labels: BTreeMap<String, String> =
            serde_json::from_value(row.labels.clone()).unwrap_or_default();
        let member = match scope {
            Scope::Device(d) => d.as_str() == row.id,
            Scope::Group { label, value } => labels.get(label) == Some(value),
            Scope::Fleet => true,
        };
        if member {
            if matches!(app.store.capture_settings(&row.id).await, Ok(Some(_))) {
                capturing.push(row.id.clone());
            }
            devices.push(row.id);
        }
    }
    (devices, capturing)
}

/// Fires a retraining request (already committed as `pending`) and records how it went.
async fn fire_retrain(
    app: &App,
    http: &reqwest::Client,
    retrain: &policy::Retrain,
    event: &str,
    detected: &Value,
) {
    let model = &detected["model"];
    let (name, version, digest) = (
        model["name"].as_str().unwrap_or_default(),
        model["version"].as_str().unwrap_or_default(),
        model["digest"].as_str().unwrap_or_default(),
    );
    let scope: Scope = serde_json::from_value(detected["scope"].clone()).unwrap_or(Scope::Fleet);
    let (devices, capturing) = scope_devices(app, &scope, digest).await;
    let capture = (!capturing.is_empty()).then(|| {
        json!({
            "devices": capturing,
            "download_url": format!("{}/api/v1/captures/download?model={digest}", app.api_url),
            "cli": format!("edgefleet capture download --model {name}@{version} -o captured.csv"),
        })
    });
    let payload = json!({
        "type": "retrain.requested",
        "drift_event": detected,
        "model": model,
        "scope": detected["scope"],
        "devices": devices,
        "capture": capture,
        "register": {
            "candidate_for": name,
            "parent": digest,
            "cli": format!("edgefleet model register MODEL.onnx --name {name} --version NEXT --reference REFERENCE.csv --candidate-for {name} --parent {digest} --param drift_event={event}"),
        },
        "controller_url": app.api_url,
    });
    let result = if let Some(command) = &retrain.command {
        let mut env = vec![
            ("EDGEFLEET_URL".to_owned(), app.api_url.clone()),
            ("EDGEFLEET_DRIFT_EVENT".to_owned(), event.to_owned()),
            ("EDGEFLEET_MODEL".to_owned(), name.to_owned()),
            ("EDGEFLEET_MODEL_VERSION".to_owned(), version.to_owned()),
            ("EDGEFLEET_MODEL_DIGEST".to_owned(), digest.to_owned()),
            ("EDGEFLEET_SCOPE".to_owned(), scope.to_string()),
        ];
        let token = match &retrain.token_file {
            Some(file) => read_secret(file).map(Some),
            None => Ok(None),
        };
        match token {
            Ok(token) => {
                if let Some(token) = token {
                    env.push(("EDGEFLEET_TOKEN".to_owned(), token));
                }
                super::webhook::run_command(command, &payload, &env)
                    .await
                    .map(|ran| ran.stdout.lines().last().unwrap_or_default().to_owned())
                    .map_err(|e| e.to_string())
            }
            Err(err) => Err(err),
        }
    } else if let Some(hook) = &retrain.webhook {
        match read_secret(&hook.secret_file) {
            Ok(secret) => super::webhook::post(
                http,
                &hook.url,
                &secret,
                "retrain.requested",
                event,
                &payload,
            )
            .await
            .map(|d| format!("answered {} after {} attempt(s)", d.status, d.attempts))
            .map_err(|e| e.to_string()),
            Err(err) => Err(err),
        }
    } else {
        Err("the policy's retrain has neither a command nor a webhook".into())
    };
    let (status, action, detail) = match &result {
        Ok(detail) => ("sent", "retrain.sent", detail.clone()),
        Err(err) => ("failed", "retrain.failed", err.clone()),
    };
    if let Err(err) = &result {
        tracing::warn!(event, error = %err, "a retraining request failed");
    }
    let audit = AuditEntry::new(
        ACTOR,
        action,
        format!("drift:{event}"),
        json!({"event": event, "model": model, "scope": detected["scope"], "status": status, "detail": detail}),
    );
    if let Err(err) = app
        .store
        .finish_retrain(app.now_ms(), event, status, &detail, audit)
        .await
    {
        tracing::error!(%err, event, "cannot record how a retraining request ended");
    }
}

/// For a model just registered with `candidate_for`: starts the rollout the parent's policy
/// plans, from the devices running the parent. `None` when the policy plans none.
pub async fn auto_rollout(app: &App, candidate: &ModelRow, actor: &str) -> Option<Value> {
    let manifest: Manifest = serde_json::from_value(candidate.manifest.clone()).ok()?;
    let target = manifest.lineage.candidate_for.as_ref()?.to_string();
    let policy = match app.store.drift_policies().await {
        Ok(all) => all
            .into_iter()
            .find(|(model, ..)| model == &target)
            .and_then(|(_, p, ..)| serde_json::from_value::<DriftPolicy>(p).ok()),
        Err(err) => {
            tracing::error!(%err, "cannot load the drift policies for an automatic rollout");
            None
        }
    }?;
    policy.auto_rollout.as_ref()?;
    let event = manifest
        .lineage
        .parameters
        .iter()
        .find(|p| p.name == "drift_event")
        .map(|p| p.value.clone());
    let trigger = json!({
        "kind": "auto_rollout",
        "candidate": {"digest": candidate.digest, "name": candidate.name, "version": candidate.version},
        "candidate_for": target,
        "parent": candidate.parent,
        "drift_event": event,
        "registered_by": actor,
    });
    let reason = format!(
        "automatic rollout of {} {} (candidate for {target}{})",
        candidate.name,
        candidate.version,
        event
            .as_deref()
            .map(|e| format!(", drift event {e}"))
            .unwrap_or_default()
    );
    let started = match policy.start_request(
        candidate.digest.clone(),
        candidate.parent.clone(),
        Some(trigger.clone()),
    ) {
        Ok(mut request) => {
            request.reason.get_or_insert(reason);
            app.rollouts
                .start(request, format!("{ACTOR}-policy:{target}"))
                .await
                .map_err(|e| e.to_string())
        }
        Err(err) => Err(err),
    };
    match started {
        Ok(rollout) => Some(json!({"started": true, "rollout": rollout["id"]})),
        Err(err) => {
            tracing::warn!(error = %err, candidate = candidate.digest, "the automatic rollout did not start");
            let audit = AuditEntry::new(
                format!("{ACTOR}-policy:{target}"),
                "rollout.auto_failed",
                format!("model:{}", candidate.digest),
                json!({"trigger": trigger, "error": err}),
            );
            if let Err(err) = app.store.audit(app.now_ms(), audit).await {
                tracing::error!(%err, "cannot audit a failed automatic rollout");
            }
            Some(json!({"started": false, "error": err}))
        }
    }
}
