//! What the tests share: a simulator configured for a controller process, and the controller's
//! view of devices and their reports.

use std::path::Path;
use std::time::Duration;

use edgefleet_sim::SimConfig;
use edgefleet_tests::controller::ControllerProcess;
use serde_json::{Value, json};

/// Bound on waits for the fleet (the machine may be busy building).
pub const WAIT: Duration = Duration::from_secs(90);

/// A runtime for the simulator; its tasks run while the test thread waits.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `devices` simulated devices for `controller`, state in `state_dir`, one-second windows.
pub fn config(controller: &ControllerProcess, state_dir: &Path, devices: usize) -> SimConfig {
    let token = std::fs::read_to_string(controller.data_dir.join("admin-token")).unwrap();
    let mut config = SimConfig::new(
        format!("http://{}", controller.api),
        token,
        controller.ca_path(),
        controller.data_dir.join("keys"),
        state_dir,
        devices,
    );
    config.window = Duration::from_secs(1);
    config.start_timeout = WAIT;
    config
}

/// Assigns `digest` to `device` over the admin API.
pub fn assign(controller: &ControllerProcess, device: &str, digest: &str, rollback: bool) {
    let (status, body) = controller.post(
        &format!("/api/v1/devices/{device}/assign"),
        &json!({"model": digest, "rollback": rollback}),
    );
    assert_eq!(status, 200, "assign {digest} to {device}: {body}");
}

/// The device's stored reports of `kind`, oldest first.
pub fn reports(controller: &ControllerProcess, device: &str, kind: &str) -> Vec<Value> {
    let (status, body) = controller.get(&format!(
        "/api/v1/devices/{device}/reports?kind={kind}&limit=10000"
    ));
    assert_eq!(status, 200, "reports of {device}: {body}");
    let mut reports = body["reports"].as_array().unwrap().clone();
    reports.reverse();
    reports
}

/// An event's kind as a short name: `downloading`, `rolled_back(error_rate)`, ….
pub fn event_kind(event: &Value) -> String {
    match &event["body"]["kind"] {
        Value::String(kind) => kind.clone(),
        Value::Object(map) => {
            let (kind, fields) = map.iter().next().unwrap();
            match fields["reason"].as_str() {
                Some(reason) => format!("{kind}({reason})"),
                None => kind.clone(),
            }
        }
        other => panic!("an event kind: {other}"),
    }
}

/// The kinds of the device's stored events, oldest first.
pub fn event_kinds(controller: &ControllerProcess, device: &str) -> Vec<String> {
    reports(controller, device, "event")
        .iter()
        .map(event_kind)
        .collect()
}

/// Waits until the device's stored events are exactly `expected` (reports reach the controller
/// a moment after the device made them).
pub fn wait_events(controller: &ControllerProcess, device: &str, expected: &[&str]) {
    let mut last = Vec::new();
    let found =
        edgefleet_tests::agent::wait_until(WAIT, &format!("{device}: events {expected:?}"), || {
            last = event_kinds(controller, device);
            (last.len() >= expected.len()).then(|| last.clone())
        });
    assert_eq!(found, expected, "{device}'s events");
}
