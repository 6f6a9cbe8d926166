//! The CUSUM chart as data in, data out: scripted feedback windows and the trace of its points
//! and crossings, compared with snapshots; then its false alarms and delay on seeded labels.

use std::fmt::Write as _;

use edgefleet_protocol::Timestamp;
use edgefleet_protocol::messages::FeedbackStats;
use expect_test::{Expect, expect};

use crate::drift::performance::{Action, ChartConfig, Crossing, PerformanceChart};
use crate::drift::sim::{Runs, chart_runs};

fn labels(count: u64, wrong: u64) -> FeedbackStats {
    FeedbackStats {
        count,
        correct: count - wrong,
        abs_error_sum: 0.0,
        sq_error_sum: 0.0,
    }
}

/// `count` predictions with absolute errors averaging `mean`, spread ±`spread`.
fn errors(count: u64, mean: f64, spread: f64) -> FeedbackStats {
    let half = count / 2;
    let (lo, hi) = (mean - spread, mean + spread);
    FeedbackStats {
        count,
        correct: 0,
        abs_error_sum: lo * half as f64 + hi * (count - half) as f64,
        sq_error_sum: lo * lo * half as f64 + hi * hi * (count - half) as f64,
    }
}

fn crossing(c: &Crossing) -> String {
    format!(
        "window {} (since window {}): {:.4} over {} labels vs baseline {:.4} (tuned for {:.4}), S={:.2} ≥ {:.2}",
        c.window,
        c.since_window,
        c.value,
        c.count,
        c.baseline.value,
        c.baseline.degraded,
        c.statistic,
        c.threshold
    )
}

#[track_caller]
fn check(config: ChartConfig, script: &[(&str, Option<FeedbackStats>)], expect: Expect) {
    let mut chart = PerformanceChart::new(config);
    let mut out = String::new();
    for (minute, (what, feedback)) in script.iter().enumerate() {
        let _ = writeln!(out, "t={}m {what}", minute + 1);
        for action in chart.handle(Timestamp(minute as u64 * 60_000), feedback.as_ref()) {
            let _ = match action {
                Action::Learning { count, needed } => writeln!(out, "  learning {count}/{needed}"),
                Action::BaselineSet(b) => writeln!(
                    out,
                    "  baseline {:.4} (sd {:.4}) from {} labels; tuned for {:.4}",
                    b.value, b.sd, b.count, b.degraded
                ),
                Action::Evaluated(p) => writeln!(
                    out,
                    "  window {} n={} value={} S={:.2}{}{}",
                    p.window,
                    p.count,
                    p.value.map_or("-".into(), |v| format!("{v:.4}")),
                    p.statistic,
                    p.recovery
                        .map_or(String::new(), |r| format!(" recovery={r:.2}")),
                    if p.degraded { " DEGRADED" } else { "" }
                ),
                Action::Degraded(c) => writeln!(out, "  degraded at {}", crossing(&c)),
                Action::Recovered(c) => writeln!(out, "  recovered at {}", crossing(&c)),
            };
        }
    }
    expect.assert_eq(&out);
}

