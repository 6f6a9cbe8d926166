//! Unit tests of `state`: identities and snapshots survive a reopen; one simulator per directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn identity(device: &str) -> Identity {
    Identity {
        device: device.to_owned(),
        certificate_pem: String::from("-----BEGIN CERTIFICATE-----"),
        key_pem: String::from("-----BEGIN PRIVATE KEY-----"),
        mac_key_hex: "ab".repeat(32),
        mqtt_url: String::from("mqtts://127.0.0.1:8883"),
        labels: BTreeMap::from([(String::from("cohort"), String::from("a"))]),
    }
}

#[test]
fn identities_and_records_survive_a_reopen_and_keys_stay_private() {
    let dir = tempfile::tempdir().unwrap();
    {
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load_identity("sim-00000").unwrap(), None);
        assert_eq!(state.load_snapshot().unwrap(), Snapshot::default());
        state.save_identity(&identity("sim-00000")).unwrap();
        state.sync().unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.devices.insert(
            String::from("sim-00000"),
            DeviceRecord {
                seq_limit: 2048,
                ..DeviceRecord::default()
            },
        );
        state.save_snapshot(&snapshot).unwrap();
    }
    let state = StateDir::open(dir.path()).unwrap();
    assert_eq!(
        state.load_identity("sim-00000").unwrap(),
        Some(identity("sim-00000"))
    );
    assert_eq!(
        state.load_snapshot().unwrap().devices["sim-00000"].seq_limit,
        2048
    );
    let mode = fs::metadata(dir.path().join("identities/sim-00000.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!dir.path().join("identities/sim-00000.tmp").exists());
}

#[test]
fn a_second_simulator_cannot_use_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = StateDir::open(dir.path()).unwrap();
    let err = StateDir::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("its own --state-dir"), "{err}");
}

#[test]
fn a_corrupt_identity_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    fs::write(dir.path().join("identities/sim-00001.json"), b"{").unwrap();
    let err = state.load_identity("sim-00001").unwrap_err();
    assert!(
        err.to_string().contains("sim-00001.json is corrupt"),
        "{err}"
    );
    fs::write(
        dir.path().join("identities/sim-00002.json"),
        serde_json::to_vec(&identity("sim-00003")).unwrap(),
    )
    .unwrap();
    let err = state.load_identity("sim-00002").unwrap_err();
    assert!(
        err.to_string().contains("it holds device sim-00003"),
        "{err}"
    );
}
