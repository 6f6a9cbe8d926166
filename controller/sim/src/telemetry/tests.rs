//! Unit tests of `telemetry`: windows counted as the agent counts them, from the behaviour.

use edgefleet_protocol::manifest::{Manifest, RuntimeSettings};
use edgefleet_protocol::messages::ModelRef;
use edgefleet_protocol::sketch::bin_index;
use edgefleet_protocol::{ModelName, ModelVersion, Sha256Digest, Timestamp};

use super::*;
use crate::behaviour::{Behaviour, Dist, Drift, ErrorRates};

/// Two features with training references, a score output and a three-class output.
fn manifest() -> Manifest {
    let temp: Vec<f64> = (0..1000).map(|i| 40.0 + f64::from(i) * 0.03).collect();
    let pressure: Vec<f64> = (0..1000).map(|i| (f64::from(i) / 100.0).powi(2)).collect();
    crate::testing::manifest(
        ("pump", "1.0.0", 1),
        &[("temp", temp), ("pressure", pressure)],
        &[("score", 1), ("class", 3)],
        RuntimeSettings::default(),
    )
}

fn model_ref() -> ModelRef {
    ModelRef {
        name: ModelName::new("pump").unwrap(),
        version: ModelVersion::new("1.0.0").unwrap(),
        release: 1,
        manifest_digest: Sha256Digest::of(b"pump"),
    }
}

fn window_of(
    behaviour: &Behaviour,
    shadow: Option<&Behaviour>,
    seconds: u64,
    seed: u64,
) -> TelemetryWindow {
    let (manifest, model) = (manifest(), model_ref());
    let models = WindowModels {
        active: (&model, &manifest, behaviour),
        shadow: shadow.map(|b| (&model, b)),
    };
    let mut rng = crate::device_rng(seed, 0);
    window(&mut rng, &models, Timestamp(0), Timestamp(seconds * 1000))
}

