//! The χ², PSI, Jensen–Shannon and KS figures against scipy's on fixed cases; the values come
//! from `scipy_reference.py` next to this file (scipy 1.17.1).

use crate::drift::math::{
    ChiSquare, Expected, chi_square_gof, chi_square_two_sample, group_bins, js_distance, psi,
    window_stats,
};
use crate::drift::sim::{kolmogorov_sf, ks_two_sample};

#[track_caller]
fn close(actual: f64, expected: f64, relative: f64) {
    let scale = expected.abs().max(f64::MIN_POSITIVE);
    assert!(
        ((actual - expected) / scale).abs() <= relative,
        "{actual:e} differs from {expected:e} by more than {relative:e} (relative)"
    );
}

#[track_caller]
fn check(result: Option<ChiSquare>, statistic: f64, dof: u32, p_value: f64) {
    let result = result.expect("a χ² result");
    close(result.statistic, statistic, 1e-12);
    assert_eq!(result.dof, dof);
    close(result.p_value, p_value, 1e-9);
}

fn f(counts: &[u64]) -> Vec<f64> {
    counts.iter().map(|c| *c as f64).collect()
}

#[test]
fn chi_square_matches_scipy_on_fixed_cases() {
    let tenths = [0.1; 10];
    check(
        chi_square_gof(&f(&[12, 8, 15, 9, 11, 5, 10, 13, 7, 10]), &tenths, 5.0),
        7.800000000000001,
        9,
        0.5544204358728568,
    );
    check(
        chi_square_gof(
            &f(&[30, 45, 60, 50, 40, 35, 40]),
            &[0.1, 0.15, 0.2, 0.15, 0.15, 0.1, 0.15],
            5.0,
        ),
        2.5,
        6,
        0.8684676654824512,
    );
    check(
        chi_square_gof(&f(&[20, 25, 30, 40, 45, 55, 60, 70, 75, 80]), &tenths, 5.0),
        82.0,
        9,
        6.467794483370819e-14,
    );
    // Expected 1, 2, 47, 40, 5, 5: the first three bins are pooled.
    check(
        chi_square_gof(
            &f(&[3, 0, 40, 45, 4, 8]),
            &[0.01, 0.02, 0.47, 0.4, 0.05, 0.05],
            5.0,
        ),
        3.605,
        3,
        0.30739712960214927,
    );
    check(
        chi_square_two_sample(&f(&[30, 50, 20]), &f(&[300, 400, 300]), 5.0),
        5.3472222222222205,
        2,
        0.06900259881482955,
    );
}

#[test]
fn a_window_above_max_samples_is_tested_at_that_size() {
    let bins = [1900, 2080, 2050, 1950, 2000, 2250, 1770, 2000, 2000, 2000];
    let edges: Vec<f64> = (1..10).map(f64::from).collect();
    let stats = window_stats(
        &bins,
        3,
        7,
        Expected::Proportions(&[0.1; 10]),
        &edges,
        5000,
        5.0,
    )
    .unwrap();
    assert_eq!(
        (stats.n, stats.effective_n, stats.nan, stats.out_of_range),
        (20_000, 5000, 3, 7)
    );
    check(stats.chi2, 17.1, 9, 0.04717282243067667);
    // The strongest contributors, with their ranges.
    let top: Vec<_> = stats
        .top_bins
        .iter()
        .map(|b| (b.bin, b.lower, b.upper, b.observed))
        .collect();
    assert_eq!(
        top,
        [
            (5, Some(5.0), Some(6.0), 2250),
            (6, Some(6.0), Some(7.0), 1770),
            (0, None, Some(1.0), 1900)
        ]
    );
}

#[test]
fn psi_and_js_match_numpy_and_scipy() {
    let p = [0.1; 10];
    let q = [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15, 0.15];
    close(psi(&p, &q), 0.10986122886681095, 1e-12);
    close(js_distance(&p, &q), 0.13970675101139313, 1e-12);
    // An empty bin: PSI raises its share to 1e-4; JS needs no smoothing.
    let q0 = [0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2];
    close(psi(&p, &q0), 0.7593994704263101, 1e-12);
    close(js_distance(&p, &q0), 0.2495107710938078, 1e-12);
}

#[test]
fn ks_matches_scipy_and_statrs() {
    let a = [0.1, 0.4, 0.7, 1.2, 1.5, 2.2, 2.9, 3.1, 3.3, 4.0, 4.4, 5.0];
    let b = [
        0.3, 0.9, 1.0, 1.6, 2.4, 3.5, 3.6, 3.9, 4.5, 5.5, 6.1, 6.4, 7.0,
    ];
    let (d, p) = ks_two_sample(&a, &b);
    close(d, 0.36538461538461536, 1e-12);
    close(p, 0.37539509452862035, 1e-9);
    let (statrs_d, statrs_p) = statrs::stats_tests::ks_test::ks_twosample(
        a.to_vec(),
        b.to_vec(),
        statrs::stats_tests::ks_test::KSTwoSampleAlternativeMethod::TwoSidedAsymptotic,
        statrs::stats_tests::NaNPolicy::Error,
    )
    .unwrap();
    close(d, statrs_d, 1e-12);
    close(p, statrs_p, 1e-8);
    for (x, sf) in [
        (0.3, 0.9999906941986655),
        (0.8, 0.5441424115741981),
        (1.0, 0.26999967167735456),
        (1.358, 0.05002679733444698),
        (2.0, 0.0006709252557796953),
    ] {
        close(kolmogorov_sf(x), sf, 1e-9);
    }
}

#[test]
fn sparse_bins_are_pooled_in_order_and_a_short_tail_joins_the_last_group() {
    assert_eq!(
        group_bins(&[1.0, 2.0, 47.0, 40.0, 5.0, 5.0], 5.0),
        [0..3, 3..4, 4..5, 5..6]
    );
    assert_eq!(group_bins(&[10.0, 10.0, 2.0], 5.0), [0..1, 1..3]);
    assert_eq!(group_bins(&[1.0, 1.0], 5.0), vec![(0..2)]);
    assert_eq!(
        group_bins(&[0.0, 0.0], 5.0),
        Vec::<std::ops::Range<usize>>::new()
    );
    // A window too small for two groups has no test.
    assert_eq!(chi_square_gof(&[3.0, 4.0], &[0.5, 0.5], 5.0), None);
    // Mass in a bin the reference never saw is pooled with its neighbour, not infinite.
    let result = chi_square_gof(&[10.0, 30.0, 10.0], &[0.5, 0.0, 0.5], 5.0).unwrap();
    assert!(
        result.statistic.is_finite() && result.dof == 1,
        "{result:?}"
    );
}
