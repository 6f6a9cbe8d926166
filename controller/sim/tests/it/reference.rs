//! The check against the reference: a real `edgefleet-agent` and a simulated device side by side
//! on one controller, given the same assignments (a model, a newer one, then a rollback to the
//! first), report the same sequence of event kinds and go through the same status transitions.

use edgefleet_protocol::Sha256Digest;
use edgefleet_sim::{Behaviour, BehaviourTable, Dist, Fleet};
use edgefleet_tests::agent::wait_until;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec};
use serde_json::Value;

use crate::common::{self, WAIT};

/// The (active, previous) models the controller shows for each device, each change once.
#[derive(Debug, Default)]
struct Transitions {
    seen: Vec<(String, String)>,
}

impl Transitions {
    fn poll(&mut self, controller: &ControllerProcess, device: &str, names: &[(&str, &str)]) {
        let row = controller.device(device);
        let name = |digest: &Value| {
            names
                .iter()
                .find(|(d, _)| Some(*d) == digest.as_str())
                .map_or_else(|| String::from("-"), |(_, n)| (*n).to_owned())
        };
        let state = (name(&row["active_digest"]), name(&row["previous_digest"]));
        if self.seen.last() != Some(&state) {
            self.seen.push(state);
        }
    }
}

#[test]
fn a_simulated_device_reports_what_a_real_agent_reports_in_the_same_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProcess::start(&dir.path().join("data"), &ControllerSpec::default());
    let v1 = controller.register_demo_model();
    let v2 = controller.register_demo_version(serde_json::json!({"name": "pump-anomaly", "version": "1.1.0", "runtime": {"grace_window_s": 1}}));
    let names = [(v1.as_str(), "1.0.0"), (v2.as_str(), "1.1.0")];
    let mut agent = controller.enroll_agent("agent-00000", &dir.path().join("agent"));
    agent.wait_ready();
    let mut config = common::config(&controller, &dir.path().join("sim"), 1);
    // The agent watches each model through its 1 s grace window before activating it.
    config.behaviour = BehaviourTable {
        default: Behaviour {
            activation_delay_ms: Dist::Fixed(1000.0),
            ..Behaviour::default()
        },
        ..BehaviourTable::default()
    };
    let runtime = common::runtime();
    let fleet = runtime.block_on(Fleet::start(config)).unwrap();
    let devices = [
        String::from("agent-00000"),
        fleet.devices()[0].id.to_string(),
    ];
    for device in &devices {
        controller.wait_device(device, "online", |d| d["online"] == true);
    }
    let mut transitions = [Transitions::default(), Transitions::default()];
    let steps = [(&v1, false), (&v2, false), (&v1, true)];
    for (step, (digest, rollback)) in steps.iter().enumerate() {
        for device in &devices {
            common::assign(&controller, device, digest, *rollback);
        }
        let want: Sha256Digest = digest.parse().unwrap();
        wait_until(
            WAIT,
            &format!("step {step}: both devices activated the model"),
            || {
                for (device, seen) in devices.iter().zip(&mut transitions) {
                    seen.poll(&controller, device, &names);
                }
                let done = devices.iter().all(|device| {
                    let kinds = common::event_kinds(&controller, device);
                    kinds.len() >= 3 * (step + 1)
                        && kinds.last().map(String::as_str) == Some("activated")
                });
                (done && fleet.count_on(&want) == 1).then_some(())
            },
        );
        for (device, seen) in devices.iter().zip(&mut transitions) {
            seen.poll(&controller, device, &names);
        }
    }
    let [agent_kinds, sim_kinds] = devices
        .clone()
        .map(|d| common::event_kinds(&controller, &d));
    assert_eq!(
        agent_kinds,
        [
            "downloading",
            "installed",
            "activated",
            "downloading",
            "installed",
            "activated",
            "downloading",
            "installed",
            "activated"
        ],
        "the agent's events"
    );
    assert_eq!(sim_kinds, agent_kinds, "the simulated device's events");
    let [agent_states, sim_states] = transitions.map(|t| t.seen);
    let state = |a: &str, p: &str| (a.to_owned(), p.to_owned());
    assert_eq!(
        agent_states,
        [
            state("-", "-"),
            state("1.0.0", "-"),
            state("1.1.0", "1.0.0"),
            state("1.0.0", "1.1.0")
        ],
        "the agent's status transitions"
    );
    assert_eq!(
        sim_states, agent_states,
        "the simulated device's status transitions"
    );
    // The models the events name, too.
    let models = |device: &str| -> Vec<Value> {
        common::reports(&controller, device, "event")
            .iter()
            .map(|e| e["body"]["model"]["version"].clone())
            .collect()
    };
    assert_eq!(models(&devices[1]), models(&devices[0]));
    runtime.block_on(fleet.stop()).unwrap();
}
