//! The rollout driver: the only place rollouts meet I/O. One task owns every live rollout; the
//! ingest, the API and the enrollment endpoint send it what happened ([`RolloutHandle`]). For each
//! batch of inputs it runs the engine (`handle_all(now, inputs)`), commits the new state, its
//! outbox of assignments and its records (audit rows) in one transaction, then carries the outbox
//! out: each assignment is signed and stored in the same transaction that removes its outbox entry,
//! and published after that commit. A controller killed at any moment restarts from the store:
//! the outbox is carried out (entries already done are skipped), member states are resynced from
//! what devices reported meanwhile, and the engine goes on.
//!
//! Inputs that produce no action (telemetry merged into the gates' samples, activations) are
//! saved at most once per [`SAVE_INTERVAL`]; a crash loses at most that much telemetry from the
//! gates' samples, and the resync on load recovers every activation and failure.
//!
//! Membership: a rollout takes the devices that match its label selector, are not revoked, run
//! its baseline and belong to no other unfinished rollout, sorted by id. A device that later
//! starts matching the selector (enrolled with matching labels, relabelled, or assigned the
//! baseline) while running the baseline joins it.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::assignment::Assignment;
use edgefleet_protocol::messages::{DeviceBody, EventKind};
use edgefleet_protocol::{DeviceId, RolloutId, Sha256Digest, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::engine::{
    self, Action, Command, DeviceReport, Gates, Input, Labels, Member, OnBreach, Rollout,
    ShadowPlan, Spec, Wave, WaveSize,
};
use crate::server::App;
use crate::server::api::{self, ApiError};
use crate::server::audit::AuditEntry;
use crate::server::store::{
    ModelRow, OutboxAssignment, OutboxOutcome, RolloutChange, RolloutRow, StoreError,
};

/// Unsaved progress (inputs that produced no action) is written at least this often.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Outbox assignments signed and stored per transaction.
const OUTBOX_CHUNK: usize = 500;
/// Inputs taken from the queue before the engine runs.
const MAX_BATCH: usize = 20_000;
/// Phases after which a rollout never moves again on its own.
pub const FINISHED: [&str; 3] = ["completed", "aborted", "rolled_back"];
pub const KIND_ROLLOUT: &str = "rollout";

/// What the API asks for when it starts a rollout (`POST /api/v1/rollouts`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The model to roll out: manifest digest or `name@version`.
    pub candidate: String,
    /// The model the members run now; by default the one model every selected device runs.
    #[serde(default)]
    pub baseline: Option<String>,
    /// Only devices with all these labels take part.
    #[serde(default)]
    pub selector: Labels,
    #[serde(default)]
    pub shadow: Option<ShadowRequest>,
    /// Waves in order; by default 1 device, 10%, 50%, 100%, each baking 10 minutes but the last.
    #[serde(default)]
    pub waves: Option<Vec<WaveRequest>>,
    #[serde(default = "default_max_per_minute")]
    pub max_per_minute: u32,
    #[serde(default = "default_progress_deadline_s")]
    pub progress_deadline_s: u64,
    #[serde(default)]
    pub gates: GatesRequest,
    #[serde(default = "default_on_breach")]
    pub on_breach: String,
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_max_per_minute() -> u32 {
    1000
}
fn default_progress_deadline_s() -> u64 {
    600
}
fn default_on_breach() -> String {
    "abort".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowRequest {
    /// A device count (`"5"`) or a percentage (`"10%"`) of the members.
    pub cohort: String,
    pub duration_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveRequest {
    /// A device count (`"1"`) or a percentage (`"50%"`), cumulative.
    pub size: String,
    #[serde(default)]
    pub bake_s: u64,
    #[serde(default)]
    pub select: Labels,
}

/// Gate limits; every field defaults to [`Gates::default`]'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesRequest {
    pub max_install_failure_rate: Option<f64>,
    pub min_installs: Option<u64>,
    pub max_error_rate_increase: Option<f64>,
    pub max_p95_latency_ratio: Option<f64>,
    pub min_inferences: Option<u64>,
    pub min_shadow_agreement: Option<f64>,
    pub min_shadow_compared: Option<u64>,
    pub max_drift_score: Option<f64>,
    pub min_drift_windows: Option<u64>,
    pub require_evidence: Option<bool>,
}

/// Why the driver refused a request.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the rollout driver stopped; restart the controller")]
    Stopped,
}

impl From<ApiError> for DriverError {
    fn from(err: ApiError) -> Self {
        DriverError::Api(err)
    }
}

impl From<DriverError> for ApiError {
    fn from(err: DriverError) -> Self {
        use axum::http::StatusCode;
        match err {
            DriverError::Invalid(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_rollout", message)
            }
            DriverError::NotFound(message) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            DriverError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            DriverError::Api(err) => err,
            DriverError::Store(err) => err.into(),
            DriverError::Stopped => ApiError::internal("the rollout driver stopped"),
        }
    }
}

type Reply = oneshot::Sender<Result<Value, DriverError>>;

pub(crate) enum Request {
    /// Reports the ingest committed, already turned into engine reports.
    Observe(Vec<(DeviceId, DeviceReport)>),
    /// A device's retained status: online, and the model it runs.
    Status {
        device: DeviceId,
        online: bool,
        active: Option<Sha256Digest>,
    },
    /// A device enrolled or was relabelled.
    DeviceChanged(DeviceId),
    Start {
        request: Box<StartRequest>,
        actor: String,
        reply: Reply,
    },
    Command {
        id: String,
        actor: String,
        command: Command,
        reply: Reply,
    },
    Show {
        id: String,
        reply: Reply,
    },
}

/// The way into the driver; cheap to clone.
#[derive(Debug, Clone)]
pub struct RolloutHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Observe(_) => "Observe",
            Request::Status { .. } => "Status",
            Request::DeviceChanged(_) => "DeviceChanged",
            Request::Start { .. } => "Start",
            Request::Command { .. } => "Command",
            Request::Show { .. } => "Show",
        })
    }
}

