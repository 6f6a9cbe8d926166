//! Staged rollouts of a candidate model over a fleet, gated on how the model behaves in the
//! field. `engine` is the pure state machine; the driver that persists it and carries out its
//! actions builds on it.

pub mod engine;

#[cfg(test)]
mod tests;
