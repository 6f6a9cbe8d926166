//! Unit tests of `device`: traces of inputs and what the device publishes and asks for.

use std::sync::Arc;

use bytes::Bytes;
use edgefleet_protocol::manifest::{Manifest, RuntimeSettings};
use edgefleet_protocol::messages::{ControllerBody, DeviceBody, EventKind, FailureCode};
use edgefleet_protocol::trust::{ReleaseKeyring, RootKeyring};
use edgefleet_protocol::{
    Arch, AssignedModel, Assignment, ControllerMessage, DeviceId, DeviceMacKey, DeviceMessage,
    ModelName, ModelVersion, Sha256Digest, Timestamp, Topic, TopicKind,
};
use edgefleet_tests::fleet::{ISSUED, TestFleet};
use expect_test::{Expect, expect};

use super::*;
use crate::behaviour::{Behaviour, BehaviourTable, Dist, ErrorRates};

const KEY: DeviceMacKey = DeviceMacKey([7; 32]);

fn model(version: &str, release: u64) -> AssignedModel {
    AssignedModel {
        name: ModelName::new("pump").unwrap(),
        version: ModelVersion::new(version).unwrap(),
        release,
        manifest_digest: Sha256Digest::of(version.as_bytes()),
        bundle_url: format!("https://ctl/api/v1/bundles/{version}"),
        bundle_size: 100,
    }
}

fn manifest(model: &AssignedModel) -> Arc<Manifest> {
    let runtime = RuntimeSettings {
        grace_window_s: 10,
        ..RuntimeSettings::default()
    };
    let temp = (0..100).map(f64::from).collect();
    let id = (model.name.as_str(), model.version.as_str(), model.release);
    Arc::new(crate::testing::manifest(
        id,
        &[("temp", temp)],
        &[("score", 1)],
        runtime,
    ))
}

/// Records what the device does, as lines of a trace.
struct Recorder {
    id: DeviceId,
    log: Vec<String>,
    behaviours: BehaviourTable,
    durable: u64,
    /// Whether the link takes publishes.
    accept: bool,
}

fn name(model: &Option<ModelRef>) -> String {
    model
        .as_ref()
        .map_or_else(|| String::from("-"), |m| m.version.to_string())
}

fn kind(kind: &EventKind) -> String {
    match kind {
        EventKind::RolledBack { reason, to } => {
            format!("RolledBack({reason:?} to {})", name(to))
        }
        EventKind::InstallFailed { reason } => format!("InstallFailed({reason:?})"),
        EventKind::SpoolDropped {
            count,
            first_seq,
            last_seq,
        } => format!("SpoolDropped({count}: {first_seq}..={last_seq})"),
        other => format!("{other:?}"),
    }
}

impl Effects for Recorder {
    fn publish(&mut self, topic: TopicKind, payload: Bytes, retain: bool) -> bool {
        if !self.accept {
            self.log.push(String::from("  (link full)"));
            return false;
        }
        let message = DeviceMessage::open(&KEY, &self.id, &payload).expect("a sealed frame");
        let line = match (&message.body, topic) {
            (DeviceBody::Status(s), TopicKind::Status) => format!(
                "  status online={} active={} previous={} shadow={} assignment_seq={} retain={retain}",
                s.online,
                name(&s.active),
                name(&s.previous),
                name(&s.shadow),
                s.assignment_seq
            ),
            (DeviceBody::Event(e), TopicKind::Event) => format!(
                "  event #{} {} {} assignment={:?}: {}",
                message.seq,
                kind(&e.kind),
                name(&e.model),
                e.assignment_seq,
                e.detail
            ),
            (DeviceBody::Telemetry(t), TopicKind::Telemetry) => format!(
                "  telemetry #{} {} {}..{} inferences={} runtime_errors={} shadow={}",
                message.seq,
                t.model.version,
                t.window_start.millis_since(ISSUED),
                t.window_end.millis_since(ISSUED),
                t.inferences,
                t.errors.runtime,
                t.shadow.as_ref().map_or_else(
                    || String::from("-"),
                    |s| format!(
                        "{} {}/{} agree",
                        s.model.version, s.argmax_agree, s.compared
                    )
                )
            ),
            (body, topic) => format!("  unexpected {topic:?} {body:?}"),
        };
        self.log.push(line);
        true
    }

