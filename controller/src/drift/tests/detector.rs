//! The detector as data in, data out: scripted windows (bin counts at the reference shares or at
//! shifted shares) and the full trace of what it records, compared with snapshots
//! (`UPDATE_EXPECT=1` rewrites them).

use std::fmt::Write as _;

use edgefleet_protocol::messages::{ModelRef, NamedSketch};
use edgefleet_protocol::sketch::{FeatureSketch, ReferenceFeature};
use edgefleet_protocol::{Sha256Digest, TensorName, Timestamp};
use expect_test::{Expect, expect};

use crate::drift::detector::{
    Action, Change, DetectorConfig, DriftDetector, Evidence, SeriesState,
};
use crate::drift::{Scope, ScopeWindow, scopes_of};

const STEADY: [f64; 10] = [0.1; 10];
/// Mass moved to the upper bins: a mean shift.
const SHIFTED: [f64; 10] = [0.05, 0.05, 0.06, 0.07, 0.09, 0.1, 0.12, 0.14, 0.15, 0.17];
/// Slightly off: for 500 values p is between the flag level (0.01/F) and the clearing level
/// (0.05/F), so it neither flags nor counts as calm (see the trace).
const NEAR: [f64; 10] = [0.06, 0.08, 0.09, 0.1, 0.1, 0.1, 0.1, 0.11, 0.12, 0.14];

fn name(s: &str) -> TensorName {
    TensorName::new(s).unwrap()
}

fn reference(feature: &str) -> ReferenceFeature {
    ReferenceFeature {
        name: name(feature),
        edges: (1..10).map(f64::from).collect(),
        proportions: STEADY.to_vec(),
        min: 0.0,
        max: 10.0,
    }
}

fn model() -> ModelRef {
    ModelRef {
        name: "pump".parse().unwrap(),
        version: "1.0.0".parse().unwrap(),
        release: 1,
        manifest_digest: Sha256Digest([7; 32]),
    }
}

/// `n` values spread over the bins at `shares` (largest remainders get the rounding).
fn sketch(n: u64, shares: &[f64]) -> FeatureSketch {
    let mut bins: Vec<u64> = shares
        .iter()
        .map(|s| (s * n as f64).floor() as u64)
        .collect();
    let mut rest = n - bins.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|a, b| {
        let frac = |i: usize| shares[i] * n as f64 - (shares[i] * n as f64).floor();
        frac(*b).total_cmp(&frac(*a))
    });
    for i in order {
        if rest == 0 {
            break;
        }
        bins[i] += 1;
        rest -= 1;
    }
    FeatureSketch {
        count: n,
        bins,
        ..FeatureSketch::new(shares.len())
    }
}

fn window(n: u64, features: &[(&str, &[f64])], outputs: &[(&str, &[f64])]) -> ScopeWindow {
    let named = |list: &[(&str, &[f64])]| {
        list.iter()
            .map(|(f, shares)| NamedSketch {
                name: name(f),
                sketch: sketch(n, shares),
            })
            .collect()
    };
    ScopeWindow {
        window_start: Timestamp(0),
        window_end: Timestamp(60_000),
        device_windows: 1,
        features: named(features),
        outputs: named(outputs),
    }
}

struct Trace {
    detector: DriftDetector,
    out: String,
    minute: u64,
}

fn state(state: SeriesState) -> String {
    match state {
        SeriesState::Stable { flagged: 0 } => "stable".into(),
        SeriesState::Stable { flagged } => format!("stable({flagged} flagged)"),
        SeriesState::Drifting { since, clear: 0 } => format!("DRIFTING since {since}"),
        SeriesState::Drifting { since, clear } => format!("DRIFTING since {since} ({clear} calm)"),
    }
}

fn evidence(e: &Evidence) -> String {
    match e.stats.chi2 {
        Some(chi2) => format!(
            "{} n={} χ²={:.1}/{} p={:.1e}{} psi={:.3} js={:.3} {}",
            e.name,
            e.stats.n,
            chi2.statistic,
            chi2.dof,
            chi2.p_value,
            if e.flagged { " FLAG" } else { "" },
            e.stats.psi,
            e.stats.js,
            state(e.state)
        ),
        None => format!("{} n={} untested {}", e.name, e.stats.n, state(e.state)),
    }
}

impl Trace {
    fn new(features: &[&str], config: DetectorConfig) -> Self {
        let reference: Vec<_> = features.iter().map(|f| reference(f)).collect();
        let detector = DriftDetector::new(model(), Scope::Fleet, &reference, config).unwrap();
        Self {
            detector,
            out: String::new(),
            minute: 0,
        }
    }