#[test]
fn error_rate_chart_learns_its_baseline_flags_a_rise_and_sees_the_recovery() {
    let config = ChartConfig {
        baseline_samples: 400,
        ..ChartConfig::error_rate()
    };
    let mut script = vec![
        ("baseline", Some(labels(200, 10))),
        ("baseline", Some(labels(200, 10))),
        ("no labels", None),
        ("steady", Some(labels(200, 11))),
        ("a bad window", Some(labels(200, 20))),
        ("steady", Some(labels(200, 9))),
    ];
    script.extend(std::iter::repeat_n(("errors up", Some(labels(200, 24))), 4));
    script.extend(std::iter::repeat_n(
        ("errors back", Some(labels(200, 10))),
        5,
    ));
    check(
        config,
        &script,
        expect![[r#"
        t=1m baseline
          learning 200/400
        t=2m baseline
          baseline 0.0500 (sd 0.2179) from 400 labels; tuned for 0.1000
        t=3m no labels
          window 1 n=0 value=- S=0.00
        t=4m steady
          window 2 n=200 value=0.0550 S=0.00
        t=5m a bad window
          window 3 n=200 value=0.1000 S=4.13
        t=6m steady
          window 4 n=200 value=0.0450 S=0.04
        t=7m errors up
          window 5 n=200 value=0.1200 S=7.16
        t=8m errors up
          window 6 n=200 value=0.1200 S=14.28 recovery=0.00 DEGRADED
          degraded at window 6 (since window 3): 0.0963 over 800 labels vs baseline 0.0500 (tuned for 0.1000), S=14.28 ≥ 11.51
        t=9m errors up
          window 7 n=200 value=0.1200 S=14.28 recovery=0.00 DEGRADED
        t=10m errors up
          window 8 n=200 value=0.1200 S=14.28 recovery=0.00 DEGRADED
        t=11m errors back
          window 9 n=200 value=0.0500 S=14.28 recovery=3.34 DEGRADED
        t=12m errors back
          window 10 n=200 value=0.0500 S=14.28 recovery=6.68 DEGRADED
        t=13m errors back
          window 11 n=200 value=0.0500 S=14.28 recovery=10.02 DEGRADED
        t=14m errors back
          window 12 n=200 value=0.0500 S=0.00
          recovered at window 12 (since window 9): 0.0500 over 800 labels vs baseline 0.0500 (tuned for 0.1000), S=13.37 ≥ 11.51
        t=15m errors back
          window 13 n=200 value=0.0500 S=0.00
    "#]],
    );
}

#[test]
fn mean_abs_error_chart_flags_a_relative_rise() {
    let config = ChartConfig {
        baseline_samples: 500,
        ..ChartConfig::mean_abs_error()
    };
    let mut script = vec![("baseline", Some(errors(500, 1.0, 0.5)))];
    script.extend(std::iter::repeat_n(
        ("steady", Some(errors(100, 1.02, 0.5))),
        2,
    ));
    script.extend(std::iter::repeat_n(
        ("errors +30%", Some(errors(100, 1.3, 0.5))),
        3,
    ));
    // Non-finite sums (a broken report) are skipped, not charted.
    script.push((
        "NaN sums",
        Some(FeedbackStats {
            abs_error_sum: f64::NAN,
            ..errors(100, 1.0, 0.5)
        }),
    ));
    check(
        config,
        &script,
        expect![[r#"
        t=1m baseline
          baseline 1.0000 (sd 0.5000) from 500 labels; tuned for 1.2000
        t=2m steady
          window 1 n=100 value=1.0200 S=0.00
        t=3m steady
          window 2 n=100 value=1.0200 S=0.00
        t=4m errors +30%
          window 3 n=100 value=1.3000 S=16.00 recovery=0.00 DEGRADED
          degraded at window 3 (since window 3): 1.3000 over 100 labels vs baseline 1.0000 (tuned for 1.2000), S=16.00 ≥ 11.51
        t=5m errors +30%
          window 4 n=100 value=1.3000 S=16.00 recovery=0.00 DEGRADED
        t=6m errors +30%
          window 5 n=100 value=1.3000 S=16.00 recovery=0.00 DEGRADED
        t=7m NaN sums
          window 6 n=100 value=- S=16.00 recovery=0.00 DEGRADED
    "#]],
    );
}

#[test]
fn error_rate_chart_rarely_false_alarms_and_flags_five_points_within_windows() {
    // 5% → 10% errors, 100 labels a window.
    let runs = chart_runs(
        &ChartConfig::error_rate(),
        (0.05, 0.10),
        100,
        5_000,
        Runs {
            runs: 200,
            max_windows: 100,
            seed: 11,
        },
    );
    let per_100 = 100.0 * runs.false_alarms as f64 / runs.stationary_windows as f64;
    assert!(per_100 <= 1.0, "false alarms per 100 windows: {per_100}");
    assert_eq!(runs.delays.detected_share(), 1.0, "{:?}", runs.delays);
    let mean = runs.delays.mean().unwrap();
    assert!(mean <= 12.0, "mean delay {mean} windows");
}
