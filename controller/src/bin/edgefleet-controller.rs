//! `edgefleet-controller`: the EdgeFleet fleet controller.

use std::process::ExitCode;

use clap::Parser;
use edgefleet_controller::server::config::{ControllerCli, ControllerCommand};

fn main() -> ExitCode {
    let cli = ControllerCli::parse();
    if let Some(ControllerCommand::ValidateModel) = cli.command {
        return edgefleet_controller::server::validate::child_main();
    }
    // The demo prints its own progress; the embedded broker reports every agent it stops as a
    // dropped connection, which is noise there.
    let default_log = match cli.command {
        Some(ControllerCommand::Demo(_)) => "warn,rumqttd=off,rumqttc=off,sqlx=warn",
        _ => "info,rumqttd=warn,rumqttc=warn,sqlx=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEFLEET_LOG")
                .unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None | Some(ControllerCommand::Serve) => {
                let running = edgefleet_controller::server::start(&cli.serve).await?;
                println!(
                    "edgefleet-controller: API http://{}  devices https://{}  (Ctrl-C to stop)",
                    running.api, running.devices
                );
                tokio::signal::ctrl_c().await?;
                running.app.store.close().await;
                Ok(())
            }
            Some(ControllerCommand::Demo(args)) => {
                edgefleet_controller::demo::run(&cli.serve, &args).await
            }
            Some(ControllerCommand::MosquittoConfig(args)) => {
                edgefleet_controller::server::mosquitto::write_config(&cli.serve, &args)
            }
            Some(ControllerCommand::ValidateModel) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
