//! The engine as data in, data out: each test feeds a script of inputs at given times and
//! compares the full trace of actions and phases with a snapshot.
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::fmt::Write as _;

use edgefleet_protocol::sketch::LatencyHistogram;
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};
use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::engine::*;

fn model(tag: u8) -> Sha256Digest {
    Sha256Digest([tag; 32])
}

const CANDIDATE: u8 = 0xCC;
const BASELINE: u8 = 0xBB;

fn spec(waves: &[(WaveSize, u64)], on_breach: OnBreach) -> Spec {
    Spec {
        candidate: model(CANDIDATE),
        baseline: model(BASELINE),
        shadow: None,
        waves: waves
            .iter()
            .map(|(size, bake_ms)| Wave {
                size: *size,
                bake_ms: *bake_ms,
                select: Labels::new(),
            })
            .collect(),
        max_per_minute: 1000,
        progress_deadline_ms: 600_000,
        gates: Gates {
            min_inferences: 100,
            // Most traces send no telemetry; the evidence rule has its own test.
            require_evidence: false,
            ..Gates::default()
        },
        on_breach,
        approval: false,
    }
}

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("d{i}")).unwrap()
}

fn sample(inferences: u64, errors: u64, latency_us: u64) -> Sample {
    let mut latency = LatencyHistogram::default();
    for _ in 0..inferences {
        latency.record(latency_us);
    }
    Sample {
        inferences,
        errors,
        latency,
    }
}

/// Runs a rollout and writes one line per action and the phase after each input.
struct Trace {
    rollout: Rollout,
    out: String,
}

impl Trace {
    fn start(spec: Spec, devices: usize, offline: &[usize]) -> Self {
        let members = (0..devices)
            .map(|i| Member::new(dev(i), !offline.contains(&i), Labels::new()))
            .collect();
        Self::start_with(spec, members)
    }

    fn start_with(spec: Spec, members: Vec<Member>) -> Self {
        let (rollout, actions) = Rollout::start(Timestamp(0), spec, members);
        let mut trace = Self {
            rollout,
            out: String::new(),
        };
        trace.log(0, "start", actions);
        trace
    }

    fn log(&mut self, at: u64, what: &str, actions: Vec<Action>) {
        let _ = writeln!(self.out, "t={}s {what}", at / 1000);
        for action in actions {
            let line = match action {
                Action::Assign {
                    device,
                    model,
                    shadow,
                    rollback,
                } => format!(
                    "  assign {device} -> {}{}{}",
                    name(&model),
                    match shadow {
                        Some(s) => format!(" + shadow {}", name(&s)),
                        None => String::new(),
                    },
                    if rollback { " (rollback)" } else { "" }
                ),
                Action::Record(text) => format!("  record: {text}"),
            };
            let _ = writeln!(self.out, "{line}");
        }
        let _ = writeln!(self.out, "  => {:?}", self.rollout.phase);
    }

    fn feed(&mut self, at: u64, input: Input) {
        let what = match &input {
            Input::Tick => "tick".to_owned(),
            Input::Device { device, report } => format!("{device}: {}", describe(report)),
            Input::Operator(command) => format!("operator: {command:?}"),
        };
        let actions = self.rollout.handle(Timestamp(at), input);
        self.log(at, &what, actions);
    }

    fn device(&mut self, at: u64, i: usize, report: DeviceReport) {
        self.feed(
            at,
            Input::Device {
                device: dev(i),
                report,
            },
        );
    }

    fn activate(&mut self, at: u64, devices: impl IntoIterator<Item = usize>) {
        for i in devices {
            self.device(at, i, DeviceReport::Activated(model(CANDIDATE)));
        }
    }

    fn check(self, expected: Expect) {
        expected.assert_eq(&self.out);
    }
}

fn describe(report: &DeviceReport) -> String {
    match report {
        DeviceReport::Activated(m) => format!("activated {}", name(m)),
        DeviceReport::InstallFailed(m) => format!("install failed {}", name(m)),
        DeviceReport::Online(online) => format!("online={online}"),
        DeviceReport::Telemetry { model, sample } => format!(
            "telemetry {} {} inferences, {} errors",
            name(model),
            sample.inferences,
            sample.errors
        ),
        DeviceReport::Drift { model, score } => format!("drift {} {score}", name(model)),
        DeviceReport::Shadow { model, sample } => format!(
            "shadow {} {} compared, {} agreed, {} errors",
            name(model),
            sample.compared,
            sample.agree,
            sample.errors
        ),
        DeviceReport::Joined { labels } => format!("joined {labels:?}"),
        DeviceReport::Feedback { model, stats } => {
            format!("feedback {} {}/{}", name(model), stats.correct, stats.count)
        }
    }
}

