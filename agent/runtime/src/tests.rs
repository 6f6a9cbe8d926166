use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use edgefleet_protocol::TensorName;
use edgefleet_protocol::manifest::{
    DType, FeatureSpec, NamedTensor, NanPolicy, TensorData, TensorSpec,
};

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models")
        .join(name)
}

fn name(s: &str) -> TensorName {
    TensorName::new(s).unwrap()
}

fn spec(n: &str, dtype: DType, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec {
        name: name(n),
        dtype,
        shape: shape.to_vec(),
        nan: NanPolicy::Reject,
    }
}

/// A scratch file removed on drop (this crate has no tempfile dependency).
struct Scratch(PathBuf);

impl Scratch {
    fn new(bytes: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "edgefleet-runtime-{}-{}.onnx",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Just enough protobuf to hand-build ONNX files the fixtures do not cover.
mod pbw {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    pub fn int(field: u64, v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, field << 3);
        varint(&mut out, v as u64);
        out
    }

    pub fn bytes(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, (field << 3) | 2);
        varint(&mut out, body.len() as u64);
        out.extend_from_slice(body);
        out
    }

    pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// ValueInfoProto of a tensor with ONNX element type `elem` and fixed dims.
    pub fn value_info(name: &str, elem: i64, dims: &[i64]) -> Vec<u8> {
        let shape: Vec<Vec<u8>> = dims.iter().map(|d| bytes(1, &int(1, *d))).collect();
        let tensor = cat(&[int(1, elem), bytes(2, &cat(&shape))]);
        cat(&[bytes(1, name.as_bytes()), bytes(2, &bytes(1, &tensor))])
    }

    pub fn node(
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[Vec<u8>],
    ) -> Vec<u8> {
        let mut parts: Vec<Vec<u8>> = inputs.iter().map(|i| bytes(1, i.as_bytes())).collect();
        parts.extend(outputs.iter().map(|o| bytes(2, o.as_bytes())));
        parts.push(bytes(3, name.as_bytes()));
        parts.push(bytes(4, op.as_bytes()));
        parts.extend(attrs.iter().map(|a| bytes(5, a)));
        cat(&parts)
    }

    /// AttributeProto holding a graph.
    pub fn graph_attr(name: &str, graph: &[u8]) -> Vec<u8> {
        cat(&[bytes(1, name.as_bytes()), bytes(6, graph), int(20, 5)])
    }

    /// TensorProto of f32 `dims` whose data is in the external file `location`.
    pub fn external_tensor(name: &str, dims: &[i64], location: &str) -> Vec<u8> {
        let mut parts: Vec<Vec<u8>> = dims.iter().map(|d| int(1, *d)).collect();
        parts.push(int(2, 1));
        parts.push(bytes(8, name.as_bytes()));
        parts.push(bytes(
            13,
            &cat(&[bytes(1, b"location"), bytes(2, location.as_bytes())]),
        ));
        parts.push(int(14, 1));
        cat(&parts)
    }

    pub fn graph(nodes: &[Vec<u8>], inputs: &[Vec<u8>], outputs: &[Vec<u8>]) -> Vec<u8> {
        graph_with(nodes, inputs, outputs, &[])
    }

    pub fn graph_with(
        nodes: &[Vec<u8>],
        inputs: &[Vec<u8>],
        outputs: &[Vec<u8>],
        initializers: &[Vec<u8>],
    ) -> Vec<u8> {
        let mut parts: Vec<Vec<u8>> = nodes.iter().map(|n| bytes(1, n)).collect();
        parts.push(bytes(2, b"g"));
        parts.extend(initializers.iter().map(|t| bytes(5, t)));
        parts.extend(inputs.iter().map(|i| bytes(11, i)));
        parts.extend(outputs.iter().map(|o| bytes(12, o)));
        cat(&parts)
    }

    pub fn model(graph: &[u8]) -> Vec<u8> {
        let opset = cat(&[bytes(1, b""), int(2, 13)]);
        cat(&[int(1, 8), bytes(8, &opset), bytes(7, graph)])
    }
}

const FLOAT: i64 = 1;
const FLOAT16: i64 = 10;

#[test]
fn fixtures_introspect_to_their_declared_specs() {
    let info = inspect(&fixture("scale_f32.onnx")).unwrap();
    assert_eq!(
        info.inputs,
        vec![spec("x", DType::F32, &[Some(1), Some(4)])]
    );
    assert_eq!(
        info.outputs,
        vec![spec("y", DType::F32, &[Some(1), Some(4)])]
    );
    assert_eq!(info.ops.iter().collect::<Vec<_>>(), ["Mul"]);
    assert_eq!(info.opset, Some(13));
    assert_eq!(info.ir_version, 8);
    assert_eq!(info.producer, "edgefleet-make_models 1");
    assert!(info.unimplemented.is_empty());
    assert!(info.external_data.is_empty());

    let info = inspect(&fixture("classifier3.onnx")).unwrap();
    assert_eq!(
        info.inputs,
        vec![spec("x", DType::F32, &[Some(1), Some(3)])]
    );
    assert_eq!(
        info.outputs,
        vec![spec("probs", DType::F32, &[Some(1), Some(3)])]
    );
    assert_eq!(
        info.ops.iter().collect::<Vec<_>>(),
        ["Add", "MatMul", "Softmax"]
    );

    // A symbolic dimension ("n") is dynamic; the initializer is not an input.
    let info = inspect(&fixture("broadcast6.onnx")).unwrap();
    assert_eq!(info.inputs, vec![spec("x", DType::F32, &[None])]);
    assert_eq!(info.outputs, vec![spec("y", DType::F32, &[Some(6)])]);

    let info = inspect(&fixture("det_unsupported.onnx")).unwrap();
    assert_eq!(
        info.unimplemented,
        vec![OpUse {
            op: String::from("Det"),
            node: String::from("det")
        }]
    );
    assert_eq!(info.outputs, vec![spec("y", DType::F32, &[])]);
}

