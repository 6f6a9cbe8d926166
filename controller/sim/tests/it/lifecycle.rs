//! Simulated devices enroll with labels, are listed online, install what the admin API assigns,
//! and their telemetry is stored with the bin counts their configured input values imply; an
//! install-failure behaviour yields `InstallFailed`.

use std::collections::BTreeMap;

use edgefleet_protocol::messages::FailureCode;
use edgefleet_protocol::sketch::{ReferenceFeature, bin_index};
use edgefleet_protocol::{Sha256Digest, TensorName};
use edgefleet_sim::{
    Behaviour, BehaviourPatch, BehaviourTable, DeviceRule, DeviceSelector, Dist, Fleet, LabelRule,
};
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};

use crate::common::{self, WAIT};

/// The demo model's reference bins for `temperature_c`, computed from its training sample the
/// way the registry computes them.
fn temperature_edges() -> Vec<f64> {
    let csv = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/reference.csv"),
    )
    .unwrap();
    let values: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|line| line.split(',').next().unwrap().parse().unwrap())
        .collect();
    ReferenceFeature::from_samples(TensorName::new("temperature_c").unwrap(), &values)
        .unwrap()
        .edges
}

#[test]
fn simulated_devices_enroll_install_and_report_the_telemetry_their_behaviour_implies() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let digest = controller.register_demo_model();
    let mut config = common::config(&controller, &dir.path().join("sim"), 4);
    let cohort = |devices, value: &str| LabelRule {
        devices: DeviceSelector::Indices(devices),
        labels: BTreeMap::from([(String::from("cohort"), value.to_owned())]),
    };
    config.labels = vec![cohort(vec![0, 1], "a"), cohort(vec![2, 3], "b")];
    config.behaviour = BehaviourTable {
        default: Behaviour {
            inference_rate: 20.0,
            activation_delay_ms: Dist::Fixed(300.0),
            features: BTreeMap::from([(String::from("temperature_c"), Dist::Fixed(50.0))]),
            ..Behaviour::default()
        },
        models: BTreeMap::new(),
        rules: vec![DeviceRule {
            devices: DeviceSelector::Indices(vec![3]),
            model: Some(String::from("pump-anomaly@1.0.0")),
            behaviour: BehaviourPatch {
                install_failure: Some(1.0),
                install_failure_reason: Some(FailureCode::NoSpace),
                ..BehaviourPatch::default()
            },
        }],
    };
    let runtime = common::runtime();
    let fleet = runtime.block_on(Fleet::start(config)).unwrap();
    let ids: Vec<String> = fleet.devices().iter().map(|d| d.id.to_string()).collect();
    assert_eq!(ids, ["sim-00000", "sim-00001", "sim-00002", "sim-00003"]);
    for (i, id) in ids.iter().enumerate() {
        let row = controller.wait_device(id, "listed online", |d| d["online"] == true);
        assert_eq!(
            row["labels"]["cohort"],
            if i < 2 { "a" } else { "b" },
            "{row}"
        );
        assert_eq!(row["agent_version"], edgefleet_sim::AGENT_VERSION);
    }

    for id in &ids {
        common::assign(&controller, id, &digest, false);
    }
    let model: Sha256Digest = digest.parse().unwrap();
    wait_until(WAIT, "three devices activated and one refused", || {
        let counters = fleet.counters();
        (fleet.count_on(&model) == 3 && counters.activated == 3 && counters.install_failed == 1)
            .then_some(())
    });
    for id in &ids[..3] {
        controller.wait_device(id, "the model active", |d| {
            d["active_digest"].as_str() == Some(digest.as_str())
        });
        common::wait_events(&controller, id, &["downloading", "installed", "activated"]);
    }
    common::wait_events(
        &controller,
        &ids[3],
        &["downloading", "install_failed(no_space)"],
    );
    assert_eq!(
        controller.device(&ids[3])["active_digest"],
        serde_json::Value::Null
    );

    // Telemetry: every temperature is 50.0, so every count is in the bin holding 50.0.
    let bin = bin_index(&temperature_edges(), 50.0);
    for id in &ids[..3] {
        let windows = wait_until(WAIT, &format!("{id}: three windows stored"), || {
            let windows = common::reports(&controller, id, "telemetry");
            (windows.len() >= 3).then_some(windows)
        });
        for window in &windows {
            let body = &window["body"];
            // Digests are hex in JSON.
            assert_eq!(body["model"]["manifest_digest"], digest.as_str());
            assert_eq!(window["model_digest"], digest.as_str());
            let temperature = body["features"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == "temperature_c")
                .unwrap();
            let bins: Vec<u64> = temperature["sketch"]["bins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap())
                .collect();
            let inferences = body["inferences"].as_u64().unwrap();
            let counted = inferences + body["errors"]["runtime"].as_u64().unwrap();
            assert_eq!(temperature["sketch"]["count"], counted, "{body}");
            let mut expected = vec![0; bins.len()];
            expected[bin] = counted;
            assert_eq!(bins, expected, "{id}: {body}");
            assert_eq!(
                body["latency"]["buckets"]
                    .as_array()
                    .map(|b| b.iter().map(|c| c.as_u64().unwrap()).sum::<u64>()),
                Some(inferences)
            );
        }
        let total: u64 = windows
            .iter()
            .map(|w| w["body"]["inferences"].as_u64().unwrap())
            .sum();
        assert!(
            total > 0,
            "{id}: no inferences in {} windows",
            windows.len()
        );
    }
    wait_until(WAIT, "every report acknowledged", || {
        fleet.devices().iter().all(|d| d.unacked == 0).then_some(())
    });
    let counters = runtime.block_on(fleet.stop()).unwrap();
    assert!(counters.acked >= counters.sent, "{counters:?}");
    assert_eq!(counters.refused_assignments, 0);
}

#[test]
fn a_device_offline_during_an_assignment_carries_it_out_when_it_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let digest = controller.register_demo_model();
    let model: Sha256Digest = digest.parse().unwrap();
    let runtime = common::runtime();
    let fleet = runtime
        .block_on(Fleet::start(common::config(
            &controller,
            &dir.path().join("sim"),
            2,
        )))
        .unwrap();
    let ids: Vec<String> = fleet.devices().iter().map(|d| d.id.to_string()).collect();
    fleet.disconnect(&[1]);
    // The broker publishes the device's last will: the controller sees it offline.
    controller.wait_device(&ids[1], "offline", |d| d["online"] == false);
    assert_eq!(fleet.online(), 1);
    for id in &ids {
        common::assign(&controller, id, &digest, false);
    }
    wait_until(WAIT, "the online device activated", || {
        (fleet.count_on(&model) == 1).then_some(())
    });
    assert_eq!(
        fleet.device(1).unwrap().active,
        None,
        "offline, it knows nothing yet"
    );
    fleet.reconnect(&[1]);
    // The retained assignment reaches it on reconnect.
    wait_until(WAIT, "the rejoined device activated", || {
        (fleet.count_on(&model) == 2).then_some(())
    });
    controller.wait_device(&ids[1], "online with the model", |d| {
        d["online"] == true && d["active_digest"].as_str() == Some(digest.as_str())
    });
    let rejoined = fleet.device(1).unwrap();
    assert!(rejoined.last_change_at > fleet.device(0).unwrap().last_change_at);
    runtime.block_on(fleet.stop()).unwrap();
}