fn name(m: &Sha256Digest) -> &'static str {
    if *m == model(CANDIDATE) {
        "candidate"
    } else {
        "baseline"
    }
}

#[test]
fn a_healthy_candidate_goes_through_three_waves_to_completion() {
    let waves = [
        (WaveSize::Count(1), 60_000),
        (WaveSize::Percent(50), 60_000),
        (WaveSize::Percent(100), 0),
    ];
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 4, &[]);
    t.activate(5_000, [0]);
    t.feed(30_000, Input::Tick);
    t.feed(65_000, Input::Tick);
    t.activate(70_000, [1]);
    t.feed(130_000, Input::Tick);
    t.activate(140_000, [2, 3]);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), 3 wave(s)
          assign d0 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d0: activated candidate
          record: wave 1 installed on 1 device(s); baking 60 s
          => Baking { wave: 0, until: Timestamp(65000) }
        t=30s tick
          => Baking { wave: 0, until: Timestamp(65000) }
        t=65s tick
          record: wave 1 passed its gates
          assign d1 -> candidate
          => Installing { wave: 1, since: Timestamp(65000) }
        t=70s d1: activated candidate
          record: wave 2 installed on 2 device(s); baking 60 s
          => Baking { wave: 1, until: Timestamp(130000) }
        t=130s tick
          record: wave 2 passed its gates
          assign d2 -> candidate
          assign d3 -> candidate
          => Installing { wave: 2, since: Timestamp(130000) }
        t=140s d2: activated candidate
          => Installing { wave: 2, since: Timestamp(130000) }
        t=140s d3: activated candidate
          record: wave 3 installed on 4 device(s); baking 0 s
          record: completed: 4 device(s) on the candidate, 0 failed, 0 left on the baseline
          => Completed
    "#]]);
}

#[test]
fn a_bad_live_error_rate_stops_the_canary_and_rolls_it_back() {
    let waves = [(WaveSize::Count(2), 300_000), (WaveSize::Percent(100), 0)];
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 5, &[]);
    t.activate(5_000, [0, 1]);
    // Baseline devices: 0.5% errors; candidate: 8% (below the sample size at first).
    t.device(
        60_000,
        2,
        DeviceReport::Telemetry {
            model: model(BASELINE),
            sample: sample(200, 1, 800),
        },
    );
    t.device(
        60_000,
        0,
        DeviceReport::Telemetry {
            model: model(CANDIDATE),
            sample: sample(50, 4, 800),
        },
    );
    t.device(
        120_000,
        1,
        DeviceReport::Telemetry {
            model: model(CANDIDATE),
            sample: sample(50, 4, 800),
        },
    );
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 5 member(s), 2 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d0: activated candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d1: activated candidate
          record: wave 1 installed on 2 device(s); baking 300 s
          => Baking { wave: 0, until: Timestamp(305000) }
        t=60s d2: telemetry baseline 200 inferences, 1 errors
          => Baking { wave: 0, until: Timestamp(305000) }
        t=60s d0: telemetry candidate 50 inferences, 4 errors
          => Baking { wave: 0, until: Timestamp(305000) }
        t=120s d1: telemetry candidate 50 inferences, 4 errors
          record: gate breached: inference error rate 7.41% vs baseline 0.50%; rolling back
          assign d0 -> baseline (rollback)
          assign d1 -> baseline (rollback)
          => Aborted { reason: "gate breached: inference error rate 7.41% vs baseline 0.50%" }
    "#]]);
}

