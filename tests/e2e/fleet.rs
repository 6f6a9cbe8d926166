//! The controller end to end with real processes: `edgefleet-controller` and two
//! `edgefleet-agent`s that enroll over HTTPS with one-time tokens; the model is registered and
//! assigned over the admin API; every agent activates it and answers inference; each agent's
//! telemetry is ingested exactly once; then one device is revoked and is cut off (its session
//! dropped, its reconnects refused, its reports and bundle downloads refused) while the other
//! keeps working.
//!
//! Three ways: the embedded broker on SQLite (where wrong logins must be refused at CONNECT, and
//! enrolling under the controller's own name is refused), and Mosquitto run with the
//! configuration `edgefleet-controller mosquitto-config` writes, on SQLite and on PostgreSQL
//! (where a device using another device's topics must be refused by the ACL, and a revoked
//! certificate by the CRL once the controller's reload command ran).

use std::path::Path;
use std::time::Duration;

use edgefleet_client::Tensor;
use edgefleet_protocol::{DeviceMacKey, Topic, TopicKind, topics};
use edgefleet_tests::agent::{AgentProcess, free_port, wait_until};
use edgefleet_tests::broker::{Mosquitto, mosquitto_available};
use edgefleet_tests::controller::{
    ControllerProcess, ControllerSpec, device_identity, mosquitto_config,
};
use edgefleet_tests::postgres::require_postgres;
use edgefleet_tests::probe::{Probe, Refused};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};

const REVOKED: &str = "pump-01";
const KEPT: &str = "pump-02";
/// Inference requests per agent before the revocation, and after it.
const BEFORE: u64 = 20;
const AFTER: u64 = 10;
const WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// Dropped in field order: agents, controller, broker, then the files.
struct Fleet {
    agents: Vec<(&'static str, AgentProcess)>,
    controller: ControllerProcess,
    broker: Option<Mosquitto>,
    dir: tempfile::TempDir,
    digest: String,
}

impl Fleet {
    fn agent(&self, device: &str) -> &AgentProcess {
        &self.agents.iter().find(|(id, _)| *id == device).unwrap().1
    }

    fn state_dir(&self, device: &str) -> &Path {
        &self.agent(device).state_dir
    }

    /// What a failed wait should show: the controller's, the broker's and the agents' logs.
    fn logs(&self) -> String {
        let mut out = format!("controller log:\n{}", self.controller.log_text());
        if let Some(broker) = &self.broker {
            out.push_str(&format!("\nmosquitto log:\n{}", broker.log_text()));
        }
        for (id, agent) in &self.agents {
            out.push_str(&format!("\n{id} log:\n{}", agent.log_text()));
        }
        out
    }
}

/// Controller (and Mosquitto), the demo model registered, two agents enrolled and online.
fn start_fleet(kind: BrokerKind, database: Option<String>) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut spec = ControllerSpec {
        database,
        external: None,
    };
    let broker = (kind == BrokerKind::Mosquitto).then(|| {
        let addr = free_port();
        let out = dir.path().join("mosquitto");
        let written = mosquitto_config(&data, &out, addr);
        assert!(written.stdout.contains("crl"), "{}", written.stdout);
        let conf = std::fs::read_to_string(out.join("mosquitto.conf")).unwrap();
        for line in [
            "require_certificate true",
            "use_identity_as_username true",
            "crlfile /",
        ] {
            assert!(conf.contains(line), "{line:?} missing in:\n{conf}");
        }
        let broker = Mosquitto::start_generated(&out, addr);
        // Mosquitto re-reads its crlfile on SIGHUP only.
        let reload = format!("kill -HUP {}", broker.pid().unwrap());
        spec.external = Some((addr, reload));
        broker
    });
    let controller = ControllerProcess::start(&data, &spec);
    let digest = controller.register_demo_model();
    let agents = [REVOKED, KEPT]
        .into_iter()
        .map(|id| {
            let mut agent = controller.enroll_agent(id, &dir.path().join("agents").join(id));
            agent.wait_ready();
            (id, agent)
        })
        .collect();
    let fleet = Fleet {
        dir,
        broker,
        controller,
        agents,
        digest,
    };
    for id in [REVOKED, KEPT] {
        fleet
            .controller
            .wait_device(id, "enrolled and online", |d| d["online"] == true);
    }
    fleet
}

