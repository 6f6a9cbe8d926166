//! Through Mosquitto (run with the configuration `edgefleet-controller mosquitto-config` writes):
//! a broker SIGKILLed and restarted drops every session and message in flight, and still no
//! report is lost or stored twice: every sequence number of every device is stored once, and
//! each device's telemetry windows tile time without a gap or an overlap.

use edgefleet_sim::{Behaviour, BehaviourTable, Fleet};
use edgefleet_tests::agent::{free_port, wait_until};
use edgefleet_tests::broker::{Mosquitto, mosquitto_available};
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec, mosquitto_config};

use crate::common::{self, WAIT};

#[test]
fn a_broker_killed_and_restarted_loses_and_duplicates_no_report() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (addr, out) = (free_port(), dir.path().join("mosquitto"));
    mosquitto_config(&data, &out, addr);
    let mut broker = Mosquitto::start_generated(&out, addr);
    let spec = ControllerSpec {
        database: None,
        external: Some((addr, format!("kill -HUP {}", broker.pid().unwrap()))),
    };
    let controller = ControllerProcess::start(&data, &spec);
    let digest = controller.register_demo_model();
    let mut config = common::config(&controller, &dir.path().join("sim"), 5);
    config.behaviour = BehaviourTable {
        default: Behaviour {
            inference_rate: 10.0,
            ..Behaviour::default()
        },
        ..BehaviourTable::default()
    };
    let runtime = common::runtime();
    let fleet = runtime.block_on(Fleet::start(config)).unwrap();
    let ids: Vec<String> = fleet.devices().iter().map(|d| d.id.to_string()).collect();
    for id in &ids {
        common::assign(&controller, id, &digest, false);
    }
    wait_until(WAIT, "every device activated", || {
        (fleet.counters().activated == 5).then_some(())
    });
    wait_until(WAIT, "two windows stored from every device", || {
        ids.iter()
            .all(|id| common::reports(&controller, id, "telemetry").len() >= 2)
            .then_some(())
    });

    broker.kill();
    wait_until(WAIT, "every device to notice the broker is gone", || {
        (fleet.online() == 0).then_some(())
    });
    wait_until(WAIT, "reports spooled while the broker is down", || {
        fleet.devices().iter().all(|d| d.unacked >= 2).then_some(())
    });
    broker.restart();
    wait_until(WAIT, "every device back online", || {
        (fleet.online() == 5).then_some(())
    });
    let stored_before: Vec<usize> = ids
        .iter()
        .map(|id| common::reports(&controller, id, "telemetry").len())
        .collect();
    wait_until(WAIT, "the spooled windows and newer ones stored", || {
        ids.iter()
            .zip(&stored_before)
            .all(|(id, before)| common::reports(&controller, id, "telemetry").len() >= before + 3)
            .then_some(())
    });
    wait_until(WAIT, "everything acknowledged", || {
        fleet.devices().iter().all(|d| d.unacked == 0).then_some(())
    });

    for id in &ids {
        let mut seqs: Vec<i64> = ["event", "telemetry"]
            .iter()
            .flat_map(|kind| common::reports(&controller, id, kind))
            .map(|r| r["seq"].as_i64().unwrap())
            .collect();
        seqs.sort_unstable();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(
            seqs, expected,
            "{id}: every report stored once, none missing"
        );
        let windows = common::reports(&controller, id, "telemetry");
        for pair in windows.windows(2) {
            assert_eq!(
                pair[0]["body"]["window_end"], pair[1]["body"]["window_start"],
                "{id}: windows {} and {} do not meet",
                pair[0]["seq"], pair[1]["seq"]
            );
        }
    }
    runtime.block_on(fleet.stop()).unwrap();
}
