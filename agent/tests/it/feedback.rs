//! Ground-truth feedback through the local API: joined to the prediction once, scored by the
//! manifest's prediction spec (classes by argmax, a value by its error), refused with the right
//! status when it cannot count, and counted exactly in the telemetry windows — those a
//! controller peer receives over a real Mosquitto, and those in the spool.

use std::time::Duration;

use edgefleet_client::{ClientError, GroundTruth, Tensor};
use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{PredictionKind, PredictionSpec};
use edgefleet_protocol::messages::{DeviceBody, FeedbackStats};
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::broker::mosquitto_available;
use edgefleet_tests::fleet::BundleSpec;
use edgefleet_tests::models::fixture;

use crate::link::{Link, link, linked_agent_with};
use crate::{install_ok, setup};

/// Inputs of the two 3-class fixtures and their argmax classes (measured with onnxruntime):
/// classifier3 answers A, classifier3_b answers B.
const INPUTS: [[f32; 3]; 5] = [
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [1.0, 2.0, 3.0],
    [0.5, -1.0, 2.0],
];
const A: [u32; 5] = [0, 1, 2, 1, 2];
const B: [u32; 5] = [1, 0, 2, 0, 2];

fn classifier(file: &str, name: &str) -> BundleSpec {
    BundleSpec::fixture(
        &fixture(file),
        name,
        1,
        ("x", &[Some(1), Some(3)]),
        ("probs", &[Some(1), Some(3)]),
    )
}

