//! The closed loop end to end with real processes: a real controller, four real agents in two
//! label groups (`site=north`, `site=south`) running the pump model, each scoring a stream of
//! simulated pump readings and feeding the ground truth back, with data capture on.
//!
//! The north sensors read high (temperature and vibration shifted by one training standard
//! deviation, the truth unchanged): the drift service detects drift for group `site=north` and
//! its two devices, and for nothing of `site=south` (a signed alert webhook hears of it); the
//! model's policy fires its retraining
//! command exactly once, which runs the example `firmware-examples/retrain/retrain.py`: it
//! downloads the north devices' captured samples, trains the classifier on them, and registers
//! the candidate with `--candidate-for pump-anomaly`. The policy's rollout plan starts the
//! candidate's rollout at once, behind an operator's approval; the shift then reaches the south
//! site too (whose detection is recorded but fires no second retraining), the operator approves,
//! and the candidate goes through its shadow phase and canary wave to the whole fleet. The audit
//! log holds the chain in order: `drift.detected` → `retrain.requested` → `model.register` →
//! `rollout.start` → `device.assign`. A controller SIGKILLed and restarted then goes on with
//! its detectors where they were, firing nothing again. On SQLite, and on PostgreSQL when it is
//! installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgefleet_client::{Client, GroundTruth, Tensor};
use edgefleet_tests::agent::AgentProcess;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use edgefleet_tests::postgres::require_postgres;
use edgefleet_tests::{bin, run, run_ok};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, Gamma, StandardNormal};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(300);
const NORTH: [&str; 2] = ["pump-n0", "pump-n1"];
const SOUTH: [&str; 2] = ["pump-s0", "pump-s1"];
/// The training data's standard deviations of temperature and vibration (`metrics.json`).
const SD: [f64; 2] = [6.3753, 1.0648];
/// The north sensors' shift, in those standard deviations.
const SHIFT: f64 = 1.0;

/// A Python 3 that has numpy and onnx (the retraining example's only needs).
fn python_with_onnx() -> Option<PathBuf> {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find_map(|python| {
            let ok = std::process::Command::new(python)
                .args(["-c", "import numpy, onnx"])
                .output()
                .is_ok_and(|o| o.status.success());
            ok.then(|| PathBuf::from(python))
        })
}

fn require_python(test: &str) -> Option<PathBuf> {
    match python_with_onnx() {
        Some(python) => Some(python),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "{test}: CI is set but no python3 with numpy and onnx is installed (apt-get install python3-numpy python3-onnx)"
            )
        }
        None => {
            eprintln!(
                "\n!!! SKIPPED {test}: no python3 with numpy and onnx; install python3-numpy python3-onnx\n"
            );
            None
        }
    }
}

#[test]
fn drift_in_one_group_retrains_once_and_rolls_the_candidate_out_on_sqlite() {
    let Some(python) =
        require_python("drift_in_one_group_retrains_once_and_rolls_the_candidate_out_on_sqlite")
    else {
        return;
    };
    closed_loop(&python, None);
}

#[test]
fn drift_in_one_group_retrains_once_and_rolls_the_candidate_out_on_postgresql() {
    let test = "drift_in_one_group_retrains_once_and_rolls_the_candidate_out_on_postgresql";
    let Some(python) = require_python(test) else {
        return;
    };
    let Some(pg) = require_postgres(test) else {
        return;
    };
    closed_loop(&python, Some(pg.url()));
    let events = pg
        .psql("SELECT count(*) FROM retrain_requests WHERE status = 'sent'")
        .unwrap();
    assert_eq!(events.trim(), "1");
}

/// Simulated pump readings, the demo trainer's generative model (`controller/demo/`): four
/// sensors driven by load, wear and ambient temperature; an anomaly when a fault pattern holds.
struct Pump {
    rng: Xoshiro256PlusPlus,
}

impl Pump {
    fn normal(&mut self, sd: f64) -> f64 {
        let z: f64 = StandardNormal.sample(&mut self.rng);
        z * sd
    }

