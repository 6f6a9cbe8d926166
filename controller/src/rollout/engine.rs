//! The rollout state machine: pure and deterministic. [`Rollout::handle`] takes `now` and one
//! input (a tick, a device report, an operator command) and returns the actions the driver must
//! carry out; [`Rollout::next_deadline`] says when the driver must tick it next. No I/O and no
//! clock here: the driver commits the new state together with the actions (its outbox) in one
//! transaction before publishing anything, so a restart resumes exactly where it stopped.
//!
//! A rollout moves a fixed set of member devices from the `baseline` model to the `candidate`
//! in cumulative waves. Rules it follows:
//! - Members are taken in the order given (the driver sorts them); a wave's target is a count or a
//!   percentage of the current membership, rounded up, cumulative over the waves.
//! - Offline members are skipped when a wave picks devices and picked later once online; a wave
//!   with nobody left to pick ends short; members still offline when the last wave ends stay on
//!   the baseline and are named in the completion record. An assigned member that goes offline
//!   still counts as installing (and can breach the progress deadline). A joiner (a device that starts matching mid-rollout) is appended and counts towards later
//!   waves' percentages.
//! - At most `max_per_minute` assignments are issued in any 60 s.
//! - A wave is done when all its picked members run the candidate, a failed install counting as
//!   done-and-failed; then it bakes for the wave's bake time (`promote` skips it) while the gates
//!   are evaluated; then the next wave starts.
//! - A wave that has not finished installing within `progress_deadline` of its start breaches.
//! - A breached gate pauses or aborts per policy; abort (or the operator's abort/rollback) sends
//!   every member that was given the candidate a rollback assignment to the baseline.
//! - Only the candidate and the baseline are ever assigned.

use std::collections::VecDeque;

use edgefleet_protocol::sketch::LatencyHistogram;
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};
use serde::{Deserialize, Serialize};

/// How many devices a wave brings to the candidate, cumulatively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveSize {
    Count(u32),
    Percent(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub size: WaveSize,
    /// How long the wave runs on the candidate, with the gates evaluated, before the next.
    pub bake_ms: u64,
}

/// Limits the candidate must stay within, each with the least evidence needed to judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Failed installs (download, verification, self-test) over installs attempted.
    pub max_install_failure_rate: f64,
    pub min_installs: u64,
    /// Candidate inference error rate minus the baseline's.
    pub max_error_rate_increase: f64,
    /// p95 latency of the candidate over the baseline's.
    pub max_p95_latency_ratio: f64,
    /// Inferences needed on each side before the error and latency gates judge.
    pub min_inferences: u64,
    /// Highest mean drift score of the candidate's windows (from the drift detector); `None`
    /// turns the gate off.
    pub max_drift_score: Option<f64>,
    /// Drift windows needed before the drift gate judges.
    pub min_drift_windows: u64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_install_failure_rate: 0.05,
            min_installs: 1,
            max_error_rate_increase: 0.01,
            max_p95_latency_ratio: 1.5,
            min_inferences: 200,
            max_drift_score: None,
            min_drift_windows: 3,
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
    pub waves: Vec<Wave>,
    pub max_per_minute: u32,
    pub progress_deadline_ms: u64,
    pub gates: Gates,
    pub on_breach: OnBreach,
}

/// Where one member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// On the baseline, not picked yet.
    Waiting,
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
}

/// One telemetry window's numbers, as the gates use them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub inferences: u64,
    pub errors: u64,
    pub latency: LatencyHistogram,
}

impl Sample {
    fn merge(&mut self, other: &Sample) {
        self.inferences = self.inferences.saturating_add(other.inferences);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
    }

    fn error_rate(&self) -> f64 {
        if self.inferences == 0 {
            0.0
        } else {
            self.errors as f64 / self.inferences as f64
        }
    }
}