#[test]
fn failed_installs_and_slow_inference_breach_their_gates() {
    let waves = [(WaveSize::Count(2), 60_000), (WaveSize::Percent(100), 0)];
    let mut t = Trace::start(spec(&waves, OnBreach::Pause), 4, &[]);
    t.device(5_000, 0, DeviceReport::InstallFailed(model(CANDIDATE)));
    t.activate(6_000, [1]);
    t.feed(7_000, Input::Operator(Command::Resume));
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), 2 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d0: install failed candidate
          record: d0: the candidate failed
          record: gate breached, paused: install failures 1/1 (100.0%)
          => Paused { stage: Wave(0), reason: "install failures 1/1 (100.0%)" }
        t=6s d1: activated candidate
          => Paused { stage: Wave(0), reason: "install failures 1/1 (100.0%)" }
        t=7s operator: Resume
          record: resumed
          record: gate breached, paused: install failures 1/2 (50.0%)
          => Paused { stage: Wave(0), reason: "install failures 1/2 (50.0%)" }
    "#]]);

    let mut t = Trace::start(spec(&waves, OnBreach::Pause), 4, &[]);
    t.activate(5_000, [0, 1]);
    for (i, m, us) in [(2, BASELINE, 1_000), (0, CANDIDATE, 3_000)] {
        t.device(
            30_000,
            i,
            DeviceReport::Telemetry {
                model: model(m),
                sample: sample(100, 0, us),
            },
        );
    }
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), 2 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d0: activated candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=5s d1: activated candidate
          record: wave 1 installed on 2 device(s); baking 60 s
          => Baking { wave: 0, until: Timestamp(65000) }
        t=30s d2: telemetry baseline 100 inferences, 0 errors
          => Baking { wave: 0, until: Timestamp(65000) }
        t=30s d0: telemetry candidate 100 inferences, 0 errors
          record: gate breached, paused: p95 latency 3072 µs vs baseline 1024 µs (3.00x)
          => Paused { stage: Wave(0), reason: "p95 latency 3072 µs vs baseline 1024 µs (3.00x)" }
    "#]]);
}

#[test]
fn the_drift_gate_judges_the_mean_score_once_it_has_enough_windows() {
    let mut s = spec(
        &[(WaveSize::Count(2), 60_000), (WaveSize::Percent(100), 0)],
        OnBreach::Abort,
    );
    s.gates.max_drift_score = Some(0.2);
    s.gates.min_drift_windows = 3;
    let mut t = Trace::start(s, 3, &[]);
    t.activate(1_000, [0, 1]);
    for (at, i, score) in [
        (10_000, 0, 0.5),
        (11_000, 2, 0.9),
        (12_000, 1, 0.1),
        (13_000, 0, 0.3),
    ] {
        let m = if i == 2 { BASELINE } else { CANDIDATE };
        t.device(
            at,
            i,
            DeviceReport::Drift {
                model: model(m),
                score,
            },
        );
    }
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 3 member(s), 2 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d0: activated candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d1: activated candidate
          record: wave 1 installed on 2 device(s); baking 60 s
          => Baking { wave: 0, until: Timestamp(61000) }
        t=10s d0: drift candidate 0.5
          => Baking { wave: 0, until: Timestamp(61000) }
        t=11s d2: drift baseline 0.9
          => Baking { wave: 0, until: Timestamp(61000) }
        t=12s d1: drift candidate 0.1
          => Baking { wave: 0, until: Timestamp(61000) }
        t=13s d0: drift candidate 0.3
          record: gate breached: mean drift score 0.300 over 3 window(s) above 0.200; rolling back
          assign d0 -> baseline (rollback)
          assign d1 -> baseline (rollback)
          => Aborted { reason: "gate breached: mean drift score 0.300 over 3 window(s) above 0.200" }
    "#]]);
}

#[test]
fn pause_resume_promote_and_operator_abort() {
    let waves = [
        (WaveSize::Count(1), 600_000),
        (WaveSize::Percent(100), 600_000),
    ];
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 3, &[]);
    t.activate(1_000, [0]);
    t.feed(
        2_000,
        Input::Operator(Command::Pause {
            reason: "weekend".into(),
        }),
    );
    t.feed(3_000, Input::Operator(Command::Promote));
    t.feed(4_000, Input::Operator(Command::Resume));
    t.feed(5_000, Input::Operator(Command::Promote));
    t.activate(6_000, [1]);
    t.feed(
        7_000,
        Input::Operator(Command::Abort {
            reason: "customer complaint".into(),
        }),
    );
    t.feed(8_000, Input::Operator(Command::Resume));
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 3 member(s), 2 wave(s)
          assign d0 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d0: activated candidate
          record: wave 1 installed on 1 device(s); baking 600 s
          => Baking { wave: 0, until: Timestamp(601000) }
        t=2s operator: Pause { reason: "weekend" }
          record: paused by the operator: weekend
          => Paused { stage: Wave(0), reason: "weekend" }
        t=3s operator: Promote
          record: promote does not apply while paused; ignored
          => Paused { stage: Wave(0), reason: "weekend" }
        t=4s operator: Resume
          record: resumed
          record: wave 1 installed on 1 device(s); baking 600 s
          => Baking { wave: 0, until: Timestamp(604000) }
        t=5s operator: Promote
          record: wave 1 promoted: bake skipped
          record: wave 1 passed its gates
          assign d1 -> candidate
          assign d2 -> candidate
          => Installing { wave: 1, since: Timestamp(5000) }
        t=6s d1: activated candidate
          => Installing { wave: 1, since: Timestamp(5000) }
        t=7s operator: Abort { reason: "customer complaint" }
          record: aborted by the operator: customer complaint; rolling back
          assign d0 -> baseline (rollback)
          assign d1 -> baseline (rollback)
          assign d2 -> baseline (rollback)
          => Aborted { reason: "aborted by the operator: customer complaint" }
        t=8s operator: Resume
          record: the rollout is aborted; command ignored
          => Aborted { reason: "aborted by the operator: customer complaint" }
    "#]]);
}