    /// One reading (sensors shifted by `shift` standard deviations) and its true label.
    fn reading(&mut self, shift: f64) -> (Vec<f32>, u32) {
        let load = self.normal(1.0);
        let wear = Gamma::new(2.0, 0.5).map_or(1.0, |g| g.sample(&mut self.rng));
        let ambient = self.normal(1.0);
        let current = 11.5 + 1.6 * load + 0.9 * wear + self.normal(0.5);
        let temperature = 48.0 + 4.5 * load + 5.0 * wear + 2.5 * ambient + self.normal(1.5);
        let vibration = (2.2f64.ln() + 0.12 * load + 0.30 * wear + self.normal(0.18)).exp();
        let pressure = 6.2 + 0.45 * load - 0.35 * wear + self.normal(0.3);
        let bearing = ((temperature - 64.0) / 4.0).min((vibration - 3.8) / 0.8);
        let cavitation = ((5.2 - pressure) / 0.35).min((vibration - 3.2) / 0.6);
        let label = u32::from(bearing.max(cavitation) + self.normal(0.5) > 0.0);
        let reading = vec![
            (temperature + shift * SD[0]) as f32,
            (vibration + shift * SD[1]).max(0.05) as f32,
            current as f32,
            pressure as f32,
        ];
        (reading, label)
    }
}

/// Every agent scores a reading every 20 ms and feeds its truth back; `shifted` sites read high.
struct Traffic {
    stop: Arc<AtomicBool>,
    south_shifted: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    const MAX_REQUESTS: u64 = 60_000;
    const MAX_TIME: Duration = Duration::from_secs(900);