    fn fetch(&mut self, request: FetchRequest) {
        self.log.push(format!(
            "  fetch job {} {} floor={:?} rollback={} digest={}",
            request.job,
            request.model.version,
            request.policy.release_floor,
            request.policy.allow_downgrade,
            request.policy.expected_digest == Some(request.model.manifest_digest)
        ));
    }

    fn cancel_fetch(&mut self, job: u64) {
        self.log.push(format!("  cancel job {job}"));
    }

    fn behaviour(&self, model: &str) -> Behaviour {
        self.behaviours.for_model(model)
    }

    fn seq_durable(&self) -> u64 {
        self.durable
    }
}

/// A device and its recorder, driven by a test.
struct Trace {
    fleet: TestFleet,
    _dir: tempfile::TempDir,
    device: Device,
    fx: Recorder,
}

/// A healthy model that activates after exactly one second and serves one request a second.
fn healthy() -> Behaviour {
    Behaviour {
        activation_delay_ms: Dist::Fixed(1000.0),
        inference_rate: 1.0,
        ..Behaviour::default()
    }
}

impl Trace {
    fn new(behaviours: BehaviourTable) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fleet = TestFleet::new(dir.path());
        let root = RootKeyring::verify_anchor(&std::fs::read(&fleet.root_path).unwrap()).unwrap();
        let keyring = ReleaseKeyring::verify(
            &std::fs::read(&fleet.keyring_path).unwrap(),
            &root,
            ISSUED,
            0,
        )
        .unwrap();
        let id = DeviceId::new("sim-00001").unwrap();
        let params = DeviceParams {
            index: 1,
            id: id.clone(),
            key: KEY,
            anchor: Arc::new(Anchor {
                root,
                keyring,
                arch: Arch::new("x86_64").unwrap(),
            }),
            window_ms: 60_000,
            spool_max: 1000,
            rng: crate::device_rng(1, 1),
        };
        let device = Device::new(params, DeviceRecord::default(), &|_| None, ISSUED);
        Self {
            fleet,
            _dir: dir,
            device,
            fx: Recorder {
                id,
                log: Vec::new(),
                behaviours,
                durable: SEQ_BLOCK + 1,
                accept: true,
            },
        }
    }

    fn healthy() -> Self {
        Self::new(BehaviourTable {
            default: healthy(),
            ..BehaviourTable::default()
        })
    }

    fn at(ms: u64) -> Timestamp {
        ISSUED.plus_millis(ms)
    }

    fn step(&mut self, ms: u64, what: &str, input: Input<'_>) {
        self.fx.log.push(format!("t={ms} {what}"));
        self.device.handle(Self::at(ms), input, &mut self.fx);
    }

    fn connect(&mut self, ms: u64) {
        self.step(ms, "connected", Input::Connected);
    }

    /// An assignment for this device, issued at `ms`, valid for an hour.
    fn assignment(&self, ms: u64, seq: u64, active: Option<&AssignedModel>) -> Assignment {
        Assignment {
            device: self.fx.id.clone(),
            seq,
            issued_at: Self::at(ms),
            expires: Self::at(ms).plus_secs(3600),
            rollback: false,
            active: active.cloned(),
            shadow: None,
            rollout: None,
            capture: None,
        }
    }

    fn signed(&self, ms: u64, seq: u64, active: Option<&AssignedModel>, rollback: bool) -> Vec<u8> {
        Assignment {
            rollback,
            ..self.assignment(ms, seq, active)
        }
        .sign(&self.fleet.controller)
    }

    fn deliver(&mut self, ms: u64, what: &str, payload: &[u8]) {
        let topic = Topic::new(self.fx.id.clone(), TopicKind::Assignment).to_string();
        self.step(
            ms,
            what,
            Input::Message {
                topic: &topic,
                payload,
            },
        );
    }

    fn assign(&mut self, ms: u64, seq: u64, active: Option<&AssignedModel>, rollback: bool) {
        let payload = self.signed(ms, seq, active, rollback);
        let what = format!(
            "assignment {seq} {}{}",
            active.map_or("none", |m| m.version.as_str()),
            if rollback { " (rollback)" } else { "" }
        );
        self.deliver(ms, &what, &payload);
    }

    fn fetched(&mut self, ms: u64, job: u64, model: &AssignedModel) {
        let result = Ok(manifest(model));
        self.step(
            ms,
            &format!("fetched job {job}"),
            Input::Fetched { job, result },
        );
    }

    fn fetch_failed(&mut self, ms: u64, job: u64, code: FailureCode) {
        let result = Err(Failure {
            code,
            message: String::from("the device endpoint answered 404 Not Found"),
        });
        self.step(
            ms,
            &format!("fetch of job {job} failed"),
            Input::Fetched { job, result },
        );
    }

    fn tick(&mut self, ms: u64) {
        self.step(ms, "tick", Input::Tick);
    }

    fn ack(&mut self, ms: u64, seqs: &[u64]) {
        let payload = ControllerMessage::new(
            self.fx.id.clone(),
            Self::at(ms),
            ControllerBody::Ack {
                seqs: seqs.to_vec(),
            },
        )
        .seal(&KEY);
        let topic = Topic::new(self.fx.id.clone(), TopicKind::Ack).to_string();
        self.step(
            ms,
            &format!("ack {seqs:?}"),
            Input::Message {
                topic: &topic,
                payload: &payload,
            },
        );
    }

    #[track_caller]
    fn check(&self, expected: Expect) {
        expected.assert_eq(&self.fx.log.join("\n"));
    }
}