#[test]
fn joiners_offline_devices_and_the_progress_deadline() {
    let waves = [(WaveSize::Percent(50), 0), (WaveSize::Percent(100), 0)];
    // d1 is offline from the start; d4 joins later; d2 never activates in wave 2.
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 4, &[1]);
    t.activate(1_000, [0, 2]);
    t.device(
        2_000,
        4,
        DeviceReport::Joined {
            labels: Labels::new(),
        },
    );
    t.activate(3_000, [3, 4]);
    t.feed(700_000, Input::Tick);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), 2 wave(s)
          assign d0 -> candidate
          assign d2 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d0: activated candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d2: activated candidate
          record: wave 1 installed on 2 device(s); baking 0 s
          record: wave 1 passed its gates
          assign d3 -> candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=2s d4: joined {}
          record: d4 joined the rollout
          assign d4 -> candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=3s d3: activated candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=3s d4: activated candidate
          record: wave 2 installed on 4 device(s); baking 0 s
          record: completed: 4 device(s) on the candidate, 0 failed, 1 left on the baseline
          => Completed
        t=700s tick
          => Completed
    "#]]);

    // An assigned device that never reports breaches the progress deadline.
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 2, &[]);
    assert_eq!(t.rollout.next_deadline(), Some(Timestamp(600_000)));
    t.feed(599_000, Input::Tick);
    t.feed(600_000, Input::Tick);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 2 member(s), 2 wave(s)
          assign d0 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=599s tick
          => Installing { wave: 0, since: Timestamp(0) }
        t=600s tick
          record: gate breached: wave 1 still had 1 device(s) installing at its progress deadline; rolling back
          assign d0 -> baseline (rollback)
          => Aborted { reason: "gate breached: wave 1 still had 1 device(s) installing at its progress deadline" }
    "#]]);
}

#[test]
fn assignments_are_paced_to_max_per_minute() {
    let mut s = spec(&[(WaveSize::Percent(100), 0)], OnBreach::Abort);
    s.max_per_minute = 2;
    let mut t = Trace::start(s, 5, &[]);
    // Counted per second, conservatively: the two issued at t=0.0–0.999 s free their slots at
    // 61 s.
    assert_eq!(t.rollout.next_deadline(), Some(Timestamp(61_000)));
    t.feed(30_000, Input::Tick);
    t.feed(60_000, Input::Tick);
    t.feed(61_000, Input::Tick);
    t.feed(122_000, Input::Tick);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 5 member(s), 1 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=30s tick
          => Installing { wave: 0, since: Timestamp(0) }
        t=60s tick
          => Installing { wave: 0, since: Timestamp(0) }
        t=61s tick
          assign d2 -> candidate
          assign d3 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=122s tick
          assign d4 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
    "#]]);
}

fn shadow(compared: u64, agree: u64, errors: u64) -> DeviceReport {
    DeviceReport::Shadow {
        model: model(CANDIDATE),
        sample: ShadowSample {
            compared,
            agree,
            errors,
        },
    }
}

fn telemetry(m: u8, inferences: u64, errors: u64) -> DeviceReport {
    DeviceReport::Telemetry {
        model: model(m),
        sample: sample(inferences, errors, 1_000),
    }
}

