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
//! its baseline and belong to no other unfinished rollout or experiment, sorted by id. A device
//! that later starts matching the selector (enrolled with matching labels, relabelled, or
//! assigned the baseline) while running the baseline joins it. A/B experiments
//! (`super::experiment`) are driven the same way; their cohorts are fixed at start, split by a
//! hash of the experiment and device ids.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::assignment::Assignment;
use edgefleet_protocol::messages::{DeviceBody, EventKind};
use edgefleet_protocol::{DeviceId, RolloutId, Sha256Digest, Timestamp};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

pub mod plan;
mod view;

pub use self::plan::{ExperimentRequest, StartRequest, parse_size};
use super::engine::{self, Action, Command, DeviceReport, Input, Labels, Member, Rollout};
use super::experiment::{Arm, ArmReport, Experiment, ExperimentCommand, ExperimentInput};
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
/// Phases after which a rollout or experiment never moves again.
pub const FINISHED: [&str; 4] = ["completed", "aborted", "rolled_back", "promoted"];
pub const KIND_ROLLOUT: &str = "rollout";
pub const KIND_EXPERIMENT: &str = "experiment";

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
    StartExperiment {
        request: Box<ExperimentRequest>,
        actor: String,
        reply: Reply,
    },
    Command {
        id: String,
        actor: String,
        operation: Operation,
        reply: Reply,
    },
    Show {
        id: String,
        reply: Reply,
    },
}

