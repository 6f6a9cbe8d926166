//! The controller link over a real Mosquitto with mutual TLS, against a test peer that plays the
//! controller through the protocol crate.

use std::time::{Duration, Instant};

use edgefleet_client::Tensor;
use edgefleet_protocol::messages::DeviceBody;
use edgefleet_protocol::{DeviceId, DeviceMacKey};
use edgefleet_tests::agent::{AgentProcess, wait_until};
use edgefleet_tests::broker::{Mosquitto, TestPki, mosquitto_available};
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::fixture;
use edgefleet_tests::peer::ControllerPeer;

use crate::{Setup, agent_bin, install_ok};

const KEY: [u8; 32] = [7; 32];

fn linked_agent(dir: &std::path::Path, pki: &TestPki, broker: &Mosquitto) -> Setup {
    let fleet = TestFleet::new(&dir.join("fleet"));
    let device = pki.issue("test-device", &[]);
    let mac_key = dir.join("mac.key");
    std::fs::write(&mac_key, hex::encode(KEY)).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", broker.addr.port());
    let env = [
        ("EDGEFLEET_MQTT_URL", url.as_str()),
        ("EDGEFLEET_MQTT_CA", pki.ca.to_str().unwrap()),
        ("EDGEFLEET_MQTT_CERT", device.cert.to_str().unwrap()),
        ("EDGEFLEET_MQTT_KEY", device.key.to_str().unwrap()),
        ("EDGEFLEET_MQTT_MAC_KEY", mac_key.to_str().unwrap()),
        ("EDGEFLEET_MQTT_KEEP_ALIVE_S", "5"),
        ("EDGEFLEET_TELEMETRY_WINDOW_S", "1"),
    ];
    let mut agent = AgentProcess::start(&agent_bin(), &fleet, &dir.join("state"), &env);
    agent.wait_ready();
    Setup {
        fleet,
        agent,
        dir: tempfile::tempdir().unwrap(),
    }
}

#[test]
fn reports_reach_the_controller_exactly_once_across_a_broker_outage() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let mut broker = Mosquitto::start(&pki, &dir.path().join("broker"), "edgefleet-controller");
    let controller = pki.issue("edgefleet-controller", &[]);
    let device = DeviceId::new("test-device").unwrap();
    let peer = ControllerPeer::start(broker.addr, &pki.ca, &controller, device, DeviceMacKey(KEY));
    let setup = linked_agent(dir.path(), &pki, &broker);
    let spec = BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    );
    let digest = install_ok(&setup, &spec);
    let mut client = setup.agent.client();
    let mut infer = || {
        client
            .infer(&[("x", Tensor::f32(vec![1, 4], vec![1.0, 2.0, 3.0, 4.0]))])
            .map(|_| ())
            .unwrap()
    };

    // Telemetry flows and is acknowledged; the retained status names the active model.
    let started = Instant::now();
    while peer.with(|i| i.telemetry()) < 3 {
        infer();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no telemetry reached the peer; broker log:\n{}\nagent log:\n{}",
            broker.log_text(),
            setup.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = peer.with(|i| i.status.clone()).expect("a retained status");
    match status.body {
        DeviceBody::Status(s) => {
            assert!(s.online);
            assert_eq!(s.active.unwrap().manifest_digest.to_hex(), digest);
        }
        other => panic!("status topic carried {other:?}"),
    }

    // The broker dies (losing every session) for a few seconds; inference goes on.
    broker.kill();
    let outage = Instant::now();
    let mut served_during_outage = 0;
    while outage.elapsed() < Duration::from_secs(4) {
        infer();
        served_during_outage += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.restart();
    for _ in 0..20 {
        infer();
    }
    // Everything spooled meanwhile is delivered, and the spool empties as acks arrive.
    wait_until(
        Duration::from_secs(60),
        "the spool to drain after the outage",
        || (setup.agent.status()["spool"]["pending"] == 0).then_some(()),
    );
    let high_water: u64 = std::fs::read_to_string(setup.agent.state_dir.join("spool/seq"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (seqs, duplicates, rejected, windows) = peer.with(|i| {
        (
            i.reports.keys().copied().collect::<Vec<_>>(),
            i.duplicates,
            i.rejected.clone(),
            i.telemetry(),
        )
    });
    assert_eq!(
        seqs,
        (1..=high_water).collect::<Vec<_>>(),
        "every report, each sequence number once, no gaps"
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    assert!(
        windows >= 6,
        "windows from before, during and after the outage: {windows}"
    );
    assert!(
        served_during_outage > 50,
        "inference kept working during the outage"
    );
    eprintln!(
        "{high_water} reports ingested once each ({windows} telemetry windows); {duplicates} resent copies deduplicated"
    );
}
