//! The `edgefleet` admin CLI. Offline commands (`keys`, `bundle`) work on files and need no
//! controller; online commands (`login`, `device`, `model`, `token`, `audit`, …) drive a
//! controller through its admin API over HTTP ([`online`]).

pub mod bundle;
pub mod keyfile;
pub mod keys;
pub mod online;
pub mod output;
pub mod spec;
pub mod trustdir;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use self::online::Online;

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
    /// Check an API token against a controller and save both as a profile.
    Login(online::profile::Login),
    /// Forget a saved profile (the token stays valid until revoked).
    Logout(online::profile::Logout),
    /// List the saved profiles or choose the current one.
    Profile(online::profile::ProfileArgs),
    /// Enrolled devices: list, show, label, assign a model, revoke.
    Device(Online<online::device::DeviceCommand>),
    /// The model registry: register, list, show, lineage, download, add a signature.
    Model(Online<online::model::ModelCommand>),
    /// One-time device enrollment tokens.
    EnrollToken(Online<online::token::EnrollTokenCommand>),
    /// API tokens and their roles (admin).
    Token(Online<online::token::TokenCommand>),
    /// The controller's hash-chained audit log: verify, export.
    Audit(Online<online::audit::AuditCommand>),
    /// Staged rollouts gated on inference health: start, list, status, watch, pause, resume,
    /// promote, abort, rollback.
    Rollout(Online<online::rollout::RolloutCommand>),
    /// A/B experiments: two models on two cohorts, compared by a significance test.
    Experiment(Online<online::experiment::ExperimentCommand>),
    /// Data capture for retraining: turn it on or off per device, list and download batches.
    Capture(Online<online::capture::CaptureCommand>),
    /// Drift: status per model and scope, per-feature evidence, the model's drift policy.
    Drift(Online<online::drift::DriftCommand>),
    /// Print a shell completion script, e.g. `edgefleet completions bash > /etc/bash_completion.d/edgefleet`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(command) => keys::run(command),
        Command::Bundle(command) => bundle::run(command),
        Command::Login(args) => online::profile::login(&args),
        Command::Logout(args) => online::profile::logout(&args),
        Command::Profile(args) => online::profile::profile(&args),
        Command::Device(command) => online::run(command, online::device::run),
        Command::Model(command) => online::run(command, online::model::run),
        Command::EnrollToken(command) => online::run(command, online::token::run_enroll),
        Command::Token(command) => online::run(command, online::token::run_api),
        Command::Audit(command) => online::run(command, online::audit::run),
        Command::Rollout(command) => online::run(command, online::rollout::run),
        Command::Experiment(command) => online::run(command, online::experiment::run),
        Command::Capture(command) => online::run(command, online::capture::run),
        Command::Drift(command) => online::run(command, online::drift::run),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics when its writer fails (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "edgefleet", &mut script);
            std::io::stdout().write_all(&script)?;
            Ok(())
        }
    }
}

/// 2 when the user must fix the configuration or the command line, 1 for other failures.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<online::profile::ConfigError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// ARCHITECTURE.md: the CLI reaches a controller over HTTP only.
    #[test]
    fn the_cli_never_imports_the_server() {
        fn check(dir: &std::path::Path) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    check(&path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let source = std::fs::read_to_string(&path).unwrap();
                    // Split so that this file does not match itself; comments may name them.
                    let forbidden = [concat!("crate::", "server"), concat!("sq", "lx")];
                    let mut code = source.lines().filter(|l| !l.trim_start().starts_with("//"));
                    assert!(
                        !code.any(|l| forbidden.iter().any(|f| l.contains(f))),
                        "{} imports the controller's server side",
                        path.display()
                    );
                }
            }
        }
        check(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli"));
    }
}
