//! Agent integration tests: real agent processes, real ONNX models through tract, real kills.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

mod activation;
mod crash;
mod feedback;
mod link;
mod serve;
mod telemetry;

use std::path::PathBuf;

use edgefleet_client::Tensor;
use edgefleet_tests::agent::AgentProcess;
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::{SILERO_VAD_16K, fetch};

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent"))
}

/// A fleet, a state directory and a running agent, cleaned up on drop.
#[derive(Debug)]
pub struct Setup {
    pub fleet: TestFleet,
    pub agent: AgentProcess,
    pub dir: tempfile::TempDir,
}

pub fn setup(env: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fleet = TestFleet::new(&dir.path().join("fleet"));
    let mut agent = AgentProcess::start(&agent_bin(), &fleet, &dir.path().join("state"), env);
    agent.wait_ready();
    Setup { fleet, agent, dir }
}

/// Installs `spec` and expects it to activate; returns its manifest digest.
pub fn install_ok(setup: &Setup, spec: &BundleSpec) -> String {
    let (path, digest) = setup.fleet.bundle(spec);
    let answer = setup
        .agent
        .install(&path)
        .unwrap_or_else(|err| panic!("install failed: {err}\nlog:\n{}", setup.agent.log_text()));
    assert_eq!(answer["result"], "activated", "{answer}");
    digest
}

pub fn silero() -> PathBuf {
    fetch(SILERO_VAD_16K)
}

/// One Silero call on 576 zeros with a zero state; returns (probability, model digest).
pub fn silero_silence(setup: &Setup) -> (f32, String) {
    let reply = setup
        .agent
        .client()
        .infer(&[
            ("input", Tensor::f32(vec![1, 576], vec![0.0; 576])),
            ("state", Tensor::f32(vec![2, 1, 128], vec![0.0; 256])),
        ])
        .unwrap();
    (reply.outputs["output"].to_f32()[0], reply.model.digest)
}
