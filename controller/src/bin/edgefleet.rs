//! `edgefleet`: the EdgeFleet admin CLI.

use std::process::ExitCode;

use clap::Parser;
use edgefleet_controller::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
