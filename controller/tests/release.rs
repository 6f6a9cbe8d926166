//! The release builder on the committed fixture models (agent/tests/models), with real tract.
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::path::{Path, PathBuf};

use edgefleet_controller::release::{
    ReleaseError, ReleaseSpec, SpecFile, build_release, parse_reference, sign, write_bundle,
};
use edgefleet_protocol::bundle::split_header;
use edgefleet_protocol::manifest::{DType, FeatureSpec, NanPolicy, TensorData, TensorSpec};
use edgefleet_protocol::{ModelName, ModelVersion, SecretKey, TensorName, Timestamp};

const NOW: Timestamp = Timestamp::from_secs(1_793_491_200);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/models")
        .join(name)
}

fn spec() -> ReleaseSpec {
    ReleaseSpec::new(
        ModelName::new("m").unwrap(),
        ModelVersion::new("1.0.0").unwrap(),
        1,
    )
}

fn name(s: &str) -> TensorName {
    TensorName::new(s).unwrap()
}

fn tensor(n: &str, dtype: DType, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec {
        name: name(n),
        dtype,
        shape: shape.to_vec(),
        nan: NanPolicy::Reject,
    }
}

fn bytes(label: &str, text: &str) -> SpecFile {
    SpecFile::Bytes {
        label: label.to_owned(),
        bytes: text.as_bytes().to_vec(),
    }
}

#[test]
fn a_release_of_a_fixture_model_takes_its_schema_from_the_model() {
    let built = build_release(&fixture("scale_f32.onnx"), &spec(), NOW).unwrap();
    let m = &built.manifest;
    assert_eq!(m.inputs, vec![tensor("x", DType::F32, &[Some(1), Some(4)])]);
    assert_eq!(
        m.outputs,
        vec![tensor("y", DType::F32, &[Some(1), Some(4)])]
    );
    assert_eq!(m.golden.len(), edgefleet_runtime::GOLDEN_COUNT);
    assert!(built.golden_generated);
    assert_eq!(built.info.opset, Some(13));
    assert_eq!(m.payloads[0].name.as_str(), "scale_f32.onnx");
    assert_eq!(m.created_at, NOW);
    assert_eq!(m.expires, NOW.plus_secs(365 * 86_400));
    m.validate().unwrap();
    // y = x * [1, 2, 3, 4], exactly.
    for vector in &m.golden {
        let (TensorData::F32(x), TensorData::F32(y)) =
            (&vector.inputs[0].data, &vector.outputs[0].data)
        else {
            panic!("f32 tensors")
        };
        for (i, (x, y)) in x.iter().zip(y).enumerate() {
            assert_eq!(*y, x * (i + 1) as f32);
        }
    }
    // The same spec builds the same manifest.
    let again = build_release(&fixture("scale_f32.onnx"), &spec(), NOW).unwrap();
    assert_eq!(again.digest(), built.digest());

    let info = build_release(&fixture("classifier3.onnx"), &spec(), NOW)
        .unwrap()
        .info;
    assert_eq!(
        info.outputs,
        vec![tensor("probs", DType::F32, &[Some(1), Some(3)])]
    );
    assert_eq!(
        info.ops.into_iter().collect::<Vec<_>>(),
        ["Add", "MatMul", "Softmax"]
    );
}

#[test]
fn dynamic_dimensions_can_be_fixed_but_declared_ones_cannot_change() {
    let built = build_release(&fixture("broadcast6.onnx"), &spec(), NOW).unwrap();
    assert_eq!(built.manifest.inputs[0].shape, vec![None]);
    assert_eq!(built.manifest.golden[0].inputs[0].shape, vec![1]);

    let mut fixed = spec();
    fixed.inputs = vec![tensor("x", DType::F32, &[Some(6)])];
    let built = build_release(&fixture("broadcast6.onnx"), &fixed, NOW).unwrap();
    assert_eq!(built.manifest.inputs[0].shape, vec![Some(6)]);
    assert_eq!(built.manifest.golden[0].inputs[0].shape, vec![6]);

    // A size the model cannot run is refused at build time, not on the device.
    fixed.inputs = vec![tensor("x", DType::F32, &[Some(5)])];
    let err = build_release(&fixture("broadcast6.onnx"), &fixed, NOW).unwrap_err();
    assert_eq!(err.code(), "model_failed", "{err}");

    let mut wrong = spec();
    wrong.inputs = vec![tensor("x", DType::I64, &[Some(1), Some(4)])];
    let err = build_release(&fixture("scale_f32.onnx"), &wrong, NOW).unwrap_err();
    assert_eq!(err.code(), "schema_mismatch");
    assert!(
        err.to_string()
            .contains("input x is given as I64 [1, 4] but the model declares F32 [1, 4]"),
        "{err}"
    );
    wrong.inputs = vec![tensor("z", DType::F32, &[Some(1)])];
    let err = build_release(&fixture("scale_f32.onnx"), &wrong, NOW).unwrap_err();
    assert!(
        err.to_string()
            .contains("the model has no input z; its inputs are x"),
        "{err}"
    );
}

