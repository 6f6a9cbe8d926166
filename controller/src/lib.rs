//! EdgeFleet controller library: the `edgefleet` admin CLI and the fleet controller.

pub mod cli;
pub mod demo;
pub mod drift;
pub mod fsutil;
pub mod release;
pub mod rollout;
pub mod server;
