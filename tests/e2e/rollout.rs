//! Staged rollouts end to end with real processes: an `edgefleet-controller` (embedded broker,
//! SQLite) and real `edgefleet-agent`s that run the pump-sensor model and answer a steady stream
//! of inference requests, so the gates judge real telemetry.
//!
//! - A healthy candidate, started and watched with the `edgefleet` CLI, goes through three waves
//!   to every device; each device is given the candidate exactly once.
//! - A candidate whose golden vectors pass but which refuses half the live requests (it was built
//!   for a fixed batch of one; the devices' applications also send batches of four) is stopped by
//!   the error-rate gate at the canary wave: the canary device is rolled back to the baseline
//!   with the explicit rollback flag, and no other device ever receives the candidate.
//! - A controller SIGKILLed again and again at random moments of a rollout finishes it correctly
//!   after its restarts: every device on the candidate, each given it exactly once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgefleet_client::{Client, Tensor};
use edgefleet_tests::agent::{AgentProcess, wait_until};
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use edgefleet_tests::{bin, run};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

/// Dropped in field order: traffic, agents, controller, then the files.
struct Bed {
    traffic: Option<Traffic>,
    agents: Vec<(String, AgentProcess)>,
    controller: ControllerProcess,
    dir: tempfile::TempDir,
    baseline: String,
}

impl Bed {
    /// A controller, the pump model 1.0.0 registered and assigned to `n` enrolled agents, all
    /// running it.
    fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let controller =
            ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
        let baseline = controller.register_demo_version(
            json!({"name": "pump-anomaly", "version": "1.0.0", "runtime": {"grace_window_s": 1}}),
        );
        let agents: Vec<(String, AgentProcess)> = (0..n)
            .map(|i| {
                let id = format!("pump-{i:02}");
                let mut agent = controller.enroll_agent(&id, &dir.path().join("agents").join(&id));
                agent.wait_ready();
                (id, agent)
            })
            .collect();
        let bed = Self {
            traffic: None,
            agents,
            controller,
            dir,
            baseline,
        };
        for (id, _) in &bed.agents {
            bed.controller
                .wait_device(id, "enrolled and online", |d| d["online"] == true);
            let (status, body) = bed.controller.post(
                &format!("/api/v1/devices/{id}/assign"),
                &json!({"model": bed.baseline}),
            );
            assert_eq!(status, 200, "assign the baseline to {id}: {body}");
        }
        for (id, _) in &bed.agents {
            bed.wait_active(id, &bed.baseline.clone());
        }
        bed
    }

    fn wait_active(&self, device: &str, digest: &str) {
        wait_until(WAIT, &format!("{device} to run {digest}"), || {
            let row = self.controller.device(device);
            (row["active_digest"] == digest).then_some(())
        });
    }

    fn logs(&self) -> String {
        let mut out = format!("controller log:\n{}", self.controller.log_text());
        for (id, agent) in &self.agents {
            out.push_str(&format!("\n{id} log:\n{}", agent.log_text()));
        }
        out
    }

    /// Every agent answers a request every 25 ms, alternating batches of one and four rows.
    fn start_traffic(&mut self) {
        let sockets = self.agents.iter().map(|(_, a)| a.socket.clone()).collect();
        self.traffic = Some(Traffic::start(sockets));
    }

    fn rollout(&self, id: &str) -> Value {
        let (status, body) = self.controller.get(&format!("/api/v1/rollouts/{id}"));
        assert_eq!(status, 200, "rollout {id}: {body}");
        body
    }

    fn wait_phase(&self, id: &str, phase: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let rollout = self.rollout(id);
            if rollout["progress"]["phase"] == phase {
                return rollout;
            }
            let finished = ["completed", "aborted", "rolled_back"]
                .contains(&rollout["progress"]["phase"].as_str().unwrap_or(""));
            if finished || Instant::now() > deadline {
                panic!(
                    "rollout {id} did not reach {phase}: {rollout:#}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `device.assign` audit rows of rollout `id`: (device, assigned digest, rollback flag).
    fn rollout_assignments(&self, id: &str) -> Vec<(String, String, bool)> {
        self.controller
            .get_text("/api/v1/audit?limit=10000")
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|row| row["action"] == "device.assign")
            .filter_map(|row| {
                let details: Value = serde_json::from_str(row["details"].as_str()?).ok()?;
                (details["rollout"] == id).then(|| {
                    (
                        row["object"]
                            .as_str()
                            .unwrap_or_default()
                            .trim_start_matches("device:")
                            .to_owned(),
                        details["active"]["digest"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        details["rollback"] == true,
                    )
                })
            })
            .collect()
    }

    fn cli(&self, args: &[&str]) -> edgefleet_tests::Run {
        run(Command::new(bin("edgefleet"))
            .args(args)
            .envs(self.controller.cli_env())
            .env("EDGEFLEET_CONFIG", self.dir.path().join("cli.toml")))
    }
}

/// Rows of the model's training reference, as request inputs.
fn reference_rows() -> Vec<[f32; 4]> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/demo/reference.csv");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let v: Vec<f32> = line.split(',').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 4).then(|| [v[0], v[1], v[2], v[3]])
        })
        .collect()
}

