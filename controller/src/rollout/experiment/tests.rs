//! Experiments as data in, data out, and the tests' statistics against reference values
//! (computed with scipy 1.17: `scipy.stats.norm.sf`, `scipy.stats.mannwhitneyu(...,
//! use_continuity=False, method="asymptotic")`).
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::fmt::Write as _;

use edgefleet_protocol::messages::FeedbackStats;
use edgefleet_protocol::sketch::LatencyHistogram;
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};
use expect_test::{Expect, expect};

use super::*;
use crate::rollout::engine::{Action, Sample};

fn close(got: f64, want: f64) {
    let err = (got - want).abs() / want.abs().max(1e-300);
    assert!(err < 1e-6, "{got} vs {want} (relative error {err:e})");
}

#[test]
fn the_statistics_match_a_reference_implementation() {
    close(normal_sf(1.96), 0.024997895148220435);
    close(normal_sf(3.5), 0.00023262907903552502);
    close(normal_sf(0.3), 0.3820885778110474);
    let (z, p) = two_proportion_z(30, 1000, 12, 1000);
    close(z, 2.8070911436484303);
    close(p, 0.004999109504464619);
    let (z, p) = two_proportion_z(50, 400, 20, 500);
    close(z, 4.731154298718107);
    close(p, 2.232467455734592e-06);
    assert_eq!(two_proportion_z(5, 200, 5, 200), (0.0, 1.0));
    assert_eq!(two_proportion_z(0, 0, 5, 200), (0.0, 1.0));
    // 100, 200 and 400 µs fall in three buckets: a histogram holds the exact ranks with ties.
    let histogram = |counts: [(u64, u64); 3]| {
        let mut h = LatencyHistogram::default();
        for (us, n) in counts {
            for _ in 0..n {
                h.record(us);
            }
        }
        h
    };
    let a = histogram([(100, 50), (200, 30), (400, 20)]);
    let b = histogram([(100, 20), (200, 40), (400, 40)]);
    let (z, p) = mann_whitney(&a, &b);
    close(z, -4.409741004043072);
    close(p, 1.0349432202925645e-05);
    assert_eq!(mann_whitney(&a, &LatencyHistogram::default()), (0.0, 1.0));
}

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("d{i}")).unwrap()
}

const A: Sha256Digest = Sha256Digest([0xAA; 32]);
const B: Sha256Digest = Sha256Digest([0xBB; 32]);

fn name(m: &Sha256Digest) -> &'static str {
    if *m == A { "A" } else { "B" }
}

fn spec(metric: Metric) -> ExperimentSpec {
    ExperimentSpec {
        a: A,
        b: B,
        metric,
        alpha: 0.05,
        min_samples: 500,
        duration_ms: 60_000,
        max_duration_ms: 600_000,
    }
}

struct Trace {
    experiment: Experiment,
    out: String,
}

impl Trace {
    /// d0, d1 on A (d0 already runs it), d2, d3 on B.
    fn start(spec: ExperimentSpec) -> Self {
        let members = vec![
            (dev(0), Arm::A, Some(A)),
            (dev(1), Arm::A, Some(B)),
            (dev(2), Arm::B, Some(A)),
            (dev(3), Arm::B, None),
        ];
        let (experiment, actions) = Experiment::start(Timestamp(0), spec, members);
        let mut trace = Self {
            experiment,
            out: String::new(),
        };
        trace.log(0, "start", actions);
        trace
    }

    fn log(&mut self, at: u64, what: &str, actions: Vec<Action>) {
        let _ = writeln!(self.out, "t={}s {what}", at / 1000);
        for action in actions {
            let _ = match action {
                Action::Assign {
                    device,
                    model,
                    rollback,
                    ..
                } => writeln!(
                    self.out,
                    "  assign {device} -> {}{}",
                    name(&model),
                    if rollback { " (rollback)" } else { "" }
                ),
                Action::Record(text) => writeln!(self.out, "  record: {text}"),
            };
        }
        let _ = writeln!(self.out, "  => {}", self.experiment.phase.name());
    }

    fn feed(&mut self, at: u64, what: &str, input: ExperimentInput) {
        let actions = self.experiment.handle_all(Timestamp(at), [input]);
        self.log(at, what, actions);
    }

    fn activate_all(&mut self, at: u64) {
        for (i, m) in [(1, A), (2, B), (3, B)] {
            self.feed(
                at,
                &format!("d{i} activated {}", name(&m)),
                ExperimentInput::Device {
                    device: dev(i),
                    report: ArmReport::Activated(m),
                },
            );
        }
    }

    /// A window on device `i` running `m`: `requests` with `errors`, `latency` µs each, and
    /// `feedback` labels of which `correct` were right.
    fn window(&mut self, at: u64, i: usize, m: Sha256Digest, counts: [u64; 5]) {
        let [requests, errors, latency, feedback, correct] = counts;
        let mut histogram = LatencyHistogram::default();
        for _ in 0..requests - errors {
            histogram.record(latency);
        }
        self.feed(
            at,
            &format!("d{i} window on {}: {errors}/{requests} errors", name(&m)),
            ExperimentInput::Device {
                device: dev(i),
                report: ArmReport::Telemetry {
                    model: m,
                    sample: Sample {
                        inferences: requests - errors,
                        errors,
                        latency: histogram,
                    },
                    feedback: (feedback > 0).then_some(FeedbackStats {
                        count: feedback,
                        correct,
                        abs_error_sum: 0.0,
                        sq_error_sum: 0.0,
                    }),
                },
            },
        );
    }

