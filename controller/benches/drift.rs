//! Drift detection simulation table.
fn main() {}
