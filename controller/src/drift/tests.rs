//! Drift detection as data in, data out.