/// What a device told the controller that matters to the rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    Activated(Sha256Digest),
    InstallFailed(Sha256Digest),
    Online(bool),
    /// A window of inference on `model`.
    Telemetry {
        model: Sha256Digest,
        sample: Sample,
    },
    /// The drift detector's score for one window of `model` on this device.
    Drift {
        model: Sha256Digest,
        score: f64,
    },
    /// A device that now matches the rollout's selector and runs the baseline.
    Joined,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Pause {
        reason: String,
    },
    Resume,
    /// Ends the current wave's bake now.
    Promote,
    /// Stops the rollout and rolls every candidate device back.
    Abort {
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
    ProgressDeadline {
        wave: usize,
        pending: usize,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Wave `wave` is installing (started at `since`).
    Installing {
        wave: usize,
        since: Timestamp,
    },
    /// Wave `wave` runs the candidate until `until`.
    Baking {
        wave: usize,
        until: Timestamp,
    },
    Paused {
        wave: usize,
        reason: String,
    },
    Completed,
    Aborted {
        reason: String,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish a signed assignment of `model` (rollback: the explicit-rollback flag).
    Assign {
        device: DeviceId,
        model: Sha256Digest,
        rollback: bool,
    },
    /// Record in the audit log (and show in `rollout status`).
    Record(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub spec: Spec,
    pub members: Vec<Member>,
    pub phase: Phase,
    /// Telemetry of the members on each side since the rollout started.
    pub candidate: Sample,
    pub baseline: Sample,
    /// Drift scores of the candidate's windows: count and sum.
    pub drift_windows: u64,
    pub drift_sum: f64,
    /// When recent assignments were issued, for `max_per_minute`.
    issued: VecDeque<Timestamp>,
}

const MINUTE_MS: u64 = 60_000;

impl Rollout {
    /// A rollout over `members` (device id and whether it is online), starting at `now`.
    pub fn start(
        now: Timestamp,
        spec: Spec,
        members: Vec<(DeviceId, bool)>,
    ) -> (Self, Vec<Action>) {
        let mut rollout = Self {
            spec,
            members: members
                .into_iter()
                .map(|(device, online)| Member {
                    device,
                    online,
                    state: MemberState::Waiting,
                })
                .collect(),
            phase: Phase::Installing {
                wave: 0,
                since: now,
            },
            candidate: Sample::default(),
            baseline: Sample::default(),
            drift_windows: 0,
            drift_sum: 0.0,
            issued: VecDeque::new(),
        };
        let mut actions = vec![Action::Record(format!(
            "rollout started: {} member(s), {} wave(s)",
            rollout.members.len(),
            rollout.spec.waves.len()
        ))];
        if rollout.spec.waves.is_empty() {
            rollout.phase = Phase::Completed;
            actions.push(Action::Record("no waves: nothing to do".into()));
            return (rollout, actions);
        }
        actions.extend(rollout.step(now));
        (rollout, actions)
    }

    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Action> {
        let mut actions = Vec::new();
        match input {
            Input::Tick => {}
            Input::Device { device, report } => self.on_device(&device, report, &mut actions),
            Input::Operator(command) => self.on_command(now, command, &mut actions),
        }
        actions.extend(self.step(now));
        actions
    }

    /// When the driver must tick next (`None`: only inputs can move the rollout).
    pub fn next_deadline(&self) -> Option<Timestamp> {
        match &self.phase {
            Phase::Installing { since, .. } => {
                let deadline = Timestamp(since.0.saturating_add(self.spec.progress_deadline_ms));
                let slot = self.rate_limited_until();
                Some(slot.map_or(deadline, |s| s.min(deadline)))
            }
            Phase::Baking { until, .. } => Some(*until),
            Phase::Paused { .. } | Phase::Completed | Phase::Aborted { .. } => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Aborted { .. })
    }

    fn member(&mut self, device: &DeviceId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| &m.device == device)
    }

    fn on_device(&mut self, device: &DeviceId, report: DeviceReport, actions: &mut Vec<Action>) {
        let candidate = self.spec.candidate;
        let baseline = self.spec.baseline;
        if matches!(report, DeviceReport::Joined) {
            if self.member(device).is_none() && !self.is_finished() {
                self.members.push(Member {
                    device: device.clone(),
                    online: true,
                    state: MemberState::Waiting,
                });
                actions.push(Action::Record(format!("{device} joined the rollout")));
            }
            return;
        }
        let Some(member) = self.member(device) else {
            return;
        };
        match report {
            DeviceReport::Online(online) => member.online = online,
            DeviceReport::Activated(model)
                if model == candidate && member.state == MemberState::Assigned =>
            {
                member.state = MemberState::Active;
            }
            DeviceReport::InstallFailed(model)
                if model == candidate && member.state == MemberState::Assigned =>
            {
                member.state = MemberState::Failed;
                actions.push(Action::Record(format!(
                    "{device}: installing the candidate failed"
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
                    && matches!(member.state, MemberState::Waiting | MemberState::Assigned)
                {
                    self.baseline.merge(&sample);
                }
            }
            _ => {}
        }
    }

    fn on_command(&mut self, now: Timestamp, command: Command, actions: &mut Vec<Action>) {
        match (command, self.phase.clone()) {
            (_, Phase::Completed | Phase::Aborted { .. }) => {
                actions.push(Action::Record(
                    "the rollout is over; command ignored".into(),
                ));
            }
            (
                Command::Pause { reason },
                Phase::Installing { wave, .. } | Phase::Baking { wave, .. },
            ) => {
                actions.push(Action::Record(format!("paused by the operator: {reason}")));
                self.phase = Phase::Paused { wave, reason };
            }
            (Command::Resume, Phase::Paused { wave, .. }) => {
                actions.push(Action::Record("resumed".into()));
                // The wave restarts its clock: progress deadline and bake from now.
                self.phase = Phase::Installing { wave, since: now };
            }
            (Command::Promote, Phase::Baking { wave, .. }) => {
                actions.push(Action::Record(format!(
                    "wave {} promoted: bake skipped",
                    wave + 1
                )));
                self.phase = Phase::Baking { wave, until: now };
            }
            (Command::Abort { reason }, _) => {
                self.abort(format!("aborted by the operator: {reason}"), actions)
            }
            (command, phase) => actions.push(Action::Record(format!(
                "{command:?} does not apply while {}; ignored",
                phase_name(&phase)
            ))),
        }
    }

    /// Rolls every member that was given the candidate back to the baseline.
    fn abort(&mut self, reason: String, actions: &mut Vec<Action>) {
        actions.push(Action::Record(format!("{reason}; rolling back")));
        let baseline = self.spec.baseline;
        for member in &mut self.members {
            if matches!(
                member.state,
                MemberState::Assigned | MemberState::Active | MemberState::Failed
            ) {
                member.state = MemberState::RolledBack;
                actions.push(Action::Assign {
                    device: member.device.clone(),
                    model: baseline,
                    rollback: true,
                });
            }
        }
        self.phase = Phase::Aborted { reason };
    }

    fn breach(&mut self, breach: Breach, wave: usize, actions: &mut Vec<Action>) {
        match self.spec.on_breach {
            OnBreach::Pause => {
                actions.push(Action::Record(format!("gate breached, paused: {breach}")));
                self.phase = Phase::Paused {
                    wave,
                    reason: breach.to_string(),
                };
            }
            OnBreach::Abort => self.abort(format!("gate breached: {breach}"), actions),
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
        let (cand, base) = (&self.candidate, &self.baseline);
        if cand.inferences >= gates.min_inferences && base.inferences >= gates.min_inferences {
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

    fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }

    /// Members wave `wave` brings to the candidate, cumulatively.
    fn target(&self, wave: usize) -> usize {
        let n = self.members.len();
        match self.spec.waves[wave].size {
            WaveSize::Count(c) => (c as usize).min(n),
            WaveSize::Percent(p) => (n * usize::from(p.min(100))).div_ceil(100),
        }
    }

    fn rate_limited_until(&self) -> Option<Timestamp> {
        let limit = self.spec.max_per_minute.max(1) as usize;
        if self.issued.len() < limit {
            return None;
        }
        self.issued
            .front()
            .map(|t| Timestamp(t.0.saturating_add(MINUTE_MS)))
    }

    /// Advances the phase as far as `now` allows.
    fn step(&mut self, now: Timestamp) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(front) = self.issued.front() {
            if front.0.saturating_add(MINUTE_MS) <= now.0 {
                self.issued.pop_front();
            } else {
                break;
            }
        }
        loop {
            match self.phase.clone() {
                Phase::Installing { wave, since } => {
                    if let Some(breach) = self.gate_breach() {
                        self.breach(breach, wave, &mut actions);
                        continue;
                    }
                    let target = self.target(wave);
                    let given = self.members.len() - self.count(MemberState::Waiting);
                    let mut want = target.saturating_sub(given);
                    let limit = self.spec.max_per_minute.max(1) as usize;
                    let candidate = self.spec.candidate;
                    for member in &mut self.members {
                        if want == 0 || self.issued.len() >= limit {
                            break;
                        }
                        if member.state == MemberState::Waiting && member.online {
                            member.state = MemberState::Assigned;
                            self.issued.push_back(now);
                            want -= 1;
                            actions.push(Action::Assign {
                                device: member.device.clone(),
                                model: candidate,
                                rollback: false,
                            });
                        }
                    }
                    let given = self.members.len() - self.count(MemberState::Waiting);
                    let pending = self.count(MemberState::Assigned);
                    let online_waiting = self
                        .members
                        .iter()
                        .any(|m| m.state == MemberState::Waiting && m.online);
                    // Offline members do not hold a wave up: it ends short when nobody else
                    // can be picked.
                    if (given >= target || !online_waiting) && pending == 0 {
                        let bake = self.spec.waves[wave].bake_ms;
                        actions.push(Action::Record(format!(
                            "wave {} installed on {given} device(s); baking {} s",
                            wave + 1,
                            bake / 1000
                        )));
                        self.phase = Phase::Baking {
                            wave,
                            until: Timestamp(now.0.saturating_add(bake)),
                        };
                        continue;
                    }
                    if now.0 >= since.0.saturating_add(self.spec.progress_deadline_ms) {
                        let pending = pending + target.saturating_sub(given);
                        self.breach(
                            Breach::ProgressDeadline { wave, pending },
                            wave,
                            &mut actions,
                        );
                        continue;
                    }
                    return actions;
                }
                Phase::Baking { wave, until } => {
                    if let Some(breach) = self.gate_breach() {
                        self.breach(breach, wave, &mut actions);
                        continue;
                    }
                    if now < until {
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
                    if self
                        .members
                        .iter()
                        .any(|m| m.state == MemberState::Waiting && m.online)
                    {
                        // Joiners, or members back online during the bake: the last wave
                        // takes them too.
                        self.phase = Phase::Installing { wave, since: now };
                        continue;
                    }
                    actions.push(Action::Record(format!(
                        "completed: {} device(s) on the candidate, {} failed, {} offline left on the baseline",
                        self.count(MemberState::Active),
                        self.count(MemberState::Failed),
                        self.count(MemberState::Waiting)
                    )));
                    self.phase = Phase::Completed;
                    return actions;
                }
                Phase::Paused { .. } | Phase::Completed | Phase::Aborted { .. } => return actions,
            }
        }
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Installing { .. } => "installing",
        Phase::Baking { .. } => "baking",
        Phase::Paused { .. } => "paused",
        Phase::Completed => "completed",
        Phase::Aborted { .. } => "aborted",
    }
}
