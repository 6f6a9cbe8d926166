//! Test fixtures shared by the unit tests: manifests with features, references and outputs.

use edgefleet_protocol::manifest::{
    DType, FeatureSpec, Lineage, MANIFEST_FORMAT, Manifest, NanPolicy, Payload, PayloadRole,
    ReferenceStats, RuntimeSettings, Target, TensorSpec,
};
use edgefleet_protocol::sketch::ReferenceFeature;
use edgefleet_protocol::{Arch, ModelName, ModelVersion, Sha256Digest, TensorName, Timestamp};

pub fn name(n: &str) -> TensorName {
    TensorName::new(n).unwrap()
}

/// A manifest whose input `x` carries `features` (each with a reference computed from its
/// training values), with `outputs` of the given widths.
pub fn manifest(
    model: (&str, &str, u64),
    features: &[(&str, Vec<f64>)],
    outputs: &[(&str, u64)],
    runtime: RuntimeSettings,
) -> Manifest {
    let spec = |n: &str, width: u64| TensorSpec {
        name: name(n),
        dtype: DType::F32,
        shape: vec![None, Some(width)],
        nan: NanPolicy::Reject,
    };
    Manifest {
        format: MANIFEST_FORMAT,
        name: ModelName::new(model.0).unwrap(),
        version: ModelVersion::new(model.1).unwrap(),
        release: model.2,
        description: None,
        target: Target {
            arch: Arch::any(),
            min_agent_version: None,
        },
        payloads: vec![Payload {
            name: name("model.onnx"),
            role: PayloadRole::Model,
            sha256: Sha256Digest::of(b"model"),
            size: 5,
        }],
        runtime,
        inputs: vec![spec("x", features.len() as u64)],
        outputs: outputs.iter().map(|(n, w)| spec(n, *w)).collect(),
        features: features
            .iter()
            .enumerate()
            .map(|(i, (n, _))| FeatureSpec {
                name: name(n),
                tensor: name("x"),
                index: i as u32,
            })
            .collect(),
        golden: Vec::new(),
        prediction: None,
        reference: Some(ReferenceStats {
            sample_count: features.first().map_or(0, |(_, v)| v.len() as u64),
            features: features
                .iter()
                .map(|(n, values)| ReferenceFeature::from_samples(name(n), values).unwrap())
                .collect(),
        }),
        lineage: Lineage::default(),
        created_at: Timestamp(0),
        expires: Timestamp(u64::MAX),
    }
}