/// The engine reports a committed device message carries.
pub fn reports_of(body: &DeviceBody) -> Vec<DeviceReport> {
    match body {
        DeviceBody::Telemetry(window) => {
            // Refusals for want of a model are not the model's errors.
            let errors = window.errors.total() - window.errors.unavailable;
            let mut reports = vec![DeviceReport::Telemetry {
                model: window.model.manifest_digest,
                sample: engine::Sample {
                    inferences: window.inferences,
                    errors,
                    latency: window.latency.clone(),
                },
            }];
            if let Some(shadow) = &window.shadow {
                reports.push(DeviceReport::Shadow {
                    model: shadow.model.manifest_digest,
                    sample: engine::ShadowSample {
                        compared: shadow.compared,
                        agree: shadow.argmax_agree,
                        errors: shadow.errors,
                    },
                });
            }
            reports
        }
        DeviceBody::Event(event) => {
            let Some(model) = &event.model else {
                return Vec::new();
            };
            match event.kind {
                EventKind::Activated => vec![DeviceReport::Activated(model.manifest_digest)],
                EventKind::InstallFailed { .. } | EventKind::RolledBack { .. } => {
                    vec![DeviceReport::InstallFailed(model.manifest_digest)]
                }
                _ => Vec::new(),
            }
        }
        DeviceBody::Status(_) | DeviceBody::Capture(_) => Vec::new(),
    }
}

impl RolloutHandle {
    /// Committed reports (the ingest calls this after each commit, with the new ones only).
    pub async fn observe(&self, reports: Vec<(DeviceId, DeviceReport)>) {
        if !reports.is_empty() {
            let _ = self.tx.send(Request::Observe(reports)).await;
        }
    }

    pub async fn status(&self, device: DeviceId, online: bool, active: Option<Sha256Digest>) {
        let _ = self
            .tx
            .send(Request::Status {
                device,
                online,
                active,
            })
            .await;
    }

    pub async fn device_changed(&self, device: DeviceId) {
        let _ = self.tx.send(Request::DeviceChanged(device)).await;
    }

    async fn ask(&self, request: impl FnOnce(Reply) -> Request) -> Result<Value, DriverError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(request(reply))
            .await
            .map_err(|_| DriverError::Stopped)?;
        answer.await.map_err(|_| DriverError::Stopped)?
    }

    pub async fn start(&self, request: StartRequest, actor: String) -> Result<Value, DriverError> {
        self.ask(|reply| Request::Start {
            request: Box::new(request),
            actor,
            reply,
        })
        .await
    }

    pub async fn command(
        &self,
        id: String,
        actor: String,
        command: Command,
    ) -> Result<Value, DriverError> {
        self.ask(|reply| Request::Command {
            id,
            actor,
            command,
            reply,
        })
        .await
    }

    pub async fn show(&self, id: String) -> Result<Value, DriverError> {
        self.ask(|reply| Request::Show { id, reply }).await
    }
}

/// The receiving end of the driver's queue.
#[derive(Debug)]
pub struct DriverQueue(mpsc::Receiver<Request>);

/// The driver's queue; [`spawn`] takes the receiving end once the controller's parts exist.
pub fn channel() -> (RolloutHandle, DriverQueue) {
    let (tx, rx) = mpsc::channel(16_384);
    (RolloutHandle { tx }, DriverQueue(rx))
}

/// Loads unfinished rollouts, carries out their outboxes, resyncs them, and serves requests.
pub fn spawn(app: Arc<App>, DriverQueue(rx): DriverQueue) {
    tokio::spawn(async move {
        let mut driver = Driver {
            app,
            live: HashMap::new(),
            members: HashMap::new(),
            models: HashMap::new(),
            retry_outbox: Vec::new(),
        };
        if let Err(err) = driver.load().await {
            tracing::error!(error = %err, "cannot load the unfinished rollouts; they stay where they are until the controller restarts");
        }
        driver.run(rx).await;
    });
}

/// A rollout the driver owns while it is unfinished.
struct Live {
    row: RolloutRow,
    engine: Rollout,
    version: i64,
    /// Inputs changed the engine since the last save.
    dirty: bool,
    saved_at: tokio::time::Instant,
}