    fn feed(&mut self, what: &str, window: ScopeWindow) {
        self.minute += 1;
        let now = Timestamp(self.minute * 60_000);
        let actions = self.detector.handle(now, &window);
        let _ = writeln!(self.out, "t={}m {what}", self.minute);
        for action in actions {
            let _ = match action {
                Action::Accumulating { rows, needed } => {
                    writeln!(self.out, "  accumulating {rows}/{needed} rows")
                }
                Action::Refused { reason } => writeln!(self.out, "  refused: {reason}"),
                Action::Evaluated(e) => {
                    let _ = writeln!(
                        self.out,
                        "  window {} rows={} score={} model={} prediction={}",
                        e.window,
                        e.rows,
                        e.score,
                        if e.model_drifting { "DRIFTING" } else { "ok" },
                        if e.prediction_drifting {
                            "DRIFTING"
                        } else {
                            "ok"
                        },
                    );
                    for f in e.features.iter().chain(&e.outputs) {
                        let _ = writeln!(self.out, "    {}", evidence(f));
                    }
                    Ok(())
                }
                Action::DriftDetected(c) => self.change("drift detected", &c),
                Action::DriftCleared(c) => self.change("drift cleared", &c),
                Action::PredictionDriftDetected(c) => self.change("prediction drift detected", &c),
                Action::PredictionDriftCleared(c) => self.change("prediction drift cleared", &c),
                Action::OutputBaselineSet { outputs, rows } => writeln!(
                    self.out,
                    "  output baseline set from {rows} rows: {outputs:?}"
                ),
            };
        }
    }
}

