//! Capture settings bounds, sampling, and the assignment encoding with and without them.

use serde::Serialize;

use super::*;
use crate::assignment::{AssignedModel, Assignment};
use crate::crypto::Sha256Digest;
use crate::ids::{ModelName, ModelVersion, RolloutId};
use crate::manifest::TensorData;

fn settings(rate_ppm: u32) -> CaptureSettings {
    CaptureSettings {
        rate_ppm,
        max_batch_samples: 100,
        max_batch_age_s: 60,
        outputs: true,
        feedback: true,
    }
}

#[test]
fn settings_out_of_range_are_refused_with_the_bounds() {
    assert!(settings(1).validate().is_ok());
    assert!(settings(PPM).validate().is_ok());
    let err = settings(0).validate().unwrap_err();
    assert!(err.contains("between 1 and 1000000"), "{err}");
    assert!(settings(PPM + 1).validate().is_err());
    let mut s = settings(10);
    s.max_batch_samples = 0;
    assert!(s.validate().unwrap_err().contains("max_batch_samples"));
    s.max_batch_samples = 1;
    s.max_batch_age_s = CaptureSettings::MAX_BATCH_AGE_S + 1;
    assert!(s.validate().unwrap_err().contains("max_batch_age_s"));
}

#[test]
fn the_rate_selects_that_fraction_of_uniform_draws() {
    let tenth = settings(100_000);
    let draws = 10_000;
    let selected = (0..draws)
        .filter(|i| tenth.selects(f64::from(*i) / f64::from(draws)))
        .count();
    assert_eq!(selected, 1000);
    assert!(settings(PPM).selects(0.999_999_9));
    assert!(!settings(1).selects(0.000_001));
}

/// The assignment as it was before capture settings existed.
#[derive(Serialize)]
struct AssignmentWithoutCapture {
    device: DeviceId,
    seq: u64,
    issued_at: Timestamp,
    expires: Timestamp,
    rollback: bool,
    active: Option<AssignedModel>,
    shadow: Option<AssignedModel>,
    rollout: Option<RolloutId>,
}

#[test]
fn an_assignment_without_capture_encodes_exactly_as_before() {
    let model = AssignedModel {
        name: ModelName::new("pump").unwrap(),
        version: ModelVersion::new("1.0").unwrap(),
        release: 3,
        manifest_digest: Sha256Digest::of(b"m"),
        bundle_url: String::from("https://ctl/b"),
        bundle_size: 10,
    };
    let assignment = Assignment {
        device: DeviceId::new("d1").unwrap(),
        seq: 7,
        issued_at: Timestamp(1),
        expires: Timestamp(2),
        rollback: false,
        active: Some(model.clone()),
        shadow: None,
        rollout: Some(RolloutId::new("r1").unwrap()),
        capture: None,
    };
    let before = AssignmentWithoutCapture {
        device: assignment.device.clone(),
        seq: 7,
        issued_at: Timestamp(1),
        expires: Timestamp(2),
        rollback: false,
        active: Some(model),
        shadow: None,
        rollout: assignment.rollout.clone(),
    };
    let bytes = codec::encode(&assignment);
    assert_eq!(bytes, codec::encode(&before));
    let with = Assignment {
        capture: Some(settings(5)),
        ..assignment
    };
    let decoded: Assignment = codec::decode("assignment", &codec::encode(&with), 1 << 16).unwrap();
    assert_eq!(decoded, with);
}

#[test]
fn a_batch_decodes_and_counts_its_samples() {
    let model = ModelRef {
        name: ModelName::new("pump").unwrap(),
        version: ModelVersion::new("1.0").unwrap(),
        release: 1,
        manifest_digest: Sha256Digest::of(b"m"),
    };
    let sample = CaptureRecord::Sample(CapturedSample {
        prediction: 9,
        at: Timestamp(5),
        inputs: vec![NamedTensor {
            name: crate::TensorName::new("x").unwrap(),
            shape: vec![1, 2],
            data: TensorData::F32(vec![1.5, f32::NAN]),
        }],
        outputs: Vec::new(),
    });
    let feedback = CaptureRecord::Feedback(CapturedFeedback {
        prediction: 9,
        at: Timestamp(6),
        truth: Truth::Label(1),
    });
    let batch = CaptureBatch {
        format: CAPTURE_FORMAT,
        device: DeviceId::new("d1").unwrap(),
        batch: 4,
        model,
        records: vec![sample, feedback],
    };
    let decoded = CaptureBatch::decode(&codec::encode(&batch)).unwrap();
    assert_eq!(decoded.samples(), 1);
    assert_eq!(decoded.records[1].at(), Timestamp(6));
    let wrong = CaptureBatch { format: 9, ..batch };
    assert!(matches!(
        CaptureBatch::decode(&codec::encode(&wrong)),
        Err(DecodeError::Version { found: 9, .. })
    ));
}
