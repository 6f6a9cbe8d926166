//! Serving real models through the local API.

use std::io::{Read, Write};
use std::net::TcpStream;

use edgefleet_client::{Client, Tensor};
use edgefleet_tests::fleet::{BundleSpec, tensor};
use edgefleet_tests::models::{PPOCR_CLS, SILERO_VAD_WITH_IF, fetch, fixture};

use crate::{install_ok, setup, silero, silero_silence};

/// A formant-synthesised vowel /a/ (1 s, 4 Hz envelope) between 0.5 s of silence at 16 kHz.
fn vowel_signal() -> Vec<f32> {
    const SR: f64 = 16_000.0;
    let n = 16_000;
    let t: Vec<f64> = (0..n).map(|i| f64::from(i) / SR).collect();
    let mut phase = 0.0;
    let mut previous_floor = 0.0;
    let mut x: Vec<f64> = t
        .iter()
        .map(|t| {
            phase += (120.0 + 15.0 * (1.0 - (2.0 * std::f64::consts::PI * t).cos())) / SR;
            let pulse = phase.floor() - previous_floor;
            previous_floor = phase.floor();
            pulse
        })
        .collect();
    for (f, bw) in [(700.0, 80.0), (1220.0, 90.0), (2600.0, 120.0)] {
        let r = (-std::f64::consts::PI * bw / SR).exp();
        let (a1, a2) = (
            2.0 * r * (2.0 * std::f64::consts::PI * f / SR).cos(),
            -r * r,
        );
        let (mut y1, mut y2) = (0.0, 0.0);
        for v in &mut x {
            let y0 = *v + a1 * y1 + a2 * y2;
            y2 = y1;
            y1 = y0;
            *v = y0;
        }
    }
    let peak = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut signal = vec![0.0f32; 8000];
    signal.extend(x.iter().zip(&t).map(|(v, t)| {
        (0.5 * v / peak * 0.5 * (1.0 - (2.0 * std::f64::consts::PI * 4.0 * t).cos())) as f32
    }));
    signal.extend(vec![0.0f32; 8000]);
    signal
}

#[test]
fn silero_vad_finds_the_speech_in_a_16khz_signal_with_state_carried_across_calls() {
    let setup = setup(&[]);
    let digest = install_ok(&setup, &BundleSpec::silero(&silero(), 1));
    let signal = vowel_signal();
    let mut client = setup.agent.client();
    let mut state = Tensor::f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut context = vec![0.0f32; 64];
    let mut probabilities = Vec::new();
    for frame in signal.chunks_exact(512) {
        let mut input = context.clone();
        input.extend_from_slice(frame);
        let reply = client
            .infer(&[
                ("input", Tensor::f32(vec![1, 576], input)),
                ("state", state.clone()),
            ])
            .unwrap();
        assert_eq!(reply.model.digest, digest);
        assert_eq!(reply.model.name, "silero-vad");
        probabilities.push(reply.outputs["output"].to_f32()[0]);
        state = reply.outputs["stateN"].clone();
        state.dtype = None;
        context = frame[448..].to_vec();
    }
    assert_eq!(probabilities.len(), 62);
    let rounded: Vec<f32> = probabilities
        .iter()
        .map(|p| (p * 1000.0).round() / 1000.0)
        .collect();
    assert!(
        probabilities[..15].iter().all(|p| *p < 0.05),
        "leading silence: {rounded:?}"
    );
    assert!(
        probabilities[17..=30].iter().all(|p| *p > 0.7),
        "vowel: {rounded:?}"
    );
    assert!(
        probabilities[52..].iter().all(|p| *p < 0.05),
        "trailing silence: {rounded:?}"
    );
    // The reference run (onnxruntime, same signal) peaks at 0.966 in frame 25.
    assert!(
        (probabilities[25] - 0.966).abs() < 0.02,
        "frame 25: {}",
        probabilities[25]
    );
}

#[test]
fn json_and_cbor_over_tcp_and_unix_socket_answer_alike_and_name_the_model() {
    let setup = setup(&[]);
    let spec = BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    );
    let digest = install_ok(&setup, &spec);
    let input = [("x", Tensor::f32(vec![1, 4], vec![0.5, -1.0, 2.0, 10.0]))];
    let over_unix = setup.agent.client().infer(&input).unwrap();
    let over_tcp_json = Client::tcp(setup.agent.api).json().infer(&input).unwrap();
    assert_eq!(over_unix.outputs["y"].data, vec![0.5, -2.0, 6.0, 40.0]);
    assert_eq!(over_unix.outputs, over_tcp_json.outputs);
    assert_eq!(over_tcp_json.outputs["y"].dtype.as_deref(), Some("f32"));
    assert_eq!(over_tcp_json.model.digest, digest);
    assert!(
        over_tcp_json.id != over_unix.id,
        "prediction ids are unique"
    );

    // Every answer names the model in headers too.
    let body = r#"{"inputs":{"x":{"shape":[1,4],"data":[1,1,1,1]}}}"#;
    let mut stream = TcpStream::connect(setup.agent.api).unwrap();
    write!(stream, "POST /v1/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("x-edgefleet-model: scale@1.1"),
        "{response}"
    );
    assert!(
        response.contains(&format!("x-edgefleet-model-digest: {digest}")),
        "{response}"
    );

    let info = setup.agent.client().model().unwrap();
    assert_eq!(info.inputs[0].name, "x");
    assert_eq!(info.inputs[0].shape, vec![Some(1), Some(4)]);
}

