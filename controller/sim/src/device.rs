//! One simulated device as a pure state machine (`handle(now, input, effects)`,
//! `next_deadline()`): it does on the wire what `edgefleet-agent` does in the same situation.
//!
//! - Assignments are verified with `protocol`'s `DeviceTrust` (controller signature, device,
//!   sequence floor, expiry); a retained one seen again is ignored, any other refusal is an
//!   `InstallFailed` event. A newer assignment supersedes a download under way; one that arrives
//!   during an activation waits for it, as the agent's supervisor does.
//! - An install is `Downloading` (the bundle or its manifest is fetched and verified by the
//!   driver), then `InstallFailed`, or `Installed` (the retained status now names the new model
//!   active and the old one previous, as the agent's trial state does), then after the activation
//!   delay `Activated` or `RolledBack` to the previous model: a simulated self-test failure, or
//!   the agent's grace-window error-rate check failing on the requests the behaviour draws.
//! - A shadow model named by the assignment is fetched the same way (`ShadowStarted`, and
//!   `ShadowStopped` when it is replaced or dropped); windows then carry `ShadowStats`.
//! - Every report gets the device's next sequence number and stays in a bounded in-memory spool
//!   until the controller's MAC-checked ack; everything unacknowledged is sent again after each
//!   ConnAck, and a report still unacknowledged 30 s after it was published is published again.
//!   Sequence numbers are reserved in blocks the driver makes durable before they are used, so a
//!   restarted simulator never reuses one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use edgefleet_protocol::assignment::DeviceTrust;
use edgefleet_protocol::manifest::{Manifest, ManifestPolicy, error_rate_breach};
use edgefleet_protocol::messages::{
    ControllerBody, DeviceBody, DeviceEvent, EventKind, FailureCode, ModelRef, Status,
};
use edgefleet_protocol::{
    AssignedModel, ControllerMessage, DeviceId, DeviceMacKey, DeviceMessage, Floors,
    ReleaseKeyring, RootKeyring, Sha256Digest, Timestamp, Topic, TopicKind, TrustError, Verified,
};
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use crate::behaviour::Behaviour;
use crate::state::DeviceRecord;
use crate::telemetry::{self, WindowModels};

/// The agent version simulated devices report (the agent of the same build).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Unacknowledged reports are sent again this often, as the agent does.
const RESEND_MS: u64 = 30_000;
/// How often the device looks for reports to send again.
const RESEND_CHECK_MS: u64 = 5_000;
/// Sequence numbers reserved (made durable) at a time.
pub const SEQ_BLOCK: u64 = 1024;
/// Assignments that arrive during an activation and wait for it.
const MAX_HELD: usize = 16;

/// What every device trusts: the fleet's root and release keyring, and its architecture.
#[derive(Debug)]
pub struct Anchor {
    pub root: Verified<RootKeyring>,
    pub keyring: Verified<ReleaseKeyring>,
    pub arch: edgefleet_protocol::Arch,
}

/// A model a device holds, with its verified manifest (shared between devices).
#[derive(Debug, Clone)]
pub struct Model {
    pub assigned: AssignedModel,
    pub manifest: Arc<Manifest>,
}

pub fn model_ref(model: &AssignedModel) -> ModelRef {
    ModelRef {
        name: model.name.clone(),
        version: model.version.clone(),
        release: model.release,
        manifest_digest: model.manifest_digest,
    }
}

/// The behaviour key of a model: `name@version`.
pub fn model_key(model: &AssignedModel) -> String {
    format!("{}@{}", model.name, model.version)
}

impl Model {
    fn model_ref(&self) -> ModelRef {
        model_ref(&self.assigned)
    }

    fn digest(&self) -> Sha256Digest {
        self.assigned.manifest_digest
    }
}

/// Why a fetch failed, as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
}

/// Fetch `model`'s bundle (or its manifest) and verify it under `policy`.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub job: u64,
    pub model: AssignedModel,
    pub policy: ManifestPolicy,
}

pub type FetchResult = Result<Arc<Manifest>, Failure>;

