//! A restarted simulator reuses its enrolled identities (no new enrollment, same devices, same
//! models) and its reports go on with sequence numbers the controller has not seen.

use edgefleet_sim::Fleet;
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};

use crate::common::{self, WAIT};

fn used_tokens(controller: &ControllerProcess) -> usize {
    let (status, body) = controller.get("/api/v1/enroll-tokens");
    assert_eq!(status, 200, "{body}");
    body["enroll_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["used_at"].is_null())
        .count()
}

#[test]
fn a_restarted_simulator_reuses_its_identities_and_models() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let digest = controller.register_demo_model();
    let state = dir.path().join("sim");
    let runtime = common::runtime();
    let model = digest.parse().unwrap();

    let fleet = runtime
        .block_on(Fleet::start(common::config(&controller, &state, 3)))
        .unwrap();
    let ids: Vec<String> = fleet.devices().iter().map(|d| d.id.to_string()).collect();
    for id in &ids {
        common::assign(&controller, id, &digest, false);
    }
    wait_until(WAIT, "every device activated", || {
        (fleet.counters().activated == 3).then_some(())
    });
    wait_until(WAIT, "a window from every device, all acknowledged", || {
        let stored = ids
            .iter()
            .all(|id| !common::reports(&controller, id, "telemetry").is_empty());
        (stored && fleet.devices().iter().all(|d| d.unacked == 0)).then_some(())
    });
    runtime.block_on(fleet.stop()).unwrap();
    for id in &ids {
        controller.wait_device(id, "offline (its last will)", |d| d["online"] == false);
    }
    assert_eq!(used_tokens(&controller), 3);
    let before: Vec<usize> = ids
        .iter()
        .map(|id| common::reports(&controller, id, "telemetry").len())
        .collect();

    let fleet = runtime
        .block_on(Fleet::start(common::config(&controller, &state, 3)))
        .unwrap();
    assert_eq!(used_tokens(&controller), 3, "no device enrolled again");
    assert_eq!(
        fleet.count_on(&model),
        3,
        "the devices still run their model"
    );
    for (id, before) in ids.iter().zip(before) {
        controller.wait_device(id, "online again", |d| d["online"] == true);
        // New windows are stored: their sequence numbers are new to the controller.
        wait_until(WAIT, &format!("{id}: windows after the restart"), || {
            (common::reports(&controller, id, "telemetry").len() >= before + 2).then_some(())
        });
        // The retained assignment is not news to a device that already carried it out.
        assert_eq!(
            common::event_kinds(&controller, id),
            ["downloading", "installed", "activated"]
        );
    }
    let counters = runtime.block_on(fleet.stop()).unwrap();
    assert_eq!(
        counters.activated, 0,
        "nothing installed again: {counters:?}"
    );
}
