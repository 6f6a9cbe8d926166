//! Telemetry windows and events land in the on-disk spool with the right counts.

use std::time::Duration;

use edgefleet_client::Tensor;
use edgefleet_protocol::TensorName;
use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::manifest::{FeatureSpec, ReferenceStats};
use edgefleet_protocol::messages::{DeviceBody, DeviceMessage, EventKind};
use edgefleet_protocol::sketch::{FeatureSketch, ReferenceFeature};
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::fleet::BundleSpec;
use edgefleet_tests::models::fixture;

use crate::{Setup, install_ok, setup};

/// The reports in the agent's spool, oldest first.
pub fn spooled(setup: &Setup) -> Vec<DeviceMessage> {
    let dir = setup.agent.state_dir.join("spool");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cbor"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| codec::decode("spooled", &std::fs::read(p).unwrap(), MAX_MESSAGE_BYTES).unwrap())
        .collect()
}

#[test]
fn telemetry_windows_count_known_inputs_into_the_reference_bins() {
    let setup = setup(&[("EDGEFLEET_TELEMETRY_WINDOW_S", "1")]);
    let mut spec = BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    );
    let training: Vec<f64> = (0..100).map(f64::from).collect();
    let names = ["f0", "f1", "f2", "f3"];
    spec.features = names
        .iter()
        .enumerate()
        .map(|(i, n)| FeatureSpec {
            name: TensorName::new(*n).unwrap(),
            tensor: TensorName::new("x").unwrap(),
            index: i as u32,
        })
        .collect();
    spec.reference = Some(ReferenceStats {
        sample_count: 100,
        features: names
            .iter()
            .map(|n| {
                ReferenceFeature::from_samples(TensorName::new(*n).unwrap(), &training).unwrap()
            })
            .collect(),
    });
    let digest = install_ok(&setup, &spec);
    let mut client = setup.agent.client();
    for _ in 0..5 {
        client
            .infer(&[("x", Tensor::f32(vec![1, 4], vec![5.0, 15.0, 95.0, 500.0]))])
            .unwrap();
    }
    let _ = client
        .infer(&[("x", Tensor::f32(vec![1, 3], vec![0.0; 3]))])
        .unwrap_err();
    // Windows close every second; sum them until all six requests are accounted for.
    let windows = wait_until(
        Duration::from_secs(20),
        "telemetry windows covering the requests",
        || {
            let windows: Vec<_> = spooled(&setup)
                .into_iter()
                .filter_map(|m| match m.body {
                    DeviceBody::Telemetry(w) if w.model.manifest_digest.to_hex() == digest => {
                        Some(w)
                    }
                    _ => None,
                })
                .collect();
            let seen: u64 = windows
                .iter()
                .map(|w| w.inferences + w.errors.total())
                .sum();
            (seen >= 6).then_some(windows)
        },
    );
    let mut merged: Vec<FeatureSketch> = (0..4).map(|_| FeatureSketch::new(10)).collect();
    for window in &windows {
        assert!(window.window_end > window.window_start);
        assert!(window.resources.rss_bytes > 1 << 20, "RSS is measured");
        for (total, named) in merged.iter_mut().zip(&window.features) {
            total.merge(&named.sketch).unwrap();
        }
    }
    assert_eq!(windows.iter().map(|w| w.inferences).sum::<u64>(), 5);
    assert_eq!(
        windows.iter().map(|w| w.errors.invalid_input).sum::<u64>(),
        1
    );
    let bin = |i: usize| -> Vec<u64> {
        let mut b = vec![0; 10];
        b[i] = 5;
        b
    };
    assert_eq!(
        merged[0].bins,
        bin(0),
        "5 falls below the first decile edge (10)"
    );
    assert_eq!(merged[1].bins, bin(1));
    assert_eq!(merged[2].bins, bin(9));
    assert_eq!(merged[3].bins, bin(9));
    assert_eq!(
        (merged[3].out_of_range, merged[2].out_of_range),
        (5, 0),
        "500 is above the training maximum 99"
    );
    assert_eq!(merged[3].sum, 2500.0);
    // Output y = x·[1,2,3,4] is a vector: its argmax class (3) is counted.
    let outputs: u64 = windows
        .iter()
        .flat_map(|w| &w.outputs)
        .map(|o| o.sketch.bins.get(3).copied().unwrap_or(0))
        .sum();
    assert_eq!(outputs, 5);
    // Lifecycle events are spooled for the controller too, with increasing sequence numbers.
    let messages = spooled(&setup);
    assert!(messages.windows(2).all(|w| w[0].seq < w[1].seq));
    let kinds: Vec<String> = messages
        .iter()
        .filter_map(|m| match &m.body {
            DeviceBody::Event(e) => Some(format!("{:?}", e.kind)),
            _ => None,
        })
        .collect();
    assert!(
        kinds.contains(&format!("{:?}", EventKind::Installed))
            && kinds.contains(&format!("{:?}", EventKind::Activated)),
        "{kinds:?}"
    );
    assert_eq!(
        setup.agent.status()["spool"]["pending"].as_u64().unwrap() as usize,
        messages.len()
    );
}