#[test]
fn unsupported_ops_are_refused_by_name_before_loading() {
    let expected = RuntimeError::UnsupportedOp {
        op: String::from("If"),
        node: String::from("if"),
    };
    assert_eq!(inspect(&fixture("if_op.onnx")).unwrap_err(), expected);
    assert_eq!(check_ops(&fixture("if_op.onnx")).unwrap_err(), expected);
    let manifest_inputs = [spec("c", DType::Bool, &[])];
    assert_eq!(
        LoadedModel::load_with_inputs(&fixture("if_op.onnx"), &manifest_inputs).unwrap_err(),
        expected
    );
    assert!(expected.to_string().contains("`If` (node \"if\")"));

    // A Loop inside a Scan body, in an unnamed node: found, named by its output.
    let body = pbw::graph(
        &[pbw::node("Loop", "", &["a"], &["b"], &[])],
        &[pbw::value_info("a", FLOAT, &[1])],
        &[pbw::value_info("b", FLOAT, &[1])],
    );
    let graph = pbw::graph(
        &[pbw::node(
            "Scan",
            "scan",
            &["x"],
            &["y"],
            &[pbw::graph_attr("body", &body)],
        )],
        &[pbw::value_info("x", FLOAT, &[1])],
        &[pbw::value_info("y", FLOAT, &[1])],
    );
    let file = Scratch::new(&pbw::model(&graph));
    assert_eq!(
        inspect(&file.0).unwrap_err(),
        RuntimeError::UnsupportedOp {
            op: String::from("Loop"),
            node: String::from("b")
        }
    );
}

#[test]
fn unsupported_element_types_name_the_tensor() {
    let graph = pbw::graph(
        &[pbw::node("Identity", "id", &["half"], &["y"], &[])],
        &[pbw::value_info("half", FLOAT16, &[1, 2])],
        &[pbw::value_info("y", FLOAT16, &[1, 2])],
    );
    let file = Scratch::new(&pbw::model(&graph));
    let err = inspect(&file.0).unwrap_err();
    assert_eq!(
        err,
        RuntimeError::UnsupportedDtype {
            kind: "input",
            tensor: String::from("half"),
            dtype: String::from("FLOAT16")
        }
    );
    assert!(
        err.to_string()
            .starts_with("model input `half` has ONNX element type FLOAT16"),
        "{err}"
    );
}

#[test]
fn garbage_truncated_and_empty_files_are_errors_not_panics() {
    let real = std::fs::read(fixture("classifier3.onnx")).unwrap();
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"definitely not protobuf \xff\xff\xff\xff".to_vec(),
        vec![0xff; 64],
    ];
    cases.extend((1..real.len()).step_by(7).map(|n| real[..n].to_vec()));
    let inputs = [spec("x", DType::F32, &[Some(1), Some(3)])];
    for bytes in cases {
        let file = Scratch::new(&bytes);
        match inspect(&file.0) {
            // A cut at a field boundary can still decode; loading must then not crash tract.
            Ok(_) => {
                let loaded = LoadedModel::load_with_inputs(&file.0, &inputs);
                assert!(
                    !matches!(loaded, Err(RuntimeError::Panic(_))),
                    "{} bytes: {loaded:?}",
                    bytes.len()
                );
            }
            Err(err) => assert!(
                matches!(err, RuntimeError::Load(_) | RuntimeError::Schema(_)),
                "{} bytes: {err:?}",
                bytes.len()
            ),
        }
    }
    let file = Scratch::new(b"");
    let err = inspect(&file.0).unwrap_err().to_string();
    assert!(
        err.contains("is not an ONNX model: it has no graph"),
        "{err}"
    );
    let file = Scratch::new(b"\xff\xff\xff\xff garbage");
    let err = inspect(&file.0).unwrap_err().to_string();
    assert!(err.contains("is not a readable ONNX file"), "{err}");
    let missing = inspect(Path::new("/nonexistent/model.onnx")).unwrap_err();
    assert!(matches!(missing, RuntimeError::Load(_)), "{missing:?}");
}