#[track_caller]
fn refused(result: Result<impl std::fmt::Debug, ClientError>, status: u16, code: &str) -> String {
    match result {
        Err(ClientError::Api {
            status: got,
            code: got_code,
            message,
        }) if got == status && got_code == code => message,
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

#[test]
fn feedback_is_counted_exactly_in_the_windows_the_controller_receives() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Link { pki, broker, peer } = link(dir.path());
    let setup = linked_agent_with(dir.path(), &pki, &broker, &[]);
    let primary = install_ok(&setup, &classifier("classifier3.onnx", "classifier"));
    let (shadow_path, shadow) = setup
        .fleet
        .bundle(&classifier("classifier3_b.onnx", "classifier-b"));
    setup
        .agent
        .admin(&serde_json::json!({"set_shadow": {"path": shadow_path}}))
        .unwrap();

    let mut client = setup.agent.client();
    let n = 30;
    let replies: Vec<_> = (0..n)
        .map(|i| {
            client
                .infer(&[("x", Tensor::f32(vec![1, 3], INPUTS[i % 5].to_vec()))])
                .unwrap()
        })
        .collect();
    // Feedback once the shadow has predicted too, so both are scored.
    wait_until(
        Duration::from_secs(20),
        "the shadow to run every request",
        || {
            client
                .stats()
                .ok()
                .filter(|s| s["shadow"]["compared"] == n as u64)
        },
    );
    let (mut correct, mut shadow_correct) = (0, 0);
    for (i, reply) in replies.iter().enumerate() {
        // Labels that agree with the active model for the first 20 requests, with the
        // shadow for the rest.
        let label = if i < 20 { A[i % 5] } else { B[i % 5] };
        let answer = client
            .feedback(reply.id, GroundTruth::Label(label))
            .unwrap();
        assert_eq!(answer.predicted_class, Some(A[i % 5]));
        assert_eq!(answer.correct, Some(label == A[i % 5]));
        correct += u64::from(label == A[i % 5]);
        shadow_correct += u64::from(label == B[i % 5]);
    }
    // Refusals: each says what was wrong, and none is counted.
    refused(
        client.feedback(replies[0].id, GroundTruth::Label(0)),
        409,
        "feedback_given",
    );
    refused(
        client.feedback(replies[0].id + 1000, GroundTruth::Label(0)),
        404,
        "unknown_prediction",
    );
    let extra = client
        .infer(&[("x", Tensor::f32(vec![1, 3], INPUTS[0].to_vec()))])
        .unwrap();
    let message = refused(
        client.feedback(extra.id, GroundTruth::Label(3)),
        422,
        "unfit_feedback",
    );
    assert!(message.contains("classes 0 to 2"), "{message}");
    let message = refused(
        client.feedback(extra.id, GroundTruth::Value(0.5)),
        422,
        "unfit_feedback",
    );
    assert!(message.contains("send `label`"), "{message}");

    let expected = FeedbackStats {
        count: n as u64,
        correct,
        abs_error_sum: 0.0,
        sq_error_sum: 0.0,
    };
    let (active, shadowed) = wait_until(
        Duration::from_secs(60),
        "the controller to receive the feedback",
        || {
            let (mut active, mut shadowed) = (FeedbackStats::default(), FeedbackStats::default());
            peer.with(|ingest| {
                for message in ingest.reports.values() {
                    let DeviceBody::Telemetry(window) = &message.body else {
                        continue;
                    };
                    assert_eq!(window.model.manifest_digest.to_hex(), primary);
                    for (total, part) in [
                        (&mut active, window.feedback.as_ref()),
                        (
                            &mut shadowed,
                            window.shadow.as_ref().and_then(|s| {
                                assert_eq!(s.model.manifest_digest.to_hex(), shadow);
                                s.feedback.as_ref()
                            }),
                        ),
                    ] {
                        if let Some(part) = part {
                            total.count += part.count;
                            total.correct += part.correct;
                        }
                    }
                }
            });
            (active.count >= expected.count && shadowed.count >= expected.count)
                .then_some((active, shadowed))
        },
    );
    assert_eq!(active, expected);
    assert_eq!(
        shadowed,
        FeedbackStats {
            correct: shadow_correct,
            ..expected
        }
    );
    assert_ne!(
        correct, shadow_correct,
        "the fixtures disagree, so the two are told apart"
    );
    assert_eq!(peer.with(|i| i.duplicates), 0);
}

#[test]
fn regression_feedback_counts_the_errors_and_bad_bodies_are_refused() {
    let setup = setup(&[("EDGEFLEET_TELEMETRY_WINDOW_S", "1")]);
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../controller/demo/sensor-anomaly.onnx");
    let mut spec = BundleSpec::fixture(
        &demo,
        "pump-score",
        1,
        ("features", &[Some(1), Some(4)]),
        ("anomaly_probability", &[Some(1), Some(1)]),
    );
    spec.prediction = Some(PredictionSpec {
        output: TensorName::new("anomaly_probability").unwrap(),
        kind: PredictionKind::Regression,
    });
    let digest = install_ok(&setup, &spec);
    let mut client = setup.agent.client().json();
    let truths = [0.0, 1.0, 0.25];
    let mut expected = FeedbackStats::default();
    for (i, truth) in truths.iter().enumerate() {
        let reply = client
            .infer(&[(
                "features",
                Tensor::f32(
                    vec![1, 4],
                    vec![50.0 + 8.0 * i as f32, 3.0 + i as f32, 12.0, 5.8],
                ),
            )])
            .unwrap();
        let predicted = reply.outputs["anomaly_probability"].data[0];
        let answer = client
            .feedback(reply.id, GroundTruth::Value(*truth))
            .unwrap();
        // JSON numbers: serde_json's parser may be one unit in the last place off.
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
        assert!(close(answer.predicted_value, predicted), "{answer:?}");
        assert!(close(answer.error, predicted - truth), "{answer:?}");
        expected.count += 1;
        expected.abs_error_sum += (predicted - truth).abs();
        expected.sq_error_sum += (predicted - truth) * (predicted - truth);
        if i == 0 {
            let message = refused(
                client.feedback(reply.id + 1, GroundTruth::Label(1)),
                404,
                "unknown_prediction",
            );
            assert!(
                message.contains("not made by the model serving now"),
                "{message}"
            );
        }
    }
    let last = client
        .infer(&[(
            "features",
            Tensor::f32(vec![1, 4], vec![50.0, 3.0, 12.0, 5.8]),
        )])
        .unwrap();
    let message = refused(
        client.feedback(last.id, GroundTruth::Label(1)),
        422,
        "unfit_feedback",
    );
    assert!(message.contains("send `value`"), "{message}");
    // Bodies that are not one feedback request are 400s, in JSON and in CBOR.
    for body in [
        serde_json::json!({"id": last.id, "label": 1, "value": 0.5}),
        serde_json::json!({"id": last.id}),
        serde_json::json!({"id": last.id, "lable": 1}),
        serde_json::json!({"id": "seven", "value": 1.0}),
    ] {
        let response = raw_post(
            &setup,
            "application/json",
            &serde_json::to_vec(&body).unwrap(),
        );
        assert!(response.starts_with("HTTP/1.1 400"), "{body}: {response}");
    }
    let mut cbor = Vec::new();
    ciborium::ser::into_writer(
        &serde_json::json!({"id": last.id, "value": 0.5, "label": 1}),
        &mut cbor,
    )
    .unwrap();
    assert!(raw_post(&setup, "application/cbor", &cbor).starts_with("HTTP/1.1 400"));
    let response = raw_post(
        &setup,
        "application/json",
        format!("{{\"id\": {}, \"label\": -1}}", last.id).as_bytes(),
    );
    assert!(response.starts_with("HTTP/1.1 422"), "{response}");

    let counted = wait_until(
        Duration::from_secs(20),
        "the feedback in the spooled windows",
        || {
            let mut total = FeedbackStats::default();
            for message in crate::telemetry::spooled(&setup) {
                if let DeviceBody::Telemetry(w) = message.body
                    && w.model.manifest_digest.to_hex() == digest
                    && let Some(f) = w.feedback
                {
                    total.count += f.count;
                    total.correct += f.correct;
                    total.abs_error_sum += f.abs_error_sum;
                    total.sq_error_sum += f.sq_error_sum;
                }
            }
            (total.count >= expected.count).then_some(total)
        },
    );
    assert_eq!(counted.count, expected.count);
    assert_eq!(counted.correct, 0);
    assert!((counted.abs_error_sum - expected.abs_error_sum).abs() < 1e-12);
    assert!((counted.sq_error_sum - expected.sq_error_sum).abs() < 1e-12);
}

/// One raw HTTP request on the agent's TCP port; the whole response.
fn raw_post(setup: &crate::Setup, content_type: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(setup.agent.api).unwrap();
    write!(
        stream,
        "POST /v1/feedback HTTP/1.1\r\nhost: agent\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response).into_owned()
}