/// Chi-square statistic of observed bin counts against expected proportions.
fn chi_square(bins: &[u64], proportions: &[f64]) -> f64 {
    let n: u64 = bins.iter().sum();
    bins.iter()
        .zip(proportions)
        .filter(|(_, p)| **p > 0.0)
        .map(|(o, p)| {
            let e = p * n as f64;
            (*o as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn an_undrifted_device_fills_the_reference_bins_in_their_proportions() {
    let behaviour = Behaviour {
        inference_rate: 100.0,
        ..Behaviour::default()
    };
    let window = window_of(&behaviour, None, 100, 7);
    let manifest = manifest();
    let references = &manifest.reference.as_ref().unwrap().features;
    assert!(
        (9_000..11_000).contains(&window.inferences),
        "{}",
        window.inferences
    );
    for (sketch, reference) in window.features.iter().zip(references) {
        assert_eq!(sketch.name, reference.name);
        assert_eq!(sketch.sketch.count, window.inferences);
        assert_eq!(sketch.sketch.out_of_range, 0);
        // 9 degrees of freedom: p = 0.001 at 27.9.
        let chi = chi_square(&sketch.sketch.bins, &reference.proportions);
        assert!(chi < 27.9, "{}: chi-square {chi}", reference.name);
        let (mean, _) = reference_mean_sd(reference);
        let observed = sketch.sketch.mean().unwrap();
        assert!(
            (observed - mean).abs() < 0.05 * mean.abs().max(1.0),
            "{observed} vs {mean}"
        );
    }
}

#[test]
fn configured_values_and_drift_land_in_the_bins_they_imply() {
    let manifest = manifest();
    let temp = &manifest.reference.as_ref().unwrap().features[0];
    let behaviour = Behaviour {
        inference_rate: 10.0,
        features: [(String::from("temp"), Dist::Fixed(50.0))].into(),
        drift: Some(Drift {
            stuck_fraction: 0.25,
            stuck_value: 10.0,
            features: Some(vec![String::from("pressure")]),
            ..Drift::default()
        }),
        ..Behaviour::default()
    };
    let window = window_of(&behaviour, None, 60, 3);
    let n = window.inferences;
    let fixed = &window.features[0].sketch;
    let mut expected = vec![0; temp.edges.len() + 1];
    expected[bin_index(&temp.edges, 50.0)] = n;
    assert_eq!(fixed.bins, expected, "every value 50.0 in one bin");
    let pressure = &window.features[1].sketch;
    let stuck_bin = bin_index(
        &manifest.reference.as_ref().unwrap().features[1].edges,
        10.0,
    );
    let share = pressure.bins[stuck_bin] as f64 / n as f64;
    // A quarter stuck there, plus the bin's own tenth of the rest.
    assert!((0.25..0.40).contains(&share), "{share}");
    // A mean shift of one standard deviation moves the mean by one sd.
    let (mean, sd) = reference_mean_sd(temp);
    let shifted = Behaviour {
        inference_rate: 10.0,
        drift: Some(Drift {
            mean_shift_sd: 1.0,
            features: Some(vec![String::from("temp")]),
            ..Drift::default()
        }),
        ..Behaviour::default()
    };
    let window = window_of(&shifted, None, 600, 4);
    let observed = window.features[0].sketch.mean().unwrap();
    assert!(
        (observed - (mean + sd)).abs() < 0.1 * sd,
        "{observed} vs {}",
        mean + sd
    );
}

#[test]
fn errors_latency_outputs_and_shadow_agreement_follow_the_behaviour() {
    let behaviour = Behaviour {
        inference_rate: 50.0,
        errors: ErrorRates {
            runtime: 0.1,
            invalid_input: 0.05,
            timeout: 0.0,
        },
        latency_us: Dist::LogNormal {
            median: 800.0,
            p95: 4000.0,
        },
        output: Dist::Fixed(0.93),
        classes: vec![0.0, 0.0, 1.0],
        ..Behaviour::default()
    };
    let candidate = Behaviour {
        shadow_agreement: 0.8,
        shadow_mean_abs_diff: 0.1,
        ..Behaviour::default()
    };
    let window = window_of(&behaviour, Some(&candidate), 100, 11);
    let requests = window.inferences + window.errors.total();
    let share = |n: u64| n as f64 / requests as f64;
    assert!((0.08..0.12).contains(&share(window.errors.runtime)));
    assert!((0.035..0.065).contains(&share(window.errors.invalid_input)));
    // Features count every request past the schema check, runtime failures included.
    assert_eq!(
        window.features[0].sketch.count,
        window.inferences + window.errors.runtime
    );
    assert_eq!(window.latency.count(), window.inferences);
    let p50 = window.latency.quantile(0.5).unwrap() as f64;
    let p95 = window.latency.quantile(0.95).unwrap() as f64;
    // Histogram buckets are 12.5% wide.
    assert!((700.0..1000.0).contains(&p50), "p50 {p50}");
    assert!((3500.0..5000.0).contains(&p95), "p95 {p95}");
    let (score, class) = (&window.outputs[0], &window.outputs[1]);
    assert_eq!(score.name.as_str(), "score");
    assert_eq!(
        score.sketch.bins[9], window.inferences,
        "0.93 is in the top score bin"
    );
    assert_eq!(
        class.sketch.bins,
        vec![0, 0, window.inferences],
        "always class 2"
    );
    let shadow = window.shadow.as_ref().unwrap();
    assert_eq!(shadow.compared + shadow.errors, window.inferences);
    let agree = shadow.argmax_agree as f64 / shadow.compared as f64;
    assert!((0.77..0.83).contains(&agree), "{agree}");
    let diff = shadow.abs_diff_sum / shadow.compared as f64;
    assert!((0.09..0.11).contains(&diff), "{diff}");
    assert_eq!(window.resources.rss_bytes, 36 * 1024 * 1024);
}

#[test]
fn a_window_without_requests_has_empty_sketches_and_no_outputs() {
    let idle = Behaviour {
        inference_rate: 0.0,
        ..Behaviour::default()
    };
    let window = window_of(&idle, None, 60, 1);
    assert_eq!(window.inferences, 0);
    assert_eq!(window.features.len(), 2);
    assert!(window.features.iter().all(|f| f.sketch.count == 0));
    assert!(
        window.outputs.is_empty(),
        "the agent adds output sketches as outputs appear"
    );
}

#[test]
fn the_grace_window_counts_what_the_agent_checks() {
    let mut rng = crate::device_rng(5, 0);
    let behaviour = Behaviour {
        inference_rate: 2.0,
        errors: ErrorRates {
            runtime: 0.2,
            invalid_input: 0.5,
            timeout: 0.0,
        },
        ..Behaviour::default()
    };
    let (ok, runtime) = grace_counts(&mut rng, &behaviour, 100);
    // 200 requests expected: half refused at the schema check and not counted.
    assert!((60..100).contains(&ok), "{ok}");
    assert!((20..60).contains(&runtime), "{runtime}");
    assert_eq!(grace_counts(&mut rng, &behaviour, 0), (0, 0));
}