/// An operator's command, for a rollout or an experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Rollout(Command),
    Experiment(ExperimentCommand),
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
            Request::StartExperiment { .. } => "StartExperiment",
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
            if let Some(feedback) = &window.feedback {
                reports.push(DeviceReport::Feedback {
                    model: window.model.manifest_digest,
                    stats: feedback.clone(),
                });
            }
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

    pub async fn start_experiment(
        &self,
        request: ExperimentRequest,
        actor: String,
    ) -> Result<Value, DriverError> {
        self.ask(|reply| Request::StartExperiment {
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
        operation: Operation,
    ) -> Result<Value, DriverError> {
        self.ask(|reply| Request::Command {
            id,
            actor,
            operation,
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

/// The engine a stored row drives.
#[derive(Debug, Clone)]
enum Engine {
    Rollout(Rollout),
    Experiment(Experiment),
}

impl Engine {
    fn of(row: &RolloutRow) -> Result<Self, DriverError> {
        let unreadable = |e: serde_json::Error| {
            DriverError::Invalid(format!(
                "{} {}: stored state unreadable: {e}",
                row.kind, row.id
            ))
        };
        match row.kind.as_str() {
            KIND_ROLLOUT => Ok(Engine::Rollout(
                serde_json::from_value(row.state.clone()).map_err(unreadable)?,
            )),
            KIND_EXPERIMENT => Ok(Engine::Experiment(
                serde_json::from_value(row.state.clone()).map_err(unreadable)?,
            )),
            other => Err(DriverError::Invalid(format!(
                "{}: unknown kind {other:?}",
                row.id
            ))),
        }
    }

    fn state(&self) -> Result<Value, serde_json::Error> {
        match self {
            Engine::Rollout(r) => serde_json::to_value(r),
            Engine::Experiment(e) => serde_json::to_value(e),
        }
    }

    fn phase(&self) -> &'static str {
        match self {
            Engine::Rollout(r) => r.phase.name(),
            Engine::Experiment(e) => e.phase.name(),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Engine::Rollout(r) => r.is_finished(),
            Engine::Experiment(e) => e.is_finished(),
        }
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        match self {
            Engine::Rollout(r) => r.next_deadline(),
            Engine::Experiment(e) => e.next_deadline(),
        }
    }

    fn devices(&self) -> Vec<DeviceId> {
        match self {
            Engine::Rollout(r) => r.members.iter().map(|m| m.device.clone()).collect(),
            Engine::Experiment(e) => e.members.iter().map(|m| m.device.clone()).collect(),
        }
    }

    /// Members given a model they may have activated or failed on while nobody watched.
    fn awaiting(&self) -> Vec<(DeviceId, Sha256Digest)> {
        match self {
            Engine::Rollout(r) => r
                .members
                .iter()
                .filter(|m| {
                    matches!(
                        m.state,
                        engine::MemberState::Assigned | engine::MemberState::Active
                    )
                })
                .map(|m| (m.device.clone(), r.spec.candidate))
                .collect(),
            Engine::Experiment(e) => e
                .members
                .iter()
                .map(|m| {
                    let model = match m.arm {
                        Arm::A => e.spec.a,
                        Arm::B => e.spec.b,
                    };
                    (m.device.clone(), model)
                })
                .collect(),
        }
    }

    /// The model a device must run to join: an unfinished rollout's baseline.
    fn joins_on(&self) -> Option<Sha256Digest> {
        match self {
            Engine::Rollout(r) if !r.is_finished() => Some(r.spec.baseline),
            _ => None,
        }
    }

    fn handle_all(&mut self, now: Timestamp, inputs: Vec<Input>) -> Vec<Action> {
        match self {
            Engine::Rollout(r) => r.handle_all(now, inputs),
            Engine::Experiment(e) => {
                let inputs = inputs.into_iter().filter_map(|input| match input {
                    Input::Tick => Some(ExperimentInput::Tick),
                    Input::Operator(_) => None,
                    Input::Device { device, report } => {
                        let report = match report {
                            DeviceReport::Activated(m) => ArmReport::Activated(m),
                            DeviceReport::InstallFailed(m) => ArmReport::InstallFailed(m),
                            DeviceReport::Telemetry { model, sample } => ArmReport::Telemetry {
                                model,
                                sample,
                                feedback: None,
                            },
                            DeviceReport::Feedback { model, stats } => ArmReport::Telemetry {
                                model,
                                sample: engine::Sample::default(),
                                feedback: Some(stats),
                            },
                            _ => return None,
                        };
                        Some(ExperimentInput::Device { device, report })
                    }
                });
                e.handle_all(now, inputs)
            }
        }
    }

    /// Runs an operator's command; the kinds must match.
    fn operate(
        &mut self,
        now: Timestamp,
        id: &str,
        operation: Operation,
    ) -> Result<Vec<Action>, DriverError> {
        match (self, operation) {
            (Engine::Rollout(r), Operation::Rollout(command)) => {
                Ok(r.handle(now, Input::Operator(command)))
            }
            (Engine::Experiment(e), Operation::Experiment(command)) => {
                Ok(e.handle_all(now, [ExperimentInput::Operator(command)]))
            }
            (Engine::Rollout(_), Operation::Experiment(_)) => Err(DriverError::NotFound(format!(
                "{id} is a rollout, not an experiment; use /api/v1/rollouts/{id}"
            ))),
            (Engine::Experiment(_), Operation::Rollout(_)) => Err(DriverError::NotFound(format!(
                "{id} is an experiment, not a rollout; use /api/v1/experiments/{id}"
            ))),
        }
    }
}

/// A rollout or experiment the driver owns while it is unfinished.
struct Live {
    row: RolloutRow,
    engine: Engine,
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

/// The row of a rollout or experiment being started: (candidate, baseline) — for an experiment
/// (B, A) — at version 1; `create` fills in its state and deadline.
fn started_row(
    id: &str,
    kind: &str,
    (candidate, baseline): (&ModelRow, &ModelRow),
    selector: &Labels,
    phase: &str,
    actor: &str,
    now: Timestamp,
) -> RolloutRow {
    RolloutRow {
        id: id.to_owned(),
        kind: kind.to_owned(),
        candidate: candidate.digest.clone(),
        baseline: baseline.digest.clone(),
        selector: serde_json::to_value(selector).unwrap_or(Value::Null),
        phase: phase.to_owned(),
        state: Value::Null,
        version: 1,
        next_deadline: None,
        created_by: actor.to_owned(),
        created_at: ms(now),
        updated_at: ms(now),
    }
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
                        .any(|l| l.engine.joins_on() == Some(active))
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
            Request::StartExperiment {
                request,
                actor,
                reply,
            } => {
                let result = self.start_experiment(*request, &actor).await;
                let _ = reply.send(result);
            }
            Request::Command {
                id,
                actor,
                operation,
                reply,
            } => {
                // Inputs queued before the command are applied first.
                self.advance(std::mem::take(inputs)).await;
                let result = self.command(&id, &actor, operation).await;
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
            if active.is_some()
                && live.engine.joins_on() == active
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
                json!({ "record": text, "phase": live.engine.phase() }),
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
            for device in live.engine.devices() {
                if self.members.get(&device).map(String::as_str) == Some(id) {
                    self.members.remove(&device);
                }
            }
            tracing::info!(
                rollout = id,
                phase = live.engine.phase(),
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
                    // Data capture is the operator's per-device setting; a rollout keeps it.
                    capture: crate::server::capture::device_settings(
                        &self.app.store,
                        device.as_str(),
                    )
                    .await?,
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

    /// Takes over a stored unfinished rollout or experiment: its engine, its members, its
    /// outbox.
    async fn adopt(&mut self, row: RolloutRow) -> Result<(), DriverError> {
        let engine = Engine::of(&row)?;
        let id = row.id.clone();
        for device in engine.devices() {
            self.members.insert(device, id.clone());
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

    /// At start: every unfinished rollout and experiment, resynced with what its members did
    /// meanwhile.
    async fn load(&mut self) -> Result<(), DriverError> {
        let rows = self.app.store.unfinished_rollouts(&FINISHED).await?;
        for row in rows {
            let id = row.id.clone();
            let since = row.created_at;
            if let Err(err) = self.adopt(row).await {
                tracing::error!(error = %err, rollout = %id, "cannot resume a rollout; it stays where it is");
                continue;
            }
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
    /// given a model whether they activated it or failed (the latest event about it, else the
    /// model their status says they run).
    async fn resync(&self, id: &str, since: i64) -> Result<Vec<Input>, DriverError> {
        let Some(live) = self.live.get(id) else {
            return Ok(Vec::new());
        };
        let rows: HashMap<String, _> = self
            .app
            .store
            .list_devices()
            .await?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let mut inputs = Vec::new();
        for device in live.engine.devices() {
            if let Some(row) = rows.get(device.as_str()) {
                inputs.push(Input::Device {
                    device,
                    report: DeviceReport::Online(row.online),
                });
            }
        }
        for (device, model) in live.engine.awaiting() {
            let Some(row) = rows.get(device.as_str()) else {
                continue;
            };
            let hex = model.to_hex();
            let events = self
                .app
                .store
                .recent_reports(device.as_str(), Some("event"), 50)
                .await?;
            let latest = events.iter().find_map(|event| {
                if event.sent_at < since || event.model_digest.as_deref() != Some(hex.as_str()) {
                    return None;
                }
                let kind = &event.body["kind"];
                if kind == "activated" {
                    Some(DeviceReport::Activated(model))
                } else if kind.get("install_failed").is_some() || kind.get("rolled_back").is_some()
                {
                    Some(DeviceReport::InstallFailed(model))
                } else {
                    None
                }
            });
            let latest = latest.or_else(|| {
                (row.active_digest.as_deref() == Some(hex.as_str()))
                    .then_some(DeviceReport::Activated(model))
            });
            if let Some(report) = latest {
                inputs.push(Input::Device { device, report });
            }
        }
        Ok(inputs)
    }

    /// Devices of `selected` already in an unfinished rollout or experiment: refused, naming one.
    fn check_free(&self, selected: &[DeviceId]) -> Result<(), DriverError> {
        for device in selected {
            if let Some(other) = self.members.get(device) {
                return Err(DriverError::Conflict(format!(
                    "device {device} is in unfinished {other}; wait for it to finish, end it, or narrow the selector"
                )));
            }
        }
        Ok(())
    }

    /// Creates the row with the engine's first actions, then drives it.
    async fn create(
        &mut self,
        row: RolloutRow,
        engine: Engine,
        actions: Vec<Action>,
        mut audits: Vec<AuditEntry>,
        actor: &str,
    ) -> Result<(), DriverError> {
        let now = self.now();
        let mut outbox = Vec::new();
        for action in actions {
            match action {
                Action::Record(text) => audits.push(AuditEntry::new(
                    actor,
                    "rollout.progress",
                    format!("rollout:{}", row.id),
                    json!({"record": text, "phase": engine.phase()}),
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
        let stored = self.app.store.get_rollout(&row.id).await?;
        self.adopt(stored).await?;
        if self
            .live
            .get(&row.id)
            .is_some_and(|l| l.engine.is_finished())
        {
            self.retire(&row.id);
        }
        Ok(())
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
        self.check_free(&members.iter().map(|m| m.device.clone()).collect::<Vec<_>>())?;
        let spec = plan::spec_of(&request, candidate_digest, baseline_digest)?;
        let id = crate::server::auth::new_id("ro");
        let (engine, actions) = Rollout::start(now, spec.clone(), members);
        let row = started_row(
            &id,
            KIND_ROLLOUT,
            (&candidate, &baseline),
            &request.selector,
            engine.phase.name(),
            actor,
            now,
        );
        let audits = vec![AuditEntry::new(
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
                "trigger": request.trigger,
                "plan": plan::plan_json(&spec),
            }),
        )];
        self.models.insert(candidate_digest, candidate);
        self.models.insert(baseline_digest, baseline);
        self.create(row, Engine::Rollout(engine), actions, audits, actor)
            .await?;
        let mut shown = self.show(&id).await?;
        shown["excluded"] = json!(excluded);
        Ok(shown)
    }

    async fn start_experiment(
        &mut self,
        request: ExperimentRequest,
        actor: &str,
    ) -> Result<Value, DriverError> {
        let now = self.now();
        let a = api::resolve_model(&self.app, &request.a).await?;
        let b = api::resolve_model(&self.app, &request.b).await?;
        if a.digest == b.digest {
            return Err(DriverError::Invalid(
                "an experiment compares two different models".into(),
            ));
        }
        let (a_digest, b_digest) = (digest(&a.digest)?, digest(&b.digest)?);
        let spec = plan::experiment_spec_of(&request, a_digest, b_digest)?;
        let arch_ok = |model: &ModelRow, arch: &str| {
            matches!(
                model.manifest["target"]["arch"].as_str(),
                None | Some("any")
            ) || model.manifest["target"]["arch"].as_str() == Some(arch)
        };
        let id = crate::server::auth::new_id("ex");
        let mut selected: Vec<(DeviceId, Option<Sha256Digest>)> = Vec::new();
        for device in self.app.store.list_devices().await? {
            if device.revoked_at.is_some()
                || !engine::matches(&request.selector, &labels_of(&device.labels))
                || !arch_ok(&a, &device.arch)
                || !arch_ok(&b, &device.arch)
            {
                continue;
            }
            let Ok(device_id) = DeviceId::new(&device.id) else {
                continue;
            };
            let running = device
                .active_digest
                .as_deref()
                .and_then(|d| Sha256Digest::from_str(d).ok());
            selected.push((device_id, running));
        }
        if selected.len() < 2 {
            return Err(DriverError::Invalid(format!(
                "an experiment needs at least two devices; the selector matches {}",
                selected.len()
            )));
        }
        self.check_free(&selected.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>())?;
        // A random but stable split: by a hash of the experiment and device ids.
        selected.sort_by_key(|(device, _)| {
            Sha256::digest(format!("{id}/{device}").as_bytes()).to_vec()
        });
        let n_b = (selected.len() * usize::from(request.split_percent))
            .div_ceil(100)
            .clamp(1, selected.len() - 1);
        let mut members: Vec<(DeviceId, Arm, Option<Sha256Digest>)> = selected
            .into_iter()
            .enumerate()
            .map(|(i, (device, running))| (device, if i < n_b { Arm::B } else { Arm::A }, running))
            .collect();
        members.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        let (engine, actions) = Experiment::start(now, spec, members);
        let row = started_row(
            &id,
            KIND_EXPERIMENT,
            (&b, &a),
            &request.selector,
            engine.phase.name(),
            actor,
            now,
        );
        let audits = vec![AuditEntry::new(
            actor,
            "experiment.start",
            format!("rollout:{id}"),
            json!({
                "a": {"digest": a.digest, "name": a.name, "version": a.version},
                "b": {"digest": b.digest, "name": b.name, "version": b.version},
                "selector": request.selector,
                "members": engine.members.len(),
                "cohort_b": n_b,
                "metric": request.metric,
                "alpha": request.alpha,
                "min_samples": request.min_samples,
                "duration_s": request.duration_s,
                "reason": request.reason,
            }),
        )];
        self.models.insert(a_digest, a);
        self.models.insert(b_digest, b);
        self.create(row, Engine::Experiment(engine), actions, audits, actor)
            .await?;
        self.show(&id).await
    }

    async fn command(
        &mut self,
        id: &str,
        actor: &str,
        operation: Operation,
    ) -> Result<Value, DriverError> {
        if !self.live.contains_key(id) {
            // Finished ones are not live; `rollback` still applies to a completed rollout.
            let row = match self.app.store.get_rollout(id).await {
                Ok(row) => row,
                Err(StoreError::NotFound(_)) => {
                    return Err(DriverError::NotFound(format!("{id:?} not found")));
                }
                Err(err) => return Err(err.into()),
            };
            let engine = Engine::of(&row)?;
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
        let (name, reason) = match &operation {
            Operation::Rollout(Command::Pause { reason }) => {
                ("rollout.pause", Some(reason.clone()))
            }
            Operation::Rollout(Command::Approve) => ("rollout.approve", None),
            Operation::Rollout(Command::Resume) => ("rollout.resume", None),
            Operation::Rollout(Command::Promote) => ("rollout.promote", None),
            Operation::Rollout(Command::Abort { reason }) => {
                ("rollout.abort", Some(reason.clone()))
            }
            Operation::Rollout(Command::Rollback { reason }) => {
                ("rollout.rollback", Some(reason.clone()))
            }
            Operation::Experiment(ExperimentCommand::Conclude) => ("experiment.conclude", None),
            Operation::Experiment(ExperimentCommand::Promote) => ("experiment.promote", None),
            Operation::Experiment(ExperimentCommand::Abort { reason }) => {
                ("experiment.abort", Some(reason.clone()))
            }
        };
        let Some(live) = self.live.get_mut(id) else {
            return Err(DriverError::NotFound(format!("{id:?} not found")));
        };
        let before = live.engine.phase();
        let actions = match live.engine.operate(now, id, operation) {
            Ok(actions) => actions,
            Err(err) => {
                if live.engine.is_finished() {
                    self.live.remove(id);
                }
                return Err(err);
            }
        };
        let after = live.engine.phase();
        let details = json!({"reason": reason, "phase_before": before, "phase_after": after});
        if !self.commit(id, actor, name, details, actions).await {
            return Err(DriverError::Conflict(format!(
                "{id} changed meanwhile; look at it again and retry"
            )));
        }
        if self.live.get(id).is_some_and(|l| l.engine.is_finished()) {
            self.retire(id);
        }
        self.show(id).await
    }

    /// The rollout or experiment as the API shows it.
    async fn show(&mut self, id: &str) -> Result<Value, DriverError> {
        let (row, engine, version) = match self.live.get(id) {
            Some(live) => (live.row.clone(), live.engine.clone(), live.version),
            None => {
                let row = match self.app.store.get_rollout(id).await {
                    Ok(row) => row,
                    Err(StoreError::NotFound(_)) => {
                        return Err(DriverError::NotFound(format!("{id:?} not found")));
                    }
                    Err(err) => return Err(err.into()),
                };
                let engine = Engine::of(&row)?;
                let version = row.version;
                (row, engine, version)
            }
        };
        let records = self
            .app
            .store
            .audit_for(&format!("rollout:{id}"), 50)
            .await?;
        Ok(match &engine {
            Engine::Rollout(rollout) => {
                let candidate = self.model(&rollout.spec.candidate).await?;
                let baseline = self.model(&rollout.spec.baseline).await?;
                view::rollout_json(&row, rollout, version, &candidate, &baseline, &records)
            }
            Engine::Experiment(experiment) => {
                let a = self.model(&experiment.spec.a).await?;
                let b = self.model(&experiment.spec.b).await?;
                view::experiment_json(&row, experiment, version, &a, &b, &records)
            }
        })
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

fn change_of(engine: &Engine, outbox: Vec<String>) -> Result<RolloutChange, serde_json::Error> {
    Ok(RolloutChange {
        phase: engine.phase().into(),
        state: engine.state()?,
        next_deadline: engine.next_deadline().map(ms),
        outbox,
    })
}