/// What a device asks of the code that runs it.
pub trait Effects {
    /// Queues a QoS 1 publish without waiting; false if the link cannot take it now.
    fn publish(&mut self, kind: TopicKind, payload: Bytes, retain: bool) -> bool;
    fn fetch(&mut self, request: FetchRequest);
    fn cancel_fetch(&mut self, job: u64);
    /// What this device does with `model` (`name@version`).
    fn behaviour(&self, model: &str) -> Behaviour;
    /// Sequence numbers below this are durably reserved.
    fn seq_durable(&self) -> u64;
}

#[derive(Debug)]
pub enum Input<'a> {
    Connected,
    Disconnected,
    /// A message on one of the device's topics.
    Message {
        topic: &'a str,
        payload: &'a [u8],
    },
    Fetched {
        job: u64,
        result: FetchResult,
    },
    /// A deadline passed.
    Tick,
}

/// Per-device counts since the simulator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reports (events and telemetry windows) published for the first time.
    pub sent: u64,
    /// Reports the controller acknowledged.
    pub acked: u64,
    /// Reports published again (after a reconnect or the periodic resend).
    pub resent: u64,
    /// Reports dropped because the spool was full.
    pub dropped: u64,
    /// Assignments refused (bad signature, expired, wrong device, …).
    pub refused_assignments: u64,
    pub installed: u64,
    pub activated: u64,
    pub rolled_back: u64,
    pub install_failed: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.resent += other.resent;
        self.dropped += other.dropped;
        self.refused_assignments += other.refused_assignments;
        self.installed += other.installed;
        self.activated += other.activated;
        self.rolled_back += other.rolled_back;
        self.install_failed += other.install_failed;
    }
}

/// One step of carrying out an assignment.
#[derive(Debug, Clone)]
enum Job {
    Install {
        seq: u64,
        model: AssignedModel,
        policy: ManifestPolicy,
    },
    Shadow {
        seq: u64,
        model: Option<(AssignedModel, ManifestPolicy)>,
    },
}

#[derive(Debug, Clone)]
enum Stage {
    Idle,
    Fetching {
        job: u64,
        seq: u64,
        model: AssignedModel,
        shadow: bool,
    },
    /// The new model is active on trial until `until`; then it is kept or `failure` reverts it.
    Activating {
        seq: u64,
        until: Timestamp,
        failure: Option<(FailureCode, String)>,
    },
}

/// How a device is set up.
#[derive(Debug, Clone)]
pub struct DeviceParams {
    pub index: usize,
    pub id: DeviceId,
    pub key: DeviceMacKey,
    pub anchor: Arc<Anchor>,
    pub window_ms: u64,
    pub spool_max: usize,
    pub rng: Xoshiro256PlusPlus,
}

#[derive(Debug)]
pub struct Device {
    index: usize,
    id: DeviceId,
    key: DeviceMacKey,
    anchor: Arc<Anchor>,
    floors: Floors,
    active: Option<Model>,
    previous: Option<Model>,
    shadow: Option<Model>,
    stage: Stage,
    jobs: VecDeque<Job>,
    held: VecDeque<Vec<u8>>,
    next_job: u64,
    /// Unacknowledged reports by sequence number.
    spool: BTreeMap<u64, Spooled>,
    spool_max: usize,
    next_seq: u64,
    /// Reserved up to here (what the next snapshot records).
    seq_limit: u64,
    /// Reports waiting for sequence numbers to become durable.
    parked: VecDeque<(TopicKind, DeviceBody)>,
    connected: bool,
    /// Highest sequence published on this connection, and ever.
    sent_up_to: u64,
    high_sent: u64,
    started: Timestamp,
    last_seen: Timestamp,
    window_started: Timestamp,
    window_ms: u64,
    next_resend: Timestamp,
    rng: Xoshiro256PlusPlus,
    counters: Counters,
    last_change_at: Option<Timestamp>,
    /// The persistent record changed since the driver last took it.
    dirty: bool,
    /// What the fleet shows of the device changed.
    view_changed: bool,
}