#[test]
fn models_the_runtime_cannot_run_are_refused_naming_the_operator() {
    let err = build_release(&fixture("if_op.onnx"), &spec(), NOW).unwrap_err();
    assert_eq!(err.code(), "unsupported_op");
    assert!(
        matches!(&err, ReleaseError::UnsupportedOp { op, node } if op == "If" && node == "if"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("the model uses ONNX operator `If` (node \"if\")"),
        "{err}"
    );

    // Det parses but tract does not implement it.
    let err = build_release(&fixture("det_unsupported.onnx"), &spec(), NOW).unwrap_err();
    assert!(
        matches!(&err, ReleaseError::UnsupportedOp { op, node } if op == "Det" && node == "det"),
        "{err:?}"
    );

    // tract cannot prove the symbolic reshape; the load error is reported as is.
    let err = build_release(&fixture("reshape6.onnx"), &spec(), NOW).unwrap_err();
    assert_eq!(err.code(), "invalid_model", "{err}");
    assert!(err.to_string().contains("Reshape"), "{err}");
}

#[test]
fn garbage_and_truncated_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(fixture("classifier3.onnx")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.onnx", Vec::new()),
        (
            "garbage.onnx",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff junk".to_vec(),
        ),
        (
            "text.onnx",
            b"this is a CSV file, not a model\n1,2,3\n".to_vec(),
        ),
        ("truncated.onnx", real[..real.len() / 2].to_vec()),
        ("cut.onnx", real[..real.len() - 3].to_vec()),
    ];
    for (file, content) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, &content).unwrap();
        let err = build_release(&path, &spec(), NOW).unwrap_err();
        assert!(
            matches!(
                err.code(),
                "invalid_model" | "schema_mismatch" | "model_failed"
            ),
            "{file}: {err:?}"
        );
        assert!(err.is_input_error());
        assert!(!err.to_string().contains("panicked"), "{file}: {err}");
    }
    let path = dir.path().join("empty.onnx");
    let err = build_release(&path, &spec(), NOW).unwrap_err().to_string();
    assert!(err.contains("it has no graph"), "{err}");

    let err = build_release(&dir.path().join("missing.onnx"), &spec(), NOW).unwrap_err();
    assert_eq!(err.code(), "io_error");
    assert!(!err.is_input_error());
}