#[test]
fn a_shadow_phase_that_agrees_hands_over_to_the_waves() {
    let mut s = spec(
        &[(WaveSize::Count(1), 0), (WaveSize::Percent(100), 0)],
        OnBreach::Abort,
    );
    s.shadow = Some(ShadowPlan {
        cohort: WaveSize::Count(2),
        duration_ms: 60_000,
    });
    s.gates.min_shadow_agreement = Some(0.9);
    s.gates.min_shadow_compared = 100;
    s.gates.min_inferences = 0;
    s.gates.require_evidence = true;
    let mut t = Trace::start(s, 3, &[]);
    t.device(10_000, 0, shadow(40, 39, 0));
    t.feed(60_000, Input::Tick);
    t.device(70_000, 1, shadow(80, 78, 0));
    t.activate(75_000, [0]);
    t.activate(80_000, [1, 2]);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 3 member(s), a shadow phase, 2 wave(s)
          assign d0 -> baseline + shadow candidate
          assign d1 -> baseline + shadow candidate
          => Shadowing { until: Timestamp(60000) }
        t=10s d0: shadow candidate 40 compared, 39 agreed, 0 errors
          => Shadowing { until: Timestamp(60000) }
        t=60s tick
          => Shadowing { until: Timestamp(60000) }
        t=70s d1: shadow candidate 80 compared, 78 agreed, 0 errors
          record: shadow phase passed: 117 of 120 shadowed request(s) agreed, 0 failed
          assign d0 -> candidate
          assign d1 -> baseline
          => Installing { wave: 0, since: Timestamp(70000) }
        t=75s d0: activated candidate
          record: wave 1 installed on 1 device(s); baking 0 s
          record: wave 1 passed its gates
          assign d1 -> candidate
          assign d2 -> candidate
          => Installing { wave: 1, since: Timestamp(75000) }
        t=80s d1: activated candidate
          => Installing { wave: 1, since: Timestamp(75000) }
        t=80s d2: activated candidate
          record: wave 2 installed on 3 device(s); baking 0 s
          record: completed: 3 device(s) on the candidate, 0 failed, 0 left on the baseline
          => Completed
    "#]]);
}

#[test]
fn a_shadow_that_disagrees_or_fails_is_stopped_before_any_device_runs_it() {
    let mut s = spec(&[(WaveSize::Percent(100), 0)], OnBreach::Abort);
    s.shadow = Some(ShadowPlan {
        cohort: WaveSize::Percent(50),
        duration_ms: 60_000,
    });
    s.gates.min_shadow_agreement = Some(0.95);
    s.gates.min_shadow_compared = 100;
    let mut t = Trace::start(s.clone(), 4, &[]);
    t.device(10_000, 0, shadow(60, 50, 0));
    t.device(20_000, 1, shadow(60, 50, 0));
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), a shadow phase, 1 wave(s)
          assign d0 -> baseline + shadow candidate
          assign d1 -> baseline + shadow candidate
          => Shadowing { until: Timestamp(60000) }
        t=10s d0: shadow candidate 60 compared, 50 agreed, 0 errors
          => Shadowing { until: Timestamp(60000) }
        t=20s d1: shadow candidate 60 compared, 50 agreed, 0 errors
          record: gate breached: shadow agreement 83.3% over 120 request(s) below 95.0%; rolling back
          assign d0 -> baseline
          assign d1 -> baseline
          => Aborted { reason: "gate breached: shadow agreement 83.3% over 120 request(s) below 95.0%" }
    "#]]);

    // The candidate fails on live inputs the baseline answers: the shadow error gate.
    s.gates.min_shadow_agreement = None;
    let mut t = Trace::start(s, 4, &[]);
    t.device(10_000, 2, telemetry(BASELINE, 200, 0));
    t.device(20_000, 0, shadow(90, 90, 30));
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), a shadow phase, 1 wave(s)
          assign d0 -> baseline + shadow candidate
          assign d1 -> baseline + shadow candidate
          => Shadowing { until: Timestamp(60000) }
        t=10s d2: telemetry baseline 200 inferences, 0 errors
          => Shadowing { until: Timestamp(60000) }
        t=20s d0: shadow candidate 90 compared, 90 agreed, 30 errors
          record: gate breached: shadow error rate 25.00% vs baseline 0.00%; rolling back
          assign d0 -> baseline
          assign d1 -> baseline
          => Aborted { reason: "gate breached: shadow error rate 25.00% vs baseline 0.00%" }
    "#]]);
}

