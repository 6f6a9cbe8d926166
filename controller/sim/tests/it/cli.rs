//! The `edgefleet-sim` binary: a short run prints progress and a summary; what it cannot use is
//! named, with exit status 2 for configuration errors and 1 for runtime failures.

use std::path::Path;
use std::process::Command;

use edgefleet_tests::agent::free_port;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use edgefleet_tests::{bin, run, run_ok};

/// `edgefleet-sim run` for `controller`'s fleet (`EDGEFLEET_SIM_*` set as a user would).
fn sim(controller: &ControllerProcess, state: &Path, token_file: &Path) -> Command {
    let mut command = Command::new(bin("edgefleet-sim"));
    command
        .arg("run")
        .env("EDGEFLEET_SIM_API", format!("http://{}", controller.api))
        .env("EDGEFLEET_SIM_TOKEN_FILE", token_file)
        .env("EDGEFLEET_SIM_CA", controller.ca_path())
        .env("EDGEFLEET_SIM_KEYS_DIR", controller.data_dir.join("keys"))
        .env("EDGEFLEET_SIM_STATE_DIR", state)
        .env("EDGEFLEET_LOG", "warn");
    command
}

#[test]
fn the_binary_runs_a_fleet_and_names_what_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let token = controller.data_dir.join("admin-token");
    let behaviour = dir.path().join("behaviour.toml");
    std::fs::write(&behaviour, "[default]\ninference_rate = 5\nwindow_s = 3\n").unwrap();

    let out = run(sim(&controller, &dir.path().join("bad"), &token)
        .args(["--devices", "2"])
        .arg("--behaviour")
        .arg(&behaviour));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("unknown field `window_s`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("line 3"), "{}", out.stderr);

    std::fs::write(&behaviour, "[default]\ninference_rate = 5\n\n[[devices]]\nselect = { indices = [1] }\nbehaviour = { install_failure = 1.0 }\n").unwrap();
    let out = run_ok(
        sim(&controller, &dir.path().join("sim"), &token)
            .args([
                "--devices",
                "2",
                "--window-s",
                "1",
                "--duration-s",
                "3",
                "--split",
                "cohort=a,b",
            ])
            .arg("--behaviour")
            .arg(&behaviour),
    );
    for line in [
        "enrolled 2/2",
        "connected 2/2",
        "all 2 devices enrolled and connected",
        "online 2/2",
        "stopped:",
    ] {
        assert!(
            out.stdout.contains(line),
            "{line:?} missing in:\n{}",
            out.stdout
        );
    }
    let (_, listed) = controller.get("/api/v1/devices?label=cohort=b");
    let cohort_b: Vec<&str> = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(cohort_b, ["sim-00001"]);

    let refused = dir.path().join("refused-token");
    std::fs::write(&refused, format!("efk_{}", "0".repeat(64))).unwrap();
    let out = run(sim(&controller, &dir.path().join("refused"), &refused).args(["--devices", "1"]));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the controller refused the admin token (401"),
        "{}",
        out.stderr
    );

    let mut unreachable = sim(&controller, &dir.path().join("unreachable"), &token);
    unreachable.args([
        "--devices",
        "1",
        "--api",
        &format!("http://{}", free_port()),
    ]);
    let out = run(&mut unreachable);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("cannot reach the controller at http://127.0.0.1:"),
        "{}",
        out.stderr
    );

    let out = run(sim(&controller, &dir.path().join("nokeys"), &token).args([
        "--devices",
        "1",
        "--keys-dir",
        "/nonexistent",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("/nonexistent/root-v1.cbor: cannot read it"),
        "{}",
        out.stderr
    );
}