/// `n` inference requests on `device`'s local API, every one answered.
fn infer(fleet: &Fleet, device: &str, n: u64) {
    let mut client = fleet.agent(device).client();
    for i in 0..n {
        let row = vec![60.0 + i as f32 % 7.0, 2.5, 11.0, 3.2];
        let reply = client
            .infer(&[("features", Tensor::f32(vec![1, 4], row))])
            .unwrap_or_else(|err| panic!("{device} request {i}: {err}"));
        assert!(!reply.outputs.is_empty(), "{device}: no outputs");
    }
}

/// Telemetry windows in the agent's spool (sent or not, not yet acknowledged).
fn spooled_telemetry(agent: &AgentProcess) -> usize {
    std::fs::read_dir(agent.state_dir.join("spool"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".telemetry.cbor"))
        })
        .count()
}

fn spool_pending(agent: &AgentProcess) -> u64 {
    agent.status()["spool"]["pending"].as_u64().unwrap()
}

/// Assign, activate, infer, and see each agent's telemetry stored exactly once.
fn assign_and_serve(fleet: &Fleet) {
    let ctl = &fleet.controller;
    for id in [REVOKED, KEPT] {
        let (status, body) = ctl.post(
            &format!("/api/v1/devices/{id}/assign"),
            &serde_json::json!({"model": fleet.digest}),
        );
        assert_eq!(status, 200, "assign {id}: {body}");
    }
    for id in [REVOKED, KEPT] {
        ctl.wait_device(id, "the model active", |d| {
            d["active_digest"].as_str() == Some(fleet.digest.as_str())
        });
        let mut client = fleet.agent(id).client();
        wait_until(WAIT, &format!("{id}'s API to serve the model"), || {
            (client.model().ok()?.model.digest == fleet.digest).then_some(())
        });
        infer(fleet, id, BEFORE);
    }
    for (id, agent) in &fleet.agents {
        wait_until(WAIT, &format!("{id}'s telemetry acked"), || {
            let (_, inferences) = ctl.telemetry(id);
            (inferences >= BEFORE && spool_pending(agent) == 0).then_some(())
        });
        // Everything is acked, so nothing more will come: each inference counted once.
        let (windows, inferences) = ctl.telemetry(id);
        assert_eq!(
            inferences, BEFORE,
            "{id}: {windows} windows count {inferences} inferences"
        );
    }
}

fn mac_password(state_dir: &Path, device: &str) -> String {
    let hex_key = std::fs::read_to_string(state_dir.join("mac.key")).unwrap();
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut key).unwrap();
    DeviceMacKey(key).mqtt_password(device)
}

fn topic(device: &str, kind: TopicKind) -> String {
    Topic::new(device.parse().unwrap(), kind).to_string()
}

/// The embedded broker checks the login on every CONNECT: the client id must be the device
/// and the password its MAC-derived one; the device's certificate alone does not let it in.
/// (The agents themselves, online with the right login, are the positive case.)
fn embedded_broker_refuses_wrong_logins(fleet: &Fleet) {
    let (ca, mqtt) = (fleet.controller.ca_path(), fleet.controller.mqtt);
    let state = fleet.state_dir(REVOKED);
    let identity = device_identity(state);
    let password = mac_password(state, REVOKED);
    for (client_id, user, password, case) in [
        (REVOKED, REVOKED, "0".repeat(64), "a wrong password"),
        (KEPT, KEPT, password.clone(), "another device's id"),
        (
            KEPT,
            REVOKED,
            password.clone(),
            "a client id that is not the user",
        ),
    ] {
        let refused = Probe::connect(mqtt, &ca, &identity, client_id, Some((user, &password)))
            .err()
            .unwrap_or_else(|| panic!("{case} was accepted"));
        // After the TLS handshake with the device's valid certificate: at CONNECT.
        assert!(
            matches!(refused, Refused::Connect(_)),
            "{case}: {refused:?}"
        );
    }
}

/// No device can enroll under the controller's own name, which Mosquitto's ACL lets read and
/// write every fleet topic.
fn enrollment_refuses_the_controllers_name(fleet: &Fleet) {
    let name = "edgefleet-controller";
    let mut agent = fleet
        .controller
        .enroll_agent(name, &fleet.dir.path().join("agents").join(name));
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains("reserved_device_id") || log.contains("is reserved"),
        "{log}"
    );
    assert!(!agent.state_dir.join("device.pem").exists());
}

