//! End-to-end tests: real binaries, real models, real files.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

mod capture;
mod cli_bundles;
mod cli_online;
mod closed_loop;
mod controller_demo;
mod cross_arch;
mod deploy;
mod fleet;
mod release;
mod rollout;
