//! `edgefleet-agent`: the EdgeFleet device daemon and its local admin commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use edgefleet_agent::config::{AgentConfig, ConfigArgs, LogFormat};
use edgefleet_agent::supervisor::AdminRequest;
use edgefleet_agent::{admin_call, supervisor, worker};
use edgefleet_protocol::SystemClock;

#[derive(Debug, Parser)]
#[command(name = "edgefleet-agent", version, about = "EdgeFleet device agent")]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon (the default).
    Run,
    /// Install a signed bundle on the running agent (standalone mode) and wait for the verdict.
    Install { bundle: PathBuf },
    /// Run a signed bundle as the shadow model beside the active one (`--clear` stops it).
    Shadow {
        #[arg(required_unless_present = "clear")]
        bundle: Option<PathBuf>,
        #[arg(long)]
        clear: bool,
    },
    /// Show the running agent's models, floors and recent events as JSON.
    Status,
    /// Print the effective configuration and exit.
    PrintConfig,
    /// Check the configuration and trust files, then exit.
    CheckConfig,
    /// Internal: the model worker process the daemon starts.
    #[command(hide = true)]
    Worker,
}

fn init_logging(format: LogFormat) {
    let filter = std::env::var("EDGEFLEET_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| String::from("info"));
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Worker) = cli.command {
        init_logging(LogFormat::Plain);
        return worker::main();
    }
    let config = match AgentConfig::resolve(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run | Command::Worker => {
            init_logging(config.log_format);
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(supervisor::run(config, Arc::new(SystemClock))),
                Err(err) => Err(err.into()),
            }
        }
        Command::Install { bundle } => {
            let path = std::fs::canonicalize(&bundle).unwrap_or(bundle);
            admin_call(&config.admin_socket(), &AdminRequest::Install { path }).map(|value| {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            })
        }
        Command::Shadow { bundle, .. } => {
            let path = bundle.map(|b| std::fs::canonicalize(&b).unwrap_or(b));
            admin_call(&config.admin_socket(), &AdminRequest::SetShadow { path }).map(|value| {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            })
        }
        Command::Status => admin_call(&config.admin_socket(), &AdminRequest::Status).map(|value| {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }),
        Command::PrintConfig => {
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::CheckConfig => {
            edgefleet_agent::trust::load(&config, edgefleet_protocol::Clock::now(&SystemClock)).map(
                |trust| {
                    println!(
                        "configuration OK; trusting root v{} and release keyring v{}",
                        trust.root.version, trust.keyring.version
                    );
                },
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