#[test]
fn reference_csv_gives_statistics_and_the_golden_inputs_and_names_bad_lines() {
    let mut csv = String::from("a,b,c\n1,0,0\n0.5,-1,2\n");
    for i in 0..100 {
        csv.push_str(&format!("{},{},{}\n", i, i % 2, f64::from(i) / 10.0));
    }
    let mut with_reference = spec();
    with_reference.reference = Some(bytes("ref.csv", &csv));
    let built = build_release(&fixture("classifier3.onnx"), &with_reference, NOW).unwrap();
    let m = &built.manifest;
    assert_eq!(m.features.len(), 3);
    assert_eq!(m.features[2].index, 2);
    let reference = m.reference.as_ref().unwrap();
    assert_eq!(reference.sample_count, 102);
    assert_eq!(reference.features[0].edges.len(), 9);
    // The first reference rows are the golden inputs; onnxruntime gives these outputs.
    assert_eq!(
        m.golden[1].inputs[0].data,
        TensorData::F32(vec![0.5, -1.0, 2.0])
    );
    let TensorData::F32(probs) = &m.golden[0].outputs[0].data else {
        panic!("f32")
    };
    for (got, want) in probs.iter().zip([0.800_556_5, 0.029_527_06, 0.169_916_5]) {
        assert!((got - want).abs() < 1e-5, "{probs:?}");
    }

    let inputs = [tensor("x", DType::F32, &[Some(1), Some(3)])];
    let err =
        parse_reference(&bytes("ref.csv", "a,b,c\n1,2,3\n1,warm,3\n"), &[], &inputs).unwrap_err();
    assert_eq!(err.code(), "bad_reference");
    assert_eq!(
        err.to_string(),
        "ref.csv: line 3, column b: \"warm\" is not a finite number; fix it, or leave the cell empty for a missing value"
    );
    let err =
        parse_reference(&bytes("ref.csv", "a,b,c\n1,2,3\n\n4,5\n"), &[], &inputs).unwrap_err();
    assert!(
        err.to_string()
            .contains("line 4: the row has 2 fields but the header has 3"),
        "{err}"
    );
    let err = parse_reference(&bytes("ref.csv", "a,b\n\n1,x\n"), &[], &inputs).unwrap_err();
    assert!(err.to_string().contains("line 3, column b"), "{err}");
    let err = parse_reference(&bytes("ref.csv", "a,b\n"), &[], &inputs).unwrap_err();
    assert!(err.to_string().contains("no rows"), "{err}");
    // Missing cells are allowed; declared features must have a column.
    let ok = parse_reference(&bytes("ref.csv", "a,b\n1,\nnan,2\n"), &[], &inputs).unwrap();
    assert_eq!(ok.stats.sample_count, 2);
    assert!(ok.first_rows[0][1].is_nan());
    let feature = FeatureSpec {
        name: name("temp"),
        tensor: name("x"),
        index: 0,
    };
    let err = parse_reference(&bytes("ref.csv", "a,b\n1,2\n"), &[feature], &inputs).unwrap_err();
    assert!(
        err.to_string()
            .contains("feature temp has no column; the columns are a, b"),
        "{err}"
    );

    // A feature index beyond a fixed last axis is refused.
    let mut out_of_range = spec();
    out_of_range.features = vec![FeatureSpec {
        name: name("f"),
        tensor: name("x"),
        index: 3,
    }];
    let err = build_release(&fixture("classifier3.onnx"), &out_of_range, NOW).unwrap_err();
    assert_eq!(err.code(), "invalid_manifest");
    assert!(
        err.to_string()
            .contains("feature f reads index 3 of input x, whose last axis has 3 element(s)"),
        "{err}"
    );
}

#[test]
fn given_golden_vectors_are_checked_against_the_model() {
    let good = r#"[{"inputs": {"x": {"shape": [1, 4], "data": [1, 1, 1, 1]}},
                    "outputs": {"y": {"shape": [1, 4], "data": [1, 2, 3, 4]}}}]"#;
    let mut given = spec();
    given.golden = Some(bytes("golden.json", good));
    let built = build_release(&fixture("scale_f32.onnx"), &given, NOW).unwrap();
    assert!(!built.golden_generated);
    assert_eq!(built.manifest.golden.len(), 1);
    assert_eq!(built.manifest.golden[0].tolerance, 1e-4);

    given.golden = Some(bytes(
        "golden.json",
        &good.replace("[1, 2, 3, 4]", "[1, 2, 3, 5]"),
    ));
    let err = build_release(&fixture("scale_f32.onnx"), &given, NOW).unwrap_err();
    assert_eq!(err.code(), "bad_golden");
    assert!(err.to_string().contains("output y differs"), "{err}");

    given.golden = Some(bytes("golden.json", "{\"inputs\": 3}"));
    let err = build_release(&fixture("scale_f32.onnx"), &given, NOW).unwrap_err();
    assert_eq!(err.code(), "bad_golden");
    assert!(
        err.to_string()
            .starts_with("golden.json: not golden-vector JSON")
    );

    given.golden = Some(bytes("golden.json", &good.replace("\"x\"", "\"w\"")));
    let err = build_release(&fixture("scale_f32.onnx"), &given, NOW).unwrap_err();
    assert!(
        err.to_string()
            .contains("vector 0: input \"w\" is not a model input; the inputs are x"),
        "{err}"
    );
}

