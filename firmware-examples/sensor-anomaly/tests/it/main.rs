//! The example against a real agent running the demo pump model: an injected bearing fault is
//! flagged, normal readings mostly are not, and every reading's ground truth reaches the
//! agent's telemetry windows as feedback (counted once, with the right number correct).
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::messages::{DeviceBody, DeviceMessage, FeedbackStats};
use edgefleet_tests::agent::{AgentProcess, wait_until};
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::{bin, run_ok};

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../controller/demo/sensor-anomaly.onnx")
}

/// A real agent (state in `dir`) with the demo pump model installed and active.
fn agent_serving_the_pump_model(dir: &Path, env: &[(&str, &str)]) -> AgentProcess {
    let fleet = TestFleet::new(&dir.join("fleet"));
    let mut agent = AgentProcess::start(&bin("edgefleet-agent"), &fleet, &dir.join("state"), env);
    agent.wait_ready();
    let spec = BundleSpec::fixture(
        &demo_model(),
        "pump-anomaly",
        1,
        ("features", &[Some(1), Some(4)]),
        ("anomaly_probability", &[Some(1), Some(1)]),
    );
    let (bundle, _) = fleet.bundle(&spec);
    let answer = agent.install(&bundle).unwrap();
    assert_eq!(answer["result"], "activated", "{answer}");
    agent
}

/// The feedback in the telemetry windows the agent spooled so far, summed.
fn spooled_feedback(agent: &AgentProcess) -> FeedbackStats {
    let mut total = FeedbackStats::default();
    for entry in std::fs::read_dir(agent.state_dir.join("spool")).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".telemetry.cbor") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let message: DeviceMessage = codec::decode("spooled", &bytes, MAX_MESSAGE_BYTES).unwrap();
        if let DeviceBody::Telemetry(window) = message.body
            && let Some(feedback) = window.feedback
        {
            total.count += feedback.count;
            total.correct += feedback.correct;
        }
    }
    total
}

/// `key=value` of a line.
fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn an_injected_bearing_fault_is_flagged_and_feedback_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_serving_the_pump_model(dir.path(), &[("EDGEFLEET_TELEMETRY_WINDOW_S", "1")]);

    let (samples, fault_at) = (160u64, 80u64);
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_sensor-anomaly"))
            .arg("--socket")
            .arg(&agent.socket)
            .args(["--samples", &samples.to_string()])
            .args(["--fault", "bearing", "--fault-at", &fault_at.to_string()]),
    );
    eprintln!("sensor-anomaly output:\n{}", out.stdout);
    let flagged: Vec<u64> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("anomaly "))
        .map(|l| value(l, "sample").parse().unwrap())
        .collect();
    let before = flagged.iter().filter(|s| **s < fault_at).count() as f64 / fault_at as f64;
    let developed = fault_at + 10;
    let after =
        flagged.iter().filter(|s| **s >= developed).count() as f64 / (samples - developed) as f64;
    assert!(
        before < 0.25,
        "normal operation (about 11% true anomalies) flagged {before:.2}:\n{}",
        out.stdout
    );
    assert!(
        after > 0.9,
        "the developed fault flagged only {after:.2}:\n{}",
        out.stdout
    );

    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_else(|| panic!("no summary:\n{}", out.stdout));
    assert_eq!(value(summary, "samples"), samples.to_string());
    assert_eq!(value(summary, "feedback"), samples.to_string());
    assert_eq!(value(summary, "model"), "pump-anomaly@1.1");
    let correct: u64 = value(summary, "correct").parse().unwrap();
    assert!(
        correct as f64 / samples as f64 > 0.85,
        "the demo model is right about 96% of the time: {summary}"
    );
    // Every label reached a telemetry window, counted once, scored as the example scored it.
    let counted = wait_until(
        Duration::from_secs(30),
        "feedback in the telemetry windows",
        || {
            let total = spooled_feedback(&agent);
            (total.count >= samples).then_some(total)
        },
    );
    assert_eq!(counted.count, samples);
    assert_eq!(counted.correct, correct);
}

#[test]
fn recorded_readings_from_standard_input_are_scored() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_serving_the_pump_model(dir.path(), &[]);
    let csv = dir.path().join("readings.csv");
    // A healthy reading, then a hot, shaking bearing.
    std::fs::write(
        &csv,
        "temperature_c,vibration_rms,current_a,pressure_bar,label\n48.1,2.31,11.2,6.1,0\n73.5,7.9,12.8,5.6,1\n",
    )
    .unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_sensor-anomaly"))
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--input")
            .arg("-")
            .stdin(std::fs::File::open(&csv).unwrap()),
    );
    let anomalies: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("anomaly "))
        .collect();
    assert_eq!(anomalies.len(), 1, "{}", out.stdout);
    assert_eq!(value(anomalies[0], "sample"), "1");
    assert_eq!(value(anomalies[0], "truth"), "1");
    assert!(
        out.stdout
            .contains("summary samples=2 flagged=1 true_anomalies=1 correct=2 feedback=2"),
        "{}",
        out.stdout
    );
}
