//! Properties: PSI and Jensen–Shannon are ≥ 0 and 0 on identical distributions, χ² stays a
//! probability, and merging sketches is associative and commutative (so the drift figures of a
//! scope do not depend on the order its windows arrived in).

use edgefleet_protocol::TensorName;
use edgefleet_protocol::Timestamp;
use edgefleet_protocol::messages::NamedSketch;
use edgefleet_protocol::sketch::FeatureSketch;
use proptest::prelude::*;

use crate::drift::ScopeWindow;
use crate::drift::math::{Expected, chi_square_gof, js_distance, psi, window_stats};

const BINS: usize = 6;

fn shares() -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(0u32..1000, BINS).prop_filter_map("some mass", |raw| {
        let total: u32 = raw.iter().sum();
        (total > 0).then(|| {
            raw.iter()
                .map(|v| f64::from(*v) / f64::from(total))
                .collect()
        })
    })
}

fn sketch() -> impl Strategy<Value = FeatureSketch> {
    (
        proptest::collection::vec(0u64..500, BINS),
        0u64..50,
        -1e3f64..1e3,
        -1e3f64..1e3,
    )
        .prop_map(|(bins, nan, a, b)| {
            let count: u64 = bins.iter().sum();
            FeatureSketch {
                out_of_range: count / 7,
                count,
                nan,
                sum: a * count as f64,
                sum_sq: a * a * count as f64,
                min: a.min(b),
                max: a.max(b),
                bins,
            }
        })
}

fn window(sketch: FeatureSketch, start: u64) -> ScopeWindow {
    ScopeWindow {
        window_start: Timestamp(start),
        window_end: Timestamp(start + 60_000),
        device_windows: 1,
        features: vec![NamedSketch {
            name: TensorName::new("f").unwrap(),
            sketch,
        }],
        outputs: Vec::new(),
    }
}

fn merged(windows: &[&ScopeWindow]) -> ScopeWindow {
    let mut acc = windows[0].clone();
    for w in &windows[1..] {
        acc.merge(w).unwrap();
    }
    acc
}

/// Everything but the float sums, which are equal up to rounding.
fn exact_part(
    window: &ScopeWindow,
) -> (Vec<u64>, u64, u64, u64, f64, f64, u64, Timestamp, Timestamp) {
    let s = &window.features[0].sketch;
    (
        s.bins.clone(),
        s.count,
        s.nan,
        s.out_of_range,
        s.min,
        s.max,
        window.device_windows,
        window.window_start,
        window.window_end,
    )
}

proptest! {
    #[test]
    fn psi_and_js_are_nonnegative_and_zero_on_identical_shares(p in shares(), q in shares()) {
        prop_assert!(psi(&p, &q) >= 0.0);
        let js = js_distance(&p, &q);
        prop_assert!((0.0..=1.0).contains(&js), "js {js}");
        prop_assert_eq!(psi(&p, &p), 0.0);
        prop_assert_eq!(js_distance(&p, &p), 0.0);
    }

    #[test]
    fn window_stats_are_zero_against_their_own_counts_and_p_is_a_probability(
        s in sketch(),
        p in shares(),
    ) {
        let stats = window_stats(&s.bins, s.nan, 0, Expected::Counts(&s.bins), &[], 5000, 5.0)
            .unwrap();
        prop_assert_eq!(stats.psi, 0.0);
        prop_assert!(stats.js.abs() < 1e-7, "js {}", stats.js);
        let observed: Vec<f64> = s.bins.iter().map(|c| *c as f64).collect();
        if let Some(chi2) = chi_square_gof(&observed, &p, 5.0) {
            prop_assert!(chi2.statistic >= 0.0);
            prop_assert!((0.0..=1.0).contains(&chi2.p_value));
        }
    }

    #[test]
    fn merge_is_associative_and_commutative(a in sketch(), b in sketch(), c in sketch()) {
        let (a, b, c) = (window(a, 0), window(b, 60_000), window(c, 120_000));
        let left = merged(&[&merged(&[&a, &b]), &c]);
        let right = merged(&[&a, &merged(&[&b, &c])]);
        let swapped = merged(&[&c, &b, &a]);
        prop_assert_eq!(exact_part(&left), exact_part(&right));
        prop_assert_eq!(exact_part(&left), exact_part(&swapped));
        for other in [&right, &swapped] {
            let (x, y) = (&left.features[0].sketch, &other.features[0].sketch);
            prop_assert!((x.sum - y.sum).abs() <= 1e-9 * x.sum.abs().max(1.0));
            prop_assert!((x.sum_sq - y.sum_sq).abs() <= 1e-9 * x.sum_sq.abs().max(1.0));
        }
        // The drift figures see only the bins: equal, not just close.
        let reference = [1.0 / BINS as f64; BINS];
        let stats = |w: &ScopeWindow| {
            let s = &w.features[0].sketch;
            window_stats(&s.bins, s.nan, s.out_of_range, Expected::Proportions(&reference), &[], 5000, 5.0)
        };
        prop_assert_eq!(stats(&left), stats(&right));
        prop_assert_eq!(stats(&left), stats(&swapped));
    }
}

#[test]
fn windows_with_other_bins_do_not_merge() {
    let mut a = window(FeatureSketch::new(BINS), 0);
    let before = a.clone();
    let b = window(FeatureSketch::new(BINS + 1), 0);
    let err = a.merge(&b).unwrap_err();
    assert_eq!(
        err.to_string(),
        "feature f has 7 bins but 6 were expected; merge and test only windows taken with the same model bundle"
    );
    assert_eq!(a, before, "a refused merge leaves the window unchanged");
}