#[test]
fn a_bake_waits_for_evidence_and_breaches_without_it() {
    let mut s = spec(
        &[(WaveSize::Count(1), 10_000), (WaveSize::Percent(100), 0)],
        OnBreach::Pause,
    );
    s.gates.require_evidence = true;
    s.progress_deadline_ms = 100_000;
    let mut t = Trace::start(s.clone(), 3, &[]);
    t.activate(1_000, [0]);
    t.device(5_000, 1, telemetry(BASELINE, 150, 0));
    t.feed(11_000, Input::Tick);
    t.device(20_000, 0, telemetry(CANDIDATE, 150, 1));
    // Without candidate traffic the bake waits until its progress deadline, then pauses; the
    // operator resumes (the wave starts its bake again) and promotes it without evidence.
    let mut quiet = Trace::start(s, 3, &[]);
    quiet.activate(1_000, [0]);
    quiet.device(5_000, 1, telemetry(BASELINE, 150, 0));
    assert_eq!(quiet.rollout.next_deadline(), Some(Timestamp(11_000)));
    quiet.feed(11_000, Input::Tick);
    assert_eq!(quiet.rollout.next_deadline(), Some(Timestamp(111_000)));
    quiet.feed(111_000, Input::Tick);
    quiet.feed(112_000, Input::Operator(Command::Resume));
    quiet.feed(113_000, Input::Operator(Command::Promote));
    t.out.push_str(&quiet.out);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 3 member(s), 2 wave(s)
          assign d0 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d0: activated candidate
          record: wave 1 installed on 1 device(s); baking 10 s
          => Baking { wave: 0, until: Timestamp(11000) }
        t=5s d1: telemetry baseline 150 inferences, 0 errors
          => Baking { wave: 0, until: Timestamp(11000) }
        t=11s tick
          => Baking { wave: 0, until: Timestamp(11000) }
        t=20s d0: telemetry candidate 150 inferences, 1 errors
          record: wave 1 passed its gates
          assign d1 -> candidate
          assign d2 -> candidate
          => Installing { wave: 1, since: Timestamp(20000) }
        t=0s start
          record: rollout started: 3 member(s), 2 wave(s)
          assign d0 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d0: activated candidate
          record: wave 1 installed on 1 device(s); baking 10 s
          => Baking { wave: 0, until: Timestamp(11000) }
        t=5s d1: telemetry baseline 150 inferences, 0 errors
          => Baking { wave: 0, until: Timestamp(11000) }
        t=11s tick
          => Baking { wave: 0, until: Timestamp(11000) }
        t=111s tick
          record: gate breached, paused: not enough evidence by the progress deadline: 0/100 request(s) on the candidate
          => Paused { stage: Wave(0), reason: "not enough evidence by the progress deadline: 0/100 request(s) on the candidate" }
        t=112s operator: Resume
          record: resumed
          record: wave 1 installed on 1 device(s); baking 10 s
          => Baking { wave: 0, until: Timestamp(122000) }
        t=113s operator: Promote
          record: wave 1 promoted: bake skipped
          record: wave 1 passed its gates
          assign d1 -> candidate
          assign d2 -> candidate
          => Installing { wave: 1, since: Timestamp(113000) }
    "#]]);
}

#[test]
fn waves_with_label_selectors_and_an_operator_rollback_after_completion() {
    let mut s = spec(
        &[(WaveSize::Percent(100), 0), (WaveSize::Percent(100), 0)],
        OnBreach::Abort,
    );
    s.waves[0].select = lab_labels();
    s.gates.max_install_failure_rate = 0.5;
    let members = (0..4)
        .map(|i| {
            let labels = if i >= 2 { lab_labels() } else { Labels::new() };
            Member::new(dev(i), true, labels)
        })
        .collect();
    let mut t = Trace::start_with(s, members);
    t.activate(1_000, [2, 3]);
    t.activate(2_000, [0]);
    t.device(3_000, 1, DeviceReport::InstallFailed(model(CANDIDATE)));
    t.feed(
        4_000,
        Input::Operator(Command::Rollback {
            reason: "recall".into(),
        }),
    );
    t.feed(
        5_000,
        Input::Operator(Command::Rollback {
            reason: "twice".into(),
        }),
    );
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 4 member(s), 2 wave(s)
          assign d2 -> candidate
          assign d3 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d2: activated candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=1s d3: activated candidate
          record: wave 1 installed on 2 device(s); baking 0 s
          record: wave 1 passed its gates
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=2s d0: activated candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=3s d1: install failed candidate
          record: d1: the candidate failed
          record: wave 2 installed on 4 device(s); baking 0 s
          record: completed: 3 device(s) on the candidate, 1 failed, 0 left on the baseline
          => Completed
        t=4s operator: Rollback { reason: "recall" }
          record: rollback requested by the operator: recall; rolling back
          assign d0 -> baseline (rollback)
          assign d1 -> baseline (rollback)
          assign d2 -> baseline (rollback)
          assign d3 -> baseline (rollback)
          => RolledBack { reason: "rollback requested by the operator: recall" }
        t=5s operator: Rollback { reason: "twice" }
          record: the rollout is rolled back; command ignored
          => RolledBack { reason: "rollback requested by the operator: recall" }
    "#]]);
}