/// A steady request stream to each agent, bounded in count and time.
struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    const MAX_REQUESTS: u64 = 40_000;
    const MAX_TIME: Duration = Duration::from_secs(600);

    fn start(sockets: Vec<std::path::PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let rows = Arc::new(reference_rows());
        let threads = sockets
            .into_iter()
            .map(|socket| {
                let (stop, answered, rows) = (stop.clone(), answered.clone(), rows.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut client = Client::unix(socket);
                    for i in 0..Self::MAX_REQUESTS {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > Self::MAX_TIME {
                            return;
                        }
                        let batch = if i % 2 == 0 { 1 } else { 4 };
                        let data: Vec<f32> = (0..batch)
                            .flat_map(|k| rows[(i as usize + k) % rows.len()])
                            .collect();
                        let tensor = Tensor::f32(vec![batch as u64, 4], data);
                        if client.infer(&[("features", tensor)]).is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(25));
                    }
                })
            })
            .collect();
        Self {
            stop,
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

fn members_by_wave(rollout: &Value) -> Vec<(u64, u64)> {
    rollout["progress"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["given"].as_u64().unwrap(), w["active"].as_u64().unwrap()))
        .collect()
}

#[test]
fn a_healthy_model_rolls_out_to_every_device_through_three_waves() {
    let mut bed = Bed::start(4);
    let candidate = bed.controller.register_demo_version(
        json!({"name": "pump-anomaly", "version": "1.1.0", "runtime": {"grace_window_s": 1}}),
    );
    bed.start_traffic();
    let started = bed.cli(&[
        "rollout",
        "start",
        "pump-anomaly@1.1.0",
        "--select",
        "site=test",
        "--wave",
        "1,bake=3s",
        "--wave",
        "50%,bake=3s",
        "--wave",
        "100%",
        "--gate",
        "min_inferences=20",
        // Four agents and the test suite share two cores: latency is noise here.
        "--gate",
        "max_p95_latency_ratio=50",
        "--reason",
        "new pump model",
        "--output",
        "json",
    ]);
    assert!(
        started.success(),
        "rollout start: {}{}",
        started.stdout,
        started.stderr
    );
    let answer: Value = serde_json::from_str(&started.stdout).unwrap();
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(answer["progress"]["members"]["total"], 4, "{answer:#}");
    assert_eq!(answer["baseline"]["digest"], bed.baseline.as_str());

    // `watch` follows the rollout until it finishes, one JSON document per refresh.
    let mut watch = Command::new(bin("edgefleet"))
        .args([
            "rollout",
            "watch",
            &id,
            "--interval",
            "1",
            "--output",
            "json",
        ])
        .envs(bed.controller.cli_env())
        .env("EDGEFLEET_CONFIG", bed.dir.path().join("cli.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watched = wait_until(WAIT, "edgefleet rollout watch to return", || {
        watch.try_wait().unwrap()
    });
    let output = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        watched.success(),
        "watch failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        bed.logs()
    );
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert!(docs.len() >= 2, "watch refreshed: {}", docs.len());
    let last = docs.last().unwrap();
    assert_eq!(
        last["progress"]["phase"],
        "completed",
        "{last:#}\n{}",
        bed.logs()
    );
    // Cumulative waves: 1 device, then 50% of 4, then the rest.
    assert_eq!(
        members_by_wave(last),
        vec![(1, 1), (1, 1), (2, 2)],
        "{last:#}"
    );
    let phases: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["progress"]["stage"].as_str())
        .collect();
    println!("watch saw stages {phases:?}");

    for (device, _) in &bed.agents {
        bed.wait_active(device, &candidate);
    }
    let mut given: Vec<_> = bed.rollout_assignments(&id);
    given.sort();
    let expected: Vec<_> = bed
        .agents
        .iter()
        .map(|(d, _)| (d.clone(), candidate.clone(), false))
        .collect();
    assert_eq!(
        given, expected,
        "each device given the candidate exactly once"
    );

    let status = bed.cli(&["rollout", "status", &id]);
    assert!(status.success(), "{}", status.stderr);
    for needle in [
        "completed",
        "pump-anomaly@1.1.0",
        "wave 1 passed its gates",
        "wave 2 passed its gates",
        "completed: 4 device(s) on the candidate, 0 failed",
        "error_rate_increase",
    ] {
        assert!(
            status.stdout.contains(needle),
            "{needle:?} missing in:\n{}",
            status.stdout
        );
    }
    let answered = bed
        .traffic
        .as_ref()
        .unwrap()
        .answered
        .load(Ordering::Relaxed);
    println!("{answered} inference requests answered during the rollout");
    let verify = bed.cli(&["audit", "verify"]);
    assert!(verify.success(), "{}{}", verify.stdout, verify.stderr);
}