#[test]
fn an_assignment_is_downloaded_installed_on_trial_and_activated() {
    let mut t = Trace::healthy();
    let v1 = model("1.0.0", 1);
    t.connect(0);
    t.assign(10, 1, Some(&v1), false);
    t.fetched(20, 1, &v1);
    t.tick(500);
    t.tick(1020);
    t.ack(1030, &[1, 2, 3]);
    // The retained assignment again after a reconnect: not news.
    t.connect(2000);
    t.assign(2000, 1, Some(&v1), false);
    t.check(expect![[r#"
        t=0 connected
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
        t=10 assignment 1 1.0.0
          status online=true active=- previous=- shadow=- assignment_seq=1 retain=true
          event #1 Downloading 1.0.0 assignment=Some(1): assignment 1 from https://ctl/api/v1/bundles/1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=20 fetched job 1
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #2 Installed 1.0.0 assignment=Some(1): installed
        t=500 tick
        t=1020 tick
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #3 Activated 1.0.0 assignment=Some(1): passed its self-test and grace window
        t=1030 ack [1, 2, 3]
        t=2000 connected
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
        t=2000 assignment 1 1.0.0"#]]);
    assert_eq!(t.device.unacked(), 0);
    assert_eq!(t.device.last_change_at(), Some(Trace::at(20)));
}

#[test]
fn a_rollback_assignment_may_go_below_the_release_floor() {
    let mut t = Trace::healthy();
    let (v1, v2) = (model("1.0.0", 1), model("2.0.0", 2));
    t.connect(0);
    t.assign(0, 1, Some(&v1), false);
    t.fetched(0, 1, &v1);
    t.tick(1000);
    t.assign(2000, 2, Some(&v2), false);
    t.fetched(2000, 2, &v2);
    t.tick(3000);
    t.fx.log.clear();
    t.assign(4000, 3, Some(&v1), true);
    t.fetched(4000, 3, &v1);
    t.tick(5000);
    t.check(expect![[r#"
        t=4000 assignment 3 1.0.0 (rollback)
          status online=true active=2.0.0 previous=1.0.0 shadow=- assignment_seq=3 retain=true
          event #7 Downloading 1.0.0 assignment=Some(3): assignment 3 from https://ctl/api/v1/bundles/1.0.0
          fetch job 3 1.0.0 floor=Some(2) rollback=true digest=true
        t=4000 fetched job 3
          status online=true active=1.0.0 previous=2.0.0 shadow=- assignment_seq=3 retain=true
          event #8 Installed 1.0.0 assignment=Some(3): installed
        t=5000 tick
          status online=true active=1.0.0 previous=2.0.0 shadow=- assignment_seq=3 retain=true
          event #9 Activated 1.0.0 assignment=Some(3): passed its self-test and grace window"#]]);
}

#[test]
fn a_newer_assignment_supersedes_a_download_and_waits_for_an_activation() {
    let mut t = Trace::healthy();
    let (v1, v2, v3) = (model("1.0.0", 1), model("2.0.0", 2), model("3.0.0", 3));
    t.connect(0);
    t.assign(0, 1, Some(&v1), false);
    t.assign(5, 2, Some(&v2), false);
    // The superseded download finishing anyway changes nothing.
    t.fetched(10, 1, &v1);
    t.fetched(20, 2, &v2);
    // During the activation: held until it ends, then carried out.
    t.assign(500, 3, Some(&v3), false);
    t.tick(1020);
    t.check(expect![[r#"
        t=0 connected
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
        t=0 assignment 1 1.0.0
          status online=true active=- previous=- shadow=- assignment_seq=1 retain=true
          event #1 Downloading 1.0.0 assignment=Some(1): assignment 1 from https://ctl/api/v1/bundles/1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=5 assignment 2 2.0.0
          cancel job 1
          status online=true active=- previous=- shadow=- assignment_seq=2 retain=true
          event #2 Downloading 2.0.0 assignment=Some(2): assignment 2 from https://ctl/api/v1/bundles/2.0.0
          fetch job 2 2.0.0 floor=None rollback=false digest=true
        t=10 fetched job 1
        t=20 fetched job 2
          status online=true active=2.0.0 previous=- shadow=- assignment_seq=2 retain=true
          event #3 Installed 2.0.0 assignment=Some(2): installed
        t=500 assignment 3 3.0.0
        t=1020 tick
          status online=true active=2.0.0 previous=- shadow=- assignment_seq=2 retain=true
          event #4 Activated 2.0.0 assignment=Some(2): passed its self-test and grace window
          status online=true active=2.0.0 previous=- shadow=- assignment_seq=3 retain=true
          event #5 Downloading 3.0.0 assignment=Some(3): assignment 3 from https://ctl/api/v1/bundles/3.0.0
          fetch job 3 3.0.0 floor=Some(2) rollback=false digest=true"#]]);
}

#[test]
fn install_and_activation_failures_are_reported_as_the_agent_reports_them() {
    let (v1, bad_install, bad_live) = (model("1.0.0", 1), model("2.0.0", 2), model("3.0.0", 3));
    let mut table = BehaviourTable {
        default: healthy(),
        ..BehaviourTable::default()
    };
    table.models.insert(
        String::from("pump@2.0.0"),
        Behaviour {
            install_failure: 1.0,
            install_failure_reason: FailureCode::NoSpace,
            ..healthy()
        },
    );
    // Golden vectors pass; live requests fail far above the manifest's 5%.
    table.models.insert(
        String::from("pump@3.0.0"),
        Behaviour {
            inference_rate: 10.0,
            errors: ErrorRates {
                runtime: 0.5,
                ..ErrorRates::default()
            },
            ..healthy()
        },
    );
    let mut t = Trace::new(table);
    t.connect(0);
    t.assign(0, 1, Some(&v1), false);
    t.fetched(0, 1, &v1);
    t.tick(1000);
    t.fx.log.clear();
    t.assign(2000, 2, Some(&bad_install), false);
    t.fetched(2000, 2, &bad_install);
    t.assign(3000, 3, Some(&bad_live), false);
    t.fetch_failed(3000, 3, FailureCode::Download);
    t.assign(4000, 4, Some(&bad_live), false);
    t.fetched(4000, 4, &bad_live);
    t.tick(5000);
    t.check(expect![[r#"
        t=2000 assignment 2 2.0.0
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=2 retain=true
          event #4 Downloading 2.0.0 assignment=Some(2): assignment 2 from https://ctl/api/v1/bundles/2.0.0
          fetch job 2 2.0.0 floor=Some(1) rollback=false digest=true
        t=2000 fetched job 2
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=2 retain=true
          event #5 InstallFailed(NoSpace) 2.0.0 assignment=Some(2): simulated install failure
        t=3000 assignment 3 3.0.0
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=3 retain=true
          event #6 Downloading 3.0.0 assignment=Some(3): assignment 3 from https://ctl/api/v1/bundles/3.0.0
          fetch job 3 3.0.0 floor=Some(1) rollback=false digest=true
        t=3000 fetch of job 3 failed
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=3 retain=true
          event #7 InstallFailed(Download) 3.0.0 assignment=Some(3): the device endpoint answered 404 Not Found
        t=4000 assignment 4 3.0.0
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=4 retain=true
          event #8 Downloading 3.0.0 assignment=Some(4): assignment 4 from https://ctl/api/v1/bundles/3.0.0
          fetch job 4 3.0.0 floor=Some(1) rollback=false digest=true
        t=4000 fetched job 4
          status online=true active=3.0.0 previous=1.0.0 shadow=- assignment_seq=4 retain=true
          event #9 Installed 3.0.0 assignment=Some(4): installed
        t=5000 tick
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=4 retain=true
          event #10 RolledBack(ErrorRate to 1.0.0) 3.0.0 assignment=Some(4): live error rate 42.6% (40 of 94 requests) is above the manifest's limit 5.0%"#]]);
    assert_eq!(t.device.counters().install_failed, 2);
    assert_eq!(t.device.counters().rolled_back, 1);
    assert_eq!(t.device.last_change_at(), Some(Trace::at(5000)));
}

#[test]
fn refused_assignments_are_reported_and_counted() {
    let mut t = Trace::healthy();
    let v1 = model("1.0.0", 1);
    t.connect(0);
    // Issued long ago: expired.
    let mut old = t.signed(0, 1, Some(&v1), false);
    t.deliver(3_601_000, "expired assignment 1", &old);
    // Signed for another device.
    let mut other = Assignment {
        device: DeviceId::new("sim-00002").unwrap(),
        ..t.assignment(3_601_000, 2, Some(&v1))
    }
    .sign(&t.fleet.controller);
    t.deliver(3_601_000, "assignment 2 for sim-00002", &other);
    // Altered after signing.
    old.truncate(old.len() - 1);
    t.deliver(3_601_000, "truncated assignment", &old);
    other.clear();
    t.deliver(3_601_000, "cleared retained assignment", &other);
    t.check(expect![[r#"
        t=0 connected
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
        t=3601000 expired assignment 1
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
          event #1 InstallFailed(Expired) - assignment=None: assignment refused: assignment expired at 2026-11-01T01:00:00.000Z (now 2026-11-01T01:00:01.000Z); possible freeze attack, or the signer must re-issue it
        t=3601000 assignment 2 for sim-00002
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
          event #2 InstallFailed(WrongDevice) - assignment=None: assignment refused: assignment is for device sim-00002, not this device (sim-00001)
        t=3601000 truncated assignment
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
          event #3 InstallFailed(Signature) - assignment=None: assignment refused: signed assignment is truncated: the input ended inside a CBOR item
        t=3601000 cleared retained assignment
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
          event #4 InstallFailed(Signature) - assignment=None: assignment refused: signed assignment is truncated: the input ended inside a CBOR item"#]]);
    assert_eq!(t.device.counters().refused_assignments, 4);
}

#[test]
fn reports_wait_for_the_ack_and_are_sent_again_after_a_reconnect() {
    let mut t = Trace::healthy();
    let v1 = model("1.0.0", 1);
    // Offline: reports are spooled, not sent.
    t.assign(0, 1, Some(&v1), false);
    t.connect(100);
    t.ack(200, &[1, 99]);
    t.step(300, "disconnected", Input::Disconnected);
    t.fetched(400, 1, &v1);
    t.fx.accept = false;
    t.connect(500);
    t.fx.accept = true;
    // The periodic resend picks up what the full link refused…
    t.tick(30_000);
    // …and, 30 s later, what is still unacknowledged.
    t.tick(45_000);
    t.tick(60_000);
    t.check(expect![[r#"
        t=0 assignment 1 1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=100 connected
          status online=true active=- previous=- shadow=- assignment_seq=1 retain=true
          event #1 Downloading 1.0.0 assignment=Some(1): assignment 1 from https://ctl/api/v1/bundles/1.0.0
        t=200 ack [1, 99]
        t=300 disconnected
        t=400 fetched job 1
        t=500 connected
          (link full)
          (link full)
        t=30000 tick
          event #2 Installed 1.0.0 assignment=Some(1): installed
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #3 Activated 1.0.0 assignment=Some(1): passed its self-test and grace window
        t=45000 tick
        t=60000 tick
          event #2 Installed 1.0.0 assignment=Some(1): installed
          event #3 Activated 1.0.0 assignment=Some(1): passed its self-test and grace window
          telemetry #4 1.0.0 0..60000 inferences=67 runtime_errors=0 shadow=-"#]]);
    let counters = t.device.counters();
    assert_eq!((counters.sent, counters.acked, counters.resent), (4, 1, 2));
}

#[test]
fn a_full_spool_drops_the_oldest_reports_and_says_so() {
    let mut t = Trace::healthy();
    t.device.spool_max = 2;
    let v1 = model("1.0.0", 1);
    t.assign(0, 1, Some(&v1), false);
    t.fetched(0, 1, &v1);
    t.tick(1000);
    t.connect(2000);
    t.check(expect![[r#"
        t=0 assignment 1 1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=0 fetched job 1
        t=1000 tick
        t=2000 connected
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #2 Installed 1.0.0 assignment=Some(1): installed
          event #3 Activated 1.0.0 assignment=Some(1): passed its self-test and grace window
          event #4 SpoolDropped(1: 1..=1) - assignment=None: the offline spool was full; dropped 1 report(s)"#]]);
    assert_eq!(t.device.counters().dropped, 1);
}

#[test]
fn reports_wait_for_durable_sequence_numbers() {
    let mut t = Trace::healthy();
    t.fx.durable = 2;
    let v1 = model("1.0.0", 1);
    t.connect(0);
    t.assign(0, 1, Some(&v1), false);
    t.fetched(0, 1, &v1);
    assert_eq!(
        t.device.next_deadline(),
        Trace::at(100),
        "parked reports retry soon"
    );
    t.fx.durable = 10;
    t.tick(100);
    t.check(expect![[r#"
        t=0 connected
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
        t=0 assignment 1 1.0.0
          status online=true active=- previous=- shadow=- assignment_seq=1 retain=true
          event #1 Downloading 1.0.0 assignment=Some(1): assignment 1 from https://ctl/api/v1/bundles/1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=0 fetched job 1
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
        t=100 tick
          event #2 Installed 1.0.0 assignment=Some(1): installed"#]]);
    let record = t.device.record();
    assert!(
        record.seq_limit > 2,
        "a block ahead is reserved: {}",
        record.seq_limit
    );
}

#[test]
fn telemetry_windows_report_the_active_model_and_the_shadow() {
    let mut table = BehaviourTable {
        default: healthy(),
        ..BehaviourTable::default()
    };
    table.models.insert(
        String::from("pump@9.0.0"),
        Behaviour {
            shadow_agreement: 0.5,
            ..healthy()
        },
    );
    let mut t = Trace::new(table);
    let (v1, candidate) = (model("1.0.0", 1), model("9.0.0", 9));
    t.connect(0);
    // No model yet: no window.
    t.tick(60_000);
    t.assign(60_000, 1, Some(&v1), false);
    t.fetched(60_000, 1, &v1);
    t.tick(61_000);
    t.ack(61_000, &[1, 2, 3]);
    t.tick(120_000);
    t.ack(120_000, &[4]);
    let shadowed = Assignment {
        shadow: Some(candidate.clone()),
        ..t.assignment(120_000, 2, Some(&v1))
    }
    .sign(&t.fleet.controller);
    t.deliver(120_000, "assignment 2 1.0.0 shadow 9.0.0", &shadowed);
    t.fetched(120_000, 2, &candidate);
    t.ack(120_000, &[5]);
    t.tick(180_000);
    t.assign(200_000, 3, Some(&v1), false);
    t.check(expect![[r#"
        t=0 connected
          status online=true active=- previous=- shadow=- assignment_seq=0 retain=true
        t=60000 tick
        t=60000 assignment 1 1.0.0
          status online=true active=- previous=- shadow=- assignment_seq=1 retain=true
          event #1 Downloading 1.0.0 assignment=Some(1): assignment 1 from https://ctl/api/v1/bundles/1.0.0
          fetch job 1 1.0.0 floor=None rollback=false digest=true
        t=60000 fetched job 1
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #2 Installed 1.0.0 assignment=Some(1): installed
        t=61000 tick
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=1 retain=true
          event #3 Activated 1.0.0 assignment=Some(1): passed its self-test and grace window
        t=61000 ack [1, 2, 3]
        t=120000 tick
          telemetry #4 1.0.0 60000..120000 inferences=67 runtime_errors=0 shadow=-
        t=120000 ack [4]
        t=120000 assignment 2 1.0.0 shadow 9.0.0
          fetch job 2 9.0.0 floor=Some(1) rollback=false digest=true
        t=120000 fetched job 2
          status online=true active=1.0.0 previous=- shadow=9.0.0 assignment_seq=2 retain=true
          event #5 ShadowStarted 9.0.0 assignment=Some(2): running on copies of live requests
        t=120000 ack [5]
        t=180000 tick
          telemetry #6 1.0.0 120000..180000 inferences=72 runtime_errors=0 shadow=9.0.0 33/72 agree
        t=200000 assignment 3 1.0.0
          status online=true active=1.0.0 previous=- shadow=- assignment_seq=3 retain=true
          event #7 ShadowStopped 9.0.0 assignment=Some(3): the assignment names no shadow model"#]]);
}

#[test]
fn the_same_seed_gives_the_same_device() {
    let run = || {
        let mut table = BehaviourTable {
            default: healthy(),
            ..BehaviourTable::default()
        };
        table.default.activation_delay_ms = Dist::Uniform {
            min: 100.0,
            max: 5000.0,
        };
        let mut t = Trace::new(table);
        let v1 = model("1.0.0", 1);
        t.connect(0);
        t.assign(0, 1, Some(&v1), false);
        t.fetched(0, 1, &v1);
        let deadline = t.device.next_deadline();
        t.tick(deadline.millis_since(ISSUED));
        t.tick(120_000);
        t.fx.log
    };
    assert_eq!(run(), run());
}