#[test]
fn bundles_are_written_atomically_and_refuse_a_payload_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.onnx");
    std::fs::copy(fixture("classifier3.onnx"), &model).unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "cat\ndog\nbird\n").unwrap();
    let mut with_data = spec();
    with_data.data = vec![labels.clone()];
    let built = build_release(&model, &with_data, NOW).unwrap();
    assert_eq!(built.sources, vec![model.clone(), labels.clone()]);
    let mut signed = built.unsigned();
    let key = || SecretKey::from_seed([9; 32]);
    sign(&mut signed, &[key(), key()]);
    assert_eq!(signed.signatures.len(), 1, "a key signs once");
    let out = dir.path().join("m.efb");
    write_bundle(&signed, &built.sources, &out).unwrap();
    let bundle = std::fs::read(&out).unwrap();
    let (read_back, offset) = split_header(&bundle).unwrap().unwrap();
    assert_eq!(read_back, signed);
    let mut payloads = std::fs::read(&model).unwrap();
    payloads.extend(std::fs::read(&labels).unwrap());
    assert_eq!(&bundle[offset..], &payloads[..]);

    std::fs::write(&labels, "cat\ndog\nfish\n").unwrap();
    let again = dir.path().join("again.efb");
    let err = write_bundle(&signed, &built.sources, &again).unwrap_err();
    assert_eq!(err.code(), "payload_changed");
    assert!(err.to_string().contains("labels.txt changed"), "{err}");
    assert!(!again.exists());
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp.")
        })
        .count();
    assert_eq!(leftovers, 0);
}

/// An ONNX file `y = x * w` (f32 [1, 4]) whose `w` is read from the external file `location`,
/// hand-encoded as protobuf.
fn external_data_model(location: &str) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn int(tag: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, tag << 3);
        varint(&mut out, v);
        out
    }
    fn msg(tag: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, (tag << 3) | 2);
        varint(&mut out, body.len() as u64);
        out.extend_from_slice(body);
        out
    }
    let value_info = |name: &str| {
        let shape = [msg(1, &int(1, 1)), msg(1, &int(1, 4))].concat();
        let tensor = [int(1, 1), msg(2, &shape)].concat();
        [msg(1, name.as_bytes()), msg(2, &msg(1, &tensor))].concat()
    };
    let entry = |k: &str, v: &str| msg(13, &[msg(1, k.as_bytes()), msg(2, v.as_bytes())].concat());
    let weights = [
        int(1, 1),
        int(1, 4),
        int(2, 1),
        msg(8, b"w"),
        entry("location", location),
        entry("length", "16"),
        int(14, 1),
    ]
    .concat();
    let node = [
        msg(1, b"x"),
        msg(1, b"w"),
        msg(2, b"y"),
        msg(3, b"mul"),
        msg(4, b"Mul"),
    ]
    .concat();
    let graph = [
        msg(1, &node),
        msg(2, b"g"),
        msg(5, &weights),
        msg(11, &value_info("x")),
        msg(12, &value_info("y")),
    ]
    .concat();
    let opset = [msg(1, b""), int(2, 13)].concat();
    [int(1, 8), msg(8, &opset), msg(7, &graph)].concat()
}

#[test]
fn external_tensor_data_must_travel_in_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("ext.onnx");
    std::fs::write(&model, external_data_model("w.bin")).unwrap();
    let weights = dir.path().join("w.bin");
    let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&weights, values).unwrap();

    // Not a payload: refused before tract reads it.
    let err = build_release(&model, &spec(), NOW).unwrap_err();
    assert_eq!(err.code(), "invalid_model");
    assert!(
        err.to_string()
            .contains("reads tensor data from the external file \"w.bin\""),
        "{err}"
    );

    // Shipped as a data payload next to the model: tract loads it, y = x * [1, 2, 3, 4].
    let mut shipped = spec();
    shipped.data = vec![weights.clone()];
    let built = build_release(&model, &shipped, NOW).unwrap();
    assert_eq!(built.manifest.payloads[1].name.as_str(), "w.bin");
    let vector = &built.manifest.golden[0];
    let (TensorData::F32(x), TensorData::F32(y)) =
        (&vector.inputs[0].data, &vector.outputs[0].data)
    else {
        panic!("f32 tensors")
    };
    for (i, (x, y)) in x.iter().zip(y).enumerate() {
        assert_eq!(*y, x * (i + 1) as f32);
    }

    // A file of that name elsewhere is not the one tract would read.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = elsewhere.path().join("w.bin");
    std::fs::copy(&weights, &other).unwrap();
    shipped.data = vec![other];
    let err = build_release(&model, &shipped, NOW).unwrap_err();
    assert_eq!(err.code(), "invalid_model", "{err}");

    // Outside the model's directory: refused.
    std::fs::write(&model, external_data_model("../w.bin")).unwrap();
    let err = build_release(&model, &spec(), NOW).unwrap_err();
    assert!(err.to_string().contains("\"../w.bin\""), "{err}");
}
