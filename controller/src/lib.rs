//! EdgeFleet controller library: the `edgefleet` admin CLI and, around it, the fleet controller.

pub mod cli;
pub mod fsutil;