#[test]
fn a_rollout_that_needs_approval_assigns_nothing_until_approved() {
    let mut s = spec(&[(WaveSize::Percent(100), 0)], OnBreach::Abort);
    s.approval = true;
    let mut t = Trace::start(s, 2, &[]);
    assert_eq!(t.rollout.next_deadline(), None);
    t.feed(10_000, Input::Tick);
    t.feed(11_000, Input::Operator(Command::Promote));
    t.feed(12_000, Input::Operator(Command::Approve));
    t.feed(13_000, Input::Operator(Command::Approve));
    t.activate(14_000, [0, 1]);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 2 member(s), 1 wave(s)
          record: awaiting an operator's approval (`edgefleet rollout approve`)
          => AwaitingApproval
        t=10s tick
          => AwaitingApproval
        t=11s operator: Promote
          record: promote does not apply while awaiting_approval; ignored
          => AwaitingApproval
        t=12s operator: Approve
          record: approved: the rollout begins
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(12000) }
        t=13s operator: Approve
          record: approve does not apply while installing; ignored
          => Installing { wave: 0, since: Timestamp(12000) }
        t=14s d0: activated candidate
          => Installing { wave: 0, since: Timestamp(12000) }
        t=14s d1: activated candidate
          record: wave 1 installed on 2 device(s); baking 0 s
          record: completed: 2 device(s) on the candidate, 0 failed, 0 left on the baseline
          => Completed
    "#]]);
}

fn any_input(devices: usize) -> impl Strategy<Value = (u64, Input)> {
    let pick = |c: bool| model(if c { CANDIDATE } else { BASELINE });
    let report = prop_oneof![
        (any::<bool>(), 0.0f64..1.0).prop_map(move |(c, score)| DeviceReport::Drift {
            model: pick(c),
            score
        }),
        any::<bool>().prop_map(move |c| DeviceReport::Activated(pick(c))),
        any::<bool>().prop_map(move |c| DeviceReport::InstallFailed(pick(c))),
        any::<bool>().prop_map(DeviceReport::Online),
        any::<bool>().prop_map(|lab| DeviceReport::Joined {
            labels: if lab { lab_labels() } else { Labels::new() }
        }),
        (any::<bool>(), 0u64..500, 0u64..50, 100u64..5000).prop_map(move |(c, n, e, us)| {
            DeviceReport::Telemetry {
                model: pick(c),
                sample: sample(n, e.min(n), us),
            }
        }),
        (0u64..300, 0u64..300, 0u64..30).prop_map(move |(n, a, e)| DeviceReport::Shadow {
            model: pick(true),
            sample: ShadowSample {
                compared: n,
                agree: a.min(n),
                errors: e,
            },
        }),
    ];
    let command = prop_oneof![
        Just(Command::Pause { reason: "p".into() }),
        Just(Command::Resume),
        Just(Command::Promote),
        Just(Command::Abort { reason: "a".into() }),
        Just(Command::Rollback { reason: "r".into() }),
        Just(Command::Approve),
    ];
    let input = prop_oneof![
        Just(Input::Tick),
        (0..devices + 2, report).prop_map(|(i, report)| Input::Device {
            device: dev(i),
            report
        }),
        command.prop_map(Input::Operator),
    ];
    (0u64..120_000, input)
}

fn lab_labels() -> Labels {
    Labels::from([("site".to_owned(), "lab".to_owned())])
}

/// A plan with every feature on: shadow phase, a selector wave, evidence required.
fn full_spec() -> Spec {
    let mut s = spec(
        &[
            (WaveSize::Count(2), 30_000),
            (WaveSize::Percent(60), 10_000),
            (WaveSize::Percent(100), 0),
        ],
        OnBreach::Abort,
    );
    s.shadow = Some(ShadowPlan {
        cohort: WaveSize::Count(2),
        duration_ms: 20_000,
    });
    s.waves[0].select = lab_labels();
    s.gates.min_shadow_agreement = Some(0.5);
    s.gates.min_shadow_compared = 100;
    s.gates.require_evidence = true;
    s.progress_deadline_ms = 200_000;
    s.max_per_minute = 3;
    s
}

