//! The rollout state machine: pure and deterministic. [`Rollout::handle`] takes `now` and one
//! input (a tick, a device report, an operator command) and returns the actions the driver must
//! carry out; [`Rollout::next_deadline`] says when the driver must tick it next. No I/O and no
//! clock here: the driver commits the new state together with the actions (its outbox) in one
//! transaction before publishing anything, so a restart resumes exactly where it stopped.
//!
//! A rollout moves a fixed set of member devices from the `baseline` model to the `candidate`:
//! an optional shadow phase, then cumulative waves. Rules it follows:
//! - Members are taken in the order given (the driver sorts them). A wave's target is a count or a
//!   percentage, rounded up, of the members its label selector matches (all members without
//!   one), cumulative over the waves.
//! - Shadow phase: a cohort (count or percentage, the first online members) runs the baseline with
//!   the candidate in shadow on copies of live inputs. It lasts its duration and until the shadow
//!   gates have their minimum sample; then the cohort's shadow is cleared and the waves start.
//! - Offline members are skipped when a wave picks devices and picked later once online; a wave
//!   with nobody left to pick ends short; members still offline when the last wave ends stay on
//!   the baseline and are named in the completion record. An assigned member that goes offline
//!   still counts as installing (and can breach the progress deadline). A joiner (a device that
//!   starts matching mid-rollout while on the baseline) is appended and counts towards later
//!   waves' percentages.
//! - At most `max_per_minute` assignments are issued in any 60 s.
//! - A wave is done when all its picked members run the candidate, a failed install counting as
//!   done-and-failed; then it bakes for the wave's bake time (`promote` skips it) while the gates
//!   are evaluated. With `require_evidence`, a bake (and the shadow phase) also waits until every
//!   gate has its minimum sample; then the next wave starts.
//! - A wave that has not finished installing within `progress_deadline` of its start breaches; so
//!   does a bake or shadow phase still short of evidence `progress_deadline` after its end.
//! - A breached gate pauses or aborts per policy; abort (or the operator's abort/rollback) sends
//!   every member that was given the candidate a rollback assignment to the baseline, and clears
//!   the shadow of members in the shadow cohort.
//! - Only the candidate and the baseline are ever assigned.

use std::collections::{BTreeMap, HashMap, VecDeque};

use edgefleet_protocol::messages::FeedbackStats;
use edgefleet_protocol::sketch::LatencyHistogram;
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};
use serde::{Deserialize, Serialize};

/// Device labels, and label selectors (every pair must match).
pub type Labels = BTreeMap<String, String>;

/// Whether `labels` carry every pair of `selector` (an empty selector matches everything).
pub fn matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// How many devices a wave brings to the candidate, cumulatively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveSize {
    Count(u32),
    Percent(u8),
}

impl WaveSize {
    /// The count this size means out of `n` (percentages rounded up).
    pub fn of(self, n: usize) -> usize {
        match self {
            WaveSize::Count(c) => (c as usize).min(n),
            WaveSize::Percent(p) => (n * usize::from(p.min(100))).div_ceil(100),
        }
    }
}

impl std::fmt::Display for WaveSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaveSize::Count(c) => write!(f, "{c}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub size: WaveSize,
    /// How long the wave runs on the candidate, with the gates evaluated, before the next.
    pub bake_ms: u64,
    /// Only members with these labels are counted and picked by this wave.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub select: Labels,
}

/// The shadow phase before the waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowPlan {
    pub cohort: WaveSize,
    pub duration_ms: u64,
}

/// Limits the candidate must stay within, each with the least evidence needed to judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Failed installs (download, verification, self-test, local rollback) over installs
    /// attempted.
    pub max_install_failure_rate: f64,
    pub min_installs: u64,
    /// Candidate inference error rate minus the baseline's (also the shadow's error rate minus
    /// the baseline's during the shadow phase).
    pub max_error_rate_increase: f64,
    /// p95 latency of the candidate over the baseline's.
    pub max_p95_latency_ratio: f64,
    /// Inferences needed on each side before the error and latency gates judge.
    pub min_inferences: u64,
    /// Lowest share of shadowed requests where the candidate's top output agrees with the
    /// baseline's; `None` turns the gate off.
    pub min_shadow_agreement: Option<f64>,
    /// Shadowed requests needed before the shadow gates judge.
    pub min_shadow_compared: u64,
    /// Highest mean drift score of the candidate's windows (from the drift detector); `None`
    /// turns the gate off.
    pub max_drift_score: Option<f64>,
    /// Drift windows needed before the drift gate judges.
    pub min_drift_windows: u64,
    /// A bake (or the shadow phase) ends only once every gate has its minimum sample.
    pub require_evidence: bool,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_install_failure_rate: 0.05,
            min_installs: 1,
            max_error_rate_increase: 0.01,
            max_p95_latency_ratio: 1.5,
            min_inferences: 200,
            min_shadow_agreement: None,
            min_shadow_compared: 200,
            max_drift_score: None,
            min_drift_windows: 3,
            require_evidence: true,
        }
    }
}

/// What a breached gate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnBreach {
    Pause,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub candidate: Sha256Digest,
    pub baseline: Sha256Digest,
    pub shadow: Option<ShadowPlan>,
    pub waves: Vec<Wave>,
    pub max_per_minute: u32,
    pub progress_deadline_ms: u64,
    pub gates: Gates,
    pub on_breach: OnBreach,
    /// Wait for an operator's approval before the first assignment.
    #[serde(default)]
    pub approval: bool,
}