#[test]
fn a_model_that_fails_on_live_inputs_is_stopped_at_the_canary_and_rolled_back() {
    let mut bed = Bed::start(3);
    // The same network exported for a fixed batch of one: its golden vectors (batch 1) pass and
    // it activates, but it refuses the batches of four the devices also send. Its local error
    // limit is off, so only the fleet's gate can stop it.
    let candidate = bed.controller.register_demo_version(json!({
        "name": "pump-anomaly",
        "version": "1.1.0",
        "inputs": ["features:f32:1x4"],
        "runtime": {"grace_window_s": 1, "max_error_rate": 1.0},
    }));
    bed.start_traffic();
    let (status, answer) = bed.controller.post(
        "/api/v1/rollouts",
        &json!({
            "candidate": candidate,
            "selector": {"site": "test"},
            "waves": [{"size": "1", "bake_s": 120}, {"size": "100%"}],
            "gates": {"min_inferences": 20, "max_p95_latency_ratio": 50},
            "reason": "batch-one export",
        }),
    );
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let canary = "pump-00";
    let aborted = bed.wait_phase(&id, "aborted");
    let reason = aborted["progress"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("gate breached: inference error rate"),
        "{aborted:#}"
    );
    bed.wait_active(canary, &bed.baseline.clone());
    let row = bed.controller.device(canary);
    assert_eq!(row["assignment"]["rollback"], true, "{row:#}");
    assert_eq!(row["assignment"]["active"]["digest"], bed.baseline.as_str());
    assert_eq!(
        bed.rollout_assignments(&id),
        vec![
            (canary.to_owned(), candidate.clone(), false),
            (canary.to_owned(), bed.baseline.clone(), true),
        ],
        "only the canary was given the candidate, then rolled back"
    );
    for (device, _) in bed.agents.iter().skip(1) {
        assert_eq!(
            bed.controller.device(device)["active_digest"],
            bed.baseline.as_str()
        );
    }
    // The canary answers again on the baseline: batches of four work (once the old worker's
    // connections have drained).
    let rows = reference_rows();
    let data: Vec<f32> = rows[..4].iter().flatten().copied().collect();
    wait_until(WAIT, "the canary to answer a batch of four", || {
        let mut client = bed.agents[0].1.client();
        client
            .infer(&[("features", Tensor::f32(vec![4, 4], data.clone()))])
            .ok()
            .filter(|answer| answer.model.digest == bed.baseline)
    });
}

