//! Unit tests of `behaviour`: the behaviour file, its errors, patches and device rules.

use expect_test::expect;

use super::*;

const FILE: &str = r#"
[default]
inference_rate = 5
latency_us = { median = 800, p95 = 2500 }

[models."pump@2.0.0"]
errors = { runtime = 0.2 }
activation_delay_ms = 50

[[devices]]
select = { ids = ["sim-00001", "sim-00003"] }
model = "pump@2.0.0"
[devices.behaviour]
drift = { mean_shift_sd = 1.5, features = ["temp"] }

[[devices]]
select = { indices = [3] }
[devices.behaviour]
inference_rate = 0
"#;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sim-{i:05}")).collect()
}

#[test]
fn a_behaviour_file_patches_the_default_per_model_and_per_device() {
    let table = BehaviourTable::from_toml(FILE, "behaviour.toml").unwrap();
    let resolved = Behaviours::new(table, ids(4), 1);
    let base = resolved.get(0, "pump@1.0.0");
    assert_eq!(base.inference_rate, 5.0);
    assert_eq!(base.errors.runtime, 0.0);
    assert_eq!(
        base.latency_us,
        Dist::LogNormal {
            median: 800.0,
            p95: 2500.0
        }
    );
    let candidate = resolved.get(0, "pump@2.0.0");
    assert_eq!(candidate.errors.runtime, 0.2);
    assert_eq!(candidate.activation_delay_ms, Dist::Fixed(50.0));
    assert_eq!(
        candidate.inference_rate, 5.0,
        "the model section patches the default"
    );
    assert_eq!(candidate.drift, None);
    let drifting = resolved.get(1, "pump@2.0.0");
    assert_eq!(
        drifting.errors.runtime, 0.2,
        "the rule patches the model's behaviour"
    );
    assert_eq!(drifting.drift.as_ref().unwrap().mean_shift_sd, 1.5);
    assert_eq!(
        resolved.get(1, "pump@1.0.0").drift,
        None,
        "only on the rule's model"
    );
    let both = resolved.get(3, "pump@2.0.0");
    assert!(both.drift.is_some());
    assert_eq!(
        both.inference_rate, 0.0,
        "later rules apply after earlier ones"
    );
}

#[test]
fn a_bad_behaviour_file_names_the_field() {
    let errors = [
        "[default]\ninference_rat = 2\n",
        "[default]\nerrors = { runtime = 1.5 }\n",
        "[models.pump]\ninstall_failure = 0.1\n",
        "[default]\nlatency_us = { median = 10, mx = 20 }\n",
        "[default]\nlatency_us = { median = 10 }\n",
        "[default]\ninstall_failure_reason = \"disk_on_fire\"\n",
        "[[devices]]\nselect = { fraction = 2 }\n",
        "[[devices]]\nselect = { ids = [\"a\"] }\nbehaviour = { errors = { runtime = 0.7, timeout = 0.7 } }\n",
    ]
    .map(|text| BehaviourTable::from_toml(text, "b.toml").unwrap_err().to_string())
    .join("\n---\n");
    expect![[r#"
        behaviour file b.toml: TOML parse error at line 2, column 1
          |
        2 | inference_rat = 2
          | ^^^^^^^^^^^^^
        unknown field `inference_rat`, expected one of `install_failure`, `install_failure_reason`, `activation_failure`, `activation_failure_reason`, `activation_delay_ms`, `inference_rate`, `errors`, `latency_us`, `shadow_agreement`, `shadow_mean_abs_diff`, `features`, `drift`, `output`, `classes`, `cpu_percent`, `rss_mib`
        ---
        behaviour file b.toml: default.errors.runtime: 1.5 is not a probability (0 to 1); default.errors: the rates add up to 1.5, above 1; fix these fields
        ---
        behaviour file b.toml: models."pump": name models as name@version (e.g. pump-anomaly@1.0.0); fix these fields
        ---
        behaviour file b.toml: TOML parse error at line 2, column 29
          |
        2 | latency_us = { median = 10, mx = 20 }
          |                             ^^
        unknown field `mx`, expected one of `min`, `max`, `mean`, `sd`, `median`, `p95`
        ---
        behaviour file b.toml: TOML parse error at line 2, column 14
          |
        2 | latency_us = { median = 10 }
          |              ^^^^^^^^^^^^^^^
        a distribution is a number, { min, max }, { mean, sd } or { median, p95 }
        ---
        behaviour file b.toml: TOML parse error at line 2, column 26
          |
        2 | install_failure_reason = "disk_on_fire"
          |                          ^^^^^^^^^^^^^^
        unknown variant `disk_on_fire`, expected one of `signature`, `expired`, `downgrade`, `replay`, `wrong_device`, `wrong_arch`, `agent_too_old`, `manifest_mismatch`, `payload_hash`, `download`, `download_stalled`, `no_space`, `io`, `model_load`, `unsupported_op`, `golden_mismatch`, `latency_budget`, `error_rate`, `crash`, `operator`
        ---
        behaviour file b.toml: TOML parse error at line 2, column 10
          |
        2 | select = { fraction = 2 }
          |          ^^^^^^^^^^^^^^^^
        select exactly one of { all = true }, { indices = [...] }, { ids = [...] } or { fraction = 0..1 }
        ---
        behaviour file b.toml: devices[0].behaviour.errors: the rates add up to 1.4, above 1; fix these fields"#]]
    .assert_eq(&errors);
}

#[test]
fn a_fraction_selects_that_many_devices_the_same_way_for_the_same_seed() {
    let ids = ids(1000);
    let pick = |seed| DeviceSelector::Fraction(0.1).resolve(&ids, seed);
    let first = pick(42);
    assert_eq!(first.iter().filter(|s| **s).count(), 100);
    assert_eq!(first, pick(42));
    assert_ne!(first, pick(43));
    let by_id = DeviceSelector::Ids(vec![String::from("sim-00007"), String::from("nope")]);
    let selected: Vec<usize> = by_id
        .resolve(&ids, 0)
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.then_some(i))
        .collect();
    assert_eq!(selected, [7]);
    assert_eq!(
        DeviceSelector::Indices(vec![2, 5000]).resolve(&ids[..3], 0),
        [false, false, true]
    );
}

#[test]
fn distributions_have_the_mean_and_spread_they_are_given() {
    let mut rng = crate::device_rng(9, 0);
    for dist in [
        Dist::Fixed(3.0),
        Dist::Uniform { min: 2.0, max: 4.0 },
        Dist::Normal { mean: 3.0, sd: 0.5 },
        Dist::LogNormal {
            median: 3.0,
            p95: 6.0,
        },
    ] {
        let samples: Vec<f64> = (0..20_000).map(|_| dist.sample(&mut rng)).collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / samples.len() as f64;
        let (want_mean, want_sd) = dist.mean_sd();
        assert!((mean - want_mean).abs() < 0.05, "{dist:?}: mean {mean}");
        assert!(
            (var.sqrt() - want_sd).abs() < 0.05,
            "{dist:?}: sd {}",
            var.sqrt()
        );
    }
    let mut sorted: Vec<f64> = (0..20_000)
        .map(|_| {
            Dist::LogNormal {
                median: 800.0,
                p95: 2500.0,
            }
            .sample(&mut rng)
        })
        .collect();
    sorted.sort_by(f64::total_cmp);
    let p95 = sorted[19_000];
    assert!((2300.0..2700.0).contains(&p95), "p95 {p95}");
}