/// Where one member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// On the baseline, not picked yet.
    Waiting,
    /// On the baseline with the candidate in shadow.
    Shadowing,
    /// Given the candidate; not active yet.
    Assigned,
    Active,
    Failed,
    /// Given a rollback assignment to the baseline.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub device: DeviceId,
    pub online: bool,
    pub state: MemberState,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// The wave that gave it the candidate (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u16>,
}

impl Member {
    /// A member as the rollout starts with it: on the baseline, not picked.
    pub fn new(device: DeviceId, online: bool, labels: Labels) -> Self {
        Self {
            device,
            online,
            state: MemberState::Waiting,
            labels,
            wave: None,
        }
    }
}

/// One telemetry window's numbers, as the gates use them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub inferences: u64,
    pub errors: u64,
    pub latency: LatencyHistogram,
}

impl Sample {
    pub fn merge(&mut self, other: &Sample) {
        self.inferences = self.inferences.saturating_add(other.inferences);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
    }

    /// Requests answered or failed.
    pub fn requests(&self) -> u64 {
        self.inferences.saturating_add(self.errors)
    }

    /// Errors over requests.
    pub fn error_rate(&self) -> f64 {
        match self.requests() {
            0 => 0.0,
            requests => self.errors as f64 / requests as f64,
        }
    }
}

/// One window of the candidate running in shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShadowSample {
    /// Requests where both models answered and were compared.
    pub compared: u64,
    /// Of those, where the top outputs agreed.
    pub agree: u64,
    /// Requests the shadow failed on.
    pub errors: u64,
}

impl ShadowSample {
    pub fn merge(&mut self, other: &ShadowSample) {
        self.compared = self.compared.saturating_add(other.compared);
        self.agree = self.agree.saturating_add(other.agree);
        self.errors = self.errors.saturating_add(other.errors);
    }

    pub fn agreement(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.agree as f64 / self.compared as f64)
    }

    pub fn error_rate(&self) -> f64 {
        let requests = self.compared.saturating_add(self.errors);
        if requests == 0 {
            0.0
        } else {
            self.errors as f64 / requests as f64
        }
    }
}

/// What a device told the controller that matters to the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    Activated(Sha256Digest),
    /// Installing or activating `model` failed, or the device put its previous model back.
    InstallFailed(Sha256Digest),
    Online(bool),
    /// A window of inference on `model`.
    Telemetry {
        model: Sha256Digest,
        sample: Sample,
    },
    /// A window of `model` running in shadow.
    Shadow {
        model: Sha256Digest,
        sample: ShadowSample,
    },
    /// Ground-truth feedback over one window of `model` (used by experiments).
    Feedback {
        model: Sha256Digest,
        stats: FeedbackStats,
    },
    /// The drift detector's score for one window of `model` on this device.
    Drift {
        model: Sha256Digest,
        score: f64,
    },
    /// A device that now matches the rollout's selector and runs the baseline.
    Joined {
        labels: Labels,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Lets a rollout that waits for approval begin.
    Approve,
    Pause {
        reason: String,
    },
    Resume,
    /// Ends the current bake (or the shadow phase) now, evidence or not.
    Promote,
    /// Stops the rollout and rolls every candidate device back.
    Abort {
        reason: String,
    },
    /// Rolls every candidate device back, also after the rollout completed.
    Rollback {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Tick,
    Device {
        device: DeviceId,
        report: DeviceReport,
    },
    Operator(Command),
}

/// Which limit was crossed, with the numbers that crossed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Breach {
    InstallFailures {
        failed: u64,
        attempted: u64,
        rate: f64,
    },
    ErrorRate {
        candidate: f64,
        baseline: f64,
    },
    LatencyP95 {
        candidate_us: u64,
        baseline_us: u64,
        ratio: f64,
    },
    ShadowAgreement {
        agreement: f64,
        limit: f64,
        compared: u64,
    },
    ShadowErrors {
        shadow: f64,
        baseline: f64,
    },
    ProgressDeadline {
        wave: usize,
        pending: usize,
    },
    InsufficientEvidence {
        missing: String,
    },
    Drift {
        mean: f64,
        limit: f64,
        windows: u64,
    },
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Breach::InstallFailures {
                failed,
                attempted,
                rate,
            } => write!(
                f,
                "install failures {failed}/{attempted} ({:.1}%)",
                rate * 100.0
            ),
            Breach::ErrorRate {
                candidate,
                baseline,
            } => write!(
                f,
                "inference error rate {:.2}% vs baseline {:.2}%",
                candidate * 100.0,
                baseline * 100.0
            ),
            Breach::LatencyP95 {
                candidate_us,
                baseline_us,
                ratio,
            } => write!(
                f,
                "p95 latency {candidate_us} µs vs baseline {baseline_us} µs ({ratio:.2}x)"
            ),
            Breach::ShadowAgreement {
                agreement,
                limit,
                compared,
            } => write!(
                f,
                "shadow agreement {:.1}% over {compared} request(s) below {:.1}%",
                agreement * 100.0,
                limit * 100.0
            ),
            Breach::ShadowErrors { shadow, baseline } => write!(
                f,
                "shadow error rate {:.2}% vs baseline {:.2}%",
                shadow * 100.0,
                baseline * 100.0
            ),
            Breach::Drift {
                mean,
                limit,
                windows,
            } => write!(
                f,
                "mean drift score {mean:.3} over {windows} window(s) above {limit:.3}"
            ),
            Breach::ProgressDeadline { wave, pending } => write!(
                f,
                "wave {} still had {pending} device(s) installing at its progress deadline",
                wave + 1
            ),
            Breach::InsufficientEvidence { missing } => {
                write!(f, "not enough evidence by the progress deadline: {missing}")
            }
        }
    }
}