fn any_members() -> Vec<Member> {
    (0..6)
        .map(|i| {
            let labels = if i % 2 == 0 {
                lab_labels()
            } else {
                Labels::new()
            };
            Member::new(dev(i), i % 3 != 0, labels)
        })
        .collect()
}

/// What the rollout's assignments may be, whatever the inputs: only its two models; the
/// candidate at most once per device, never with a shadow, never rolled back; the candidate in
/// shadow only on the baseline and never after the device was given it; the baseline without
/// shadow either as a rollback of a device that was given the candidate, or as the end of that
/// device's shadow.
fn check_assignments(actions: &[Action]) -> Result<(), TestCaseError> {
    let mut given = std::collections::BTreeSet::new();
    let mut shadowing = std::collections::BTreeSet::new();
    let mut rolled_back = std::collections::BTreeSet::new();
    for action in actions {
        let Action::Assign {
            device,
            model: m,
            shadow,
            rollback,
        } = action
        else {
            continue;
        };
        if *m == model(CANDIDATE) {
            prop_assert!(!rollback && shadow.is_none());
            prop_assert!(
                given.insert(device.clone()),
                "{device} given the candidate twice"
            );
            // The candidate's assignment replaces a shadow one.
            shadowing.remove(device);
            continue;
        }
        prop_assert_eq!(*m, model(BASELINE));
        match shadow {
            Some(s) => {
                prop_assert_eq!(*s, model(CANDIDATE));
                prop_assert!(!rollback && !given.contains(device));
                prop_assert!(shadowing.insert(device.clone()), "{device} shadowed twice");
            }
            None if *rollback => {
                prop_assert!(
                    given.contains(device),
                    "{device} rolled back without the candidate"
                );
                prop_assert!(
                    rolled_back.insert(device.clone()),
                    "{device} rolled back twice"
                );
            }
            None => {
                prop_assert!(
                    shadowing.remove(device),
                    "{device} cleared without a shadow"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, only the rollout's two models are assigned, as `check_assignments`
    /// states.
    #[test]
    fn only_the_two_models_are_ever_assigned(
        inputs in proptest::collection::vec(any_input(6), 0..120),
        full in any::<bool>(),
    ) {
        let waves = [(WaveSize::Count(2), 30_000), (WaveSize::Percent(60), 10_000), (WaveSize::Percent(100), 0)];
        let plan = if full { full_spec() } else { spec(&waves, OnBreach::Abort) };
        let (mut rollout, mut actions) = Rollout::start(Timestamp(0), plan, any_members());
        let mut now = 0;
        for (step, input) in inputs {
            now += step;
            actions.extend(rollout.handle(Timestamp(now), input));
        }
        check_assignments(&actions)?;
    }

    /// A rollout saved and loaded at any point (as the driver does across a controller restart)
    /// goes on exactly as one that never stopped.
    #[test]
    fn a_saved_and_loaded_rollout_continues_identically(
        inputs in proptest::collection::vec(any_input(6), 0..80),
        cut in 0usize..80,
    ) {
        let (mut kept, first) = Rollout::start(Timestamp(0), full_spec(), any_members());
        let mut loaded = kept.clone();
        let mut now = 0;
        for (i, (step, input)) in inputs.into_iter().enumerate() {
            now += step;
            if i == cut {
                let json = serde_json::to_string(&loaded).unwrap();
                loaded = serde_json::from_str(&json).map_err(|e| format!("{e}: {json}")).unwrap();
            }
            let a = kept.handle(Timestamp(now), input.clone());
            let b = loaded.handle(Timestamp(now), input);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(kept.next_deadline(), loaded.next_deadline());
        }
        prop_assert_eq!(kept, loaded);
        let _ = first;
    }

    /// The next deadline always lies after the last time the rollout saw, so a driver that
    /// sleeps until it never spins.
    #[test]
    fn the_next_deadline_is_always_in_the_future(
        inputs in proptest::collection::vec(any_input(6), 0..80),
    ) {
        let (mut rollout, _) = Rollout::start(Timestamp(0), full_spec(), any_members());
        let mut now = 0;
        for (step, input) in inputs {
            now += step;
            rollout.handle(Timestamp(now), input);
            if let Some(deadline) = rollout.next_deadline() {
                prop_assert!(deadline.0 > now, "deadline {deadline:?} not after {now}");
            }
        }
    }
}
