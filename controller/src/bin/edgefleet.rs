//! `edgefleet`: the EdgeFleet admin CLI.

use std::process::ExitCode;

use clap::Parser;
use edgefleet_controller::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            cli::exit_code(&err)
        }
    }
}