#[test]
fn generated_golden_vectors_are_deterministic_and_replay() {
    let path = fixture("scale_f32.onnx");
    let info = inspect(&path).unwrap();
    let model = LoadedModel::load_with_inputs(&path, &info.inputs).unwrap();
    let golden = model
        .generate_golden(&info.outputs, ReferenceRows::default(), GOLDEN_COUNT)
        .unwrap();
    assert_eq!(golden.len(), GOLDEN_COUNT);
    for vector in &golden {
        let TensorData::F32(x) = &vector.inputs[0].data else {
            panic!("f32 input")
        };
        let TensorData::F32(y) = &vector.outputs[0].data else {
            panic!("f32 output")
        };
        assert_eq!(vector.inputs[0].shape, [1, 4]);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)), "{x:?}");
        let want: Vec<f32> = x
            .iter()
            .zip([1.0, 2.0, 3.0, 4.0])
            .map(|(a, b)| a * b)
            .collect();
        assert_eq!(y, &want);
        assert!(vector.tolerance > 0.0 && vector.tolerance <= 4.0 * GOLDEN_TOLERANCE);
    }
    assert_ne!(golden[0].inputs, golden[1].inputs);
    let again = model
        .generate_golden(&info.outputs, ReferenceRows::default(), GOLDEN_COUNT)
        .unwrap();
    assert_eq!(golden, again);
    model.check_golden(&golden).unwrap();
}

#[test]
fn dynamic_dimensions_become_one_and_reference_rows_fill_features() {
    let path = fixture("broadcast6.onnx");
    let info = inspect(&path).unwrap();
    let model = LoadedModel::load_with_inputs(&path, &info.inputs).unwrap();
    let golden = model
        .generate_golden(&info.outputs, ReferenceRows::default(), 1)
        .unwrap();
    assert_eq!(golden[0].inputs[0].shape, [1]);
    assert_eq!(golden[0].outputs[0].shape, [6]);

    let path = fixture("classifier3.onnx");
    let info = inspect(&path).unwrap();
    let model = LoadedModel::load_with_inputs(&path, &info.inputs).unwrap();
    let features: Vec<FeatureSpec> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| FeatureSpec {
            name: name(n),
            tensor: name("x"),
            index: i as u32,
        })
        .collect();
    let rows = vec![vec![1.0, 0.0, 0.0], vec![0.5, -1.0, 2.0]];
    let reference = ReferenceRows {
        features: &features,
        rows: &rows,
    };
    let golden = model
        .generate_golden(&info.outputs, reference, GOLDEN_COUNT)
        .unwrap();
    assert_eq!(golden.len(), 2, "one vector per reference row");
    assert_eq!(
        golden[1].inputs[0].data,
        TensorData::F32(vec![0.5, -1.0, 2.0])
    );
    // onnxruntime: classifier3([[1,0,0]]) and ([[0.5,-1,2]]).
    let expected = [
        [0.800_556_5, 0.029_527_06, 0.169_916_5],
        [0.229_515_7, 0.008_465_268, 0.762_019],
    ];
    for (vector, want) in golden.iter().zip(expected) {
        let TensorData::F32(got) = &vector.outputs[0].data else {
            panic!("f32 output")
        };
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    // A dynamic last axis read by a feature is widened to hold the feature's index.
    let wide = spec("v", DType::I64, &[None, None]);
    let at_four = [FeatureSpec {
        name: name("f"),
        tensor: name("v"),
        index: 4,
    }];
    assert_eq!(concrete_shape(&wide, &at_four), [1, 5]);
    let inputs = generated_inputs(&[wide], &at_four, 0);
    let TensorData::I64(values) = &inputs[0].data else {
        panic!("i64")
    };
    assert!(values.iter().all(|v| (0..=3).contains(v)), "{values:?}");
}

#[test]
fn declared_outputs_are_checked_against_what_the_model_produces() {
    let got = vec![NamedTensor {
        name: name("y"),
        shape: vec![1, 4],
        data: TensorData::F32(vec![0.0; 4]),
    }];
    check_outputs(&[spec("y", DType::F32, &[None, Some(4)])], &got).unwrap();
    let err = check_outputs(&[spec("y", DType::I64, &[Some(1), Some(4)])], &got).unwrap_err();
    assert!(
        err.to_string()
            .contains("output y is declared as I64 [1, 4] but the model produced F32 [1, 4]"),
        "{err}"
    );
    let err = check_outputs(&[spec("z", DType::F32, &[Some(1)])], &got).unwrap_err();
    assert!(err.to_string().contains("its outputs are y"), "{err}");
}

#[test]
fn external_tensor_data_files_are_reported() {
    let graph = pbw::graph_with(
        &[pbw::node("Mul", "mul", &["x", "w"], &["y"], &[])],
        &[pbw::value_info("x", FLOAT, &[1, 4])],
        &[pbw::value_info("y", FLOAT, &[1, 4])],
        &[pbw::external_tensor("w", &[1, 4], "../weights.bin")],
    );
    let file = Scratch::new(&pbw::model(&graph));
    let info = inspect(&file.0).unwrap();
    assert_eq!(
        info.external_data.iter().collect::<Vec<_>>(),
        ["../weights.bin"]
    );
    assert_eq!(info.inputs.len(), 1, "the initializer is not an input");
}