fn raw_post(addr: std::net::SocketAddr, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "POST /v1/infer HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    (status, response)
}

#[test]
fn bad_requests_get_clear_errors_and_no_model_is_503() {
    let setup = setup(&[("EDGEFLEET_API_MAX_BODY_BYTES", "4096")]);
    let x = |shape: Vec<u64>, data: Vec<f32>| [("x", Tensor::f32(shape, data))];
    let err = setup
        .agent
        .client()
        .infer(&x(vec![1, 4], vec![1.0; 4]))
        .unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(err.to_string().contains("no model is active"), "{err}");

    let spec = BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    );
    install_ok(&setup, &spec);
    let mut client = setup.agent.client();
    let err = client.infer(&x(vec![1, 3], vec![1.0; 3])).unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(
        err.to_string()
            .contains("input x: has shape [1, 3] but the model takes [1, 4]"),
        "{err}"
    );
    let err = client.infer(&x(vec![1, 4], vec![1.0; 3])).unwrap_err();
    assert!(
        err.to_string().contains("needs 4 values but 3 were given"),
        "{err}"
    );
    let err = client
        .infer(&x(vec![1, 4], vec![1.0, f32::NAN, 0.0, 0.0]))
        .unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let err = client
        .infer(&[("z", Tensor::f32(vec![1], vec![1.0]))])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("input z: the model has no such input; its inputs are x"),
        "{err}"
    );
    let err = client.infer(&[]).unwrap_err();
    assert!(err.to_string().contains("input x: missing"), "{err}");

    let (status, body) = raw_post(setup.agent.api, "application/json", b"{\"inputs\": ");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a valid inference request"), "{body}");
    let (status, body) = raw_post(setup.agent.api, "text/plain", b"hello");
    assert_eq!(status, 415, "{body}");
    let (status, body) = raw_post(setup.agent.api, "application/json", &vec![b' '; 8192]);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("api.max_body_bytes"), "{body}");
    // The agent keeps serving good requests.
    assert_eq!(
        client.infer(&x(vec![1, 4], vec![1.0; 4])).unwrap().outputs["y"].data,
        vec![1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn ppocr_text_direction_classifier_runs_through_the_api() {
    let setup = setup(&[]);
    let model = fetch(PPOCR_CLS);
    let mut spec = BundleSpec::fixture(
        &model,
        "ppocr-cls",
        1,
        ("x", &[Some(1), Some(3), Some(48), Some(192)]),
        ("save_infer_model/scale_0.tmp_1", &[Some(1), Some(2)]),
    );
    spec.inputs = vec![tensor("x", &[Some(1), Some(3), Some(48), Some(192)])];
    install_ok(&setup, &spec);
    let reply = setup
        .agent
        .client()
        .infer(&[(
            "x",
            Tensor::f32(vec![1, 3, 48, 192], vec![0.5; 3 * 48 * 192]),
        )])
        .unwrap();
    let probs = reply.outputs["save_infer_model/scale_0.tmp_1"].to_f32();
    // onnxruntime on the same input: [0.5030592679977417, 0.4969407618045807].
    assert!(
        (probs[0] - 0.503_059_3).abs() < 1e-4 && (probs[1] - 0.496_940_8).abs() < 1e-4,
        "{probs:?}"
    );
}

#[test]
fn a_model_using_onnx_if_is_refused_naming_the_op_and_the_old_model_keeps_serving() {
    let setup = setup(&[]);
    let old = install_ok(&setup, &BundleSpec::silero(&silero(), 1));
    let with_if = fetch(SILERO_VAD_WITH_IF);
    let mut spec = BundleSpec::fixture(
        &with_if,
        "silero-vad",
        2,
        ("input", &[Some(1), Some(512)]),
        ("output", &[Some(1), Some(1)]),
    );
    spec.name = String::from("silero-vad");
    let (path, _) = setup.fleet.bundle(&spec);
    let err = setup.agent.install(&path).unwrap_err();
    assert!(err.contains("model uses ONNX operator `If`"), "{err}");
    assert!(err.ends_with("[unsupported_op]"), "{err}");
    assert_eq!(silero_silence(&setup).1, old);
}
