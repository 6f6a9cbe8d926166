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

fn assignment(
    setup: &Setup,
    seq: u64,
    spec_path: &std::path::Path,
    digest: &str,
    url: &str,
) -> Vec<u8> {
    use edgefleet_protocol::{AssignedModel, Assignment, Clock, SystemClock};
    let manifest = {
        let bytes = std::fs::read(spec_path).unwrap();
        let (signed, _) = edgefleet_protocol::bundle::split_header(&bytes)
            .unwrap()
            .unwrap();
        edgefleet_protocol::codec::decode::<edgefleet_protocol::Manifest>(
            "m",
            &signed.body,
            1 << 20,
        )
        .unwrap()
    };
    let now = SystemClock.now();
    Assignment {
        device: DeviceId::new("test-device").unwrap(),
        seq,
        issued_at: now,
        expires: now.plus_secs(3600),
        rollback: false,
        active: Some(AssignedModel {
            name: manifest.name,
            version: manifest.version,
            release: manifest.release,
            manifest_digest: digest.parse().unwrap(),
            bundle_url: url.to_owned(),
            bundle_size: std::fs::metadata(spec_path).unwrap().len(),
        }),
        shadow: None,
        rollout: None,
    }
    .sign(&setup.fleet.controller)
}

fn active_digest(setup: &Setup) -> Option<String> {
    setup.agent.status()["state"]["active"]["digest"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn signed_assignments_are_downloaded_resumed_verified_and_activated() {
    if !mosquitto_available() {
        return;
    }
    use edgefleet_tests::bundle_server::BundleServer;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let broker = Mosquitto::start(&pki, &dir.path().join("broker"), "edgefleet-controller");
    let controller = pki.issue("edgefleet-controller", &[]);
    let peer = ControllerPeer::start(
        broker.addr,
        &pki.ca,
        &controller,
        DeviceId::new("test-device").unwrap(),
        DeviceMacKey(KEY),
    );
    let setup = linked_agent(dir.path(), &pki, &broker);
    let server = BundleServer::start();
    let scale = |release| {
        BundleSpec::fixture(
            &fixture("scale_f32.onnx"),
            "scale",
            release,
            ("x", &[Some(1), Some(4)]),
            ("y", &[Some(1), Some(4)]),
        )
    };

    // 1. A download cut half-way resumes from the right offset, then the model activates.
    let (path_a, digest_a) = setup.fleet.bundle(&scale(1));
    let size_a = std::fs::metadata(&path_a).unwrap().len();
    let url_a = server.put("a.efb", std::fs::read(&path_a).unwrap());
    server.faults.lock().unwrap().cut_next_after = Some(size_a / 2);
    peer.assign(assignment(&setup, 1, &path_a, &digest_a, &url_a));
    wait_until(
        Duration::from_secs(60),
        "the assigned model to activate",
        || (active_digest(&setup).as_deref() == Some(digest_a.as_str())).then_some(()),
    );
    let requests = server.requests();
    assert_eq!(requests[0], "/bundles/a.efb -", "{requests:?}");
    assert_eq!(
        requests[1],
        format!("/bundles/a.efb bytes={}-", size_a / 2),
        "{requests:?}"
    );
    wait_until(
        Duration::from_secs(30),
        "the events to reach the controller",
        || {
            let events = peer.events();
            ["Downloading", "Installed", "Activated"]
                .iter()
                .all(|k| {
                    events
                        .iter()
                        .any(|(kind, d)| kind == k && d.as_deref() == Some(digest_a.as_str()))
                })
                .then_some(())
        },
    );

    // 2. A newer assignment arriving mid-download supersedes the old one.
    let silero = crate::silero();
    let (path_slow, digest_slow) = setup.fleet.bundle(&BundleSpec::silero(&silero, 1));
    let url_slow = server.put("slow.efb", std::fs::read(&path_slow).unwrap());
    server.faults.lock().unwrap().trickle = Some(Duration::from_millis(50));
    peer.assign(assignment(&setup, 2, &path_slow, &digest_slow, &url_slow));
    wait_until(
        Duration::from_secs(30),
        "the slow download to start",
        || {
            server
                .requests()
                .iter()
                .any(|r| r.starts_with("/bundles/slow.efb"))
                .then_some(())
        },
    );
    server.faults.lock().unwrap().trickle = None;
    let (path_b, digest_b) = setup.fleet.bundle(&scale(2));
    let url_b = server.put("b.efb", std::fs::read(&path_b).unwrap());
    peer.assign(assignment(&setup, 3, &path_b, &digest_b, &url_b));
    wait_until(
        Duration::from_secs(60),
        "the superseding model to activate",
        || (active_digest(&setup).as_deref() == Some(digest_b.as_str())).then_some(()),
    );
    assert!(
        !peer
            .events()
            .iter()
            .any(|(kind, d)| kind == "Activated" && d.as_deref() == Some(digest_slow.as_str())),
        "the superseded model never activated"
    );

    // 3. A byte corrupted in transit is caught before install; the current model keeps serving.
    let (path_c, digest_c) = setup.fleet.bundle(&scale(3));
    let size_c = std::fs::metadata(&path_c).unwrap().len();
    let url_c = server.put("c.efb", std::fs::read(&path_c).unwrap());
    server.faults.lock().unwrap().corrupt = Some((String::from("/bundles/c.efb"), size_c - 10));
    peer.assign(assignment(&setup, 4, &path_c, &digest_c, &url_c));
    wait_until(
        Duration::from_secs(60),
        "the corrupted bundle to be refused",
        || {
            peer.with(|i| {
            i.reports.values().any(|m| matches!(&m.body, DeviceBody::Event(e) if matches!(e.kind, edgefleet_protocol::messages::EventKind::InstallFailed { reason: edgefleet_protocol::messages::FailureCode::PayloadHash })))
        }).then_some(())
        },
    );
    assert_eq!(active_digest(&setup).as_deref(), Some(digest_b.as_str()));
    let reply = setup
        .agent
        .client()
        .infer(&[("x", Tensor::f32(vec![1, 4], vec![1.0; 4]))])
        .unwrap();
    assert_eq!(reply.model.digest, digest_b);

    // 4. A replayed old assignment changes nothing.
    peer.assign(assignment(&setup, 1, &path_a, &digest_a, &url_a));
    wait_until(Duration::from_secs(30), "the replay to be reported", || {
        peer.with(|i| {
            i.reports.values().any(
                |m| matches!(&m.body, DeviceBody::Event(e) if e.detail.contains("not newer than")),
            )
        })
        .then_some(())
    });
    assert_eq!(active_digest(&setup).as_deref(), Some(digest_b.as_str()));
    let leftovers: Vec<_> = std::fs::read_dir(setup.agent.state_dir.join("downloads"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "downloads left behind: {leftovers:?}");
}

#[test]
fn a_device_enrolls_with_a_one_time_token_then_connects_with_its_new_identity() {
    if !mosquitto_available() {
        return;
    }
    use edgefleet_tests::enroll_server::EnrollServer;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = std::sync::Arc::new(TestPki::new(&dir.path().join("pki")));
    let broker = Mosquitto::start(&pki, &dir.path().join("broker"), "edgefleet-controller");
    let controller = pki.issue("edgefleet-controller", &[]);
    let peer = ControllerPeer::start(
        broker.addr,
        &pki.ca,
        &controller,
        DeviceId::new("test-device").unwrap(),
        DeviceMacKey(KEY),
    );
    let url = format!("mqtts://127.0.0.1:{}", broker.addr.port());
    let enroll = EnrollServer::start(pki.clone(), hex::encode(KEY), url.clone());
    enroll
        .tokens
        .lock()
        .unwrap()
        .insert(String::from("one-time-token"));
    let fleet = TestFleet::new(&dir.path().join("fleet"));
    let identity = dir.path().join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    let path = |name: &str| identity.join(name).to_str().unwrap().to_owned();
    let enroll_url = format!("http://{}", enroll.addr);
    let env = |token: &'static str| {
        vec![
            ("EDGEFLEET_MQTT_URL", url.clone()),
            ("EDGEFLEET_MQTT_CA", pki.ca.to_str().unwrap().to_owned()),
            ("EDGEFLEET_MQTT_CERT", path("device.pem")),
            ("EDGEFLEET_MQTT_KEY", path("device-key.pem")),
            ("EDGEFLEET_MQTT_MAC_KEY", path("mac.key")),
            ("EDGEFLEET_MQTT_KEEP_ALIVE_S", String::from("5")),
            ("EDGEFLEET_ENROLL_URL", enroll_url.clone()),
            ("EDGEFLEET_ENROLL_TOKEN", String::from(token)),
        ]
    };
    let owned = env("one-time-token");
    let borrowed: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut agent = AgentProcess::start(&agent_bin(), &fleet, &dir.path().join("state"), &borrowed);
    agent.wait_ready();
    assert!(
        agent.log_text().contains("enrolled"),
        "{}",
        agent.log_text()
    );
    assert!(
        enroll.tokens.lock().unwrap().is_empty(),
        "the token was used up"
    );
    for (file, mode) in [
        ("device-key.pem", 0o600),
        ("mac.key", 0o600),
        ("device.pem", 0o644),
    ] {
        assert_eq!(
            std::fs::metadata(identity.join(file))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            mode,
            "{file}"
        );
    }
    // The new identity is accepted by the broker (mTLS, certificate name = device id) and the
    // controller hears the device's sealed, retained status.
    let status = wait_until(
        Duration::from_secs(30),
        "the enrolled device's status",
        || peer.with(|i| i.status.clone()),
    );
    assert_eq!(status.device.as_str(), "test-device");
    // A restart uses the stored identity; the token is not needed (and was used up).
    agent.set_env("EDGEFLEET_ENROLL_TOKEN", Some("spent"));
    agent.restart();
    agent.wait_ready();

    // Another device presenting the spent token is refused with the controller's reason.
    let other_identity = dir.path().join("other");
    std::fs::create_dir_all(&other_identity).unwrap();
    let mut refused_env = env("one-time-token");
    for (key, value) in &mut refused_env {
        if key.starts_with("EDGEFLEET_MQTT_") && value.starts_with(identity.to_str().unwrap()) {
            *value = value.replace(identity.to_str().unwrap(), other_identity.to_str().unwrap());
        }
    }
    let borrowed: Vec<(&str, &str)> = refused_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut refused =
        AgentProcess::start(&agent_bin(), &fleet, &dir.path().join("state-2"), &borrowed);
    let status = refused.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains("enrollment refused")
            && log.contains("the enrollment token is unknown or was used already"),
        "{log}"
    );
    assert!(
        !other_identity.join("device-key.pem").exists(),
        "nothing is stored for a refused enrollment"
    );
}
