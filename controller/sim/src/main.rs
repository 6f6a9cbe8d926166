//! `edgefleet-sim`: runs a simulated fleet against a controller until stopped (Ctrl-C, SIGTERM or
//! `--duration`), with progress and a summary on stdout and logs on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgefleet_sim::{
    BehaviourTable, DeviceSelector, FetchMode, Fleet, LabelRule, Phase, Progress, SimConfig,
    SimError,
};

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-sim",
    version,
    about = "EdgeFleet fleet simulator: lightweight simulated devices on the real protocol"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        env = "EDGEFLEET_LOG_FORMAT",
        default_value = "plain",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll (or reuse) and run simulated devices until stopped.
    Run(Box<RunArgs>),
    /// Check a behaviour file and print what it sets.
    CheckBehaviour {
        /// The behaviour file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The controller's admin API.
    #[arg(
        long,
        env = "EDGEFLEET_SIM_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// A file holding an operator or admin API token (`<controller data dir>/admin-token`).
    #[arg(long, env = "EDGEFLEET_SIM_TOKEN_FILE")]
    token_file: PathBuf,
    /// The fleet CA certificate (`<controller data dir>/pki/ca.pem`).
    #[arg(long, env = "EDGEFLEET_SIM_CA")]
    ca: PathBuf,
    /// The controller's trust directory (`<controller data dir>/keys`).
    #[arg(long, env = "EDGEFLEET_SIM_KEYS_DIR")]
    keys_dir: PathBuf,
    /// Where identities and device records are kept; a later run reuses the devices.
    #[arg(
        long,
        env = "EDGEFLEET_SIM_STATE_DIR",
        default_value = "edgefleet-sim-state"
    )]
    state_dir: PathBuf,
    /// How many devices.
    #[arg(long, env = "EDGEFLEET_SIM_DEVICES", default_value_t = 100)]
    devices: usize,
    /// Behaviour per model and device (TOML); healthy models everywhere without it.
    #[arg(long, env = "EDGEFLEET_SIM_BEHAVIOUR")]
    behaviour: Option<PathBuf>,
    /// Device ids are this prefix and an index.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// A label every device enrolls with (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A label whose values are dealt out in turn: device i gets value i mod n (repeatable).
    #[arg(long = "split", value_name = "KEY=V1,V2,...")]
    splits: Vec<String>,
    /// Seed of every random draw.
    #[arg(long, env = "EDGEFLEET_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// Telemetry window, in seconds.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    /// `full` downloads and verifies whole bundles; `manifest` fetches and verifies only the
    /// signed manifest (Range requests), for large fleets.
    #[arg(long, default_value = "full")]
    fetch: FetchMode,
    /// New connections per second while starting.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Connection attempts in flight at once (brokers that handshake one client at a time, like
    /// the embedded one, need few).
    #[arg(long, default_value_t = 64)]
    max_connecting: usize,
    /// Bound on one connection attempt (TCP, TLS, CONNECT), in seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout_s: u64,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Bundle fetches in flight at once.
    #[arg(long, default_value_t = 64)]
    fetch_concurrency: usize,
    /// MQTT keep-alive, in seconds.
    #[arg(long, default_value_t = 30)]
    keep_alive_s: u64,
    /// Bound on enrolling and connecting every device, in seconds.
    #[arg(long, default_value_t = 600)]
    start_timeout_s: u64,
    /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Print a progress line this often, in seconds.
    #[arg(long, default_value_t = 10)]
    report_every_s: u64,
}

fn key_value(text: &str, flag: &str) -> Result<(String, String), SimError> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| SimError::Config(format!("{flag} {text:?}: use KEY=VALUE")))
}

fn label_rules(args: &RunArgs) -> Result<Vec<LabelRule>, SimError> {
    let mut rules = Vec::new();
    for label in &args.labels {
        let (key, value) = key_value(label, "--label")?;
        rules.push(LabelRule {
            devices: DeviceSelector::All,
            labels: BTreeMap::from([(key, value)]),
        });
    }
    for split in &args.splits {
        let (key, values) = key_value(split, "--split")?;
        let values: Vec<&str> = values.split(',').filter(|v| !v.is_empty()).collect();
        if values.is_empty() {
            return Err(SimError::Config(format!(
                "--split {split:?}: give at least one value"
            )));
        }
        for (i, value) in values.iter().enumerate() {
            rules.push(LabelRule {
                devices: DeviceSelector::Indices((i..args.devices).step_by(values.len()).collect()),
                labels: BTreeMap::from([(key.clone(), (*value).to_owned())]),
            });
        }
    }
    Ok(rules)
}