#[test]
fn a_controller_killed_at_random_moments_finishes_the_rollout_correctly() {
    let mut bed = Bed::start(3);
    let candidate = bed.controller.register_demo_version(
        json!({"name": "pump-anomaly", "version": "1.1.0", "runtime": {"grace_window_s": 1}}),
    );
    bed.start_traffic();
    let (status, answer) = bed.controller.post(
        "/api/v1/rollouts",
        &json!({
            "candidate": candidate,
            "selector": {"site": "test"},
            "waves": [
                {"size": "1", "bake_s": 4},
                {"size": "2", "bake_s": 4},
                {"size": "100%", "bake_s": 2},
            ],
            // The agents share two cores with the test suite: latency is noise here.
            "gates": {"min_inferences": 10, "max_p95_latency_ratio": 50},
        }),
    );
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    // Seeded, so a failure can be replayed.
    let mut seed: u64 = 0x5eed_0f70_11ed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut kills = 0;
    let mut phases = std::collections::BTreeMap::<String, usize>::new();
    while kills < 25 {
        // Every other kill aims at a wave's installing window (assignments out, activations
        // arriving), the rest fall anywhere.
        let pause = Duration::from_millis(if kills % 2 == 0 {
            next() % 200
        } else {
            100 + next() % 1_500
        });
        if kills % 2 == 0 {
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline
                && bed.rollout(&id)["progress"]["phase"] != "installing"
                && bed.rollout(&id)["progress"]["phase"] != "completed"
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        std::thread::sleep(pause);
        let phase = bed.rollout(&id)["progress"]["phase"].clone();
        if ["completed", "aborted", "rolled_back"].contains(&phase.as_str().unwrap_or("")) {
            break;
        }
        bed.controller.kill();
        kills += 1;
        *phases
            .entry(phase.as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        println!("kill {kills}: SIGKILLed the controller after {pause:?} (phase {phase})");
        bed.controller.restart();
    }
    assert!(
        kills >= 6,
        "the rollout finished after only {kills} kill(s); it should take longer"
    );
    println!("killed while: {phases:?}");
    let done = bed.wait_phase(&id, "completed");
    assert_eq!(
        members_by_wave(&done),
        vec![(1, 1), (1, 1), (1, 1)],
        "{done:#}"
    );
    for (device, _) in &bed.agents {
        bed.wait_active(device, &candidate);
    }
    let mut given = bed.rollout_assignments(&id);
    given.sort();
    let expected: Vec<_> = bed
        .agents
        .iter()
        .map(|(d, _)| (d.clone(), candidate.clone(), false))
        .collect();
    assert_eq!(
        given, expected,
        "each device given the candidate exactly once across {kills} kills"
    );
    let resumed = bed
        .controller
        .log_text()
        .matches("resumed an unfinished rollout")
        .count();
    assert!(resumed >= 1, "the driver never resumed:\n{}", bed.logs());
    println!("{kills} kills, {resumed} resumes");
    let verify = bed.cli(&["audit", "verify"]);
    assert!(verify.success(), "{}{}", verify.stdout, verify.stderr);
}

#[test]
fn an_ab_experiment_finds_the_worse_model_and_promotes_the_better_one() {
    let mut bed = Bed::start(4);
    let worse = bed.controller.register_demo_version(json!({
        "name": "pump-anomaly",
        "version": "1.1.0",
        "inputs": ["features:f32:1x4"],
        "runtime": {"grace_window_s": 1, "max_error_rate": 1.0},
    }));
    bed.start_traffic();
    let started = bed.cli(&[
        "experiment",
        "start",
        "pump-anomaly@1.0.0",
        "pump-anomaly@1.1.0",
        "--select",
        "site=test",
        "--min-samples",
        "100",
        "--duration",
        "6s",
        "--max-duration",
        "5m",
        "--reason",
        "batch-one export against the current model",
        "--output",
        "json",
    ]);
    assert!(started.success(), "{}{}", started.stdout, started.stderr);
    let answer: Value = serde_json::from_str(&started.stdout).unwrap();
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(answer["progress"]["a"]["devices"], 2, "{answer:#}");
    assert_eq!(answer["progress"]["b"]["devices"], 2, "{answer:#}");
    let concluded = wait_until(WAIT, "the experiment to conclude", || {
        let (_, e) = bed.controller.get(&format!("/api/v1/experiments/{id}"));
        (e["progress"]["phase"] == "concluded").then_some(e)
    });
    let verdict = &concluded["progress"]["verdict"];
    assert_eq!(verdict["winner"], "A", "{concluded:#}");
    assert!(verdict["p_value"].as_f64().unwrap() < 0.05, "{verdict:#}");
    assert!(verdict["n_a"].as_u64().unwrap() >= 100 && verdict["n_b"].as_u64().unwrap() >= 100);
    assert!(
        verdict["b"].as_f64().unwrap() > verdict["a"].as_f64().unwrap(),
        "{verdict:#}"
    );
    let status = bed.cli(&["experiment", "status", &id]);
    assert!(status.success(), "{}", status.stderr);
    assert!(
        status.stdout.contains("A is better at alpha 0.05"),
        "{}",
        status.stdout
    );

    let promoted = bed.cli(&["experiment", "promote", &id, "--output", "json"]);
    assert!(promoted.success(), "{}{}", promoted.stdout, promoted.stderr);
    let b_devices: Vec<String> = bed
        .rollout_assignments(&id)
        .into_iter()
        .filter(|(_, model, _)| *model == worse)
        .map(|(device, _, _)| device)
        .collect();
    assert_eq!(b_devices.len(), 2, "cohort B was given B");
    for device in &b_devices {
        bed.wait_active(device, &bed.baseline.clone());
        assert_eq!(
            bed.controller.device(device)["assignment"]["rollback"],
            true
        );
    }
    for (device, _) in &bed.agents {
        assert_eq!(
            bed.controller.device(device)["active_digest"],
            bed.baseline.as_str()
        );
    }
    let (_, done) = bed.controller.get(&format!("/api/v1/experiments/{id}"));
    assert_eq!(done["progress"]["phase"], "promoted");
    assert_eq!(done["progress"]["winner"], "A");
}
