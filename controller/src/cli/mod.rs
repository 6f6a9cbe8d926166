//! The `edgefleet` admin CLI. Offline commands (`keys`, `bundle`) work on files and need no
//! controller.

pub mod bundle;
pub mod keyfile;
pub mod keys;
pub mod spec;
pub mod trustdir;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet",
    version,
    about = "EdgeFleet admin CLI: keys, signed model bundles, fleet operations"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the root of trust and the release keys (offline).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Build, sign, verify and inspect model bundles (offline).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(command) => keys::run(command),
        Command::Bundle(command) => bundle::run(command),
    }
}