impl Device {
    /// A device starting at `now` from its last recorded state, with the manifests of its
    /// recorded models (a model whose manifest is missing is forgotten).
    pub fn new(
        params: DeviceParams,
        record: DeviceRecord,
        manifest: &dyn Fn(&Sha256Digest) -> Option<Arc<Manifest>>,
        now: Timestamp,
    ) -> Self {
        let model = |assigned: Option<AssignedModel>| {
            let assigned = assigned?;
            let manifest = manifest(&assigned.manifest_digest)?;
            Some(Model { assigned, manifest })
        };
        let next_seq = record.seq_limit.max(1);
        Self {
            index: params.index,
            id: params.id,
            key: params.key,
            anchor: params.anchor,
            floors: record.floors,
            active: model(record.active),
            previous: model(record.previous),
            shadow: model(record.shadow),
            stage: Stage::Idle,
            jobs: VecDeque::new(),
            held: VecDeque::new(),
            next_job: 1,
            spool: BTreeMap::new(),
            spool_max: params.spool_max.max(1),
            next_seq,
            seq_limit: next_seq + SEQ_BLOCK,
            parked: VecDeque::new(),
            connected: false,
            sent_up_to: 0,
            high_sent: 0,
            started: now,
            last_seen: now,
            window_started: now,
            window_ms: params.window_ms.max(1),
            next_resend: now.plus_millis(RESEND_CHECK_MS),
            rng: params.rng,
            counters: Counters::default(),
            last_change_at: None,
            dirty: true,
            view_changed: true,
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Reports not yet acknowledged (spooled or waiting for a sequence number).
    pub fn unacked(&self) -> usize {
        self.spool.len() + self.parked.len()
    }

    pub fn active(&self) -> Option<ModelRef> {
        self.active.as_ref().map(Model::model_ref)
    }

    pub fn previous(&self) -> Option<ModelRef> {
        self.previous.as_ref().map(Model::model_ref)
    }

    pub fn shadow(&self) -> Option<ModelRef> {
        self.shadow.as_ref().map(Model::model_ref)
    }

    pub fn assignment_seq(&self) -> u64 {
        self.floors.assignment_seq
    }

    /// When the active model last changed (installed, or reverted).
    pub fn last_change_at(&self) -> Option<Timestamp> {
        self.last_change_at
    }

    /// What a snapshot records of this device.
    pub fn record(&self) -> DeviceRecord {
        DeviceRecord {
            seq_limit: self.seq_limit,
            floors: self.floors.clone(),
            active: self.active.as_ref().map(|m| m.assigned.clone()),
            previous: self.previous.as_ref().map(|m| m.assigned.clone()),
            shadow: self.shadow.as_ref().map(|m| m.assigned.clone()),
        }
    }

    /// Whether the persistent record changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether the active, previous or shadow model or the link changed since the last call.
    pub fn take_view_changed(&mut self) -> bool {
        std::mem::take(&mut self.view_changed)
    }

    /// The retained status, sealed (sequence 0: statuses are not spooled; the newest wins).
    /// With `online: false` it is the last will.
    pub fn status_frame(&self, online: bool, now: Timestamp) -> Bytes {
        let status = Status {
            online,
            agent_version: String::from(AGENT_VERSION),
            arch: self.anchor.arch.clone(),
            active: self.active(),
            previous: self.previous(),
            shadow: self.shadow(),
            assignment_seq: self.floors.assignment_seq,
            uptime_s: now.millis_since(self.started) / 1000,
        };
        Bytes::from(
            DeviceMessage::new(self.id.clone(), 0, now, DeviceBody::Status(status)).seal(&self.key),
        )
    }

    /// When the device next needs a [`Input::Tick`].
    pub fn next_deadline(&self) -> Timestamp {
        let mut deadline = self
            .window_started
            .plus_millis(self.window_ms)
            .min(self.next_resend);
        if let Stage::Activating { until, .. } = &self.stage {
            deadline = deadline.min(*until);
        }
        if !self.parked.is_empty() {
            deadline = deadline.min(self.last_seen.plus_millis(100));
        }
        deadline
    }

    pub fn handle(&mut self, now: Timestamp, input: Input<'_>, fx: &mut dyn Effects) {
        self.last_seen = now;
        match input {
            Input::Connected => {
                self.connected = true;
                self.view_changed = true;
                // Everything unacknowledged goes again on the new connection.
                self.sent_up_to = 0;
                self.publish_status(now, fx);
                self.flush(fx);
            }
            Input::Disconnected => {
                self.connected = false;
                self.view_changed = true;
            }
            Input::Message { topic, payload } => match Topic::parse(topic) {
                Ok(topic) if topic.device == self.id && topic.kind == TopicKind::Ack => {
                    self.on_ack(payload);
                }
                Ok(topic) if topic.device == self.id && topic.kind == TopicKind::Assignment => {
                    self.on_assignment(now, payload, fx);
                }
                _ => tracing::debug!(device_id = %self.id, topic, "ignoring a message"),
            },
            Input::Fetched { job, result } => self.on_fetched(now, job, result, fx),
            Input::Tick => self.on_tick(now, fx),
        }
        if !self.parked.is_empty() {
            self.unpark(fx);
        }
    }

    fn trust(&self) -> DeviceTrust {
        DeviceTrust {
            device: self.id.clone(),
            arch: self.anchor.arch.clone(),
            agent_version: String::from(AGENT_VERSION),
            root: self.anchor.root.clone(),
            keyring: self.anchor.keyring.clone(),
            floors: self.floors.clone(),
        }
    }

    fn on_ack(&mut self, payload: &[u8]) {
        match ControllerMessage::open(&self.key, &self.id, payload) {
            Ok(message) => {
                if let ControllerBody::Ack { seqs } = message.body {
                    for seq in seqs {
                        if self.spool.remove(&seq).is_some() {
                            self.counters.acked += 1;
                        }
                    }
                }
            }
            Err(err) => {
                tracing::warn!(device_id = %self.id, error = %err, "rejected a controller message")
            }
        }
    }

    fn on_assignment(&mut self, now: Timestamp, payload: &[u8], fx: &mut dyn Effects) {
        if matches!(self.stage, Stage::Activating { .. }) {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
            }
            self.held.push_back(payload.to_vec());
            return;
        }
        let mut trust = self.trust();
        let assignment = match trust.check_assignment(payload, now) {
            Ok(assignment) => assignment,
            // The retained assignment comes again on every reconnect: not news.
            Err(TrustError::Replay { have, got }) if have == got => return,
            Err(err) => {
                self.counters.refused_assignments += 1;
                let kind = EventKind::InstallFailed {
                    reason: err.failure_code(),
                };
                self.event(
                    now,
                    kind,
                    None,
                    None,
                    format!("assignment refused: {err}"),
                    fx,
                );
                return;
            }
        };
        trust.record_assignment(&assignment);
        self.floors = trust.floors.clone();
        self.dirty = true;
        if let Stage::Fetching { job, seq, .. } = &self.stage {
            tracing::debug!(device_id = %self.id, superseded = seq, by = assignment.seq, "cancelling the superseded download");
            fx.cancel_fetch(*job);
            self.stage = Stage::Idle;
        }
        self.jobs.clear();
        let seq = assignment.seq;
        if let Some(model) = &assignment.active
            && self
                .active
                .as_ref()
                .is_none_or(|m| m.digest() != model.manifest_digest)
        {
            self.jobs.push_back(Job::Install {
                seq,
                model: model.clone(),
                policy: trust.manifest_policy(&assignment, model, now),
            });
        }
        let wanted_shadow = assignment.shadow.as_ref().map(|m| m.manifest_digest);
        if wanted_shadow != self.shadow.as_ref().map(Model::digest) {
            let model = assignment
                .shadow
                .as_ref()
                .map(|m| (m.clone(), trust.manifest_policy(&assignment, m, now)));
            self.jobs.push_back(Job::Shadow { seq, model });
        }
        self.run_jobs(now, fx);
    }

    /// Starts the next job while the device is idle.
    fn run_jobs(&mut self, now: Timestamp, fx: &mut dyn Effects) {
        while matches!(self.stage, Stage::Idle) {
            let Some(job) = self.jobs.pop_front() else {
                return;
            };
            match job {
                Job::Install { seq, model, policy } => {
                    let detail = format!("assignment {seq} from {}", model.bundle_url);
                    let kind = EventKind::Downloading;
                    self.event(now, kind, Some(model_ref(&model)), Some(seq), detail, fx);
                    self.fetch(seq, model, policy, false, fx);
                }
                Job::Shadow { seq, model: None } => {
                    if let Some(old) = self.shadow.take() {
                        self.dirty = true;
                        self.view_changed = true;
                        let detail = String::from("the assignment names no shadow model");
                        let kind = EventKind::ShadowStopped;
                        self.event(now, kind, Some(old.model_ref()), Some(seq), detail, fx);
                    }
                }
                Job::Shadow {
                    seq,
                    model: Some((model, policy)),
                } => self.fetch(seq, model, policy, true, fx),
            }
        }
    }

    fn fetch(
        &mut self,
        seq: u64,
        model: AssignedModel,
        policy: ManifestPolicy,
        shadow: bool,
        fx: &mut dyn Effects,
    ) {
        let job = self.next_job;
        self.next_job += 1;
        fx.fetch(FetchRequest {
            job,
            model: model.clone(),
            policy,
        });
        self.stage = Stage::Fetching {
            job,
            seq,
            model,
            shadow,
        };
    }

    fn on_fetched(&mut self, now: Timestamp, job: u64, result: FetchResult, fx: &mut dyn Effects) {
        let Stage::Fetching {
            job: current,
            seq,
            model,
            shadow,
        } = self.stage.clone()
        else {
            return;
        };
        if current != job {
            return;
        }
        self.stage = Stage::Idle;
        let reference = model_ref(&model);
        match (result, shadow) {
            (Err(failure), _) => {
                let kind = EventKind::InstallFailed {
                    reason: failure.code,
                };
                self.event(now, kind, Some(reference), Some(seq), failure.message, fx);
            }
            (Ok(manifest), false) => self.install(now, seq, model, manifest, fx),
            (Ok(manifest), true) => {
                if let Some(old) = self.shadow.take() {
                    let kind = EventKind::ShadowStopped;
                    let detail = String::from("replaced");
                    self.event(now, kind, Some(old.model_ref()), Some(seq), detail, fx);
                }
                self.shadow = Some(Model {
                    assigned: model,
                    manifest,
                });
                self.dirty = true;
                self.view_changed = true;
                let detail = String::from("running on copies of live requests");
                self.event(
                    now,
                    EventKind::ShadowStarted,
                    Some(reference),
                    Some(seq),
                    detail,
                    fx,
                );
            }
        }
        self.run_jobs(now, fx);
    }

    /// A verified bundle: installed (on trial) or refused, then the activation is scheduled.
    fn install(
        &mut self,
        now: Timestamp,
        seq: u64,
        model: AssignedModel,
        manifest: Arc<Manifest>,
        fx: &mut dyn Effects,
    ) {
        let reference = model_ref(&model);
        let behaviour = fx.behaviour(&model_key(&model));
        if self.rng.random_bool(behaviour.install_failure) {
            let kind = EventKind::InstallFailed {
                reason: behaviour.install_failure_reason,
            };
            let detail = String::from("simulated install failure");
            self.event(now, kind, Some(reference), Some(seq), detail, fx);
            return;
        }
        self.floors.raise_release(&manifest.name, manifest.release);
        let delay = behaviour.activation_delay_ms.sample(&mut self.rng).max(0.0) as u64;
        let failure = if self.rng.random_bool(behaviour.activation_failure) {
            Some((
                behaviour.activation_failure_reason,
                String::from("simulated activation failure"),
            ))
        } else {
            let runtime = &manifest.runtime;
            let (ok, errors) =
                telemetry::grace_counts(&mut self.rng, &behaviour, runtime.grace_window_s);
            error_rate_breach(ok, errors, runtime.max_error_rate)
                .map(|r| (FailureCode::ErrorRate, r))
        };
        self.previous = self.active.take();
        self.active = Some(Model {
            assigned: model,
            manifest,
        });
        self.changed(now);
        let detail = String::from("installed");
        self.event(
            now,
            EventKind::Installed,
            Some(reference),
            Some(seq),
            detail,
            fx,
        );
        self.stage = Stage::Activating {
            seq,
            until: now.plus_millis(delay),
            failure,
        };
    }

    fn changed(&mut self, now: Timestamp) {
        self.last_change_at = Some(now);
        self.dirty = true;
        self.view_changed = true;
    }

    fn on_tick(&mut self, now: Timestamp, fx: &mut dyn Effects) {
        if now >= self.next_resend {
            self.next_resend = now.plus_millis(RESEND_CHECK_MS);
            self.resend(now, fx);
        }
        if let Stage::Activating {
            seq,
            until,
            failure,
        } = self.stage.clone()
            && now >= until
        {
            self.finish_activation(now, seq, failure, fx);
        }
        if now >= self.window_started.plus_millis(self.window_ms) {
            self.close_window(now, fx);
        }
    }

    fn finish_activation(
        &mut self,
        now: Timestamp,
        seq: u64,
        failure: Option<(FailureCode, String)>,
        fx: &mut dyn Effects,
    ) {
        self.stage = Stage::Idle;
        let trial = self.active();
        match failure {
            None => {
                let detail = String::from("passed its self-test and grace window");
                self.event(now, EventKind::Activated, trial, Some(seq), detail, fx);
            }
            Some((reason, detail)) => {
                // The agent's fall-back: the previous model serves again, nothing behind it.
                self.active = self.previous.take();
                self.changed(now);
                let kind = EventKind::RolledBack {
                    reason,
                    to: self.active(),
                };
                self.event(now, kind, trial, Some(seq), detail, fx);
            }
        }
        while let Some(payload) = self.held.pop_front() {
            self.on_assignment(now, &payload, fx);
        }
        self.run_jobs(now, fx);
    }

    /// Ends the telemetry window and spools it (no window while no model is active).
    fn close_window(&mut self, now: Timestamp, fx: &mut dyn Effects) {
        let started = std::mem::replace(&mut self.window_started, now);
        let Some(active) = &self.active else {
            return;
        };
        let behaviour = fx.behaviour(&model_key(&active.assigned));
        let active_ref = active.model_ref();
        let shadow = self
            .shadow
            .as_ref()
            .map(|m| (m.model_ref(), fx.behaviour(&model_key(&m.assigned))));
        let models = WindowModels {
            active: (&active_ref, &active.manifest, &behaviour),
            shadow: shadow.as_ref().map(|(model, b)| (model, b)),
        };
        let window = telemetry::window(&mut self.rng, &models, started, now);
        self.spool(now, TopicKind::Telemetry, DeviceBody::Telemetry(window), fx);
        self.flush(fx);
    }

    /// Spools an event, publishes the new status, and sends what is pending (the agent's order).
    fn event(
        &mut self,
        now: Timestamp,
        kind: EventKind,
        model: Option<ModelRef>,
        seq: Option<u64>,
        detail: String,
        fx: &mut dyn Effects,
    ) {
        match &kind {
            EventKind::Installed => self.counters.installed += 1,
            EventKind::Activated => self.counters.activated += 1,
            EventKind::RolledBack { .. } => self.counters.rolled_back += 1,
            EventKind::InstallFailed { .. } => self.counters.install_failed += 1,
            _ => {}
        }
        tracing::debug!(device_id = %self.id, ?kind, model = ?model.as_ref().map(|m| m.version.as_str()), %detail, "event");
        let event = DeviceEvent {
            at: now,
            kind,
            model,
            assignment_seq: seq,
            detail,
        };
        self.spool(now, TopicKind::Event, DeviceBody::Event(event), fx);
        self.publish_status(now, fx);
        self.flush(fx);
    }

    fn publish_status(&mut self, now: Timestamp, fx: &mut dyn Effects) {
        if self.connected {
            fx.publish(TopicKind::Status, self.status_frame(true, now), true);
        }
    }

    /// The next sequence number, if it is durably reserved.
    fn take_seq(&mut self, fx: &dyn Effects) -> Option<u64> {
        if self.next_seq >= fx.seq_durable() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.next_seq + SEQ_BLOCK / 2 >= self.seq_limit {
            self.seq_limit += SEQ_BLOCK;
            self.dirty = true;
        }
        Some(seq)
    }

    /// Gives a report its sequence number and spools it, or parks it (in order) until its
    /// number is durable.
    fn spool(&mut self, now: Timestamp, kind: TopicKind, body: DeviceBody, fx: &mut dyn Effects) {
        if !self.parked.is_empty() {
            self.parked.push_back((kind, body));
            return;
        }
        match self.take_seq(fx) {
            Some(seq) => self.insert(seq, now, kind, body, fx),
            None => self.parked.push_back((kind, body)),
        }
    }

    /// Seals a report under `seq` into the spool; drops the oldest beyond the bound and reports
    /// the drop, as the agent's spool does.
    fn insert(
        &mut self,
        seq: u64,
        now: Timestamp,
        kind: TopicKind,
        body: DeviceBody,
        fx: &mut dyn Effects,
    ) {
        let frame = DeviceMessage::new(self.id.clone(), seq, now, body).seal(&self.key);
        self.spool.insert(seq, Spooled::new(kind, frame));
        let mut dropped: Option<(u64, u64, u64)> = None;
        while self.spool.len() > self.spool_max {
            let Some((oldest, _)) = self.spool.pop_first() else {
                break;
            };
            self.counters.dropped += 1;
            dropped = Some(match dropped {
                None => (1, oldest, oldest),
                Some((count, first, _)) => (count + 1, first, oldest),
            });
        }
        if let Some((count, first_seq, last_seq)) = dropped {
            let event = DeviceEvent {
                at: now,
                kind: EventKind::SpoolDropped {
                    count,
                    first_seq,
                    last_seq,
                },
                model: None,
                assignment_seq: None,
                detail: format!("the offline spool was full; dropped {count} report(s)"),
            };
            let body = DeviceBody::Event(event);
            match self.take_seq(fx) {
                Some(seq) => {
                    let frame = DeviceMessage::new(self.id.clone(), seq, now, body).seal(&self.key);
                    self.spool
                        .insert(seq, Spooled::new(TopicKind::Event, frame));
                }
                None => self.parked.push_back((TopicKind::Event, body)),
            }
        }
    }

    /// Sequences parked reports once their numbers are durable.
    fn unpark(&mut self, fx: &mut dyn Effects) {
        let now = self.last_seen;
        while !self.parked.is_empty() {
            let Some(seq) = self.take_seq(fx) else {
                break;
            };
            let Some((kind, body)) = self.parked.pop_front() else {
                break;
            };
            self.insert(seq, now, kind, body, fx);
        }
        self.flush(fx);
    }

    /// Publishes spooled reports not yet sent on this connection, oldest first.
    fn flush(&mut self, fx: &mut dyn Effects) {
        if !self.connected {
            return;
        }
        let now = self.last_seen;
        for (&seq, report) in self.spool.range_mut(self.sent_up_to + 1..) {
            if !fx.publish(report.kind, report.frame.clone(), false) {
                break;
            }
            if seq <= self.high_sent {
                self.counters.resent += 1;
            } else {
                self.counters.sent += 1;
                self.high_sent = seq;
            }
            report.published_at = Some(now);
            self.sent_up_to = seq;
        }
    }

    /// Publishes again what was published on this connection and stayed unacknowledged for
    /// [`RESEND_MS`]; the controller ingests each report once.
    fn resend(&mut self, now: Timestamp, fx: &mut dyn Effects) {
        if !self.connected {
            return;
        }
        for report in self.spool.range_mut(..=self.sent_up_to).map(|(_, r)| r) {
            let due = report
                .published_at
                .is_none_or(|at| now.millis_since(at) >= RESEND_MS);
            if !due {
                continue;
            }
            if !fx.publish(report.kind, report.frame.clone(), false) {
                break;
            }
            self.counters.resent += 1;
            report.published_at = Some(now);
        }
        self.flush(fx);
    }
}

/// One unacknowledged report: its topic kind, its sealed frame, when it was last published.
#[derive(Debug)]
struct Spooled {
    kind: TopicKind,
    frame: Bytes,
    published_at: Option<Timestamp>,
}

impl Spooled {
    fn new(kind: TopicKind, frame: Vec<u8>) -> Self {
        Self {
            kind,
            frame: Bytes::from(frame),
            published_at: None,
        }
    }
}

#[cfg(test)]
mod tests;
