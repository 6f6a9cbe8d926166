//! In-agent inference against raw tract on the same model and the same inputs, in the same run.
//!
//! `raw_tract` is what a user calling tract directly writes: `onnx().model_for_path(..)` with
//! input facts `input f32[1,576]` and `state f32[2,1,128]`, `into_optimized()`,
//! `into_runnable()`, then `plan.run(tvec![..])` on tensors built from the frame and the state.
//! `agent_runtime` is the agent's own path: `LoadedModel::load(path, &manifest)` with the Silero
//! manifest schema, then `LoadedModel::run` on `NamedTensor`s, which also checks the inputs against
//! the schema (names, dtypes, shapes, NaN policy), wraps the `Vec`s in ndarray arrays (no copy)
//! that tract's `Tensor::from` then copies into its own aligned buffers, and converts the outputs
//! back to `Vec`s. Both iterations clone their inputs (the raw side its two `Tensor`s, the agent
//! side its two `NamedTensor`s), so the agent side pays one more copy of the frame and the state
//! than the raw side.
//!
//! Model: Silero VAD 16 kHz (`edgefleet_tests::models::SILERO_VAD_16K`, fetched once with pip).
//! Input: one 576-sample frame of a 440 Hz sine at 16 kHz (amplitude 0.5) and a zero state.
//!
//! Run: `cargo bench -p edgefleet-agent --bench inference -- --warm-up-time 2 --measurement-time 10`

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use edgefleet_agent::runtime::LoadedModel;
use edgefleet_protocol::manifest::{
    Lineage, MANIFEST_FORMAT, Manifest, NamedTensor, Payload, PayloadRole, Target, TensorData,
};
use edgefleet_protocol::{Arch, ModelName, ModelVersion, Sha256Digest, TensorName, Timestamp};
use edgefleet_tests::fleet::BundleSpec;
use edgefleet_tests::models::{SILERO_VAD_16K, fetch};
use tract_onnx::prelude::*;

const SAMPLE_RATE: f32 = 16_000.0;
const FRAME: usize = 576;
const STATE: usize = 2 * 128;

/// 576 samples of a 440 Hz sine at 16 kHz, amplitude 0.5.
fn sine_frame() -> Vec<f32> {
    (0..FRAME)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / SAMPLE_RATE).sin())
        .collect()
}

/// The manifest the agent would load this model with (the harness's Silero bundle spec).
fn manifest(model: &Path) -> Manifest {
    let spec = BundleSpec::silero(model, 1);
    let payload = std::fs::read(model).expect("read the Silero model");
    let issued = Timestamp::from_secs(1_793_491_200);
    Manifest {
        format: MANIFEST_FORMAT,
        name: ModelName::new(spec.name.as_str()).expect("model name"),
        version: ModelVersion::new(spec.version.as_str()).expect("model version"),
        release: spec.release,
        description: None,
        target: Target {
            arch: Arch::any(),
            min_agent_version: None,
        },
        payloads: vec![Payload {
            name: TensorName::new("silero_vad_openvino_16k.onnx").expect("payload name"),
            role: PayloadRole::Model,
            sha256: Sha256Digest::of(&payload),
            size: payload.len() as u64,
        }],
        runtime: spec.runtime,
        inputs: spec.inputs,
        outputs: spec.outputs,
        prediction: None,
        features: Vec::new(),
        golden: spec.golden,
        reference: None,
        lineage: Lineage::default(),
        created_at: issued,
        expires: issued.plus_secs(10 * 366 * 86_400),
    }
}

fn named(name: &str, shape: &[u64], data: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: TensorName::new(name).expect("tensor name"),
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

/// Loads the model the way a user of tract would.
fn raw_plan(model: &Path) -> TractResult<Arc<TypedRunnableModel>> {
    onnx()
        .model_for_path(model)?
        .with_input_fact(0, f32::fact([1, FRAME]).into())?
        .with_input_fact(1, f32::fact([2, 1, 128]).into())?
        .into_optimized()?
        .into_runnable()
}

fn bench(c: &mut Criterion) {
    let model = fetch(SILERO_VAD_16K);
    let frame = sine_frame();

    let plan = raw_plan(&model).expect("tract loads Silero VAD");
    let input: Tensor = tract_ndarray::Array2::from_shape_vec((1, FRAME), frame.clone())
        .expect("frame shape")
        .into();
    let state: Tensor = tract_ndarray::Array3::from_shape_vec((2, 1, 128), vec![0.0f32; STATE])
        .expect("state shape")
        .into();

    let loaded = LoadedModel::load(&model, &manifest(&model)).expect("the agent loads Silero VAD");
    let inputs = vec![
        named("input", &[1, FRAME as u64], frame),
        named("state", &[2, 1, 128], vec![0.0; STATE]),
    ];

    // Both paths must compute the same thing before their speed is compared.
    let raw_out = plan
        .run(tvec![input.clone().into(), state.clone().into()])
        .expect("raw run");
    let raw_p = raw_out[0]
        .to_plain_array_view::<f32>()
        .expect("f32 output")
        .iter()
        .copied()
        .next()
        .expect("one probability");
    let agent_out = loaded.run(inputs.clone()).expect("agent run");
    let TensorData::F32(agent_p) = &agent_out[0].data else {
        panic!("output is not f32");
    };
    assert!(
        (raw_p - agent_p[0]).abs() < 1e-6,
        "raw tract {raw_p} vs agent {}",
        agent_p[0]
    );
    eprintln!("speech probability of the 440 Hz frame: {raw_p}");

    let mut group = c.benchmark_group("silero_vad_16k");
    group.bench_function("raw_tract", |b| {
        b.iter(|| {
            plan.run(tvec![
                black_box(&input).clone().into(),
                black_box(&state).clone().into()
            ])
            .expect("raw run")
        })
    });
    group.bench_function("agent_runtime", |b| {
        b.iter(|| loaded.run(black_box(&inputs).clone()).expect("agent run"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
