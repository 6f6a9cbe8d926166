//! Data capture end to end with real processes: a real controller and a real agent, capture
//! turned on for the device with `edgefleet capture enable` (its assignment re-signed at once),
//! inference with known inputs at a sample rate of one half, ground truth fed back, the batches
//! announced, uploaded and stored, and the CSV `edgefleet capture download` writes holding exactly
//! the sampled requests, each with its outputs and its ground truth; then capture turned off. On
//! SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use edgefleet_client::{GroundTruth, Tensor};
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use edgefleet_tests::postgres::require_postgres;
use edgefleet_tests::run_ok;
use serde_json::{Value, json};

const DEVICE: &str = "pump-cap";
const REQUESTS: usize = 40;
const WAIT: Duration = Duration::from_secs(90);

/// The four readings of request `i`, distinct per request.
fn reading(i: usize) -> Vec<f32> {
    vec![40.0 + i as f32 * 0.5, 2.0 + i as f32 * 0.125, 12.0, 5.75]
}

#[test]
fn captured_requests_download_as_exactly_the_sampled_rows_on_sqlite() {
    run(None);
}

#[test]
fn captured_requests_download_as_exactly_the_sampled_rows_on_postgresql() {
    let Some(pg) =
        require_postgres("captured_requests_download_as_exactly_the_sampled_rows_on_postgresql")
    else {
        return;
    };
    run(Some(pg.url()));
    let stored = pg
        .psql(&format!(
            "SELECT count(*) FROM captures WHERE device = '{DEVICE}' AND uploaded_at IS NOT NULL"
        ))
        .unwrap();
    assert_ne!(stored.trim(), "0");
}

fn run(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ControllerSpec {
        database,
        external: None,
    };
    let controller = ControllerProcess::start(&dir.path().join("data"), &spec);
    let digest = controller.register_demo_model();
    let mut agent = controller.enroll_agent(DEVICE, &dir.path().join("agent"));
    agent.wait_ready();
    controller.wait_device(DEVICE, "online", |d| d["online"] == true);
    let (status, body) = controller.post(
        &format!("/api/v1/devices/{DEVICE}/assign"),
        &json!({"model": digest}),
    );
    assert_eq!(status, 200, "{body}");
    controller.wait_device(DEVICE, "running the model", |d| {
        d["active_digest"] == digest.as_str()
    });

    // On, through the CLI: the device's assignment is re-signed with the settings.
    let enabled = run_ok(controller.cli().args([
        "capture",
        "enable",
        DEVICE,
        "--sample-rate",
        "0.5",
        "--batch-samples",
        "8",
        "--batch-age-s",
        "2",
        "--output",
        "json",
    ]));
    let enabled: Value = serde_json::from_str(&enabled.stdout).unwrap();
    assert_eq!(enabled["capture"]["sample_rate"], 0.5, "{enabled}");
    assert_eq!(enabled["assignment"]["capture"], true, "{enabled}");
    wait_until(WAIT, "the agent to apply the capture settings", || {
        (agent.status()["capture"]["on"] == true).then_some(())
    });

    let mut client = agent.client();
    let mut sampled: BTreeMap<u64, (Vec<f32>, f64, u32)> = BTreeMap::new();
    for i in 0..REQUESTS {
        let reply = client
            .infer(&[("features", Tensor::f32(vec![1, 4], reading(i)))])
            .unwrap();
        let label = (i % 2) as u32;
        client
            .feedback(reply.id, GroundTruth::Label(label))
            .unwrap();
        if reply.captured {
            let p = reply.outputs["anomaly_probability"].data[0];
            sampled.insert(reply.id, (reading(i), p, label));
        }
    }
    assert!(
        !sampled.is_empty() && sampled.len() < REQUESTS,
        "a rate of one half samples some requests: {}",
        sampled.len()
    );

    // Every sampled request arrives: announced, answered with a URL, uploaded, stored, then
    // deleted on the device. A sample's ground truth may land in a later batch than the sample,
    // so wait for every record (each sampled request and its feedback) to be through.
    let started = std::time::Instant::now();
    wait_until(WAIT, "the device to upload every captured record", || {
        let capture = agent.status()["capture"].clone();
        assert!(
            started.elapsed() < WAIT - Duration::from_secs(5),
            "{} sampled; the agent's capture: {capture}\ncontroller log:\n{}\nagent log:\n{}",
            sampled.len(),
            controller.log_text(),
            agent.log_text()
        );
        (capture["records"] == 2 * sampled.len() as u64
            && capture["bytes"] == 0
            && capture["batches_pending"] == 0)
            .then_some(())
    });
    let (status, uploaded) = controller.get(&format!("/api/v1/captures?device={DEVICE}"));
    assert_eq!(status, 200, "{uploaded}");
    assert_eq!(
        uploaded["uploaded_samples"],
        sampled.len() as u64,
        "{uploaded}"
    );
    for batch in uploaded["captures"].as_array().unwrap() {
        assert_eq!(batch["model_digest"], digest.as_str());
        assert!(batch["uploaded_at"].is_i64(), "{batch}");
    }
    let listed = run_ok(
        controller
            .cli()
            .args(["capture", "list", "--device", DEVICE]),
    );
    assert!(listed.stdout.starts_with("DEVICE"), "{}", listed.stdout);
    assert_eq!(
        listed.stdout.lines().count(),
        uploaded["captures"].as_array().unwrap().len() + 1
    );

    let csv = dir.path().join("captures.csv");
    let written = run_ok(
        controller
            .cli()
            .args(["capture", "download", "--model", "pump-anomaly@1.0.0", "-o"])
            .arg(&csv),
    );
    assert!(
        written.stdout.contains(&format!("({} rows", sampled.len())),
        "{}",
        written.stdout
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(
        header,
        [
            "time",
            "device",
            "model",
            "prediction",
            "temperature_c",
            "vibration_rms",
            "current_a",
            "pressure_bar",
            "anomaly_probability",
            "feedback_label",
            "feedback_value"
        ]
    );
    let mut rows: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in lines {
        let cells: Vec<String> = line.split(',').map(str::to_owned).collect();
        assert_eq!(cells[1], DEVICE);
        assert_eq!(cells[2], "pump-anomaly@1.0.0");
        let id: u64 = cells[3].parse().unwrap();
        assert!(rows.insert(id, cells).is_none(), "prediction {id} twice");
    }
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        sampled.keys().collect::<Vec<_>>(),
        "exactly the sampled requests"
    );
    for (id, (inputs, p, label)) in &sampled {
        let row = &rows[id];
        let expected: Vec<String> = inputs.iter().map(f32::to_string).collect();
        assert_eq!(row[4..8], expected[..], "prediction {id}");
        assert_eq!(row[8], (*p as f32).to_string(), "prediction {id}");
        assert_eq!(
            row[9],
            label.to_string(),
            "prediction {id}: its ground truth"
        );
        assert_eq!(row[10], "");
    }

    // Off again: the assignment says so and the agent stops capturing; both are audited.
    run_ok(controller.cli().args(["capture", "disable", DEVICE]));
    wait_until(WAIT, "the agent to stop capturing", || {
        (agent.status()["capture"]["on"] == false).then_some(())
    });
    let reply = client
        .infer(&[("features", Tensor::f32(vec![1, 4], reading(0)))])
        .unwrap();
    assert!(!reply.captured);
    let audit = run_ok(controller.cli().args(["audit", "export"]));
    for action in ["device.capture_on", "device.capture_off"] {
        assert!(
            audit.stdout.contains(&format!("\"action\":\"{action}\"")),
            "{action} not audited:\n{}",
            audit.stdout
        );
    }
}
