//! The offline half of `edgefleet`: keys, k-of-n bundle signing, verification and inspection,
//! on the real Silero VAD model.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use edgefleet_tests::models::{SILERO_VAD_16K, fetch};
use edgefleet_tests::{Run, bin, run_err, run_ok};

fn edgefleet(dir: &Path) -> Command {
    let mut command = Command::new(bin("edgefleet"));
    command.current_dir(dir);
    command
}

/// Every secret (hex) in the key files of `dir`.
fn secrets(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "key"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let line = text.lines().find(|l| l.starts_with("secret:")).unwrap();
            line.trim_start_matches("secret:").trim().to_owned()
        })
        .collect()
}

fn assert_no_secret(outputs: &[&Run], secrets: &[String]) {
    for out in outputs {
        for secret in secrets {
            assert!(
                !out.stdout.contains(secret) && !out.stderr.contains(secret),
                "a secret key was printed"
            );
        }
    }
}

fn reference_csv(path: &Path) {
    let mut text = String::from("energy,zero_crossings\n");
    for i in 0..400u32 {
        let x = f64::from(i);
        text.push_str(&format!(
            "{:.4},{:.4}\n",
            (x * 0.37).sin().abs(),
            (x * 0.11).cos() * 10.0
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn build_args(model: &Path, out: &str, arch: &str) -> Vec<String> {
    [
        "bundle",
        "build",
        "--model",
        &model.to_string_lossy(),
        "--name",
        "silero-vad",
        "--version",
        "6.2.3",
        "--release",
        "3",
        "--arch",
        arch,
        "--input",
        "input:f32:1x576",
        "--input",
        "state:f32:2x1x128",
        "--output",
        "output:f32:1x1",
        "--output",
        "stateN:f32:2x1x128",
        "--feature",
        "energy=input:0",
        "--feature",
        "zero_crossings=input:1",
        "--reference",
        "ref.csv",
        "--golden",
        "golden.json",
        "--param",
        "sample_rate=16000",
        "--metric",
        "roc_auc=0.97",
        "--code-commit",
        "4f1c2e9",
        "--training-data-uri",
        "s3://corpus/vad-2026-10",
        "-o",
        out,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn golden_json(path: &Path) {
    let zeros = |n: usize| vec![0.0f32; n];
    let value = serde_json::json!([{
        "inputs": {"input": {"shape": [1, 576], "data": zeros(576)}, "state": {"shape": [2, 1, 128], "data": zeros(256)}},
        "outputs": {"output": {"shape": [1, 1], "data": [0.0]}},
        "tolerance": 0.05
    }]);
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn k_of_n_signed_bundle_of_a_real_model_verifies_and_tampering_is_caught() {
    let model = fetch(SILERO_VAD_16K);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    reference_csv(&dir.join("ref.csv"));
    golden_json(&dir.join("golden.json"));

    let mut outputs = Vec::new();
    outputs.push(run_ok(edgefleet(dir).args([
        "keys",
        "init-root",
        "--dir",
        "keys",
        "--keys",
        "3",
        "--threshold",
        "2",
    ])));
    outputs.push(run_ok(edgefleet(dir).args([
        "keys",
        "add-release-key",
        "--dir",
        "keys",
        "--name",
        "alice",
        "--name",
        "bob",
        "--name",
        "carol",
        "--threshold",
        "2",
        "--root-key",
        "keys/root-v1-1.key",
    ])));
    assert!(
        outputs[1].stdout.contains("1 of the 2 root signatures"),
        "{}",
        outputs[1].stdout
    );
    outputs.push(run_ok(edgefleet(dir).args([
        "keys",
        "sign",
        "keys/keyring.cbor",
        "--key",
        "keys/root-v1-3.key",
    ])));

    for entry in std::fs::read_dir(dir.join("keys"))
        .unwrap()
        .filter_map(Result::ok)
    {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        if entry.path().extension().is_some_and(|x| x == "key") {
            assert_eq!(mode, 0o600, "{} must be private", entry.path().display());
        }
    }

    outputs.push(run_ok(
        edgefleet(dir).args(build_args(&model, "vad.efb", "any")),
    ));
    let unsigned = run_err(edgefleet(dir).args(["bundle", "verify", "vad.efb", "--keys", "keys"]));
    assert!(
        unsigned
            .stderr
            .contains("needs 2 distinct signatures but has 0"),
        "{}",
        unsigned.stderr
    );

    // Alice signs in place; Carol signs detached on her own machine; the signatures merge.
    outputs.push(run_ok(edgefleet(dir).args([
        "bundle",
        "sign",
        "vad.efb",
        "--key",
        "keys/release-alice.key",
    ])));
    let one = run_err(edgefleet(dir).args(["bundle", "verify", "vad.efb", "--keys", "keys"]));
    assert!(
        one.stderr.contains("needs 2 distinct signatures but has 1"),
        "{}",
        one.stderr
    );
    let again = run_ok(edgefleet(dir).args([
        "bundle",
        "sign",
        "vad.efb",
        "--key",
        "keys/release-alice.key",
    ]));
    assert!(again.stdout.contains("counts once"), "{}", again.stdout);
    outputs.push(run_ok(edgefleet(dir).args([
        "bundle",
        "sign",
        "vad.efb",
        "--key",
        "keys/release-carol.key",
        "--detached",
        "carol.sig",
    ])));
    outputs.push(run_ok(edgefleet(dir).args([
        "bundle",
        "sign",
        "vad.efb",
        "--add-signature",
        "carol.sig",
    ])));
    let ok = run_ok(edgefleet(dir).args([
        "bundle", "verify", "vad.efb", "--keys", "keys", "--arch", "aarch64",
    ]));
    assert!(
        ok.stdout
            .starts_with("OK vad.efb: silero-vad 6.2.3 release 3"),
        "{}",
        ok.stdout
    );

    let inspect = run_ok(edgefleet(dir).args(["bundle", "inspect", "vad.efb", "--output", "json"]));
    let json: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(json["payloads"][0]["sha256"], SILERO_VAD_16K.sha256);
    assert_eq!(
        json["payloads"][0]["size"],
        std::fs::metadata(&model).unwrap().len()
    );
    assert_eq!(json["signatures"].as_array().unwrap().len(), 2);
    assert_eq!(
        json["reference"]["features"][0]["edges"]
            .as_array()
            .unwrap()
            .len(),
        9
    );
    assert_eq!(json["reference"]["sample_count"], 400);
    assert_eq!(json["golden_vectors"], 1);
    assert_eq!(json["lineage"]["metrics"]["roc_auc"], 0.97);
    assert_eq!(
        json["lineage"]["training_data_uri"],
        "s3://corpus/vad-2026-10"
    );
    let digest = json["manifest_digest"].as_str().unwrap().to_owned();
    assert!(ok.stdout.contains(&digest));
    let table = run_ok(edgefleet(dir).args(["bundle", "inspect", "vad.efb"]));
    assert!(
        table
            .stdout
            .contains("feature            energy = input[0] (10 reference bins)"),
        "{}",
        table.stdout
    );

    // Wrong digest (mix-and-match) and a flipped payload byte are refused.
    let wrong = run_err(edgefleet(dir).args([
        "bundle",
        "verify",
        "vad.efb",
        "--keys",
        "keys",
        "--digest",
        &"0".repeat(64),
    ]));
    assert!(wrong.stderr.contains("mix-and-match"), "{}", wrong.stderr);
    let mut bytes = std::fs::read(dir.join("vad.efb")).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(dir.join("tampered.efb"), &bytes).unwrap();
    let tampered =
        run_err(edgefleet(dir).args(["bundle", "verify", "tampered.efb", "--keys", "keys"]));
    assert!(
        tampered
            .stderr
            .contains("payload silero_vad_openvino_16k.onnx has sha256"),
        "{}",
        tampered.stderr
    );
    assert!(
        tampered.stderr.contains(SILERO_VAD_16K.sha256),
        "{}",
        tampered.stderr
    );

    // A bundle for another architecture is refused on this one.
    outputs.push(run_ok(
        edgefleet(dir)
            .args(build_args(&model, "x86.efb", "x86_64"))
            .args([
                "--key",
                "keys/release-bob.key",
                "--key",
                "keys/release-carol.key",
            ]),
    ));
    let arch = run_err(edgefleet(dir).args([
        "bundle", "verify", "x86.efb", "--keys", "keys", "--arch", "aarch64",
    ]));
    assert!(
        arch.stderr
            .contains("targets architecture x86_64, this device is aarch64"),
        "{}",
        arch.stderr
    );

    // Root rotation: devices holding root v1 follow the chain; without it the new keyring fails.
    outputs.push(run_ok(edgefleet(dir).args([
        "keys",
        "rotate-root",
        "--dir",
        "keys",
    ])));
    run_ok(edgefleet(dir).args([
        "bundle",
        "verify",
        "vad.efb",
        "--root",
        "keys/root-v1.cbor",
        "--root-chain",
        "keys/root-v2.cbor",
        "--keyring",
        "keys/keyring.cbor",
    ]));
    let no_chain = run_err(edgefleet(dir).args([
        "bundle",
        "verify",
        "vad.efb",
        "--root",
        "keys/root-v1.cbor",
        "--keyring",
        "keys/keyring.cbor",
    ]));
    assert!(
        no_chain.stderr.contains("is not a root key"),
        "{}",
        no_chain.stderr
    );

    let all: Vec<&Run> = outputs
        .iter()
        .chain([&ok, &inspect, &table, &tampered, &unsigned])
        .collect();
    assert_no_secret(&all, &secrets(&dir.join("keys")));
}

#[test]
fn bad_cli_input_gets_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let err =
        run_err(edgefleet(dir).args(["keys", "init-root", "--keys", "2", "--threshold", "3"]));
    assert!(
        err.stderr.contains("need 1 ≤ threshold ≤ keys"),
        "{}",
        err.stderr
    );
    let err = run_err(edgefleet(dir).args(["keys", "add-release-key", "--dir", "nowhere"]));
    assert!(
        err.stderr.contains("edgefleet keys init-root"),
        "{}",
        err.stderr
    );
    std::fs::write(dir.join("m.onnx"), b"model").unwrap();
    let err = run_err(edgefleet(dir).args([
        "bundle",
        "build",
        "--model",
        "m.onnx",
        "--name",
        "bad/name",
        "--version",
        "1",
        "--release",
        "1",
        "--input",
        "x:f32:1",
        "--output",
        "y:f32:1",
        "-o",
        "b.efb",
    ]));
    assert!(
        err.stderr.contains("model name \"bad/name\" contains '/'"),
        "{}",
        err.stderr
    );
    std::fs::write(dir.join("junk.efb"), b"PK\x03\x04 not a bundle at all").unwrap();
    let err = run_err(edgefleet(dir).args(["bundle", "inspect", "junk.efb"]));
    assert!(
        err.stderr.contains("not an EdgeFleet bundle"),
        "{}",
        err.stderr
    );
    assert!(!dir.join("b.efb").exists());
}
