//! The README's main job, end to end with real processes: `edgefleet-controller demo` starts a
//! controller (embedded broker), registers the repo's model, enrolls real agent processes over
//! HTTPS, assigns the model over MQTT, runs inference through each agent's API and waits until
//! every inference is counted in ingested telemetry. Once on SQLite, once on PostgreSQL.

use std::process::Command;

use edgefleet_tests::postgres::require_postgres;
use edgefleet_tests::{bin, run_ok};

fn demo(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut command = Command::new(bin("edgefleet-controller"));
    command
        .arg("demo")
        .args(["--agents", "2", "--requests", "30"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--agent-bin", bin("edgefleet-agent").to_str().unwrap()])
        .args(extra)
        .env("EDGEFLEET_LOG", "warn");
    let out = run_ok(&mut command);
    for expected in [
        "2 devices enrolled and online",
        "all devices activated",
        "pump-01: 30/30 answered",
        "pump-02: 30/30 answered",
        "hash chain intact",
    ] {
        assert!(
            out.stdout.contains(expected),
            "missing {expected:?} in:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    // Telemetry: every inference counted once, per device.
    for device in ["pump-01", "pump-02"] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(&format!("{device}:")) && l.contains("telemetry windows"))
            .unwrap_or_else(|| panic!("no telemetry line for {device}:\n{}", out.stdout));
        assert!(line.ends_with("30 inferences ingested"), "{line}");
    }
    out.stdout
}

#[test]
fn demo_runs_the_loop_on_sqlite_with_the_embedded_broker() {
    demo(&[]);
}

#[test]
fn demo_runs_the_loop_on_postgresql() {
    let Some(pg) = require_postgres("demo_runs_the_loop_on_postgresql") else {
        return;
    };
    demo(&["--database", &pg.url()]);
    // The controller's state went to PostgreSQL.
    let devices = pg.psql("SELECT count(*) FROM devices").unwrap();
    assert_eq!(devices.trim(), "2");
    let telemetry = pg
        .psql("SELECT count(*) FROM reports WHERE kind = 'telemetry'")
        .unwrap();
    assert!(telemetry.trim().parse::<u32>().unwrap() >= 2, "{telemetry}");
}