/// Where a paused rollout resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Shadow,
    Wave(usize),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Nothing assigned yet: waits for an operator's approval.
    AwaitingApproval,
    /// The shadow cohort runs the candidate in shadow until `until` (and enough evidence).
    Shadowing {
        until: Timestamp,
    },
    /// Wave `wave` is installing (started at `since`).
    Installing {
        wave: usize,
        since: Timestamp,
    },
    /// Wave `wave` runs the candidate until `until` (and enough evidence).
    Baking {
        wave: usize,
        until: Timestamp,
    },
    Paused {
        stage: Stage,
        reason: String,
    },
    Completed,
    Aborted {
        reason: String,
    },
    /// Rolled back by the operator.
    RolledBack {
        reason: String,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::AwaitingApproval => "awaiting_approval",
            Phase::Shadowing { .. } => "shadowing",
            Phase::Installing { .. } => "installing",
            Phase::Baking { .. } => "baking",
            Phase::Paused { .. } => "paused",
            Phase::Completed => "completed",
            Phase::Aborted { .. } => "aborted",
            Phase::RolledBack { .. } => "rolled_back",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::Aborted { .. } | Phase::RolledBack { .. }
        )
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Publish a signed assignment of `model` with `shadow` (rollback: the explicit-rollback
    /// flag).
    Assign {
        device: DeviceId,
        model: Sha256Digest,
        shadow: Option<Sha256Digest>,
        rollback: bool,
    },
    /// Record in the audit log (and show in `rollout status`).
    Record(String),
}

/// Member positions by device id: derived from `members`, rebuilt when it falls behind.
#[derive(Clone, Default)]
struct MemberIndex(HashMap<DeviceId, usize>);

impl PartialEq for MemberIndex {
    fn eq(&self, _: &Self) -> bool {
        true // derived data
    }
}

impl std::fmt::Debug for MemberIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemberIndex({})", self.0.len())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub spec: Spec,
    pub members: Vec<Member>,
    pub phase: Phase,
    /// Telemetry of the members on each side since the rollout started.
    pub candidate: Sample,
    pub baseline: Sample,
    /// The candidate's shadow windows in the shadow cohort.
    pub shadow: ShadowSample,
    /// Drift scores of the candidate's windows: count and sum.
    pub drift_windows: u64,
    pub drift_sum: f64,
    /// The current bake (or shadow phase) was promoted: it ends without waiting for evidence.
    promoted: bool,
    /// Assignments issued per second over the last minute, for `max_per_minute`.
    issued: VecDeque<(u64, u32)>,
    /// The latest `now` the rollout was stepped at.
    last_now: Timestamp,
    #[serde(skip)]
    index: MemberIndex,
}

const MINUTE_MS: u64 = 60_000;

impl Rollout {
    /// A rollout over `members`, starting at `now`.
    pub fn start(now: Timestamp, spec: Spec, members: Vec<Member>) -> (Self, Vec<Action>) {
        let phase = if spec.approval {
            Phase::AwaitingApproval
        } else {
            first_phase(&spec, now)
        };
        let mut rollout = Self {
            spec,
            members: members
                .into_iter()
                .map(|m| Member {
                    state: MemberState::Waiting,
                    wave: None,
                    ..m
                })
                .collect(),
            phase,
            candidate: Sample::default(),
            baseline: Sample::default(),
            shadow: ShadowSample::default(),
            drift_windows: 0,
            drift_sum: 0.0,
            promoted: false,
            issued: VecDeque::new(),
            last_now: now,
            index: MemberIndex::default(),
        };
        let mut actions = vec![Action::Record(format!(
            "rollout started: {} member(s), {}{} wave(s)",
            rollout.members.len(),
            if rollout.spec.shadow.is_some() {
                "a shadow phase, "
            } else {
                ""
            },
            rollout.spec.waves.len()
        ))];
        if rollout.spec.waves.is_empty() {
            rollout.phase = Phase::Completed;
            actions.push(Action::Record("no waves: nothing to do".into()));
            return (rollout, actions);
        }
        if rollout.phase == Phase::AwaitingApproval {
            actions.push(Action::Record(
                "awaiting an operator's approval (`edgefleet rollout approve`)".into(),
            ));
            return (rollout, actions);
        }
        actions.extend(rollout.step(now));
        (rollout, actions)
    }

    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Action> {
        self.handle_all(now, std::iter::once(input))
    }

    /// Applies every input, then advances once: what many `handle` calls at the same `now` do,
    /// in one pass over the members.
    pub fn handle_all(
        &mut self,
        now: Timestamp,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for input in inputs {
            match input {
                Input::Tick => {}
                Input::Device { device, report } => self.on_device(&device, report, &mut actions),
                Input::Operator(command) => self.on_command(now, command, &mut actions),
            }
        }
        actions.extend(self.step(now));
        actions
    }

