//! What the simulator's benches share: a real controller with the broker asked for, and a
//! simulator configuration for it.

// Each bench includes this module and uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgefleet_sim::SimConfig;
use edgefleet_tests::agent::free_port;
use edgefleet_tests::broker::Mosquitto;
use edgefleet_tests::controller::{ControllerProcess, ControllerSpec, mosquitto_config};

/// A controller under `dir` with `broker` (`embedded`, its rumqttd, or `mosquitto`, run with the
/// configuration `mosquitto-config` writes); the broker's pid and name for memory readings.
pub struct Bed {
    pub controller: ControllerProcess,
    pub broker: Option<Mosquitto>,
}

impl Bed {
    pub fn start(dir: &Path, broker: &str) -> Result<Bed> {
        let data = dir.join("data");
        let mut spec = ControllerSpec::default();
        let broker = match broker {
            "embedded" => None,
            "mosquitto" => {
                let (addr, out) = (free_port(), dir.join("mosquitto"));
                mosquitto_config(&data, &out, addr);
                let broker = Mosquitto::start_generated(&out, addr);
                let pid = broker.pid().context("mosquitto runs")?;
                spec.external = Some((addr, format!("kill -HUP {pid}")));
                Some(broker)
            }
            other => bail!("--broker {other:?}: use embedded or mosquitto"),
        };
        let controller = ControllerProcess::start(&data, &spec);
        Ok(Bed { controller, broker })
    }

    /// The broker's process (the controller's, for the embedded broker) and what to call it.
    pub fn broker_process(&self) -> Result<(u32, &'static str)> {
        Ok(match &self.broker {
            Some(mosquitto) => (mosquitto.pid().context("mosquitto runs")?, "mosquitto"),
            None => (
                self.controller.pid().context("the controller runs")?,
                "controller (embedded broker)",
            ),
        })
    }

    /// A simulator configuration for `devices` devices of this controller, state in `state`.
    pub fn sim_config(&self, state: &Path, devices: usize) -> Result<SimConfig> {
        let token = std::fs::read_to_string(self.controller.data_dir.join("admin-token"))?;
        let mut config = SimConfig::new(
            format!("http://{}", self.controller.api),
            token,
            self.controller.ca_path(),
            self.controller.data_dir.join("keys"),
            state,
            devices,
        );
        config.start_timeout = Duration::from_secs(1800);
        Ok(config)
    }
}