struct Driver {
    app: Arc<App>,
    live: HashMap<String, Live>,
    /// Device → the unfinished rollout it belongs to.
    members: HashMap<DeviceId, String>,
    models: HashMap<Sha256Digest, ModelRow>,
    /// Rollouts whose outbox could not be carried out; retried on the next wake.
    retry_outbox: Vec<String>,
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis() as i64
}

impl Driver {
    fn now(&self) -> Timestamp {
        self.app.clock.now()
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Request>) {
        loop {
            let wake = self.next_wake();
            let mut inputs: HashMap<String, Vec<Input>> = HashMap::new();
            tokio::select! {
                request = rx.recv() => {
                    let Some(request) = request else { return };
                    self.accept(request, &mut inputs).await;
                    let mut taken = 1;
                    while taken < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(request) => self.accept(request, &mut inputs).await,
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                }
                _ = sleep_until(wake) => {}
            }
            self.advance(inputs).await;
        }
    }

    /// When the earliest deadline, unsaved progress or outbox retry is due.
    fn next_wake(&self) -> Option<tokio::time::Instant> {
        let now = self.now();
        let mut wake: Option<tokio::time::Instant> = None;
        let mut consider = |at: tokio::time::Instant| {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        };
        for live in self.live.values() {
            if let Some(deadline) = live.engine.next_deadline() {
                let wait = deadline.as_millis().saturating_sub(now.as_millis());
                consider(tokio::time::Instant::now() + Duration::from_millis(wait));
            }
            if live.dirty {
                consider(live.saved_at + SAVE_INTERVAL);
            }
        }
        if !self.retry_outbox.is_empty() {
            consider(tokio::time::Instant::now() + Duration::from_secs(1));
        }
        wake
    }

    /// Queues what a request means for the engines, or answers it at once.
    async fn accept(&mut self, request: Request, inputs: &mut HashMap<String, Vec<Input>>) {
        match request {
            Request::Observe(reports) => {
                for (device, report) in reports {
                    if let Some(id) = self.members.get(&device) {
                        inputs
                            .entry(id.clone())
                            .or_default()
                            .push(Input::Device { device, report });
                    }
                }
            }
            Request::Status {
                device,
                online,
                active,
            } => {
                if let Some(id) = self.members.get(&device) {
                    let queue = inputs.entry(id.clone()).or_default();
                    queue.push(Input::Device {
                        device: device.clone(),
                        report: DeviceReport::Online(online),
                    });
                    if let Some(active) = active {
                        queue.push(Input::Device {
                            device,
                            report: DeviceReport::Activated(active),
                        });
                    }
                } else if let Some(active) = active
                    && self
                        .live
                        .values()
                        .any(|l| l.row.kind == KIND_ROLLOUT && l.engine.spec.baseline == active)
                {
                    self.join_check(&device, inputs).await;
                }
            }
            Request::DeviceChanged(device) => {
                if !self.members.contains_key(&device) {
                    self.join_check(&device, inputs).await;
                }
            }
            Request::Start {
                request,
                actor,
                reply,
            } => {
                let result = self.start(*request, &actor).await;
                let _ = reply.send(result);
            }
            Request::Command {
                id,
                actor,
                command,
                reply,
            } => {
                // Inputs queued before the command are applied first.
                self.advance(std::mem::take(inputs)).await;
                let result = self.command(&id, &actor, command).await;
                let _ = reply.send(result);
            }
            Request::Show { id, reply } => {
                let result = self.show(&id).await;
                let _ = reply.send(result);
            }
        }
    }

    /// A device that is no member: does it now belong to an unfinished rollout?
    async fn join_check(&mut self, device: &DeviceId, inputs: &mut HashMap<String, Vec<Input>>) {
        let row = match self.app.store.get_device(device.as_str()).await {
            Ok(row) => row,
            Err(err) => {
                tracing::warn!(error = %err, %device, "cannot check whether a device joins a rollout");
                return;
            }
        };
        if row.revoked_at.is_some() {
            return;
        }
        let labels = labels_of(&row.labels);
        let active = row
            .active_digest
            .as_deref()
            .and_then(|d| Sha256Digest::from_str(d).ok());
        let mut ids: Vec<&String> = self.live.keys().collect();
        ids.sort();
        for id in ids {
            let live = &self.live[id];
            let selector = labels_of(&live.row.selector);
            if live.row.kind == KIND_ROLLOUT
                && !live.engine.is_finished()
                && active == Some(live.engine.spec.baseline)
                && engine::matches(&selector, &labels)
            {
                let id = id.clone();
                self.members.insert(device.clone(), id.clone());
                inputs.entry(id).or_default().push(Input::Device {
                    device: device.clone(),
                    report: DeviceReport::Joined { labels },
                });
                return;
            }
        }
    }