    /// When the driver must tick next (`None`: only inputs can move the rollout). Always after
    /// the last `now` the rollout saw.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let deadline = self.spec.progress_deadline_ms;
        let candidates: Vec<Timestamp> = match &self.phase {
            Phase::Shadowing { until } => {
                vec![*until, Timestamp(until.0.saturating_add(deadline))]
            }
            Phase::Installing { since, .. } => {
                vec![Timestamp(since.0.saturating_add(deadline))]
            }
            Phase::Baking { until, .. } => {
                vec![*until, Timestamp(until.0.saturating_add(deadline))]
            }
            Phase::AwaitingApproval
            | Phase::Paused { .. }
            | Phase::Completed
            | Phase::Aborted { .. }
            | Phase::RolledBack { .. } => return None,
        };
        let slot = match self.phase {
            Phase::Shadowing { .. } | Phase::Installing { .. } => self.rate_limited_until(),
            _ => None,
        };
        candidates
            .into_iter()
            .chain(slot)
            .filter(|t| *t > self.last_now)
            .min()
    }

    pub fn is_finished(&self) -> bool {
        self.phase.is_finished()
    }

    fn position(&mut self, device: &DeviceId) -> Option<usize> {
        if self.index.0.len() != self.members.len() {
            self.index.0 = self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| (m.device.clone(), i))
                .collect();
        }
        self.index.0.get(device).copied()
    }

    pub fn member(&self, device: &DeviceId) -> Option<&Member> {
        match self.index.0.get(device) {
            Some(&i) if self.index.0.len() == self.members.len() => self.members.get(i),
            _ => self.members.iter().find(|m| &m.device == device),
        }
    }

    fn on_device(&mut self, device: &DeviceId, report: DeviceReport, actions: &mut Vec<Action>) {
        let candidate = self.spec.candidate;
        let baseline = self.spec.baseline;
        if let DeviceReport::Joined { labels } = report {
            if self.position(device).is_none() && !self.is_finished() {
                self.members.push(Member::new(device.clone(), true, labels));
                actions.push(Action::Record(format!("{device} joined the rollout")));
            }
            return;
        }
        let Some(at) = self.position(device) else {
            return;
        };
        let member = &mut self.members[at];
        match report {
            DeviceReport::Online(online) => member.online = online,
            DeviceReport::Activated(model)
                if model == candidate && member.state == MemberState::Assigned =>
            {
                member.state = MemberState::Active;
            }
            DeviceReport::InstallFailed(model)
                if model == candidate
                    && matches!(member.state, MemberState::Assigned | MemberState::Active) =>
            {
                let after = if member.state == MemberState::Active {
                    " after it was active"
                } else {
                    ""
                };
                member.state = MemberState::Failed;
                actions.push(Action::Record(format!(
                    "{device}: the candidate failed{after}"
                )));
            }
            DeviceReport::Drift { model, score }
                if model == candidate
                    && member.state == MemberState::Active
                    && score.is_finite() =>
            {
                self.drift_windows += 1;
                self.drift_sum += score;
            }
            DeviceReport::Telemetry { model, sample } => {
                if model == candidate && member.state == MemberState::Active {
                    self.candidate.merge(&sample);
                } else if model == baseline
                    && matches!(
                        member.state,
                        MemberState::Waiting | MemberState::Shadowing | MemberState::Assigned
                    )
                {
                    self.baseline.merge(&sample);
                }
            }
            DeviceReport::Shadow { model, sample }
                if model == candidate && member.state == MemberState::Shadowing =>
            {
                self.shadow.merge(&sample);
            }
            _ => {}
        }
    }

    fn on_command(&mut self, now: Timestamp, command: Command, actions: &mut Vec<Action>) {
        match (command, self.phase.clone()) {
            (Command::Rollback { reason }, Phase::Completed) => self.end(
                Phase::RolledBack {
                    reason: format!("rollback requested by the operator: {reason}"),
                },
                actions,
            ),
            (_, phase) if phase.is_finished() => {
                actions.push(Action::Record(format!(
                    "the rollout is {}; command ignored",
                    phase.name().replace('_', " ")
                )));
            }
            (Command::Approve, Phase::AwaitingApproval) => {
                actions.push(Action::Record("approved: the rollout begins".into()));
                self.phase = first_phase(&self.spec, now);
            }
            (Command::Pause { reason }, phase) if phase != Phase::AwaitingApproval => {
                let stage = match phase {
                    Phase::Shadowing { .. } => Stage::Shadow,
                    Phase::Installing { wave, .. } | Phase::Baking { wave, .. } => {
                        Stage::Wave(wave)
                    }
                    Phase::Paused { .. } => {
                        actions.push(Action::Record("already paused; pause ignored".into()));
                        return;
                    }
                    _ => return,
                };
                actions.push(Action::Record(format!("paused by the operator: {reason}")));
                self.phase = Phase::Paused { stage, reason };
            }
            (Command::Resume, Phase::Paused { stage, .. }) => {
                actions.push(Action::Record("resumed".into()));
                // The stage restarts its clock: progress deadline, bake and shadow from now.
                self.promoted = false;
                self.phase = match stage {
                    Stage::Shadow => Phase::Shadowing {
                        until: Timestamp(
                            now.0
                                .saturating_add(self.spec.shadow.map_or(0, |s| s.duration_ms)),
                        ),
                    },
                    Stage::Wave(wave) => Phase::Installing { wave, since: now },
                };
            }
            (Command::Promote, Phase::Baking { wave, .. }) => {
                actions.push(Action::Record(format!(
                    "wave {} promoted: bake skipped",
                    wave + 1
                )));
                self.promoted = true;
                self.phase = Phase::Baking { wave, until: now };
            }
            (Command::Promote, Phase::Shadowing { .. }) => {
                actions.push(Action::Record("shadow phase promoted: ended now".into()));
                self.promoted = true;
                self.phase = Phase::Shadowing { until: now };
            }
            (Command::Abort { reason }, _) => self.end(
                Phase::Aborted {
                    reason: format!("aborted by the operator: {reason}"),
                },
                actions,
            ),
            (Command::Rollback { reason }, _) => self.end(
                Phase::RolledBack {
                    reason: format!("rollback requested by the operator: {reason}"),
                },
                actions,
            ),
            (command, phase) => actions.push(Action::Record(format!(
                "{} does not apply while {}; ignored",
                command_name(&command),
                phase.name()
            ))),
        }
    }

    /// Ends the rollout in `phase`: every member given the candidate gets a rollback assignment
    /// to the baseline, and members in the shadow cohort have their shadow cleared.
    fn end(&mut self, phase: Phase, actions: &mut Vec<Action>) {
        if let Phase::Aborted { reason } | Phase::RolledBack { reason } = &phase {
            actions.push(Action::Record(format!("{reason}; rolling back")));
        }
        let baseline = self.spec.baseline;
        for member in &mut self.members {
            match member.state {
                MemberState::Assigned | MemberState::Active | MemberState::Failed => {
                    member.state = MemberState::RolledBack;
                    actions.push(Action::Assign {
                        device: member.device.clone(),
                        model: baseline,
                        shadow: None,
                        rollback: true,
                    });
                }
                MemberState::Shadowing => {
                    member.state = MemberState::Waiting;
                    actions.push(Action::Assign {
                        device: member.device.clone(),
                        model: baseline,
                        shadow: None,
                        rollback: false,
                    });
                }
                MemberState::Waiting | MemberState::RolledBack => {}
            }
        }
        self.phase = phase;
    }

    fn breach(&mut self, breach: Breach, stage: Stage, actions: &mut Vec<Action>) {
        match self.spec.on_breach {
            OnBreach::Pause => {
                actions.push(Action::Record(format!("gate breached, paused: {breach}")));
                self.phase = Phase::Paused {
                    stage,
                    reason: breach.to_string(),
                };
            }
            OnBreach::Abort => self.end(
                Phase::Aborted {
                    reason: format!("gate breached: {breach}"),
                },
                actions,
            ),
        }
    }

    /// The first gate the candidate is outside of, judged only with enough evidence.
    pub fn gate_breach(&self) -> Option<Breach> {
        let gates = &self.spec.gates;
        let failed = self.count(MemberState::Failed) as u64;
        let attempted = failed + self.count(MemberState::Active) as u64;
        if attempted >= gates.min_installs.max(1) {
            let rate = failed as f64 / attempted as f64;
            if rate > gates.max_install_failure_rate {
                return Some(Breach::InstallFailures {
                    failed,
                    attempted,
                    rate,
                });
            }
        }
        let shadow = &self.shadow;
        if let Some(limit) = gates.min_shadow_agreement
            && shadow.compared >= gates.min_shadow_compared.max(1)
            && let Some(agreement) = shadow.agreement()
            && agreement < limit
        {
            return Some(Breach::ShadowAgreement {
                agreement,
                limit,
                compared: shadow.compared,
            });
        }
        let base = &self.baseline;
        if shadow.compared + shadow.errors >= gates.min_shadow_compared.max(1)
            && base.requests() >= gates.min_inferences
            && shadow.error_rate() - base.error_rate() > gates.max_error_rate_increase
        {
            return Some(Breach::ShadowErrors {
                shadow: shadow.error_rate(),
                baseline: base.error_rate(),
            });
        }
        if let Some(limit) = gates.max_drift_score
            && self.drift_windows >= gates.min_drift_windows.max(1)
        {
            let mean = self.drift_sum / self.drift_windows as f64;
            if mean > limit {
                return Some(Breach::Drift {
                    mean,
                    limit,
                    windows: self.drift_windows,
                });
            }
        }
        let cand = &self.candidate;
        if cand.requests() >= gates.min_inferences && base.requests() >= gates.min_inferences {
            let (c, b) = (cand.error_rate(), base.error_rate());
            if c - b > gates.max_error_rate_increase {
                return Some(Breach::ErrorRate {
                    candidate: c,
                    baseline: b,
                });
            }
            if let (Some(c95), Some(b95)) =
                (cand.latency.quantile(0.95), base.latency.quantile(0.95))
            {
                let ratio = c95 as f64 / b95.max(1) as f64;
                if ratio > gates.max_p95_latency_ratio {
                    return Some(Breach::LatencyP95 {
                        candidate_us: c95,
                        baseline_us: b95,
                        ratio,
                    });
                }
            }
        }
        None
    }

    /// What the gates still lack to judge the current stage, if anything.
    pub fn evidence_missing(&self) -> Option<String> {
        let gates = &self.spec.gates;
        let mut missing = Vec::new();
        if matches!(self.phase, Phase::Shadowing { .. }) {
            let seen = self.shadow.compared + self.shadow.errors;
            if seen < gates.min_shadow_compared {
                missing.push(format!(
                    "{seen}/{} shadowed request(s)",
                    gates.min_shadow_compared
                ));
            }
        } else {
            if self.candidate.requests() < gates.min_inferences {
                missing.push(format!(
                    "{}/{} request(s) on the candidate",
                    self.candidate.requests(),
                    gates.min_inferences
                ));
            }
            if gates.max_drift_score.is_some() && self.drift_windows < gates.min_drift_windows {
                missing.push(format!(
                    "{}/{} drift window(s)",
                    self.drift_windows, gates.min_drift_windows
                ));
            }
        }
        if self.baseline.requests() < gates.min_inferences {
            missing.push(format!(
                "{}/{} request(s) on the baseline",
                self.baseline.requests(),
                gates.min_inferences
            ));
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }

    /// Members wave `wave` counts (its selector's), and how many of them it brings to the
    /// candidate, cumulatively.
    fn target(&self, wave: usize) -> (usize, usize) {
        let select = &self.spec.waves[wave].select;
        let in_scope = self
            .members
            .iter()
            .filter(|m| matches(select, &m.labels))
            .count();
        (in_scope, self.spec.waves[wave].size.of(in_scope))
    }

    fn issued_last_minute(&self) -> usize {
        self.issued.iter().map(|(_, n)| *n as usize).sum()
    }

    fn rate_limited_until(&self) -> Option<Timestamp> {
        if self.issued_last_minute() < self.spec.max_per_minute.max(1) as usize {
            return None;
        }
        self.issued
            .front()
            .map(|(second, _)| Timestamp((second + 1) * 1000 + MINUTE_MS))
    }

    fn note_issued(&mut self, now: Timestamp) {
        let second = now.0 / 1000;
        match self.issued.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => self.issued.push_back((second, 1)),
        }
    }

    /// Gives up to `want` waiting, online members matching `select` the assignment `state`
    /// calls for, within the pace.
    fn pick(
        &mut self,
        now: Timestamp,
        select: &Labels,
        mut want: usize,
        state: MemberState,
        wave: Option<u16>,
        actions: &mut Vec<Action>,
    ) {
        let limit = self.spec.max_per_minute.max(1) as usize;
        let mut issued = self.issued_last_minute();
        let (candidate, baseline) = (self.spec.candidate, self.spec.baseline);
        let mut picked = 0u32;
        for member in &mut self.members {
            if want == 0 || issued >= limit {
                break;
            }
            if member.state == MemberState::Waiting
                && member.online
                && matches(select, &member.labels)
            {
                member.state = state;
                member.wave = wave;
                issued += 1;
                picked += 1;
                want -= 1;
                actions.push(match state {
                    MemberState::Shadowing => Action::Assign {
                        device: member.device.clone(),
                        model: baseline,
                        shadow: Some(candidate),
                        rollback: false,
                    },
                    _ => Action::Assign {
                        device: member.device.clone(),
                        model: candidate,
                        shadow: None,
                        rollback: false,
                    },
                });
            }
        }
        for _ in 0..picked {
            self.note_issued(now);
        }
    }

    /// Advances the phase as far as `now` allows. A shadow phase that ends clears the shadow of
    /// its cohort, except on members the first wave gives the candidate in the same step (their
    /// new assignment replaces the shadow one).
    fn step(&mut self, now: Timestamp) -> Vec<Action> {
        let mut shadow_ended = Vec::new();
        let mut actions = self.advance(now, &mut shadow_ended);
        let baseline = self.spec.baseline;
        for at in shadow_ended {
            let member = &self.members[at];
            if member.state == MemberState::Waiting {
                actions.push(Action::Assign {
                    device: member.device.clone(),
                    model: baseline,
                    shadow: None,
                    rollback: false,
                });
            }
        }
        actions
    }

    fn advance(&mut self, now: Timestamp, shadow_ended: &mut Vec<usize>) -> Vec<Action> {
        let mut actions = Vec::new();
        self.last_now = self.last_now.max(now);
        while let Some((second, _)) = self.issued.front() {
            if (second + 1) * 1000 + MINUTE_MS <= now.0 {
                self.issued.pop_front();
            } else {
                break;
            }
        }
        let deadline = self.spec.progress_deadline_ms;
        loop {
            match self.phase.clone() {
                Phase::Shadowing { until } => {
                    if let Some(breach) = self.gate_breach() {
                        self.breach(breach, Stage::Shadow, &mut actions);
                        continue;
                    }
                    let plan = self.spec.shadow.unwrap_or(ShadowPlan {
                        cohort: WaveSize::Count(0),
                        duration_ms: 0,
                    });
                    let target = plan.cohort.of(self.members.len());
                    let given = self.count(MemberState::Shadowing);
                    let want = target.saturating_sub(given);
                    self.pick(
                        now,
                        &Labels::new(),
                        want,
                        MemberState::Shadowing,
                        None,
                        &mut actions,
                    );
                    if now < until {
                        return actions;
                    }
                    let missing = if self.promoted || !self.spec.gates.require_evidence {
                        None
                    } else {
                        self.evidence_missing()
                    };
                    match missing {
                        None => {
                            actions.push(Action::Record(format!(
                                "shadow phase passed: {} of {} shadowed request(s) agreed, {} failed",
                                self.shadow.agree, self.shadow.compared, self.shadow.errors
                            )));
                            for (at, member) in self.members.iter_mut().enumerate() {
                                if member.state == MemberState::Shadowing {
                                    member.state = MemberState::Waiting;
                                    shadow_ended.push(at);
                                }
                            }
                            self.promoted = false;
                            self.phase = Phase::Installing {
                                wave: 0,
                                since: now,
                            };
                            continue;
                        }
                        Some(missing) if now.0 >= until.0.saturating_add(deadline) => {
                            self.breach(
                                Breach::InsufficientEvidence { missing },
                                Stage::Shadow,
                                &mut actions,
                            );
                            continue;
                        }
                        Some(_) => return actions,
                    }
                }
                Phase::Installing { wave, since } => {
                    if let Some(breach) = self.gate_breach() {
                        self.breach(breach, Stage::Wave(wave), &mut actions);
                        continue;
                    }
                    let select = self.spec.waves[wave].select.clone();
                    let (_, target) = self.target(wave);
                    let given_in_scope = |r: &Rollout| {
                        r.members
                            .iter()
                            .filter(|m| {
                                m.state != MemberState::Waiting && matches(&select, &m.labels)
                            })
                            .count()
                    };
                    let want = target.saturating_sub(given_in_scope(self));
                    self.pick(
                        now,
                        &select,
                        want,
                        MemberState::Assigned,
                        Some(wave as u16),
                        &mut actions,
                    );
                    let given = given_in_scope(self);
                    let pending = self.count(MemberState::Assigned);
                    let online_waiting = self.members.iter().any(|m| {
                        m.state == MemberState::Waiting && m.online && matches(&select, &m.labels)
                    });
                    // Offline members do not hold a wave up: it ends short when nobody else
                    // can be picked.
                    if (given >= target || !online_waiting) && pending == 0 {
                        let bake = self.spec.waves[wave].bake_ms;
                        actions.push(Action::Record(format!(
                            "wave {} installed on {given} device(s); baking {} s",
                            wave + 1,
                            bake / 1000
                        )));
                        self.promoted = false;
                        self.phase = Phase::Baking {
                            wave,
                            until: Timestamp(now.0.saturating_add(bake)),
                        };
                        continue;
                    }
                    if now.0 >= since.0.saturating_add(deadline) {
                        let pending = pending + target.saturating_sub(given);
                        self.breach(
                            Breach::ProgressDeadline { wave, pending },
                            Stage::Wave(wave),
                            &mut actions,
                        );
                        continue;
                    }
                    return actions;
                }
                Phase::Baking { wave, until } => {
                    if let Some(breach) = self.gate_breach() {
                        self.breach(breach, Stage::Wave(wave), &mut actions);
                        continue;
                    }
                    if now < until {
                        return actions;
                    }
                    if !self.promoted
                        && self.spec.gates.require_evidence
                        && let Some(missing) = self.evidence_missing()
                    {
                        if now.0 >= until.0.saturating_add(deadline) {
                            self.breach(
                                Breach::InsufficientEvidence { missing },
                                Stage::Wave(wave),
                                &mut actions,
                            );
                            continue;
                        }
                        return actions;
                    }
                    if wave + 1 < self.spec.waves.len() {
                        actions.push(Action::Record(format!(
                            "wave {} passed its gates",
                            wave + 1
                        )));
                        self.phase = Phase::Installing {
                            wave: wave + 1,
                            since: now,
                        };
                        continue;
                    }
                    let select = &self.spec.waves[wave].select;
                    let (_, target) = self.target(wave);
                    let given = self
                        .members
                        .iter()
                        .filter(|m| m.state != MemberState::Waiting && matches(select, &m.labels))
                        .count();
                    if given < target
                        && self.members.iter().any(|m| {
                            m.state == MemberState::Waiting
                                && m.online
                                && matches(select, &m.labels)
                        })
                    {
                        // Joiners, or members back online during the bake: the last wave
                        // takes them too.
                        self.phase = Phase::Installing { wave, since: now };
                        continue;
                    }
                    actions.push(Action::Record(format!(
                        "completed: {} device(s) on the candidate, {} failed, {} left on the baseline",
                        self.count(MemberState::Active),
                        self.count(MemberState::Failed),
                        self.count(MemberState::Waiting)
                    )));
                    self.phase = Phase::Completed;
                    return actions;
                }
                Phase::AwaitingApproval
                | Phase::Paused { .. }
                | Phase::Completed
                | Phase::Aborted { .. }
                | Phase::RolledBack { .. } => return actions,
            }
        }
    }

    /// Where the rollout stands, for `rollout status` and `watch`.
    pub fn progress(&self) -> Progress {
        let mut waves: Vec<WaveProgress> = self
            .spec
            .waves
            .iter()
            .enumerate()
            .map(|(i, wave)| {
                let (in_scope, target) = self.target(i);
                WaveProgress {
                    wave: i + 1,
                    size: wave.size.to_string(),
                    select: wave.select.clone(),
                    bake_s: wave.bake_ms / 1000,
                    in_scope,
                    target,
                    given: 0,
                    active: 0,
                    failed: 0,
                    pending: 0,
                    rolled_back: 0,
                }
            })
            .collect();
        let mut members = MemberCounts::default();
        for member in &self.members {
            members.total += 1;
            members.online += usize::from(member.online);
            match member.state {
                MemberState::Waiting => members.waiting += 1,
                MemberState::Shadowing => members.shadowing += 1,
                MemberState::Assigned => members.pending += 1,
                MemberState::Active => members.active += 1,
                MemberState::Failed => members.failed += 1,
                MemberState::RolledBack => members.rolled_back += 1,
            }
            if let Some(w) = member.wave.and_then(|w| waves.get_mut(usize::from(w))) {
                w.given += 1;
                match member.state {
                    MemberState::Assigned => w.pending += 1,
                    MemberState::Active => w.active += 1,
                    MemberState::Failed => w.failed += 1,
                    MemberState::RolledBack => w.rolled_back += 1,
                    MemberState::Waiting | MemberState::Shadowing => {}
                }
            }
        }
        let gates = &self.spec.gates;
        let failed = members.failed as u64;
        let attempted = failed + members.active as u64;
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        let p95 = |s: &Sample| s.latency.quantile(0.95);
        let mut gate_values = vec![
            GateValue {
                gate: "install_failure_rate",
                value: ratio(failed, attempted),
                limit: Some(gates.max_install_failure_rate),
                samples: attempted,
                needed: gates.min_installs.max(1),
                detail: format!("{failed}/{attempted} failed"),
            },
            GateValue {
                gate: "error_rate_increase",
                value: (self.candidate.requests() > 0)
                    .then(|| self.candidate.error_rate() - self.baseline.error_rate()),
                limit: Some(gates.max_error_rate_increase),
                samples: self.candidate.requests().min(self.baseline.requests()),
                needed: gates.min_inferences,
                detail: format!(
                    "candidate {:.2}% of {}, baseline {:.2}% of {}",
                    self.candidate.error_rate() * 100.0,
                    self.candidate.requests(),
                    self.baseline.error_rate() * 100.0,
                    self.baseline.requests()
                ),
            },
            GateValue {
                gate: "p95_latency_ratio",
                value: match (p95(&self.candidate), p95(&self.baseline)) {
                    (Some(c), Some(b)) => Some(c as f64 / b.max(1) as f64),
                    _ => None,
                },
                limit: Some(gates.max_p95_latency_ratio),
                samples: self.candidate.requests().min(self.baseline.requests()),
                needed: gates.min_inferences,
                detail: format!(
                    "candidate {} µs, baseline {} µs",
                    p95(&self.candidate).map_or("-".into(), |v| v.to_string()),
                    p95(&self.baseline).map_or("-".into(), |v| v.to_string())
                ),
            },
        ];
        if self.spec.shadow.is_some() {
            gate_values.push(GateValue {
                gate: "shadow_agreement",
                value: self.shadow.agreement(),
                limit: gates.min_shadow_agreement,
                samples: self.shadow.compared,
                needed: gates.min_shadow_compared,
                detail: format!(
                    "{} of {} agreed, {} shadow error(s)",
                    self.shadow.agree, self.shadow.compared, self.shadow.errors
                ),
            });
        }
        if let Some(limit) = gates.max_drift_score {
            gate_values.push(GateValue {
                gate: "drift_score",
                value: (self.drift_windows > 0).then(|| self.drift_sum / self.drift_windows as f64),
                limit: Some(limit),
                samples: self.drift_windows,
                needed: gates.min_drift_windows,
                detail: format!("mean over {} window(s)", self.drift_windows),
            });
        }
        Progress {
            phase: self.phase.name(),
            stage: match &self.phase {
                Phase::Shadowing { .. } => Some("shadow".into()),
                Phase::Installing { wave, .. } | Phase::Baking { wave, .. } => {
                    Some(format!("wave {}", wave + 1))
                }
                Phase::Paused { stage, .. } => Some(match stage {
                    Stage::Shadow => "shadow".into(),
                    Stage::Wave(w) => format!("wave {}", w + 1),
                }),
                _ => None,
            },
            reason: match &self.phase {
                Phase::Paused { reason, .. }
                | Phase::Aborted { reason }
                | Phase::RolledBack { reason } => Some(reason.clone()),
                _ => None,
            },
            until: match &self.phase {
                Phase::Shadowing { until } | Phase::Baking { until, .. } => Some(until.0),
                _ => None,
            },
            evidence_missing: match &self.phase {
                Phase::Shadowing { .. } | Phase::Baking { .. } => self.evidence_missing(),
                _ => None,
            },
            members,
            waves,
            gates: gate_values,
        }
    }
}