    fn start(agents: &[(String, AgentProcess)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let south_shifted = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = agents
            .iter()
            .enumerate()
            .map(|(i, (id, agent))| {
                let north = NORTH.contains(&id.as_str());
                let socket = agent.socket.clone();
                let (stop, south_shifted, answered) =
                    (stop.clone(), south_shifted.clone(), answered.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut pump = Pump {
                        rng: Xoshiro256PlusPlus::seed_from_u64(7 + i as u64),
                    };
                    let mut client = Client::unix(socket);
                    for _ in 0..Self::MAX_REQUESTS {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > Self::MAX_TIME {
                            return;
                        }
                        let shift = if north || south_shifted.load(Ordering::Relaxed) {
                            SHIFT
                        } else {
                            0.0
                        };
                        let (reading, label) = pump.reading(shift);
                        if let Ok(reply) =
                            client.infer(&[("features", Tensor::f32(vec![1, 4], reading))])
                        {
                            answered.fetch_add(1, Ordering::Relaxed);
                            let _ = client.feedback(reply.id, GroundTruth::Label(label));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Self {
            stop,
            south_shifted,
            answered,
            threads,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The deliveries a [`Hooks`] receiver kept: (lower-cased request head, body).
type Deliveries = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A webhook receiver on loopback: answers 200 to every POST and keeps (headers, body).
struct Hooks {
    url: String,
    received: Deliveries,
}

impl Hooks {
    const MAX_DELIVERIES: usize = 1000;

    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/drift", listener.local_addr().unwrap());
        let received: Deliveries = Arc::default();
        let kept = received.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Read, Write};
            for stream in listener.incoming().take(Self::MAX_DELIVERIES) {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_ok() {
                    kept.lock().unwrap().push((head, body));
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Self { url, received }
    }
}

/// HMAC-SHA256 (RFC 2104) of `body` under `key`, as the signature header writes it.
fn hmac_sha256(key: &[u8], body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(body)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    format!("sha256={}", hex::encode(outer))
}

/// Dropped in field order: agents, controller, then the files (the traffic, a later local,
/// stops first).
struct Bed {
    agents: Vec<(String, AgentProcess)>,
    controller: ControllerProcess,
    dir: tempfile::TempDir,
}

impl Bed {
    fn logs(&self) -> String {
        let mut out = format!("controller log:\n{}", self.controller.log_text());
        for (id, agent) in &self.agents {
            out.push_str(&format!("\n{id} log:\n{}", agent.log_text()));
        }
        let retrain_log = self.dir.path().join("retrain.log");
        if let Ok(text) = std::fs::read_to_string(retrain_log) {
            out.push_str(&format!("\nretrain log:\n{text}"));
        }
        out
    }

    /// Polls `cond` until it answers; on timeout fails with `what`, the last `context` and
    /// every log.
    fn wait<T>(&self, what: &str, mut cond: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            match cond() {
                Ok(value) => return value,
                Err(context) if Instant::now() > deadline => {
                    panic!("timed out waiting for {what}: {context}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    fn drift_status(&self) -> Vec<Value> {
        let (status, body) = self.controller.get("/api/v1/drift");
        assert_eq!(status, 200, "{body}");
        body["scopes"].as_array().cloned().unwrap_or_default()
    }

    fn fired(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("fired"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn scope_of(item: &Value) -> String {
    item["scope_text"].as_str().unwrap_or_default().to_owned()
}

fn closed_loop(python: &Path, database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(
        &dir.path().join("data"),
        &ControllerSpec {
            database,
            external: None,
        },
    );
    let baseline = controller.register_demo_version(
        json!({"name": "pump-anomaly", "version": "1.0.0", "runtime": {"grace_window_s": 1}}),
    );
    let agents: Vec<(String, AgentProcess)> = NORTH
        .iter()
        .chain(SOUTH.iter())
        .map(|id| {
            let mut agent = controller.enroll_agent(id, &dir.path().join("agents").join(id));
            agent.wait_ready();
            ((*id).to_owned(), agent)
        })
        .collect();
    let mut bed = Bed {
        agents,
        controller,
        dir,
    };
    let cli = || bed.controller.cli();
    for (id, _) in &bed.agents {
        let site = if NORTH.contains(&id.as_str()) {
            "north"
        } else {
            "south"
        };
        bed.controller
            .wait_device(id, "enrolled and online", |d| d["online"] == true);
        run_ok(cli().args(["device", "label", id, &format!("site={site}")]));
        run_ok(cli().args(["device", "assign", id, &baseline]));
    }
    for (id, _) in &bed.agents {
        bed.controller.wait_device(id, "running 1.0.0", |d| {
            d["active_digest"] == baseline.as_str()
        });
        run_ok(cli().args([
            "capture",
            "enable",
            id,
            "--sample-rate",
            "1",
            "--batch-samples",
            "50",
            "--batch-age-s",
            "2",
        ]));
    }

    // The policy: 200-row windows, groups by site, retraining by the example script, and the
    // candidate's plan: shadow on two devices, a canary, then everyone, after an approval.
    let token_file = bed.dir.path().join("token");
    std::fs::write(&token_file, bed.controller.token()).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-examples/retrain/retrain.py");
    let command = format!(
        "echo \"$EDGEFLEET_DRIFT_EVENT\" >> {fired} && {python} {script} --out {out}/retrain-$EDGEFLEET_DRIFT_EVENT --edgefleet {cli} --min-captured 2000 --wait-s 180 -- --grace-window-s 1 2>> {out}/retrain.log",
        fired = bed.dir.path().join("fired").display(),
        python = python.display(),
        script = script.display(),
        out = bed.dir.path().display(),
        cli = bin("edgefleet").display(),
    );
    let plan = json!({
        "shadow": {"cohort": "2", "duration_s": 4},
        "waves": [{"size": "1", "bake_s": 4}, {"size": "100%"}],
        "gates": {
            "min_inferences": 50, "min_shadow_compared": 50, "max_error_rate_increase": 0.05, "max_p95_latency_ratio": 3.0,
            "max_drift_score": 0.5, "min_drift_windows": 3
        },
        "approval": true,
    });
    let hooks = Hooks::start();
    let secret_file = bed.dir.path().join("alert-secret");
    std::fs::write(&secret_file, "alert-secret-1\n").unwrap();
    let policy_file = bed.dir.path().join("policy.json");
    std::fs::write(
        &policy_file,
        json!({"alert": {"url": hooks.url, "secret_file": secret_file, "scopes": ["group"]}})
            .to_string(),
    )
    .unwrap();
    let plan_file = bed.dir.path().join("plan.json");
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    run_ok(cli().args([
        "drift",
        "policy",
        "set",
        "pump-anomaly",
        "--file",
        &policy_file.to_string_lossy(),
        "--window-samples",
        "200",
        "--group-by",
        "site",
        "--retrain-command",
        &command,
        "--retrain-token-file",
        &token_file.to_string_lossy(),
        "--retrain-scope",
        "group",
        "--auto-rollout-file",
        &plan_file.to_string_lossy(),
    ]));
    let shown = run_ok(cli().args([
        "drift",
        "policy",
        "show",
        "pump-anomaly",
        "--output",
        "json",
    ]));
    let shown: Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown["policy"]["group_by"], json!(["site"]), "{shown}");
    assert_eq!(shown["policy"]["detector"]["window_samples"], 200);

    let traffic = Traffic::start(&bed.agents);

    // Detection for exactly the north group and its devices; south evaluated and stable.
    let north_group = "group site=north";
    bed.wait("drift detected for site=north and both its devices", || {
        let scopes = bed.drift_status();
        let drifting: Vec<String> = scopes
            .iter()
            .filter(|s| s["drifting"] == true && s["model"]["digest"] == baseline.as_str())
            .map(scope_of)
            .collect();
        let wanted = [north_group, "device pump-n0", "device pump-n1"];
        if wanted.iter().all(|w| drifting.iter().any(|d| d == w)) {
            Ok(())
        } else {
            Err(format!("{scopes:#?}"))
        }
    });
    let scopes = bed.drift_status();
    for scope in &scopes {
        let text = scope_of(scope);
        if text.contains("south") || text.contains("pump-s") {
            assert_eq!(scope["drifting"], false, "{text} drifts: {scopes:#?}");
        }
    }
    let south = scopes
        .iter()
        .find(|s| scope_of(s) == "group site=south")
        .unwrap_or_else(|| panic!("site=south is watched: {scopes:#?}"));
    assert!(south["windows"].as_u64().unwrap_or(0) >= 2, "{south}");

    // The retraining fires once; the example registers the candidate, whose rollout waits.
    let rollout = bed.wait("the candidate's rollout to await approval", || {
        let (_, rollouts) = bed.controller.get("/api/v1/rollouts");
        rollouts["rollouts"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|r| {
                        r["phase"] == "awaiting_approval"
                            || r["progress"]["phase"] == "awaiting_approval"
                    })
                    .cloned()
            })
            .ok_or_else(|| format!("rollouts: {rollouts}; fired: {:?}", bed.fired()))
    });
    let fired = bed.fired();
    assert_eq!(fired.len(), 1, "the retraining fired once: {fired:?}");
    let event = fired[0].clone();
    let rollout_id = rollout["id"].as_str().unwrap().to_owned();
    let candidate = rollout["candidate"].as_str().unwrap_or_default().to_owned();
    let (status, model) = bed.controller.get(&format!("/api/v1/models/{candidate}"));
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["version"], "1.1.0", "{model}");
    let lineage = &model["manifest"]["lineage"];
    assert_eq!(lineage["candidate_for"], "pump-anomaly", "{lineage}");
    assert_eq!(lineage["parent"], baseline.as_str(), "{lineage}");

    // The shift reaches the south site; its detection is recorded, no second retraining.
    traffic.south_shifted.store(true, Ordering::Relaxed);
    run_ok(cli().args(["rollout", "approve", &rollout_id]));
    let done = bed.wait("the candidate's rollout to complete", || {
        let (_, shown) = bed
            .controller
            .get(&format!("/api/v1/rollouts/{rollout_id}"));
        let phase = shown["progress"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !["aborted", "rolled_back"].contains(&phase.as_str()),
            "the rollout stopped: {shown:#}\nthe candidate's drift: {:#}\n{}",
            bed.controller.get(&format!("/api/v1/drift/{candidate}")).1,
            bed.logs()
        );
        if phase == "completed" {
            Ok(shown)
        } else {
            Err(format!("{shown:#}"))
        }
    });
    for (id, _) in &bed.agents {
        let row = bed.controller.device(id);
        assert_eq!(
            row["active_digest"],
            candidate.as_str(),
            "{id}: {row}\n{done:#}"
        );
    }
    assert!(traffic.answered.load(Ordering::Relaxed) > 0);
    let fired = bed.fired();
    assert_eq!(fired, std::slice::from_ref(&event), "still fired once");

    // The audit log holds the chain, in order.
    let audit = run_ok(cli().args(["audit", "export"]));
    let rows: Vec<Value> = audit
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut row| {
            if let Some(text) = row["details"].as_str() {
                row["details"] = serde_json::from_str(text).unwrap_or(Value::Null);
            }
            row
        })
        .collect();
    let seq_of = |what: &str, pick: &dyn Fn(&Value) -> bool| -> i64 {
        rows.iter()
            .find(|r| r["action"] == what && pick(r))
            .and_then(|r| r["seq"].as_i64())
            .unwrap_or_else(|| panic!("no {what} audit row in the chain:\n{}", audit.stdout))
    };
    let detected = seq_of("drift.detected", &|r| {
        r["details"]["event"] == event.as_str()
    });
    let requested = seq_of("retrain.requested", &|r| {
        r["details"]["event"] == event.as_str()
    });
    let registered = seq_of("model.register", &|r| {
        r["details"]["drift_event"] == event.as_str() && r["details"]["parent"] == baseline.as_str()
    });
    let started = seq_of("rollout.start", &|r| {
        r["details"]["trigger"]["drift_event"] == event.as_str()
            && r["details"]["candidate"]["digest"] == candidate.as_str()
    });
    let assigned = seq_of("device.assign", &|r| {
        r["details"]["rollout"] == rollout_id.as_str()
    });
    assert!(
        detected < requested
            && requested < registered
            && registered < started
            && started < assigned,
        "the chain is out of order: {detected} {requested} {registered} {started} {assigned}"
    );
    let detected_row = rows.iter().find(|r| r["seq"] == detected).unwrap();
    assert_eq!(
        detected_row["details"]["scope"],
        json!({"group": {"label": "site", "value": "north"}})
    );
    let retrain_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["action"] == "retrain.requested")
        .collect();
    assert_eq!(retrain_rows.len(), 1, "{retrain_rows:#?}");
    let sent = seq_of("retrain.sent", &|r| r["details"]["event"] == event.as_str());
    assert!(sent > requested);

    // The alert webhook heard of the north detection, signed with the policy's secret.
    let alerts = hooks.received.lock().unwrap().clone();
    let north_alert = alerts
        .iter()
        .find_map(|(head, body)| {
            let payload: Value = serde_json::from_slice(body).ok()?;
            (payload["event"] == event.as_str()).then(|| (head.clone(), body.clone(), payload))
        })
        .unwrap_or_else(|| panic!("no alert for {event}: {} received", alerts.len()));
    let (head, body, payload) = north_alert;
    assert_eq!(payload["type"], "drift.detected", "{payload}");
    assert_eq!(payload["scope_text"], north_group, "{payload}");
    assert!(head.contains("x-edgefleet-event: drift.detected"), "{head}");
    let signature = hmac_sha256(b"alert-secret-1", &body);
    assert!(
        head.contains(&format!("x-edgefleet-signature: {signature}")),
        "{head} (expected {signature})"
    );
    for (_, body) in &alerts {
        let payload: Value = serde_json::from_slice(body).unwrap();
        let scope = payload["scope_text"].as_str().unwrap_or_default();
        assert!(
            scope.starts_with("group "),
            "only group scopes alert: {payload}"
        );
    }

    // The CLI's views.
    let status = run_ok(cli().args(["drift", "status"]));
    assert!(status.stdout.starts_with("MODEL"), "{}", status.stdout);
    assert!(
        status.stdout.contains("group site=north"),
        "{}",
        status.stdout
    );
    let shown = run_ok(cli().args(["drift", "show", "pump-anomaly@1.0.0"]));
    for column in [
        "FEATURE",
        "temperature_c",
        "vibration_rms",
        &event,
        "detected",
    ] {
        assert!(
            shown.stdout.contains(column),
            "{column} missing:\n{}",
            shown.stdout
        );
    }
    let verify = run(cli().args(["audit", "verify"]));
    assert!(verify.success(), "{}", verify.stderr);

    // SIGKILLed and restarted, the controller goes on with its detectors where they were: the
    // candidate's fleet detector keeps counting windows, the north episode stays open with the
    // same event, and nothing fires again.
    let windows = |bed: &Bed| -> u64 {
        bed.drift_status()
            .iter()
            .find(|s| scope_of(s) == "fleet" && s["model"]["digest"] == candidate.as_str())
            .and_then(|s| s["windows"].as_u64())
            .unwrap_or(0)
    };
    let before = windows(&bed);
    assert!(before >= 1, "{:#?}", bed.drift_status());
    bed.controller.restart();
    bed.wait(
        "the candidate's fleet detector to go on after the restart",
        || {
            let now = windows(&bed);
            if now > before + 1 {
                Ok(())
            } else {
                Err(format!("{now} window(s); {before} before the restart"))
            }
        },
    );
    let north = bed
        .drift_status()
        .into_iter()
        .find(|s| scope_of(s) == north_group && s["model"]["digest"] == baseline.as_str())
        .unwrap();
    assert_eq!(north["drifting"], true, "{north}");
    assert_eq!(north["event"], event.as_str(), "{north}");
    assert_eq!(
        bed.fired(),
        std::slice::from_ref(&event),
        "nothing fired again"
    );
}