    /// Runs queued inputs and due deadlines through the engines and commits what they did.
    async fn advance(&mut self, mut inputs: HashMap<String, Vec<Input>>) {
        let now = self.now();
        for (id, live) in &self.live {
            if live
                .engine
                .next_deadline()
                .is_some_and(|deadline| deadline <= now)
            {
                inputs.entry(id.clone()).or_default().push(Input::Tick);
            }
        }
        let mut ids: Vec<String> = inputs.keys().cloned().collect();
        ids.sort();
        for id in ids {
            let batch = inputs.remove(&id).unwrap_or_default();
            let Some(live) = self.live.get_mut(&id) else {
                continue;
            };
            let actions = live.engine.handle_all(now, batch);
            live.dirty = true;
            if !actions.is_empty() {
                self.commit(&id, "controller", "rollout.progress", Value::Null, actions)
                    .await;
            }
        }
        let due: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.dirty && l.saved_at.elapsed() >= SAVE_INTERVAL)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.commit(
                &id,
                "controller",
                "rollout.progress",
                Value::Null,
                Vec::new(),
            )
            .await;
        }
        for id in std::mem::take(&mut self.retry_outbox) {
            self.carry_out(&id).await;
        }
    }

    /// Saves a live rollout with its actions (assignments to the outbox, records to the audit
    /// log, the first under `action`), then carries the outbox out.
    async fn commit(
        &mut self,
        id: &str,
        actor: &str,
        action: &str,
        details: Value,
        actions: Vec<Action>,
    ) -> bool {
        let now = self.now();
        let Some(live) = self.live.get_mut(id) else {
            return false;
        };
        let object = format!("rollout:{id}");
        let mut audits = Vec::new();
        let mut outbox = Vec::new();
        let mut records = Vec::new();
        for action in actions {
            match action {
                Action::Record(text) => records.push(text),
                assign @ Action::Assign { .. } => match serde_json::to_string(&assign) {
                    Ok(json) => outbox.push(json),
                    Err(err) => tracing::error!(error = %err, "cannot encode a rollout action"),
                },
            }
        }
        let operator = !details.is_null();
        if operator {
            audits.push(AuditEntry::new(actor, action, &object, details));
        }
        for text in records {
            audits.push(AuditEntry::new(
                if operator { actor } else { "controller" },
                "rollout.progress",
                &object,
                json!({ "record": text, "phase": live.engine.phase.name() }),
            ));
        }
        let change = match change_of(&live.engine, outbox) {
            Ok(change) => change,
            Err(err) => {
                tracing::error!(error = %err, rollout = id, "cannot encode the rollout state");
                return false;
            }
        };
        let has_outbox = !change.outbox.is_empty();
        match self
            .app
            .store
            .save_rollout(ms(now), id, live.version, change, audits)
            .await
        {
            Ok(version) => {
                live.version = version;
                live.dirty = false;
                live.saved_at = tokio::time::Instant::now();
            }
            Err(StoreError::Conflict(message)) => {
                tracing::error!(
                    rollout = id,
                    message,
                    "another writer moved the rollout; reloading it from the store"
                );
                self.reload(id).await;
                return false;
            }
            Err(err) => {
                tracing::error!(error = %err, rollout = id, "cannot save the rollout; retrying with the next input");
                return false;
            }
        }
        if has_outbox {
            self.carry_out(id).await;
        }
        if self.live.get(id).is_some_and(|l| l.engine.is_finished()) {
            self.retire(id);
        }
        true
    }

    fn retire(&mut self, id: &str) {
        if let Some(live) = self.live.remove(id) {
            for member in &live.engine.members {
                if self.members.get(&member.device).map(String::as_str) == Some(id) {
                    self.members.remove(&member.device);
                }
            }
            tracing::info!(
                rollout = id,
                phase = live.engine.phase.name(),
                "rollout finished"
            );
        }
    }

    async fn reload(&mut self, id: &str) {
        self.retire(id);
        match self.app.store.get_rollout(id).await {
            Ok(row) => {
                if let Err(err) = self.adopt(row).await {
                    tracing::error!(error = %err, rollout = id, "cannot reload the rollout");
                }
            }
            Err(err) => tracing::error!(error = %err, rollout = id, "cannot reload the rollout"),
        }
    }

    async fn model(&mut self, digest: &Sha256Digest) -> Result<ModelRow, DriverError> {
        if let Some(row) = self.models.get(digest) {
            return Ok(row.clone());
        }
        let row = self.app.store.get_model(&digest.to_hex()).await?;
        self.models.insert(*digest, row.clone());
        Ok(row)
    }

    /// Carries out the rollout's outbox, in order, in chunks.
    async fn carry_out(&mut self, id: &str) {
        if let Err(err) = self.try_carry_out(id).await {
            tracing::error!(error = %err, rollout = id, "cannot carry out the rollout's assignments; retrying");
            if !self.retry_outbox.iter().any(|r| r == id) {
                self.retry_outbox.push(id.to_owned());
            }
        }
    }

    async fn try_carry_out(&mut self, id: &str) -> Result<(), DriverError> {
        let outbox = self.app.store.rollout_outbox(id).await?;
        let rollout_id = RolloutId::new(id).map_err(|e| DriverError::Invalid(e.to_string()))?;
        for chunk in outbox.chunks(OUTBOX_CHUNK) {
            let now = self.now();
            let mut items = Vec::with_capacity(chunk.len());
            for (seq, json) in chunk {
                let Ok(Action::Assign {
                    device,
                    model,
                    shadow,
                    rollback,
                }) = serde_json::from_str::<Action>(json)
                else {
                    tracing::error!(rollout = id, seq, "an outbox entry is unreadable; skipped");
                    continue;
                };
                let active = self.model(&model).await?;
                let shadow = match shadow {
                    Some(digest) => Some(self.model(&digest).await?),
                    None => None,
                };
                let template = Assignment {
                    device: device.clone(),
                    seq: 0,
                    issued_at: Timestamp(0),
                    expires: Timestamp(0),
                    rollback,
                    active: Some(api::assigned(&self.app, &active)?),
                    shadow: shadow
                        .as_ref()
                        .map(|m| api::assigned(&self.app, m))
                        .transpose()?,
                    rollout: Some(rollout_id.clone()),
                };
                let summary = api::assignment_summary(&template);
                let audit = AuditEntry::new(
                    "controller",
                    "device.assign",
                    format!("device:{device}"),
                    json!({"active": summary["active"], "shadow": summary["shadow"], "rollback": rollback, "rollout": id}),
                );
                items.push(OutboxAssignment {
                    seq: *seq,
                    device: device.to_string(),
                    build: Box::new(api::signer(&self.app, now, template, None)),
                    audit,
                });
            }
            let outcomes = self
                .app
                .store
                .assign_from_outbox(ms(now), id, items)
                .await?;
            for outcome in outcomes {
                match outcome {
                    OutboxOutcome::Signed { device, bytes } => {
                        let Ok(device) = DeviceId::new(&device) else {
                            continue;
                        };
                        if let Err(err) = self.app.publisher.assignment(&device, bytes).await {
                            // Stored: the broker gets it with the next re-publish.
                            tracing::warn!(error = %err, %device, "cannot publish an assignment");
                        }
                    }
                    OutboxOutcome::Refused { device, reason } => {
                        tracing::warn!(
                            rollout = id,
                            device,
                            reason,
                            "a rollout assignment was refused"
                        );
                    }
                    OutboxOutcome::AlreadyDone => {}
                }
            }
        }
        Ok(())
    }

    /// Takes over a stored unfinished rollout: its engine, its members, its outbox.
    async fn adopt(&mut self, row: RolloutRow) -> Result<(), DriverError> {
        let engine: Rollout = serde_json::from_value(row.state.clone()).map_err(|err| {
            DriverError::Invalid(format!(
                "rollout {}: stored state unreadable: {err}",
                row.id
            ))
        })?;
        let id = row.id.clone();
        for member in &engine.members {
            self.members.insert(member.device.clone(), id.clone());
        }
        self.live.insert(
            id.clone(),
            Live {
                version: row.version,
                row,
                engine,
                dirty: false,
                saved_at: tokio::time::Instant::now(),
            },
        );
        self.carry_out(&id).await;
        Ok(())
    }

    /// At start: every unfinished rollout, resynced with what its members did meanwhile.
    async fn load(&mut self) -> Result<(), DriverError> {
        let rows = self.app.store.unfinished_rollouts(&FINISHED).await?;
        for row in rows {
            if row.kind != KIND_ROLLOUT {
                continue;
            }
            let id = row.id.clone();
            let since = row.created_at;
            self.adopt(row).await?;
            let inputs = self.resync(&id, since).await?;
            tracing::info!(rollout = %id, inputs = inputs.len(), "resumed an unfinished rollout");
            if let Some(live) = self.live.get_mut(&id) {
                let actions = live.engine.handle_all(self.app.clock.now(), inputs);
                live.dirty = true;
                self.commit(&id, "controller", "rollout.progress", Value::Null, actions)
                    .await;
            }
        }
        Ok(())
    }

    /// What the members reported while nobody drove the rollout: online flags, and for members
    /// given the candidate whether they activated it or failed (the latest event about it).
    async fn resync(&self, id: &str, since: i64) -> Result<Vec<Input>, DriverError> {
        let Some(live) = self.live.get(id) else {
            return Ok(Vec::new());
        };
        let candidate = live.engine.spec.candidate;
        let rows: HashMap<String, _> = self
            .app
            .store
            .list_devices()
            .await?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let mut inputs = Vec::new();
        for member in &live.engine.members {
            let Some(row) = rows.get(member.device.as_str()) else {
                continue;
            };
            inputs.push(Input::Device {
                device: member.device.clone(),
                report: DeviceReport::Online(row.online),
            });
            if !matches!(
                member.state,
                engine::MemberState::Assigned | engine::MemberState::Active
            ) {
                continue;
            }
            let events = self
                .app
                .store
                .recent_reports(member.device.as_str(), Some("event"), 50)
                .await?;
            let latest = events.iter().find_map(|event| {
                if event.sent_at < since
                    || event.model_digest.as_deref() != Some(candidate.to_hex().as_str())
                {
                    return None;
                }
                let kind = &event.body["kind"];
                if kind == "activated" {
                    Some(DeviceReport::Activated(candidate))
                } else if kind.get("install_failed").is_some() || kind.get("rolled_back").is_some()
                {
                    Some(DeviceReport::InstallFailed(candidate))
                } else {
                    None
                }
            });
            let latest = latest.or_else(|| {
                (row.active_digest.as_deref() == Some(candidate.to_hex().as_str()))
                    .then_some(DeviceReport::Activated(candidate))
            });
            if let Some(report) = latest {
                inputs.push(Input::Device {
                    device: member.device.clone(),
                    report,
                });
            }
        }
        Ok(inputs)
    }

    async fn start(&mut self, request: StartRequest, actor: &str) -> Result<Value, DriverError> {
        let now = self.now();
        let candidate = api::resolve_model(&self.app, &request.candidate).await?;
        let candidate_digest = digest(&candidate.digest)?;
        let devices = self.app.store.list_devices().await?;
        let selected: Vec<_> = devices
            .into_iter()
            .filter(|d| {
                d.revoked_at.is_none() && engine::matches(&request.selector, &labels_of(&d.labels))
            })
            .collect();
        let baseline = match &request.baseline {
            Some(reference) => api::resolve_model(&self.app, reference).await?,
            None => {
                let mut running: BTreeMap<&str, usize> = BTreeMap::new();
                for device in &selected {
                    if let Some(active) = device.active_digest.as_deref()
                        && active != candidate.digest
                    {
                        *running.entry(active).or_default() += 1;
                    }
                }
                match running.len() {
                    1 => {
                        let only = running
                            .keys()
                            .next()
                            .copied()
                            .unwrap_or_default()
                            .to_owned();
                        self.app.store.get_model(&only).await?
                    }
                    0 => {
                        return Err(DriverError::Invalid(
                            "no selected device runs a model other than the candidate; give the baseline the devices run (`baseline`)".into(),
                        ));
                    }
                    _ => {
                        return Err(DriverError::Invalid(format!(
                            "the selected devices run {} different models ({}); give the one to replace as `baseline`, or narrow the selector",
                            running.len(),
                            running
                                .iter()
                                .map(|(d, n)| format!("{} on {n}", &d[..12.min(d.len())]))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
        };
        if baseline.digest == candidate.digest {
            return Err(DriverError::Invalid(
                "the candidate and the baseline are the same model".into(),
            ));
        }
        if baseline.name != candidate.name {
            tracing::info!(candidate = %candidate.name, baseline = %baseline.name, "rollout replaces one model name by another");
        }
        let baseline_digest = digest(&baseline.digest)?;
        let arch = candidate.manifest["target"]["arch"]
            .as_str()
            .unwrap_or("any")
            .to_owned();
        let mut members = Vec::new();
        let mut excluded: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for device in &selected {
            let Ok(id) = DeviceId::new(&device.id) else {
                continue;
            };
            if device.active_digest.as_deref() != Some(baseline.digest.as_str()) {
                excluded
                    .entry("not_on_baseline")
                    .or_default()
                    .push(device.id.clone());
            } else if arch != "any" && arch != device.arch {
                excluded
                    .entry("wrong_arch")
                    .or_default()
                    .push(device.id.clone());
            } else if let Some(other) = self.members.get(&id) {
                return Err(DriverError::Conflict(format!(
                    "device {} is in unfinished rollout {other}; wait for it to finish, abort it, or narrow the selector",
                    device.id
                )));
            } else {
                members.push(Member::new(id, device.online, labels_of(&device.labels)));
            }
        }
        if members.is_empty() {
            return Err(DriverError::Invalid(format!(
                "no device matches the selector and runs the baseline {} {}",
                baseline.name, baseline.version
            )));
        }
        members.sort_by(|a, b| a.device.as_str().cmp(b.device.as_str()));
        let spec = spec_of(&request, candidate_digest, baseline_digest)?;
        let id = crate::server::auth::new_id("ro");
        let (engine, actions) = Rollout::start(now, spec.clone(), members);
        let row = RolloutRow {
            id: id.clone(),
            kind: KIND_ROLLOUT.into(),
            candidate: candidate.digest.clone(),
            baseline: baseline.digest.clone(),
            selector: serde_json::to_value(&request.selector).unwrap_or(Value::Null),
            phase: engine.phase.name().into(),
            state: Value::Null,
            version: 1,
            next_deadline: None,
            created_by: actor.to_owned(),
            created_at: ms(now),
            updated_at: ms(now),
        };
        let mut outbox = Vec::new();
        let mut audits = vec![AuditEntry::new(
            actor,
            "rollout.start",
            format!("rollout:{id}"),
            json!({
                "candidate": {"digest": candidate.digest, "name": candidate.name, "version": candidate.version},
                "baseline": {"digest": baseline.digest, "name": baseline.name, "version": baseline.version},
                "selector": request.selector,
                "members": engine.members.len(),
                "excluded": excluded,
                "reason": request.reason,
                "plan": plan_json(&spec),
            }),
        )];
        for action in actions {
            match action {
                Action::Record(text) => audits.push(AuditEntry::new(
                    actor,
                    "rollout.progress",
                    format!("rollout:{id}"),
                    json!({"record": text, "phase": engine.phase.name()}),
                )),
                assign => outbox.push(
                    serde_json::to_string(&assign)
                        .map_err(|e| DriverError::Invalid(e.to_string()))?,
                ),
            }
        }
        let change = change_of(&engine, outbox).map_err(|e| DriverError::Invalid(e.to_string()))?;
        self.app
            .store
            .create_rollout(ms(now), &row, change, audits)
            .await?;
        self.models.insert(candidate_digest, candidate);
        self.models.insert(baseline_digest, baseline);
        let row = self.app.store.get_rollout(&id).await?;
        self.adopt(row).await?;
        if self.live.get(&id).is_some_and(|l| l.engine.is_finished()) {
            self.retire(&id);
        }
        let mut shown = self.show(&id).await?;
        shown["excluded"] = json!(excluded);
        Ok(shown)
    }

    async fn command(
        &mut self,
        id: &str,
        actor: &str,
        command: Command,
    ) -> Result<Value, DriverError> {
        if !self.live.contains_key(id) {
            // Finished rollouts are not live; `rollback` still applies to a completed one.
            let row = match self.app.store.get_rollout(id).await {
                Ok(row) => row,
                Err(StoreError::NotFound(_)) => {
                    return Err(DriverError::NotFound(format!("rollout {id:?} not found")));
                }
                Err(err) => return Err(err.into()),
            };
            if row.kind != KIND_ROLLOUT {
                return Err(DriverError::Invalid(format!(
                    "{id} is an experiment, not a rollout"
                )));
            }
            let engine: Rollout = serde_json::from_value(row.state.clone())
                .map_err(|e| DriverError::Invalid(format!("stored state unreadable: {e}")))?;
            self.live.insert(
                id.to_owned(),
                Live {
                    version: row.version,
                    row,
                    engine,
                    dirty: false,
                    saved_at: tokio::time::Instant::now(),
                },
            );
        }
        let now = self.now();
        let (name, reason) = match &command {
            Command::Pause { reason } => ("rollout.pause", Some(reason.clone())),
            Command::Resume => ("rollout.resume", None),
            Command::Promote => ("rollout.promote", None),
            Command::Abort { reason } => ("rollout.abort", Some(reason.clone())),
            Command::Rollback { reason } => ("rollout.rollback", Some(reason.clone())),
        };
        let Some(live) = self.live.get_mut(id) else {
            return Err(DriverError::NotFound(format!("rollout {id:?} not found")));
        };
        let before = live.engine.phase.clone();
        let actions = live.engine.handle(now, Input::Operator(command));
        let after = live.engine.phase.name();
        let details =
            json!({"reason": reason, "phase_before": before.name(), "phase_after": after});
        if !self.commit(id, actor, name, details, actions).await {
            return Err(DriverError::Conflict(format!(
                "rollout {id} changed meanwhile; look at it again and retry"
            )));
        }
        if self.live.get(id).is_some_and(|l| l.engine.is_finished()) {
            self.retire(id);
        }
        self.show(id).await
    }

    /// The rollout as the API shows it.
    async fn show(&mut self, id: &str) -> Result<Value, DriverError> {
        let (row, engine, version) = match self.live.get(id) {
            Some(live) => (live.row.clone(), live.engine.clone(), live.version),
            None => {
                let row = match self.app.store.get_rollout(id).await {
                    Ok(row) => row,
                    Err(StoreError::NotFound(_)) => {
                        return Err(DriverError::NotFound(format!("rollout {id:?} not found")));
                    }
                    Err(err) => return Err(err.into()),
                };
                let engine: Rollout = serde_json::from_value(row.state.clone())
                    .map_err(|e| DriverError::Invalid(format!("stored state unreadable: {e}")))?;
                let version = row.version;
                (row, engine, version)
            }
        };
        let candidate = self.model(&engine.spec.candidate).await?;
        let baseline = self.model(&engine.spec.baseline).await?;
        let records = self
            .app
            .store
            .audit_for(&format!("rollout:{id}"), 50)
            .await?;
        Ok(rollout_json(
            &row, &engine, version, &candidate, &baseline, &records,
        ))
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn digest(hex: &str) -> Result<Sha256Digest, DriverError> {
    Sha256Digest::from_str(hex).map_err(|e| DriverError::Invalid(format!("digest {hex}: {e}")))
}

/// A JSON object of string labels as [`Labels`] (other values are ignored).
pub fn labels_of(value: &Value) -> Labels {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
        .collect()
}

fn change_of(engine: &Rollout, outbox: Vec<String>) -> Result<RolloutChange, serde_json::Error> {
    Ok(RolloutChange {
        phase: engine.phase.name().into(),
        state: serde_json::to_value(engine)?,
        next_deadline: engine.next_deadline().map(ms),
        outbox,
    })
}

/// `"5"` or `"10%"`.
pub fn parse_size(text: &str) -> Result<WaveSize, String> {
    let text = text.trim();
    if let Some(percent) = text.strip_suffix('%') {
        match percent.trim().parse::<u8>() {
            Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
            _ => Err(format!("{text:?}: a percentage is 1% to 100%")),
        }
    } else {
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(WaveSize::Count(n)),
            _ => Err(format!(
                "{text:?}: give a device count (e.g. 5) or a percentage (e.g. 10%)"
            )),
        }
    }
}

fn fraction(name: &str, value: f64, max: f64) -> Result<f64, DriverError> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(value)
    } else {
        Err(DriverError::Invalid(format!(
            "gate {name} = {value} is out of range (0 to {max})"
        )))
    }
}

/// The engine's plan from the API's request, every value checked.
fn spec_of(
    request: &StartRequest,
    candidate: Sha256Digest,
    baseline: Sha256Digest,
) -> Result<Spec, DriverError> {
    let invalid = DriverError::Invalid;
    let waves = match &request.waves {
        None => vec![
            Wave {
                size: WaveSize::Count(1),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(10),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(50),
                bake_ms: 600_000,
                select: Labels::new(),
            },
            Wave {
                size: WaveSize::Percent(100),
                bake_ms: 0,
                select: Labels::new(),
            },
        ],
        Some(waves) if waves.is_empty() => return Err(invalid("give at least one wave".into())),
        Some(waves) if waves.len() > 32 => return Err(invalid("at most 32 waves".into())),
        Some(waves) => waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Ok(Wave {
                    size: parse_size(&w.size)
                        .map_err(|e| invalid(format!("wave {}: size {e}", i + 1)))?,
                    bake_ms: w.bake_s.saturating_mul(1000),
                    select: w.select.clone(),
                })
            })
            .collect::<Result<_, DriverError>>()?,
    };
    let shadow = request
        .shadow
        .as_ref()
        .map(|s| {
            Ok::<_, DriverError>(ShadowPlan {
                cohort: parse_size(&s.cohort).map_err(|e| invalid(format!("shadow cohort {e}")))?,
                duration_ms: s.duration_s.saturating_mul(1000),
            })
        })
        .transpose()?;
    if request.max_per_minute == 0 {
        return Err(invalid("max_per_minute must be at least 1".into()));
    }
    if request.progress_deadline_s == 0 {
        return Err(invalid("progress_deadline_s must be at least 1".into()));
    }
    let on_breach = match request.on_breach.as_str() {
        "abort" => OnBreach::Abort,
        "pause" => OnBreach::Pause,
        other => {
            return Err(invalid(format!(
                "on_breach {other:?}: use \"abort\" (roll back) or \"pause\""
            )));
        }
    };
    let given = &request.gates;
    let default = Gates::default();
    let gates = Gates {
        max_install_failure_rate: fraction(
            "max_install_failure_rate",
            given
                .max_install_failure_rate
                .unwrap_or(default.max_install_failure_rate),
            1.0,
        )?,
        min_installs: given.min_installs.unwrap_or(default.min_installs),
        max_error_rate_increase: fraction(
            "max_error_rate_increase",
            given
                .max_error_rate_increase
                .unwrap_or(default.max_error_rate_increase),
            1.0,
        )?,
        max_p95_latency_ratio: fraction(
            "max_p95_latency_ratio",
            given
                .max_p95_latency_ratio
                .unwrap_or(default.max_p95_latency_ratio),
            1e6,
        )?,
        min_inferences: given.min_inferences.unwrap_or(default.min_inferences),
        min_shadow_agreement: given
            .min_shadow_agreement
            .map(|v| fraction("min_shadow_agreement", v, 1.0))
            .transpose()?,
        min_shadow_compared: given
            .min_shadow_compared
            .unwrap_or(default.min_shadow_compared),
        max_drift_score: given
            .max_drift_score
            .map(|v| fraction("max_drift_score", v, 1e6))
            .transpose()?,
        min_drift_windows: given.min_drift_windows.unwrap_or(default.min_drift_windows),
        require_evidence: given.require_evidence.unwrap_or(default.require_evidence),
    };
    Ok(Spec {
        candidate,
        baseline,
        shadow,
        waves,
        max_per_minute: request.max_per_minute,
        progress_deadline_ms: request.progress_deadline_s.saturating_mul(1000),
        gates,
        on_breach,
    })
}

fn plan_json(spec: &Spec) -> Value {
    json!({
        "shadow": spec.shadow.map(|s| json!({"cohort": s.cohort.to_string(), "duration_s": s.duration_ms / 1000})),
        "waves": spec.waves.iter().map(|w| json!({"size": w.size.to_string(), "bake_s": w.bake_ms / 1000, "select": w.select})).collect::<Vec<_>>(),
        "max_per_minute": spec.max_per_minute,
        "progress_deadline_s": spec.progress_deadline_ms / 1000,
        "gates": spec.gates,
        "on_breach": match spec.on_breach { OnBreach::Abort => "abort", OnBreach::Pause => "pause" },
    })
}

fn model_json(row: &ModelRow) -> Value {
    json!({"digest": row.digest, "name": row.name, "version": row.version, "release": row.release})
}

fn rollout_json(
    row: &RolloutRow,
    engine: &Rollout,
    version: i64,
    candidate: &ModelRow,
    baseline: &ModelRow,
    records: &[crate::server::audit::AuditRecord],
) -> Value {
    let records: Vec<Value> = records
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
        .collect();
    json!({
        "id": row.id,
        "kind": row.kind,
        "candidate": model_json(candidate),
        "baseline": model_json(baseline),
        "selector": row.selector,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "version": version,
        "next_deadline": engine.next_deadline().map(ms),
        "plan": plan_json(&engine.spec),
        "progress": engine.progress(),
        "records": records,
    })
}
