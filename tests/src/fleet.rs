//! A test fleet built directly with the protocol crate: root and release keys from fixed seeds,
//! the keyring files an agent is configured with, and signed bundles of real models.

use std::path::{Path, PathBuf};

use edgefleet_protocol::bundle::bundle_header;
use edgefleet_protocol::crypto::{Domain, SecretKey};
use edgefleet_protocol::manifest::{
    DType, FeatureSpec, GoldenVector, Lineage, MANIFEST_FORMAT, Manifest, NamedTensor, NanPolicy,
    Payload, PayloadRole, PredictionSpec, ReferenceStats, RuntimeSettings, Target, TensorData,
    TensorSpec,
};
use edgefleet_protocol::trust::{ReleaseKeyring, Role, RootKeyring, Signed};
use edgefleet_protocol::{Arch, ModelName, ModelVersion, Sha256Digest, TensorName, Timestamp};

/// A fixed "now" for signed documents: 2026-11-01. They expire far in the future.
pub const ISSUED: Timestamp = Timestamp::from_secs(1_793_491_200);
const YEAR_S: u64 = 366 * 86_400;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn sign(value: &impl serde::Serialize, domain: Domain, keys: &[&SecretKey]) -> Vec<u8> {
    let mut signed = Signed::unsigned(value);
    for key in keys {
        signed.sign(domain, key);
    }
    signed.encode()
}

/// Keys and trust files in a directory.
#[derive(Debug)]
pub struct TestFleet {
    pub dir: PathBuf,
    pub root_path: PathBuf,
    pub keyring_path: PathBuf,
    release: SecretKey,
    pub controller: SecretKey,
}

impl TestFleet {
    /// Writes `root-v1.cbor` and `keyring.cbor` (1-of-1 root, 1-of-1 release) into `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create fleet dir");
        let root_key = key(1);
        let release = key(2);
        let controller = key(3);
        let root = RootKeyring {
            version: 1,
            created_at: ISSUED,
            root: Role {
                keys: vec![root_key.public()],
                threshold: 1,
            },
        };
        let keyring = ReleaseKeyring {
            version: 1,
            created_at: ISSUED,
            expires: ISSUED.plus_secs(10 * YEAR_S),
            release: Role {
                keys: vec![release.public()],
                threshold: 1,
            },
            controller: Role {
                keys: vec![controller.public()],
                threshold: 1,
            },
        };
        let root_path = dir.join("root-v1.cbor");
        let keyring_path = dir.join("keyring.cbor");
        std::fs::write(&root_path, sign(&root, Domain::RootKeyring, &[&root_key]))
            .expect("write root");
        std::fs::write(
            &keyring_path,
            sign(&keyring, Domain::ReleaseKeyring, &[&root_key]),
        )
        .expect("write keyring");
        Self {
            dir: dir.to_owned(),
            root_path,
            keyring_path,
            release,
            controller,
        }
    }

    /// Signs `spec` into a bundle file in the fleet dir; returns its path and manifest digest.
    pub fn bundle(&self, spec: &BundleSpec) -> (PathBuf, String) {
        let payload = std::fs::read(&spec.model).expect("read model");
        let file_name = spec
            .model
            .file_name()
            .and_then(|n| n.to_str())
            .expect("model file name");
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: ModelName::new(spec.name.as_str()).expect("name"),
            version: ModelVersion::new(spec.version.as_str()).expect("version"),
            release: spec.release,
            description: None,
            target: Target {
                arch: Arch::any(),
                min_agent_version: None,
            },
            payloads: vec![Payload {
                name: TensorName::new(file_name).expect("payload name"),
                role: PayloadRole::Model,
                sha256: Sha256Digest::of(&payload),
                size: payload.len() as u64,
            }],
            runtime: spec.runtime.clone(),
            inputs: spec.inputs.clone(),
            outputs: spec.outputs.clone(),
            prediction: spec.prediction.clone(),
            features: spec.features.clone(),
            golden: spec.golden.clone(),
            reference: spec.reference.clone(),
            lineage: Lineage::default(),
            created_at: ISSUED,
            expires: ISSUED.plus_secs(10 * YEAR_S),
        };
        manifest.validate().expect("valid test manifest");
        let signed = sign(&manifest, Domain::Manifest, &[&self.release]);
        let digest = edgefleet_protocol::manifest::manifest_digest(&signed)
            .expect("digest")
            .to_hex();
        let mut bytes = bundle_header(&signed).expect("header");
        bytes.extend_from_slice(&payload);
        let path = self.dir.join(format!(
            "{}-{}-r{}.efb",
            spec.name, spec.version, spec.release
        ));
        std::fs::write(&path, bytes).expect("write bundle");
        (path, digest)
    }
}

/// What goes into a test bundle.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub model: PathBuf,
    pub name: String,
    pub version: String,
    pub release: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How feedback is scored (`None`: the manifest default).
    pub prediction: Option<PredictionSpec>,
    pub golden: Vec<GoldenVector>,
    pub runtime: RuntimeSettings,
    pub features: Vec<FeatureSpec>,
    pub reference: Option<ReferenceStats>,
}

pub fn tensor(name: &str, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec {
        name: TensorName::new(name).expect("name"),
        dtype: DType::F32,
        shape: shape.to_vec(),
        nan: NanPolicy::Reject,
    }
}

pub fn named(name: &str, shape: &[u64], data: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: TensorName::new(name).expect("name"),
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

impl BundleSpec {
    /// Silero VAD 16 kHz with a golden vector (silence in, the reference model's output out).
    pub fn silero(model: &Path, release: u64) -> Self {
        Self {
            model: model.to_owned(),
            name: String::from("silero-vad"),
            version: format!("6.2.{release}"),
            release,
            inputs: vec![
                tensor("input", &[Some(1), Some(576)]),
                tensor("state", &[Some(2), Some(1), Some(128)]),
            ],
            outputs: vec![
                tensor("output", &[Some(1), Some(1)]),
                tensor("stateN", &[Some(2), Some(1), Some(128)]),
            ],
            prediction: None,
            golden: vec![GoldenVector {
                inputs: vec![
                    named("input", &[1, 576], vec![0.0; 576]),
                    named("state", &[2, 1, 128], vec![0.0; 256]),
                ],
                // Measured with onnxruntime on the same file.
                outputs: vec![named("output", &[1, 1], vec![0.001_669_794_3])],
                tolerance: 1e-4,
            }],
            runtime: RuntimeSettings {
                grace_window_s: 1,
                ..RuntimeSettings::default()
            },
            features: Vec::new(),
            reference: None,
        }
    }

    /// A model from `agent/tests/models/` with a single f32 input and output and no golden vector.
    pub fn fixture(
        model: &Path,
        name: &str,
        release: u64,
        input: (&str, &[Option<u64>]),
        output: (&str, &[Option<u64>]),
    ) -> Self {
        Self {
            model: model.to_owned(),
            name: name.to_owned(),
            version: format!("1.{release}"),
            release,
            inputs: vec![tensor(input.0, input.1)],
            outputs: vec![tensor(output.0, output.1)],
            prediction: None,
            golden: Vec::new(),
            runtime: RuntimeSettings {
                grace_window_s: 1,
                ..RuntimeSettings::default()
            },
            features: Vec::new(),
            reference: None,
        }
    }
}