    fn check(self, expected: Expect) {
        expected.assert_eq(&self.out);
    }
}

#[test]
fn a_significantly_better_treatment_wins_and_is_promoted() {
    let mut t = Trace::start(spec(Metric::ErrorRate));
    t.activate_all(1_000);
    t.window(10_000, 0, A, [600, 18, 900, 0, 0]);
    t.window(10_000, 2, B, [600, 3, 900, 0, 0]);
    // Not before its duration, however clear the data.
    t.feed(30_000, "tick", ExperimentInput::Tick);
    t.feed(60_000, "tick", ExperimentInput::Tick);
    t.feed(
        61_000,
        "operator: promote",
        ExperimentInput::Operator(ExperimentCommand::Promote),
    );
    t.feed(
        62_000,
        "operator: abort",
        ExperimentInput::Operator(ExperimentCommand::Abort {
            reason: "late".into(),
        }),
    );
    t.check(expect![[r#"
        t=0s start
          record: experiment started: 2 device(s) on A, 2 on B; error_rate compared by two-proportion z-test, two-sided at alpha 0.05
          assign d1 -> A
          assign d2 -> B
          assign d3 -> B
          => running
        t=1s d1 activated A
          => running
        t=1s d2 activated B
          => running
        t=1s d3 activated B
          => running
        t=10s d0 window on A: 18/600 errors
          => running
        t=10s d2 window on B: 3/600 errors
          => running
        t=30s tick
          => running
        t=60s tick
          record: concluded: error_rate A 3.00% (n=600) vs B 0.50% (n=600), z = 3.302, p = 0.0010: B is better at alpha 0.05
          => concluded
        t=61s operator: promote
          assign d0 -> B
          assign d1 -> B
          record: promoted B: every device of the experiment runs it
          => promoted
        t=62s operator: abort
          record: the experiment is promoted; command ignored
          => promoted
    "#]]);
}

#[test]
fn no_significant_difference_has_no_winner_and_abort_restores_the_control() {
    let mut t = Trace::start(spec(Metric::Latency));
    t.activate_all(1_000);
    t.window(10_000, 0, A, [600, 0, 900, 0, 0]);
    t.window(10_000, 3, B, [600, 0, 900, 0, 0]);
    t.feed(
        20_000,
        "operator: conclude",
        ExperimentInput::Operator(ExperimentCommand::Conclude),
    );
    t.feed(
        21_000,
        "operator: promote",
        ExperimentInput::Operator(ExperimentCommand::Promote),
    );
    t.feed(
        22_000,
        "operator: abort",
        ExperimentInput::Operator(ExperimentCommand::Abort {
            reason: "inconclusive".into(),
        }),
    );
    t.check(expect![[r#"
        t=0s start
          record: experiment started: 2 device(s) on A, 2 on B; latency compared by Mann-Whitney U, normal approximation with tie correction, two-sided at alpha 0.05
          assign d1 -> A
          assign d2 -> B
          assign d3 -> B
          => running
        t=1s d1 activated A
          => running
        t=1s d2 activated B
          => running
        t=1s d3 activated B
          => running
        t=10s d0 window on A: 0/600 errors
          => running
        t=10s d3 window on B: 0/600 errors
          => running
        t=20s operator: conclude
          record: concluded: latency A 928 µs (n=600) vs B 928 µs (n=600), z(U) = 0.000, p = 1.0000: no significant difference at alpha 0.05
          => concluded
        t=21s operator: promote
          record: no significant winner to promote; ignored
          => concluded
        t=22s operator: abort
          assign d2 -> A (rollback)
          assign d3 -> A (rollback)
          record: aborted by the operator: inconclusive; cohort B back on A
          => aborted
    "#]]);
}

#[test]
fn accuracy_from_feedback_and_the_maximum_duration_without_enough_samples() {
    let mut t = Trace::start(spec(Metric::Accuracy));
    t.activate_all(1_000);
    t.window(10_000, 0, A, [900, 0, 900, 400, 340]);
    t.window(10_000, 2, B, [900, 0, 900, 400, 380]);
    t.feed(60_000, "tick", ExperimentInput::Tick);
    assert_eq!(t.experiment.next_deadline(), Some(Timestamp(600_000)));
    t.feed(600_000, "tick", ExperimentInput::Tick);
    assert_eq!(t.experiment.next_deadline(), None);
    let verdict = t.experiment.verdict();
    assert_eq!(verdict.n_a, 400);
    t.check(expect![[r#"
        t=0s start
          record: experiment started: 2 device(s) on A, 2 on B; accuracy compared by two-proportion z-test, two-sided at alpha 0.05
          assign d1 -> A
          assign d2 -> B
          assign d3 -> B
          => running
        t=1s d1 activated A
          => running
        t=1s d2 activated B
          => running
        t=1s d3 activated B
          => running
        t=10s d0 window on A: 0/900 errors
          => running
        t=10s d2 window on B: 0/900 errors
          => running
        t=60s tick
          => running
        t=600s tick
          record: maximum duration reached; no winner: accuracy A 85.00% (n=400) vs B 95.00% (n=400), z = -4.714, p = 0.0000: too few samples to judge (500 per arm needed)
          => concluded
    "#]]);
}
