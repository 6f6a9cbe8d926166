//! The seeded simulator at the window size we ship (500 rows): the detector's false alarms on
//! drift-free data and its detection delay for the three drifts the goals name, for every
//! simulated distribution. Deterministic (fixed seeds), so these are assertions on a
//! measurement, not on timing; `benches/drift.rs` prints the full table.

use crate::drift::calibrate::check_thresholds;
use crate::drift::detector::DetectorConfig;
use crate::drift::sim::{Delays, Rule, Runs, Scenario, Shape, Simulation};

/// Three features of each shape: nine features, flagged at p < 0.01 / 9.
const PER_SHAPE: usize = 3;
const SHIPPED: u64 = 500;

fn simulation() -> Simulation {
    Simulation::new(PER_SHAPE, DetectorConfig::default(), 7).unwrap()
}

#[test]
fn false_alarms_stay_below_one_percent_per_feature_per_100_windows() {
    let sim = simulation();
    let windows = 2_000;
    let rules = [Rule::Detector, Rule::ChiSquareWindow];
    let report = sim.false_alarms(SHIPPED, windows, &rules, 1).unwrap();
    let nominal = 0.01 / sim.n_features() as f64;
    for row in &report {
        let rate = row.per_100_windows();
        match row.rule {
            // Goal: ≤ 1% of features raise a false alarm per 100 windows.
            Rule::Detector => assert!(rate <= 1.0, "{row:?}: {rate} per 100 windows"),
            // The one-window flag keeps its nominal level (0.11%), within sampling noise.
            _ => assert!(
                rate / 100.0 <= 2.0 * nominal,
                "{row:?}: {rate} per 100 windows, nominal {}",
                nominal * 100.0
            ),
        }
    }
}

fn delays(sim: &Simulation, n: u64, shape: Shape, scenario: Scenario, seed: u64) -> Delays {
    let runs = Runs {
        runs: 100,
        max_windows: 20,
        seed,
    };
    sim.delays(n, shape, scenario, &[Rule::Detector], runs)
        .unwrap()
        .remove(0)
}

#[test]
fn drift_is_detected_within_three_windows_at_500_rows() {
    let sim = simulation();
    for shape in Shape::ALL {
        for (i, scenario) in Scenario::GOALS.into_iter().enumerate() {
            let d = delays(&sim, SHIPPED, shape, scenario, 100 + i as u64);
            let what = format!("{} {}", shape.name(), scenario.name());
            assert_eq!(d.detected_share(), 1.0, "{what}: {d:?}");
            let (mean, median) = (d.mean().unwrap(), d.quantile(0.5).unwrap());
            if (shape, scenario) == (Shape::Quantised, Scenario::GOALS[2]) {
                // The one case short of the goal: 0 is already this feature's most common value
                // (20% of values), so the fault only moves its share to 28%; one 500-row window
                // flags that at p < 0.01/9 about 60% of the time. 1000-row windows find it
                // within 3 (below).
                assert!(mean <= 6.0 && median <= 5, "{what}: mean {mean}, {d:?}");
            } else {
                assert!(mean <= 3.0 && median <= 3, "{what}: mean {mean}, {d:?}");
            }
        }
    }
    let d = delays(&sim, 1000, Shape::Quantised, Scenario::GOALS[2], 200);
    let (mean, median) = (d.mean().unwrap(), d.quantile(0.5).unwrap());
    assert!(
        d.detected_share() == 1.0 && mean <= 3.0 && median <= 3,
        "{d:?}"
    );
}

#[test]
fn the_reference_null_check_holds_its_level_at_the_window_sizes_we_simulate() {
    let sim = simulation();
    // 5000 rows too, in the benchmark (slow in a debug build).
    for n in [100, 500, 1000] {
        let config = DetectorConfig {
            window_samples: n,
            ..DetectorConfig::default()
        };
        let check = check_thresholds(sim.reference(), &config, 1_000, n).unwrap();
        assert!(
            check.worst_rate_at_alpha() <= 0.02,
            "n = {n}: {:#?}",
            check.features
        );
        // A drift-free 100-row window already reaches PSI ≈ 0.2: why fixed PSI thresholds fail
        // on small windows.
        if n == 100 {
            assert!(
                check.features.iter().all(|f| f.psi_p99 > 0.15),
                "{check:#?}"
            );
        }
    }
}
