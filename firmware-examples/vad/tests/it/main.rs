//! `edgefleet-vad` against a real agent serving the real Silero VAD model: the speech it finds
//! in the generated recording, read from a WAV file over the Unix socket and as raw PCM from
//! standard input over TCP, and its refusal of a model that is not Silero.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use edgefleet_tests::agent::AgentProcess;
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::{SILERO_VAD_16K, fetch, fixture};
use edgefleet_tests::{bin, run_err, run_ok, run_with_input};
use edgefleet_vad::segments::SegmentSeconds;

/// How far each detected boundary may be from the generated one. Silero answers per 32 ms
/// frame, the segmenter pads by 30 ms and needs 100 ms of silence to end a segment, and the
/// model itself reacts to an onset or a decay within a few frames.
const TOLERANCE_S: f64 = 0.15;

fn vad() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgefleet-vad"))
}

struct Setup {
    agent: AgentProcess,
    dir: tempfile::TempDir,
}

/// A real agent with `spec` installed and active.
fn agent_serving(spec: &BundleSpec) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fleet = TestFleet::new(&dir.path().join("fleet"));
    let mut agent = AgentProcess::start(
        &bin("edgefleet-agent"),
        &fleet,
        &dir.path().join("state"),
        &[],
    );
    agent.wait_ready();
    let (bundle, _) = fleet.bundle(spec);
    let answer = agent
        .install(&bundle)
        .unwrap_or_else(|err| panic!("install: {err}\nlog:\n{}", agent.log_text()));
    assert_eq!(answer["result"], "activated", "{answer}");
    Setup { agent, dir }
}

fn silero_agent() -> Setup {
    agent_serving(&BundleSpec::silero(&fetch(SILERO_VAD_16K), 1))
}

fn parse_segments(stdout: &str) -> Vec<SegmentSeconds> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect()
}

/// The generated recording and where its speech is, from `edgefleet-vad synth`.
fn synth(dir: &Path) -> (PathBuf, Vec<SegmentSeconds>) {
    let wav = dir.join("speech.wav");
    let out = run_ok(vad().args(["synth", "--json", "--out"]).arg(&wav));
    (wav, parse_segments(&out.stdout))
}

#[track_caller]
fn assert_matches(found: &[SegmentSeconds], truth: &[SegmentSeconds], stderr: &str) {
    let show = |segments: &[SegmentSeconds]| {
        segments
            .iter()
            .map(|s| format!("{:.3}-{:.3}", s.start_s, s.end_s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let report = format!(
        "found [{}], generated [{}]\nstderr:\n{stderr}",
        show(found),
        show(truth)
    );
    assert_eq!(found.len(), truth.len(), "{report}");
    for (found, truth) in found.iter().zip(truth) {
        for (what, got, want) in [
            ("start", found.start_s, truth.start_s),
            ("end", found.end_s, truth.end_s),
        ] {
            assert!(
                (got - want).abs() <= TOLERANCE_S,
                "{what} {got:.3} s is more than {TOLERANCE_S} s from {want:.3} s: {report}"
            );
        }
    }
}

#[test]
fn finds_the_speech_regions_of_the_generated_wav_through_the_agent() {
    let setup = silero_agent();
    let (wav, truth) = synth(setup.dir.path());
    assert_eq!(truth.len(), 3);
    let out = run_ok(
        vad()
            .args(["detect", "--json", "--socket"])
            .arg(&setup.agent.socket)
            .arg(&wav),
    );
    assert_matches(&parse_segments(&out.stdout), &truth, &out.stderr);
    // 6.3 s of audio is 197 frames of 32 ms (the last one short), each one agent call.
    assert!(out.stderr.contains("silero-vad@6.2.1"), "{}", out.stderr);
    assert!(out.stderr.contains("in 197 frames"), "{}", out.stderr);
    let stats = setup.agent.client().stats().unwrap();
    assert_eq!(
        stats["requests"], 197,
        "the agent counted the example's calls: {stats}"
    );
}

#[test]
fn raw_pcm_on_standard_input_over_tcp_finds_the_same_speech() {
    let setup = silero_agent();
    let (_, truth) = synth(setup.dir.path());
    let pcm: Vec<u8> = edgefleet_vad::synth::signal()
        .iter()
        .flat_map(|s| edgefleet_vad::synth::pcm16(*s).to_le_bytes())
        .collect();
    let out = run_with_input(
        vad()
            .args(["detect", "--raw", "--json", "--tcp"])
            .arg(setup.agent.api.to_string())
            .arg("-"),
        &pcm,
    );
    assert!(out.success(), "{}", out.stderr);
    assert_matches(&parse_segments(&out.stdout), &truth, &out.stderr);
}

#[test]
fn a_model_that_is_not_silero_is_refused_with_what_to_do() {
    let setup = agent_serving(&BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    ));
    let (wav, _) = synth(setup.dir.path());
    let out = run_err(
        vad()
            .args(["detect", "--socket"])
            .arg(&setup.agent.socket)
            .arg(&wav),
    );
    assert!(
        out.stderr.contains(
            "the agent's active model scale@1.1 is not Silero VAD 16 kHz (it has no input `input`)"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("assign a silero_vad_openvino_16k bundle"),
        "{}",
        out.stderr
    );
}