fn config(args: &RunArgs) -> Result<SimConfig, SimError> {
    let token = std::fs::read_to_string(&args.token_file).map_err(|err| {
        SimError::Config(format!(
            "cannot read the API token file {}: {err}",
            args.token_file.display()
        ))
    })?;
    let mut config = SimConfig::new(
        args.api.clone(),
        token,
        args.ca.clone(),
        args.keys_dir.clone(),
        args.state_dir.clone(),
        args.devices,
    );
    if let Some(path) = &args.behaviour {
        config.behaviour = BehaviourTable::load(path)?;
    }
    config.id_prefix = args.prefix.clone();
    config.labels = label_rules(args)?;
    config.seed = args.seed;
    if args.window_s == 0 {
        return Err(SimError::Config(String::from(
            "--window-s must be at least 1",
        )));
    }
    config.window = Duration::from_secs(args.window_s);
    config.fetch = args.fetch;
    config.connect_rate = args.connect_rate;
    config.max_connecting = args.max_connecting;
    config.connect_timeout = Duration::from_secs(args.connect_timeout_s);
    config.enroll_concurrency = args.enroll_concurrency;
    config.fetch_concurrency = args.fetch_concurrency;
    config.keep_alive_s = args.keep_alive_s.max(5);
    config.start_timeout = Duration::from_secs(args.start_timeout_s);
    let started = std::time::Instant::now();
    config.progress = Some(Arc::new(move |p: Progress| {
        let what = match p.phase {
            Phase::Enrolling => "enrolled",
            Phase::Connecting => "connected",
        };
        println!(
            "{what} {}/{} ({:.1} s)",
            p.done,
            p.total,
            started.elapsed().as_secs_f64()
        );
    }));
    Ok(config)
}

/// This process's resident memory (`VmRSS`), in KiB.
fn resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn summary(fleet: &Fleet, started: tokio::time::Instant) -> String {
    let counters = fleet.counters();
    let models = fleet
        .active_counts()
        .into_iter()
        .map(|(digest, n)| {
            let name =
                digest.map_or_else(|| String::from("no model"), |d| d.to_hex()[..12].to_owned());
            format!("{name}: {n}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "t={}s online {}/{}; active {models}; reports sent {} acked {} resent {} dropped {}; activated {} rolled back {} install failed {}; assignments refused {}",
        started.elapsed().as_secs(),
        fleet.online(),
        fleet.len(),
        counters.sent,
        counters.acked,
        counters.resent,
        counters.dropped,
        counters.activated,
        counters.rolled_back,
        counters.install_failed,
        counters.refused_assignments
    )
}

async fn run(args: RunArgs) -> Result<(), SimError> {
    let config = config(&args)?;
    let started = tokio::time::Instant::now();
    let fleet = Fleet::start(config).await?;
    println!(
        "all {} devices enrolled and connected in {:.1} s; simulator memory (VmRSS) {}",
        fleet.len(),
        started.elapsed().as_secs_f64(),
        resident().map_or_else(
            || String::from("unknown"),
            |kib| format!(
                "{:.1} MiB, {:.1} KiB per device",
                kib as f64 / 1024.0,
                kib as f64 / fleet.len() as f64
            )
        )
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| SimError::Config(format!("cannot watch SIGTERM: {err}")))?;
    let until = args.duration_s.map(|s| started + Duration::from_secs(s));
    let mut report = tokio::time::interval(Duration::from_secs(args.report_every_s.max(1)));
    report.tick().await;
    loop {
        let end = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = report.tick() => println!("{}", summary(&fleet, started)),
            _ = end => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    println!("{}", summary(&fleet, started));
    let counters = fleet.stop().await?;
    println!(
        "stopped: {} reports sent, {} acknowledged, {} resent, {} dropped",
        counters.sent, counters.acked, counters.resent, counters.dropped
    );
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = std::env::var("EDGEFLEET_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| String::from("info,rumqttc=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::CheckBehaviour { file } => BehaviourTable::load(&file)
            .map(|table| println!("{table:#?}"))
            .map_err(SimError::from),
        Command::Run(args) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(run(*args)),
            Err(err) => Err(SimError::Config(format!("cannot start the runtime: {err}"))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(if err.is_config() { 2 } else { 1 })
        }
    }
}