/// With Mosquitto's generated ACL, a device (here `REVOKED`, before its revocation) can neither
/// read nor write another device's topics; nothing it tries there reaches anyone.
///
/// Mosquitto 2.0.11 refuses such a PUBLISH with PUBACK 0x87 (not authorized), but grants such a
/// SUBSCRIBE and then withholds every message on it, retained or live. The test accepts either
/// answer to the SUBSCRIBE and checks that nothing is delivered.
fn mosquitto_acl_keeps_devices_to_their_topics(fleet: &Fleet) {
    let (ca, mqtt) = (fleet.controller.ca_path(), fleet.controller.mqtt);
    let controller = fleet.controller.controller_identity();
    // Sees what the controller would see, and publishes as the controller may.
    let mut observer = Probe::connect(mqtt, &ca, &controller, "test-observer", None)
        .expect("the controller's identity connects");
    let everything = format!("{}/+/+", topics::PREFIX);
    assert_eq!(
        observer.subscribe(&everything),
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    // Another client id than the agent's, so the agent keeps its session: the ACL goes by the
    // certificate's name.
    let mut intruder = Probe::connect(
        mqtt,
        &ca,
        &device_identity(fleet.state_dir(REVOKED)),
        "pump-01-probe",
        None,
    )
    .expect("the device's certificate connects");
    assert_eq!(
        intruder.subscribe(&topic(REVOKED, TopicKind::Ack)),
        SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "a device reads its own acks"
    );
    for kind in [
        TopicKind::Assignment,
        TopicKind::Ack,
        TopicKind::Telemetry,
        TopicKind::Status,
    ] {
        let answer = intruder.subscribe(&topic(KEPT, kind));
        assert!(
            matches!(
                answer,
                SubscribeReasonCode::NotAuthorized | SubscribeReasonCode::Success(_)
            ),
            "subscribing to {KEPT}'s {kind:?}: {answer:?}"
        );
    }
    let junk = b"intruder".as_slice();
    for kind in [
        TopicKind::Telemetry,
        TopicKind::Status,
        TopicKind::Assignment,
        TopicKind::Ack,
    ] {
        assert_eq!(
            intruder.publish(&topic(KEPT, kind), junk, kind == TopicKind::Assignment),
            PubAckReason::NotAuthorized,
            "publishing on {KEPT}'s {kind:?}"
        );
    }
    // The broker delivers in order: once a later message arrives, an earlier one would have.
    let own = intruder.publish(&topic(REVOKED, TopicKind::Telemetry), b"own", false);
    assert!(
        matches!(
            own,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "publishing on its own telemetry topic: {own:?}"
    );
    observer.receive("the intruder's own message", |d| d.payload == b"own");
    assert!(
        observer.delivered.iter().all(|d| d.payload != junk),
        "a refused publish was delivered: {:?}",
        observer.delivered
    );
    // Nothing on the other device's topics reaches the intruder: not its retained assignment,
    // not a live message (sent as the controller, before a marker on the intruder's own topic).
    let secret = b"for pump-02 only".as_slice();
    observer.publish(&topic(KEPT, TopicKind::Telemetry), secret, false);
    observer.publish(&topic(REVOKED, TopicKind::Ack), b"marker", false);
    intruder.receive("the marker on its own topic", |d| d.payload == b"marker");
    assert!(
        intruder.delivered.iter().all(|d| !d.topic.contains(KEPT)),
        "another device's messages reached the intruder: {:?}",
        intruder.delivered
    );
    // The other device's retained assignment is still the controller's.
    let mut fresh = Probe::connect(mqtt, &ca, &controller, "test-observer-2", None).unwrap();
    let retained = topic(KEPT, TopicKind::Assignment);
    fresh.subscribe(&retained);
    let held = fresh.receive("the retained assignment", |d| d.topic == retained);
    assert!(!held.payload.is_empty() && held.payload != junk);
}

fn count(text: &str, needles: &[&str]) -> usize {
    text.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// Revokes `REVOKED` and checks it is cut off while `KEPT` keeps working.
fn revoke_and_cut_off(fleet: &Fleet, kind: BrokerKind) {
    let ctl = &fleet.controller;
    let refusals = || match (kind, &fleet.broker) {
        (BrokerKind::Mosquitto, Some(broker)) => {
            count(&broker.log_text(), &["certificate verify failed"])
        }
        _ => count(
            &ctl.log_text(),
            &["embedded broker refused a login", REVOKED],
        ),
    };
    let refused_before = refusals();
    let stored_before = ctl.telemetry(REVOKED);

    let (status, body) = ctl.post(
        &format!("/api/v1/devices/{REVOKED}/revoke"),
        &serde_json::Value::Null,
    );
    assert_eq!(status, 200, "revoke: {body}");
    assert!(ctl.device(REVOKED)["revoked_at"].is_i64());

    // Its session is dropped and its agent's reconnects are refused.
    wait_until(WAIT, "the revoked agent's reconnect to be refused", || {
        (refusals() > refused_before).then_some(())
    });
    if let Some(broker) = &fleet.broker {
        let log = broker.log_text();
        assert!(
            count(
                &log,
                &["Client pump-01 already connected, closing old connection"]
            ) > 0,
            "no session takeover in the broker log:\n{log}"
        );
    }
    // And so is anyone holding its certificate (and, on the embedded broker, its login).
    let state = fleet.state_dir(REVOKED);
    let password = mac_password(state, REVOKED);
    let login = (kind == BrokerKind::Embedded).then_some((REVOKED, password.as_str()));
    let again = Probe::connect(
        ctl.mqtt,
        &ctl.ca_path(),
        &device_identity(state),
        REVOKED,
        login,
    );
    let refused = again.expect_err("the revoked device connected again");
    match (kind, &refused) {
        // Its login is gone.
        (BrokerKind::Embedded, Refused::Connect(_)) => {}
        // Its certificate is on the CRL Mosquitto re-read.
        (BrokerKind::Mosquitto, Refused::Handshake(alert))
            if alert.contains("CertificateRevoked") => {}
        _ => panic!("{kind:?}: the revoked device was refused the wrong way: {refused:?}"),
    }

    // Its bundle downloads are refused; the other device's are not.
    assert_eq!(ctl.download_as(state, &fleet.digest).0, 403);
    let (status, length) = ctl.download_as(fleet.state_dir(KEPT), &fleet.digest);
    assert_eq!(status, 200);
    assert!(length > 0);

    // Both still answer inference; only the kept device's telemetry is stored.
    infer(fleet, REVOKED, AFTER);
    infer(fleet, KEPT, AFTER);
    // Everything it sent before was acked, so a telemetry file in its spool is a window from
    // after the revocation that the controller has not acknowledged.
    wait_until(
        WAIT,
        "the revoked agent to spool a telemetry window",
        || (spooled_telemetry(fleet.agent(REVOKED)) > 0).then_some(()),
    );
    wait_until(WAIT, "the kept device's new telemetry", || {
        (ctl.telemetry(KEPT).1 == BEFORE + AFTER).then_some(())
    });
    assert_eq!(ctl.telemetry(REVOKED), stored_before);
    assert_eq!(ctl.device(REVOKED)["online"], false);
}

fn run(kind: BrokerKind, database: Option<String>) {
    let started = std::time::Instant::now();
    let fleet = start_fleet(kind, database);
    let step = |name: &str| eprintln!("{kind:?}: {name} at {:?}", started.elapsed());
    step("fleet up");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assign_and_serve(&fleet);
        step("served, telemetry stored once");
        match kind {
            BrokerKind::Embedded => {
                embedded_broker_refuses_wrong_logins(&fleet);
                enrollment_refuses_the_controllers_name(&fleet);
            }
            BrokerKind::Mosquitto => mosquitto_acl_keeps_devices_to_their_topics(&fleet),
        }
        step("broker checks");
        revoke_and_cut_off(&fleet, kind);
        step("revoked device cut off");
    }));
    if let Err(panic) = outcome {
        eprintln!("{}", fleet.logs());
        let Fleet {
            agents,
            controller,
            broker,
            dir,
            ..
        } = fleet;
        drop((agents, controller, broker));
        eprintln!("test files kept in {}", dir.keep().display());
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn embedded_broker_on_sqlite_refuses_wrong_logins_and_cuts_off_a_revoked_device() {
    run(BrokerKind::Embedded, None);
}

#[test]
fn mosquitto_on_sqlite_enforces_the_acl_and_cuts_off_a_revoked_device() {
    if !mosquitto_available() {
        return;
    }
    run(BrokerKind::Mosquitto, None);
}

#[test]
fn mosquitto_on_postgresql_enforces_the_acl_and_cuts_off_a_revoked_device() {
    if !mosquitto_available() {
        return;
    }
    let Some(pg) =
        require_postgres("mosquitto_on_postgresql_enforces_the_acl_and_cuts_off_a_revoked_device")
    else {
        return;
    };
    run(BrokerKind::Mosquitto, Some(pg.url()));
    let revoked = pg
        .psql(&format!(
            "SELECT count(*) FROM devices WHERE id = '{REVOKED}' AND revoked_at IS NOT NULL"
        ))
        .unwrap();
    assert_eq!(revoked.trim(), "1");
}
