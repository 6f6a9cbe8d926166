//! Drift detection as data in, data out: the math against scipy's values, property tests, the
//! detector and the performance chart as traces compared with snapshots, and the seeded
//! simulator asserting the detection goals.
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

mod detector;
mod math;
mod performance;
mod props;
mod sim;
