//! The controller link over a real Mosquitto with mutual TLS, against a test peer that plays the
//! controller through the protocol crate.

use std::time::{Duration, Instant};

use edgefleet_client::Tensor;
use edgefleet_protocol::messages::{
    DeviceBody, DeviceEvent, DeviceMessage, EventKind, FailureCode, ModelRef, Status,
};
use edgefleet_protocol::{Arch, DeviceId, DeviceMacKey, ModelName, ModelVersion};
use edgefleet_tests::agent::{AgentProcess, wait_until};
use edgefleet_tests::broker::{Mosquitto, TestPki, mosquitto_available};
use edgefleet_tests::bundle_server::BundleServer;
use edgefleet_tests::enroll_server::EnrollServer;
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::fixture;
use edgefleet_tests::peer::ControllerPeer;

use crate::{Setup, agent_bin, install_ok};

const KEY: [u8; 32] = [7; 32];

fn linked_agent(dir: &std::path::Path, pki: &TestPki, broker: &Mosquitto) -> Setup {
    linked_agent_with(dir, pki, broker, &[])
}

/// An agent linked to `broker` with a device certificate from `pki`, plus `extra` settings.
pub fn linked_agent_with(
    dir: &std::path::Path,
    pki: &TestPki,
    broker: &Mosquitto,
    extra: &[(&str, &str)],
) -> Setup {
    let fleet = TestFleet::new(&dir.join("fleet"));
    let device = pki.issue("test-device", &[]);
    let mac_key = dir.join("mac.key");
    std::fs::write(&mac_key, hex::encode(KEY)).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", broker.addr.port());
    let mut env = vec![
        ("EDGEFLEET_MQTT_URL", url.as_str()),
        ("EDGEFLEET_MQTT_CA", pki.ca.to_str().unwrap()),
        ("EDGEFLEET_MQTT_CERT", device.cert.to_str().unwrap()),
        ("EDGEFLEET_MQTT_KEY", device.key.to_str().unwrap()),
        ("EDGEFLEET_MQTT_MAC_KEY", mac_key.to_str().unwrap()),
        ("EDGEFLEET_MQTT_KEEP_ALIVE_S", "5"),
        ("EDGEFLEET_TELEMETRY_WINDOW_S", "1"),
    ];
    env.extend_from_slice(extra);
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
        capture: None,
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
    let dir = tempfile::tempdir().unwrap();
    let Link { pki, broker, peer } = link(dir.path());
    let setup = linked_agent(dir.path(), &pki, &broker);
    let server = BundleServer::start(&pki);
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
            i.reports.values().any(|m| matches!(&m.body, DeviceBody::Event(e) if matches!(e.kind, EventKind::InstallFailed { reason: FailureCode::PayloadHash })))
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
    let enroll_url = enroll.url();
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

/// A broker, a controller peer for `test-device` and the fleet PKI, in `dir`.
pub struct Link {
    pub pki: std::sync::Arc<TestPki>,
    pub broker: Mosquitto,
    pub peer: ControllerPeer,
}

pub fn link(dir: &std::path::Path) -> Link {
    let pki = std::sync::Arc::new(TestPki::new(&dir.join("pki")));
    let broker = Mosquitto::start(&pki, &dir.join("broker"), "edgefleet-controller");
    let peer = controller_peer(&pki, &broker);
    Link { pki, broker, peer }
}

fn controller_peer(pki: &TestPki, broker: &Mosquitto) -> ControllerPeer {
    let controller = pki.issue("edgefleet-controller", &[]);
    ControllerPeer::start(
        broker.addr,
        &pki.ca,
        &controller,
        DeviceId::new("test-device").unwrap(),
        DeviceMacKey(KEY),
    )
}

/// The first event of `kind` about `digest` that reached the peer.
fn event_at(peer: &ControllerPeer, kind: &str, digest: &str) -> Option<DeviceEvent> {
    peer.with(|i| {
        i.reports.values().find_map(|m| match &m.body {
            DeviceBody::Event(e)
                if format!("{:?}", e.kind).starts_with(kind)
                    && e.model
                        .as_ref()
                        .is_some_and(|m| m.manifest_digest.to_hex() == digest) =>
            {
                Some(e.clone())
            }
            _ => None,
        })
    })
}

#[test]
fn servers_without_a_fleet_ca_certificate_are_refused_with_a_clear_error() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Link { pki, broker, peer } = link(dir.path());
    // A CA the device has never heard of, e.g. a server certificate from a public CA or an
    // impostor on the network path.
    let foreign = std::sync::Arc::new(TestPki::named(
        &dir.path().join("foreign-pki"),
        "Some other CA",
    ));
    let setup = linked_agent(dir.path(), &pki, &broker);

    // A bundle server with a foreign certificate: the download fails at once, no retries, with
    // an event that says why.
    let server = BundleServer::start(&foreign);
    let spec = BundleSpec::fixture(
        &fixture("scale_f32.onnx"),
        "scale",
        1,
        ("x", &[Some(1), Some(4)]),
        ("y", &[Some(1), Some(4)]),
    );
    let (path, digest) = setup.fleet.bundle(&spec);
    let url = server.put("a.efb", std::fs::read(&path).unwrap());
    peer.assign(assignment(&setup, 1, &path, &digest, &url));
    let failed = wait_until(
        Duration::from_secs(60),
        "the download to be refused",
        || event_at(&peer, "InstallFailed", &digest),
    );
    assert_eq!(
        failed.kind,
        EventKind::InstallFailed {
            reason: FailureCode::Download
        }
    );
    assert!(
        failed.detail.contains(&url)
            && failed.detail.contains("TLS certificate is refused")
            && failed.detail.contains("UnknownIssuer")
            && failed.detail.contains("issued by the fleet CA"),
        "{}",
        failed.detail
    );
    assert!(
        server.requests().is_empty(),
        "no request was sent over the untrusted connection: {:?}",
        server.requests()
    );
    assert!(active_digest(&setup).is_none());
    let part = setup
        .agent
        .state_dir
        .join("downloads")
        .join(format!("{digest}.part"));
    assert!(
        !part.exists(),
        "nothing was written from the untrusted server"
    );
    // The same bundle from a server with a fleet certificate installs.
    let trusted = BundleServer::start(&pki);
    let url = trusted.put("a.efb", std::fs::read(&path).unwrap());
    peer.assign(assignment(&setup, 2, &path, &digest, &url));
    wait_until(Duration::from_secs(60), "the model to activate", || {
        (active_digest(&setup).as_deref() == Some(digest.as_str())).then_some(())
    });

    // Enrollment with a foreign certificate stops the agent with the reason, storing nothing.
    let enroll = EnrollServer::start(foreign.clone(), hex::encode(KEY), String::new());
    enroll.tokens.lock().unwrap().insert(String::from("token"));
    let identity = dir.path().join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    let file = |name: &str| identity.join(name).to_str().unwrap().to_owned();
    let mqtt_url = format!("mqtts://127.0.0.1:{}", broker.addr.port());
    let enroll_url = enroll.url();
    let enrolling = |ca: &str| {
        vec![
            ("EDGEFLEET_MQTT_URL", mqtt_url.clone()),
            ("EDGEFLEET_MQTT_CA", ca.to_owned()),
            ("EDGEFLEET_MQTT_CERT", file("device.pem")),
            ("EDGEFLEET_MQTT_KEY", file("device-key.pem")),
            ("EDGEFLEET_MQTT_MAC_KEY", file("mac.key")),
            ("EDGEFLEET_ENROLL_URL", enroll_url.clone()),
            ("EDGEFLEET_ENROLL_TOKEN", String::from("token")),
        ]
    };
    let fleet = TestFleet::new(&dir.path().join("fleet-2"));
    for (ca, expected) in [
        (
            pki.ca.to_str().unwrap().to_owned(),
            "presented a TLS certificate the device does not trust (invalid peer certificate: UnknownIssuer); it must be issued by the fleet CA",
        ),
        // Without the fleet CA there is nothing to check the server against.
        (
            file("missing-ca.pem"),
            "cannot enroll over HTTPS: the fleet CA",
        ),
    ] {
        let owned = enrolling(&ca);
        let env: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut agent =
            AgentProcess::start(&agent_bin(), &fleet, &dir.path().join("state-2"), &env);
        let status = agent.wait_exit(Duration::from_secs(30));
        assert!(!status.success());
        let log = agent.log_text();
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    assert_eq!(
        enroll.tokens.lock().unwrap().len(),
        1,
        "the token was never presented"
    );
    assert_eq!(
        std::fs::read_dir(&identity).unwrap().count(),
        0,
        "nothing is stored for a failed enrollment"
    );
}

#[test]
fn the_download_bandwidth_cap_bounds_the_transfer_rate() {
    if !mosquitto_available() {
        return;
    }
    const CAP: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let Link { pki, broker, peer } = link(dir.path());
    let cap = CAP.to_string();
    let setup = linked_agent_with(
        dir.path(),
        &pki,
        &broker,
        &[("EDGEFLEET_DOWNLOAD_MAX_BYTES_PER_S", cap.as_str())],
    );
    let server = BundleServer::start(&pki);
    // Silero VAD: a 1.3 MB bundle, about 5 s at the cap.
    let (path, digest) = setup.fleet.bundle(&BundleSpec::silero(&crate::silero(), 1));
    let size = std::fs::metadata(&path).unwrap().len();
    let url = server.put("vad.efb", std::fs::read(&path).unwrap());
    peer.assign(assignment(&setup, 1, &path, &digest, &url));
    wait_until(Duration::from_secs(120), "the model to activate", || {
        (active_digest(&setup).as_deref() == Some(digest.as_str())).then_some(())
    });
    let events = wait_until(
        Duration::from_secs(30),
        "the download's events to reach the peer",
        || {
            Some((
                event_at(&peer, "Downloading", &digest)?,
                event_at(&peer, "Installed", &digest)?,
            ))
        },
    );
    // The agent stamps "downloading" before its request and "installed" after the whole file
    // arrived and was verified: the transfer fits between them. It cannot be faster than the
    // cap allows; 10% margin for clock granularity.
    let elapsed_ms = events.1.at.millis_since(events.0.at);
    let minimum_ms = size * 1000 / CAP;
    assert!(
        elapsed_ms as f64 >= minimum_ms as f64 * 0.9,
        "{size} bytes arrived in {elapsed_ms} ms; at {CAP} B/s that takes at least {minimum_ms} ms"
    );
    assert_eq!(
        server.requests(),
        vec![String::from("/bundles/vad.efb -")],
        "one request, no resumes"
    );
    eprintln!("{size} bytes at a cap of {CAP} B/s: {elapsed_ms} ms (at least {minimum_ms} ms)");
}

#[test]
fn after_an_automatic_rollback_the_retained_status_names_the_previous_model() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Link { pki, broker, peer } = link(dir.path());
    let started = Instant::now();
    let setup = linked_agent(dir.path(), &pki, &broker);
    let server = BundleServer::start(&pki);
    let silero = crate::silero();
    let (good_path, good) = setup.fleet.bundle(&BundleSpec::silero(&silero, 1));
    let good_url = server.put("good.efb", std::fs::read(&good_path).unwrap());
    peer.assign(assignment(&setup, 1, &good_path, &good, &good_url));
    wait_until(
        Duration::from_secs(60),
        "the first model to activate",
        || event_at(&peer, "Activated", &good),
    );
    // The next release fails its activation health check: its golden vector does not match.
    let mut bad_spec = BundleSpec::silero(&silero, 2);
    bad_spec.golden[0].outputs = vec![edgefleet_tests::fleet::named("output", &[1, 1], vec![0.9])];
    let (bad_path, bad) = setup.fleet.bundle(&bad_spec);
    let bad_url = server.put("bad.efb", std::fs::read(&bad_path).unwrap());
    peer.assign(assignment(&setup, 2, &bad_path, &bad, &bad_url));
    let rolled_back = wait_until(Duration::from_secs(60), "the rollback event", || {
        event_at(&peer, "RolledBack", &bad)
    });
    let good_ref = ModelRef {
        name: ModelName::new("silero-vad").unwrap(),
        version: ModelVersion::new("6.2.1").unwrap(),
        release: 1,
        manifest_digest: good.parse().unwrap(),
    };
    assert_eq!(
        rolled_back.kind,
        EventKind::RolledBack {
            reason: FailureCode::GoldenMismatch,
            to: Some(good_ref.clone()),
        }
    );
    let expected = Status {
        online: true,
        agent_version: String::from(edgefleet_agent::trust::AGENT_VERSION),
        arch: Arch::new(std::env::consts::ARCH).unwrap(),
        active: Some(good_ref),
        // The failed model is gone; nothing is kept to fall back to.
        previous: None,
        shadow: None,
        assignment_seq: 2,
        uptime_s: 0,
    };
    let check = |message: &DeviceMessage, what: &str| {
        assert_eq!(message.device.as_str(), "test-device", "{what}");
        assert_eq!(message.seq, 0, "{what}: status is not a spooled report");
        assert!(
            message.sent_at >= rolled_back.at,
            "{what}: sent after the rollback"
        );
        let DeviceBody::Status(status) = &message.body else {
            panic!("{what}: the status topic carried {:?}", message.body);
        };
        assert!(
            status.uptime_s <= started.elapsed().as_secs(),
            "{what}: uptime {} s",
            status.uptime_s
        );
        assert_eq!(
            Status {
                uptime_s: 0,
                ..status.clone()
            },
            expected,
            "{what}"
        );
    };
    let latest = wait_until(
        Duration::from_secs(30),
        "a status sent after the rollback",
        || {
            peer.with(|i| i.status.clone())
                .filter(|m| m.sent_at >= rolled_back.at)
        },
    );
    check(&latest, "the latest status");
    // The local view agrees, and the previous model answers.
    assert_eq!(active_digest(&setup).as_deref(), Some(good.as_str()));
    let (probability, digest) = crate::silero_silence(&setup);
    assert_eq!(digest, good);
    assert!((probability - 0.001_67).abs() < 1e-4);

    // It is retained: a controller that connects afterwards receives the same message.
    drop(peer);
    let late = controller_peer(&pki, &broker);
    let retained = wait_until(
        Duration::from_secs(30),
        "the retained status for a new subscriber",
        || late.with(|i| i.status.clone()),
    );
    check(&retained, "the retained status");
    assert_eq!(retained, latest);
}
