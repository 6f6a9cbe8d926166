//! EdgeFleet fleet simulator: many lightweight simulated devices that speak the real protocol to a
//! real controller through the real broker, for tests, benchmarks and demos.
//!
//! Each device enrolls like an agent (one-time token from the admin API, its own key and CSR,
//! HTTPS to the device endpoint), keeps one MQTT v5 connection over mutual TLS, verifies its
//! signed assignments, fetches and verifies what they name, and reports events, telemetry
//! windows and its retained status sealed with its MAC key, as `edgefleet-agent` does — at a tiny
//! fraction of an agent's cost, so thousands run on one machine. What each device does with each
//! model (failures, latency, errors, drift, …) is its [`Behaviour`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgefleet_sim::SimError> {
//! use edgefleet_sim::{Fleet, SimConfig};
//! let config = SimConfig::new(
//!     "http://127.0.0.1:8080",
//!     "efk_…",
//!     "edgefleet-data/pki/ca.pem",
//!     "edgefleet-data/keys",
//!     "sim-state",
//!     1000,
//! );
//! let fleet = Fleet::start(config).await?;
//! println!("{} online", fleet.online());
//! let counters = fleet.stop().await?;
//! # Ok(()) }
//! ```

mod behaviour;
mod device;
mod enroll;
mod fetch;
mod fleet;
mod link;
mod state;
mod telemetry;
#[cfg(test)]
mod testing;
mod tls;

use std::path::PathBuf;

use rand::SeedableRng;

pub use behaviour::{
    Behaviour, BehaviourError, BehaviourPatch, BehaviourTable, DeviceRule, DeviceSelector, Dist,
    Drift, ErrorRates, ModelKey,
};
pub use device::{AGENT_VERSION, Counters};
pub use fetch::FetchMode;
pub use fleet::{DeviceView, Fleet, LabelRule, Phase, Progress, ProgressFn, SimConfig};
pub use state::StateError;

/// Why the simulator cannot start or go on; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Behaviour(#[from] BehaviourError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "{path}: {message}; pass the controller's keys directory (<data dir>/keys) with --keys-dir"
    )]
    Trust { path: PathBuf, message: String },
    #[error(
        "cannot reach the controller at {url}: {message}; is it running, and are --api and its device endpoint right?"
    )]
    Unreachable { url: String, message: String },
    #[error(
        "the controller refused the admin token ({status} {message}); pass an operator or admin API token with --token-file"
    )]
    TokenRefused { status: u16, message: String },
    #[error(
        "{url} kept answering 429 (rate limited) until the start deadline; the controller limits API calls per token and enrollments per address to --rate-limit-per-minute (default 600): start it with at least twice the device count"
    )]
    RateLimited { url: String },
    #[error("{url} answered {status}: {message}")]
    Api {
        url: String,
        status: u16,
        message: String,
    },
    #[error("enrolling {device}: {message}")]
    Enroll { device: String, message: String },
    #[error(
        "device {device} is already enrolled at the controller, but its identity is not in the state directory; use the state directory it was enrolled from, another --prefix, or revoke it"
    )]
    AlreadyEnrolled { device: String },
    #[error(
        "the manifest of {model}, which the state directory records as installed, cannot be fetched ({message}); remove devices.cbor from the state directory to start the devices without models"
    )]
    Manifest { model: String, message: String },
    #[error(
        "{connected} of {total} devices connected to the broker within {timeout_s} s; {reasons}"
    )]
    Connect {
        connected: usize,
        total: usize,
        timeout_s: u64,
        reasons: String,
    },
}

impl SimError {
    /// Whether the error is in the configuration (exit status 2) rather than at run time (1).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            SimError::Config(_) | SimError::Behaviour(_) | SimError::Trust { .. }
        )
    }
}

/// An error and its causes, `: `-separated.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        next = cause.source();
    }
    text
}

/// The random-number generator of device `index` under `seed`: the same seed gives every device
/// the same draws.
pub(crate) fn device_rng(seed: u64, index: u64) -> rand::rngs::Xoshiro256PlusPlus {
    rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
