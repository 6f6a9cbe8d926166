//! End-to-end tests: real binaries, real models, real files.

mod cli_bundles;
