//! Staged rollouts of a candidate model over a fleet, gated on how the model behaves in the
//! field. `engine` is the pure state machine; `driver` persists it, feeds it what devices report
//! and carries out what it decides.

pub mod driver;
pub mod engine;
pub mod experiment;

#[cfg(test)]
mod tests;
