//! The CSV layout (feature names, dynamic widths, batched rows, joined ground truth) and the
//! settings an operator may ask for.

use edgefleet_protocol::capture::{CAPTURE_FORMAT, CapturedFeedback, CapturedSample};
use edgefleet_protocol::manifest::{DType, FeatureSpec, NanPolicy};
use edgefleet_protocol::messages::ModelRef;
use edgefleet_protocol::{ModelName, ModelVersion, TensorName, Timestamp};

use super::*;

fn spec(name: &str, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec {
        name: TensorName::new(name).unwrap(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        nan: NanPolicy::Reject,
    }
}

fn tensor(name: &str, shape: &[u64], data: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: TensorName::new(name).unwrap(),
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

fn manifest() -> Manifest {
    let json = json!({
        "format": 1, "name": "pump", "version": "1.0", "release": 1, "description": null,
        "target": {"arch": "any", "min_agent_version": null},
        "payloads": [], "runtime": {"threads": 1, "latency_budget_ms": 1000, "grace_window_s": 1, "max_error_rate": 0.05},
        "inputs": [], "outputs": [], "features": [], "golden": [], "reference": null,
        "lineage": {"training_data_digest": null, "training_data_uri": null, "code_commit": null,
                    "parameters": [], "metrics": [], "mlflow_run_id": null, "parent": null, "candidate_for": null},
        "created_at": 0, "expires": 1
    });
    let mut manifest: Manifest = serde_json::from_value(json).unwrap();
    manifest.inputs = vec![spec("x", &[None, Some(3)]), spec("seq", &[Some(1), None])];
    manifest.outputs = vec![spec("p", &[None, Some(1)])];
    manifest.features = ["temp", "vib"]
        .iter()
        .enumerate()
        .map(|(i, name)| FeatureSpec {
            name: TensorName::new(*name).unwrap(),
            tensor: TensorName::new("x").unwrap(),
            index: i as u32,
        })
        .collect();
    manifest
}

fn sample(prediction: u64, x: Vec<f32>, p: Vec<f32>) -> CaptureRecord {
    let rows = (x.len() / 3) as u64;
    CaptureRecord::Sample(CapturedSample {
        prediction,
        at: Timestamp(1_700_000_000_000 + prediction),
        inputs: vec![
            tensor("x", &[rows, 3], x),
            tensor("seq", &[1, 2], vec![7.0, 8.0]),
        ],
        outputs: vec![tensor("p", &[rows, 1], p)],
    })
}

#[test]
fn columns_are_named_after_features_and_batched_requests_become_rows() {
    let manifest = manifest();
    let first = sample(1, vec![45.39, 2.5, 1.0], vec![0.25]);
    let layout = Layout::new(&manifest, Some(&first));
    assert_eq!(
        layout.header,
        [
            "time",
            "device",
            "model",
            "prediction",
            "temp",
            "vib",
            "x[2]",
            "seq[0]",
            "seq[1]",
            "p",
            "feedback_label",
            "feedback_value"
        ]
    );
    let batch = CaptureBatch {
        format: CAPTURE_FORMAT,
        device: DeviceId::new("pump-1").unwrap(),
        batch: 1,
        model: ModelRef {
            name: ModelName::new("pump").unwrap(),
            version: ModelVersion::new("1.0").unwrap(),
            release: 1,
            manifest_digest: Sha256Digest::of(b"m"),
        },
        records: vec![
            first,
            sample(2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![0.5, 0.75]),
            CaptureRecord::Feedback(CapturedFeedback {
                prediction: 9,
                at: Timestamp(0),
                truth: Truth::Label(0),
            }),
        ],
    };
    let mut truth = HashMap::new();
    truth.insert((String::from("pump-1"), 1), Truth::Label(1));
    truth.insert((String::from("pump-2"), 2), Truth::Label(0));
    let text = String::from_utf8(batch_csv(&layout, &batch, &truth).unwrap()).unwrap();
    assert_eq!(
        text,
        "2023-11-14T22:13:20.001Z,pump-1,pump@1.0,1,45.39,2.5,1,7,8,0.25,1,\n\
         2023-11-14T22:13:20.002Z,pump-1,pump@1.0,2,1,2,3,7,8,0.5,,\n\
         2023-11-14T22:13:20.002Z,pump-1,pump@1.0,2,4,5,6,,,0.75,,\n",
        "one row per input row; ground truth joined by device and prediction"
    );
}

#[test]
fn operators_give_a_rate_in_zero_to_one() {
    let request = |sample_rate: f64| CaptureRequest {
        sample_rate,
        max_batch_samples: None,
        max_batch_age_s: None,
        outputs: None,
        feedback: Some(false),
    };
    let settings = request(0.25).settings().unwrap();
    assert_eq!(settings.rate_ppm, 250_000);
    assert_eq!(
        (
            settings.max_batch_samples,
            settings.outputs,
            settings.feedback
        ),
        (DEFAULT_BATCH_SAMPLES, true, false)
    );
    assert_eq!(request(1.0).settings().unwrap().rate_ppm, PPM);
    assert_eq!(
        request(1e-9).settings().unwrap().rate_ppm,
        1,
        "tiny rates round up"
    );
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let err = request(bad).settings().unwrap_err();
        assert!(
            err.message.contains("above 0 and at most 1"),
            "{}",
            err.message
        );
    }
    assert_eq!(settings_json(&settings)["sample_rate"], 0.25);
}