/// A rollout's state at a glance (serialized by the API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub phase: &'static str,
    /// `shadow` or `wave N`, while one runs or is paused.
    pub stage: Option<String>,
    pub reason: Option<String>,
    /// When the current bake or shadow phase ends (ms).
    pub until: Option<u64>,
    pub evidence_missing: Option<String>,
    pub members: MemberCounts,
    pub waves: Vec<WaveProgress>,
    pub gates: Vec<GateValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemberCounts {
    pub total: usize,
    pub online: usize,
    pub waiting: usize,
    pub shadowing: usize,
    pub pending: usize,
    pub active: usize,
    pub failed: usize,
    pub rolled_back: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveProgress {
    pub wave: usize,
    pub size: String,
    pub select: Labels,
    pub bake_s: u64,
    /// Members the wave's selector matches, and how many of them it brings to the candidate.
    pub in_scope: usize,
    pub target: usize,
    /// Members this wave gave the candidate, and where they are now.
    pub given: usize,
    pub active: usize,
    pub failed: usize,
    pub pending: usize,
    pub rolled_back: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateValue {
    pub gate: &'static str,
    /// The measured value (`None` before any sample).
    pub value: Option<f64>,
    /// The limit (`None`: the gate is off).
    pub limit: Option<f64>,
    pub samples: u64,
    pub needed: u64,
    pub detail: String,
}

/// Where a rollout begins: its shadow phase, or its first wave.
fn first_phase(spec: &Spec, now: Timestamp) -> Phase {
    match spec.shadow {
        Some(plan) => Phase::Shadowing {
            until: Timestamp(now.0.saturating_add(plan.duration_ms)),
        },
        None => Phase::Installing {
            wave: 0,
            since: now,
        },
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Approve => "approve",
        Command::Pause { .. } => "pause",
        Command::Resume => "resume",
        Command::Promote => "promote",
        Command::Abort { .. } => "abort",
        Command::Rollback { .. } => "rollback",
    }
}
