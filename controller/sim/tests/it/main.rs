//! The fleet simulator against real `edgefleet-controller` processes (and a real agent, and a
//! real Mosquitto): enrollment, connection, assignments, telemetry, restarts, broker outages, and
//! the check against the reference agent. Build the binaries first:
//! `cargo build -p edgefleet-controller -p edgefleet-agent -p edgefleet-sim --bins`.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test by panicking"
)]

mod cli;
mod common;
mod lifecycle;
mod mosquitto;
mod reference;
mod restart;
