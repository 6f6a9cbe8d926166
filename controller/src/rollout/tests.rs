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
        waves: waves
            .iter()
            .map(|(size, bake_ms)| Wave {
                size: *size,
                bake_ms: *bake_ms,
            })
            .collect(),
        max_per_minute: 1000,
        progress_deadline_ms: 600_000,
        gates: Gates {
            min_inferences: 100,
            ..Gates::default()
        },
        on_breach,
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
            .map(|i| (dev(i), !offline.contains(&i)))
            .collect();
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
                    rollback,
                } => format!(
                    "  assign {device} -> {}{}",
                    if model == self.rollout.spec.candidate {
                        "candidate"
                    } else {
                        "baseline"
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
        DeviceReport::Joined => "joined".into(),
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
          record: completed: 4 device(s) on the candidate, 0 failed, 0 offline left on the baseline
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
          record: gate breached: inference error rate 8.00% vs baseline 0.50%; rolling back
          assign d0 -> baseline (rollback)
          assign d1 -> baseline (rollback)
          => Aborted { reason: "gate breached: inference error rate 8.00% vs baseline 0.50%" }
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
          record: d0: installing the candidate failed
          record: gate breached, paused: install failures 1/1 (100.0%)
          => Paused { wave: 0, reason: "install failures 1/1 (100.0%)" }
        t=6s d1: activated candidate
          => Paused { wave: 0, reason: "install failures 1/1 (100.0%)" }
        t=7s operator: Resume
          record: resumed
          record: gate breached, paused: install failures 1/2 (50.0%)
          => Paused { wave: 0, reason: "install failures 1/2 (50.0%)" }
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
          => Paused { wave: 0, reason: "p95 latency 3072 µs vs baseline 1024 µs (3.00x)" }
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
          => Paused { wave: 0, reason: "weekend" }
        t=3s operator: Promote
          record: Promote does not apply while paused; ignored
          => Paused { wave: 0, reason: "weekend" }
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
          record: the rollout is over; command ignored
          => Aborted { reason: "aborted by the operator: customer complaint" }
    "#]]);
}

#[test]
fn joiners_offline_devices_and_the_progress_deadline() {
    let waves = [(WaveSize::Percent(50), 0), (WaveSize::Percent(100), 0)];
    // d1 is offline from the start; d4 joins later; d2 never activates in wave 2.
    let mut t = Trace::start(spec(&waves, OnBreach::Abort), 4, &[1]);
    t.activate(1_000, [0, 2]);
    t.device(2_000, 4, DeviceReport::Joined);
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
        t=2s d4: joined
          record: d4 joined the rollout
          assign d4 -> candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=3s d3: activated candidate
          => Installing { wave: 1, since: Timestamp(1000) }
        t=3s d4: activated candidate
          record: wave 2 installed on 4 device(s); baking 0 s
          record: completed: 4 device(s) on the candidate, 0 failed, 1 offline left on the baseline
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
    assert_eq!(t.rollout.next_deadline(), Some(Timestamp(60_000)));
    t.feed(30_000, Input::Tick);
    t.feed(60_000, Input::Tick);
    t.feed(120_000, Input::Tick);
    t.check(expect![[r#"
        t=0s start
          record: rollout started: 5 member(s), 1 wave(s)
          assign d0 -> candidate
          assign d1 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=30s tick
          => Installing { wave: 0, since: Timestamp(0) }
        t=60s tick
          assign d2 -> candidate
          assign d3 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
        t=120s tick
          assign d4 -> candidate
          => Installing { wave: 0, since: Timestamp(0) }
    "#]]);
}

fn any_input(devices: usize) -> impl Strategy<Value = (u64, Input)> {
    let report = prop_oneof![
        (any::<bool>(), 0.0f64..1.0).prop_map(|(c, score)| DeviceReport::Drift {
            model: model(if c { CANDIDATE } else { BASELINE }),
            score
        }),
        any::<bool>().prop_map(|c| DeviceReport::Activated(model(if c {
            CANDIDATE
        } else {
            BASELINE
        }))),
        any::<bool>().prop_map(|c| DeviceReport::InstallFailed(model(if c {
            CANDIDATE
        } else {
            BASELINE
        }))),
        any::<bool>().prop_map(DeviceReport::Online),
        Just(DeviceReport::Joined),
        (any::<bool>(), 0u64..500, 0u64..50, 100u64..5000).prop_map(|(c, n, e, us)| {
            DeviceReport::Telemetry {
                model: model(if c { CANDIDATE } else { BASELINE }),
                sample: sample(n, e.min(n), us),
            }
        }),
    ];
    let command = prop_oneof![
        Just(Command::Pause { reason: "p".into() }),
        Just(Command::Resume),
        Just(Command::Promote),
        Just(Command::Abort { reason: "a".into() }),
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, only the rollout's two models are assigned; the candidate at most once
    /// per device, and the baseline only as a rollback of a device that was given the candidate.
    #[test]
    fn only_the_two_models_are_ever_assigned(
        inputs in proptest::collection::vec(any_input(6), 0..120),
    ) {
        let waves = [(WaveSize::Count(2), 30_000), (WaveSize::Percent(60), 10_000), (WaveSize::Percent(100), 0)];
        let members = (0..6).map(|i| (dev(i), i % 3 != 0)).collect();
        let (mut rollout, mut actions) =
            Rollout::start(Timestamp(0), spec(&waves, OnBreach::Abort), members);
        let mut now = 0;
        for (step, input) in inputs {
            now += step;
            actions.extend(rollout.handle(Timestamp(now), input));
        }
        let mut given = std::collections::BTreeSet::new();
        let mut rolled_back = std::collections::BTreeSet::new();
        for action in actions {
            if let Action::Assign { device, model: m, rollback } = action {
                if m == model(CANDIDATE) {
                    prop_assert!(!rollback);
                    prop_assert!(given.insert(device.clone()), "{device} given the candidate twice");
                } else {
                    prop_assert_eq!(m, model(BASELINE));
                    prop_assert!(rollback);
                    prop_assert!(given.contains(&device), "{device} rolled back without the candidate");
                    prop_assert!(rolled_back.insert(device.clone()), "{device} rolled back twice");
                }
            }
        }
    }
}
