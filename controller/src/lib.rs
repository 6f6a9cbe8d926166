//! EdgeFleet controller library: the `edgefleet` admin CLI and the fleet controller.

pub mod cli;
pub mod fsutil;
pub mod release;