impl Trace {
    fn change(&mut self, what: &str, c: &Change) -> std::fmt::Result {
        let names = |list: &[TensorName]| {
            list.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let since = c
            .since
            .map_or(String::new(), |s| format!(" (drifting since window {s})"));
        writeln!(
            self.out,
            "  {what}{since} at window {} for {}: top-ranked [{}], drifting [{}] of {}; most shifted {}",
            c.window,
            c.scope,
            names(&c.rule.top_ranked),
            names(&c.rule.features),
            c.rule.monitored,
            c.evidence
                .first()
                .map_or("-".into(), |e| e.name.to_string()),
        )
    }
}

#[track_caller]
fn check(trace: &Trace, expect: Expect) {
    expect.assert_eq(&trace.out);
}

#[test]
fn feature_drift_needs_two_flagged_windows_and_clears_after_three_calm_ones() {
    let mut t = Trace::new(&["a", "b"], DetectorConfig::default());
    let steady: &[f64] = &STEADY;
    let shifted: &[f64] = &SHIFTED;
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    t.feed(
        "a shifted once",
        window(500, &[("a", shifted), ("b", steady)], &[]),
    );
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    t.feed(
        "a shifted",
        window(500, &[("a", shifted), ("b", steady)], &[]),
    );
    t.feed(
        "a shifted",
        window(500, &[("a", shifted), ("b", steady)], &[]),
    );
    t.feed(
        "a shifted",
        window(500, &[("a", shifted), ("b", steady)], &[]),
    );
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    t.feed("a near", window(500, &[("a", &NEAR), ("b", steady)], &[]));
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    t.feed("steady", window(500, &[("a", steady), ("b", steady)], &[]));
    check(
        &t,
        expect![[r#"
        t=1m steady
          window 1 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=2m a shifted once
          window 2 rows=500 score=1 model=ok prediction=ok
            a n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=3m steady
          window 3 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=4m a shifted
          window 4 rows=500 score=1 model=ok prediction=ok
            a n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=5m a shifted
          window 5 rows=500 score=1 model=DRIFTING prediction=ok
            a n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 5
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
          drift detected at window 5 for fleet: top-ranked [a], drifting [a] of 2; most shifted a
        t=6m a shifted
          window 6 rows=500 score=1 model=DRIFTING prediction=ok
            a n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 5
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=7m steady
          window 7 rows=500 score=0 model=DRIFTING prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 5 (1 calm)
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=8m a near
          window 8 rows=500 score=0 model=DRIFTING prediction=ok
            a n=500 χ²=21.0/9 p=1.3e-2 psi=0.044 js=0.089 DRIFTING since 5
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=9m steady
          window 9 rows=500 score=0 model=DRIFTING prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 5 (1 calm)
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=10m steady
          window 10 rows=500 score=0 model=DRIFTING prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 5 (2 calm)
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=11m steady
          window 11 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            b n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
          drift cleared (drifting since window 5) at window 11 for fleet: top-ranked [], drifting [] of 2; most shifted a
    "#]],
    );
}

#[test]
fn model_drift_by_share_when_no_top_ranked_feature_drifts() {
    let features = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"];
    let config = DetectorConfig {
        importance: vec![name("f9"), name("f0")],
        ..DetectorConfig::default()
    };
    let mut t = Trace::new(&features, config);
    let with = |drifted: &[&str]| {
        let list: Vec<(&str, &[f64])> = features
            .iter()
            .map(|f| {
                let shares: &[f64] = if drifted.contains(f) {
                    &SHIFTED
                } else {
                    &STEADY
                };
                (*f, shares)
            })
            .collect();
        window(500, &list, &[])
    };
    // f5 is not among the top 3 (f9, f0, f1): one feature of ten is below 30%.
    t.feed("f5 shifted", with(&["f5"]));
    t.feed("f5 shifted", with(&["f5"]));
    t.feed("f5 f6 f7 shifted", with(&["f5", "f6", "f7"]));
    t.feed("f5 f6 f7 shifted", with(&["f5", "f6", "f7"]));
    // f9 ranks first: it alone is enough.
    t.feed("f9 shifted", with(&["f9"]));
    t.feed("f9 shifted", with(&["f9"]));
    check(
        &t,
        expect![[r#"
        t=1m f5 shifted
          window 1 rows=500 score=0 model=ok prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
            f6 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f7 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=2m f5 shifted
          window 2 rows=500 score=0 model=ok prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 2
            f6 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f7 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=3m f5 f6 f7 shifted
          window 3 rows=500 score=1 model=ok prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 2
            f6 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
            f7 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=4m f5 f6 f7 shifted
          window 4 rows=500 score=1 model=DRIFTING prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 2
            f6 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 4
            f7 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 4
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
          drift detected at window 4 for fleet: top-ranked [], drifting [f5 f6 f7] of 10; most shifted f5
        t=5m f9 shifted
          window 5 rows=500 score=1 model=DRIFTING prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 2 (1 calm)
            f6 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 4 (1 calm)
            f7 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 4 (1 calm)
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 stable(1 flagged)
        t=6m f9 shifted
          window 6 rows=500 score=1 model=DRIFTING prediction=ok
            f0 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f1 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f2 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f3 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f4 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f5 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 2 (2 calm)
            f6 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 4 (2 calm)
            f7 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 4 (2 calm)
            f8 n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            f9 n=500 χ²=85.0/9 p=1.6e-14 FLAG psi=0.176 js=0.177 DRIFTING since 6
    "#]],
    );
}

#[test]
fn small_windows_are_summed_until_window_samples_and_other_bins_are_refused() {
    let mut t = Trace::new(&["a"], DetectorConfig::default());
    t.feed("200 rows", window(200, &[("a", &STEADY)], &[]));
    t.feed("200 rows", window(200, &[("a", &STEADY)], &[]));
    let mut other = window(200, &[("a", &STEADY)], &[]);
    other.features[0].sketch = FeatureSketch::new(4);
    t.feed("sketch with 4 bins", other);
    t.feed("200 rows", window(200, &[("a", &STEADY)], &[]));
    // A feature missing from the window, or all NaN, is not tested and keeps its state.
    let mut nans = window(600, &[("a", &STEADY)], &[]);
    nans.features[0].sketch = FeatureSketch {
        nan: 600,
        ..FeatureSketch::new(10)
    };
    t.feed("600 NaN", nans);
    check(
        &t,
        expect![[r#"
        t=1m 200 rows
          accumulating 200/500 rows
        t=2m 200 rows
          accumulating 400/500 rows
        t=3m sketch with 4 bins
          refused: feature a has 4 bins but 10 were expected; merge and test only windows taken with the same model bundle
        t=4m 200 rows
          window 1 rows=600 score=0 model=ok prediction=ok
            a n=600 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=5m 600 NaN
          window 2 rows=600 score=0 model=ok prediction=ok
            a n=0 untested stable
    "#]],
    );
}

#[test]
fn prediction_drift_is_tested_against_the_learned_output_baseline() {
    let config = DetectorConfig {
        output_baseline_samples: 1000,
        ..DetectorConfig::default()
    };
    let mut t = Trace::new(&["a"], config);
    let classes: &[f64] = &[0.7, 0.2, 0.1];
    let skewed: &[f64] = &[0.5, 0.3, 0.2];
    for _ in 0..2 {
        t.feed(
            "outputs steady",
            window(500, &[("a", &STEADY)], &[("class", classes)]),
        );
    }
    t.feed(
        "outputs steady",
        window(500, &[("a", &STEADY)], &[("class", classes)]),
    );
    t.feed(
        "outputs skewed",
        window(500, &[("a", &STEADY)], &[("class", skewed)]),
    );
    t.feed(
        "outputs skewed",
        window(500, &[("a", &STEADY)], &[("class", skewed)]),
    );
    for _ in 0..3 {
        t.feed(
            "outputs steady",
            window(500, &[("a", &STEADY)], &[("class", classes)]),
        );
    }
    check(
        &t,
        expect![[r#"
        t=1m outputs steady
          window 1 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
        t=2m outputs steady
          window 2 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
          output baseline set from 1000 rows: [TensorName("class")]
        t=3m outputs steady
          window 3 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=0.0/2 p=1.0e0 psi=0.000 js=0.000 stable
        t=4m outputs skewed
          window 4 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=60.3/2 p=7.9e-14 FLAG psi=0.177 js=0.178 stable(1 flagged)
        t=5m outputs skewed
          window 5 rows=500 score=0 model=ok prediction=DRIFTING
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=60.3/2 p=7.9e-14 FLAG psi=0.177 js=0.178 DRIFTING since 5
          prediction drift detected at window 5 for fleet: top-ranked [], drifting [class] of 1; most shifted class
        t=6m outputs steady
          window 6 rows=500 score=0 model=ok prediction=DRIFTING
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=0.0/2 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 5 (1 calm)
        t=7m outputs steady
          window 7 rows=500 score=0 model=ok prediction=DRIFTING
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=0.0/2 p=1.0e0 psi=0.000 js=0.000 DRIFTING since 5 (2 calm)
        t=8m outputs steady
          window 8 rows=500 score=0 model=ok prediction=ok
            a n=500 χ²=0.0/9 p=1.0e0 psi=0.000 js=0.000 stable
            class n=500 χ²=0.0/2 p=1.0e0 psi=0.000 js=0.000 stable
          prediction drift cleared (drifting since window 5) at window 8 for fleet: top-ranked [], drifting [] of 1; most shifted class
    "#]],
    );
}

#[test]
fn state_survives_a_round_trip_through_serde_mid_drift() {
    let mut straight = Trace::new(&["a", "b"], DetectorConfig::default());
    let mut restored = Trace::new(&["a", "b"], DetectorConfig::default());
    let script: Vec<(&str, ScopeWindow)> = vec![
        (
            "a shifted",
            window(500, &[("a", &SHIFTED), ("b", &STEADY)], &[]),
        ),
        (
            "half window",
            window(250, &[("a", &SHIFTED), ("b", &STEADY)], &[]),
        ),
        (
            "half window",
            window(250, &[("a", &SHIFTED), ("b", &STEADY)], &[]),
        ),
        (
            "steady",
            window(500, &[("a", &STEADY), ("b", &STEADY)], &[]),
        ),
    ];
    for (i, (what, w)) in script.into_iter().enumerate() {
        straight.feed(what, w.clone());
        if i == 1 {
            let mut bytes = Vec::new();
            ciborium::into_writer(&restored.detector, &mut bytes).unwrap();
            restored.detector = ciborium::from_reader(bytes.as_slice()).unwrap();
        }
        restored.feed(what, w);
    }
    assert_eq!(straight.out, restored.out);
    assert_eq!(straight.detector, restored.detector);
}

#[test]
fn config_and_reference_errors_say_what_to_fix() {
    let bad = |config: DetectorConfig, features: &[ReferenceFeature]| {
        DriftDetector::new(model(), Scope::Fleet, features, config)
            .unwrap_err()
            .to_string()
    };
    let a = [reference("a")];
    expect!["drift detector setting importance: zz is not one of the model's reference features"]
        .assert_eq(&bad(
            DetectorConfig {
                importance: vec![name("zz")],
                ..DetectorConfig::default()
            },
            &a,
        ));
    expect!["drift detector setting alpha: must be between 0 and 1, e.g. 0.01"].assert_eq(&bad(
        DetectorConfig {
            alpha: 0.0,
            ..DetectorConfig::default()
        },
        &a,
    ));
    expect!["the model has no reference features to watch; build its bundle with a reference sample (--reference)"].assert_eq(&bad(DetectorConfig::default(), &[]));
    let mut broken = reference("a");
    broken.proportions.pop();
    expect!["the reference statistics are not usable: reference feature a has 9 edges and 9 proportions; it needs one more proportion than edges; rebuild the bundle's reference from training data"].assert_eq(&bad(DetectorConfig::default(), &[broken]));
}

#[test]
fn a_device_feeds_its_own_its_groups_and_the_fleet_scope() {
    let device = "pump-7".parse().unwrap();
    let labels = [
        ("site".to_owned(), "north".to_owned()),
        ("hw".to_owned(), "rev2".to_owned()),
    ]
    .into_iter()
    .collect();
    let scopes = scopes_of(&device, &labels, &["site".into(), "line".into()]);
    let shown: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(shown, ["device pump-7", "group site=north", "fleet"]);
}
