//! `sensor-anomaly`: a pump's sensor stream scored by the local EdgeFleet agent.
//!
//! Each reading (temperature °C, vibration mm/s RMS, motor current A, discharge pressure bar)
//! goes to the agent's local API through `edgefleet-client`; the active model (the pump
//! anomaly classifier `controller/demo/` trains) answers with an anomaly probability, and
//! readings at or above the threshold are printed as anomalies. The ground truth for every
//! reading is sent back with `POST /v1/feedback`, so the fleet's accuracy figures (and the
//! performance-degradation checks built on them) have labels to count.
//!
//! The readings come from a simulated pump (the same generative model the demo model was
//! trained on, seeded) with an injectable fault, or from a CSV file or standard input
//! (`temperature_c,vibration_rms,current_a,pressure_bar[,label]`, a header line first), as a
//! real sensor logger would write it.
//!
//! Output, one line each: `anomaly sample=… p=… truth=… temperature_c=… …` for every flagged
//! reading, then `summary samples=… flagged=… true_anomalies=… correct=… feedback=… model=…`.

mod pump;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use edgefleet_client::{Client, ClientError, GroundTruth, Tensor};

use crate::pump::{FEATURES, Fault, Pump, Reading};

#[derive(Debug, Parser)]
#[command(
    name = "sensor-anomaly",
    version,
    about = "Score a pump's sensor stream on the local EdgeFleet agent"
)]
struct Args {
    /// The agent's local API socket.
    #[arg(
        long,
        env = "EDGEFLEET_API_SOCKET",
        default_value = "/var/lib/edgefleet/agent.sock"
    )]
    socket: PathBuf,
    /// Or its loopback TCP address, e.g. 127.0.0.1:8470.
    #[arg(long, conflicts_with = "socket")]
    tcp: Option<std::net::SocketAddr>,
    /// Read readings from this CSV file (`-` for standard input) instead of the simulation.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Simulated readings to score.
    #[arg(long, default_value_t = 200)]
    samples: u64,
    /// Milliseconds between simulated readings (0: as fast as the agent answers).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// A fault to inject into the simulated pump.
    #[arg(long, value_enum, default_value_t = FaultArg::None)]
    fault: FaultArg,
    /// The reading the fault starts at; it develops over the next ten.
    #[arg(long, default_value_t = 100)]
    fault_at: u64,
    /// Seed of the simulation (the same seed gives the same readings).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Anomaly probability at or above which a reading is flagged.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Do not send ground truth back to the agent.
    #[arg(long)]
    no_feedback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FaultArg {
    None,
    /// Bearing overheating: temperature and vibration climb.
    Bearing,
    /// Cavitation: discharge pressure drops and vibration rises.
    Cavitation,
}

/// What a run counted.
#[derive(Debug, Default)]
struct Summary {
    samples: u64,
    flagged: u64,
    true_anomalies: u64,
    correct: u64,
    feedback: u64,
    model: String,
}

/// The model's input and output, from `GET /v1/model`.
struct Schema {
    input: String,
    output: String,
}

fn schema(client: &mut Client) -> Result<Schema> {
    let info = client
        .model()
        .context("the agent has no model to score with (is one assigned and active?)")?;
    let input = info
        .inputs
        .first()
        .context("the active model has no input")?;
    if input.shape.last().copied().flatten() != Some(FEATURES.len() as u64) {
        bail!(
            "the active model {}@{} takes {:?} for input {}; this program sends rows of {} readings",
            info.model.name,
            info.model.version,
            input.shape,
            input.name,
            FEATURES.len()
        );
    }
    let output = info
        .outputs
        .first()
        .context("the active model has no output")?;
    Ok(Schema {
        input: input.name.clone(),
        output: output.name.clone(),
    })
}

fn score(
    client: &mut Client,
    schema: &Schema,
    args: &Args,
    sample: u64,
    reading: &Reading,
    summary: &mut Summary,
    out: &mut impl Write,
) -> Result<()> {
    let row: Vec<f32> = reading.values.iter().map(|v| *v as f32).collect();
    let reply = client
        .infer(&[(schema.input.as_str(), Tensor::f32(vec![1, 4], row))])
        .with_context(|| format!("reading {sample}: the agent did not score it"))?;
    let p = reply
        .outputs
        .get(&schema.output)
        .and_then(|t| t.data.first().copied())
        .with_context(|| format!("reading {sample}: the answer has no {}", schema.output))?;
    summary.samples += 1;
    summary.model = format!("{}@{}", reply.model.name, reply.model.version);
    let flagged = p >= args.threshold;
    if flagged {
        summary.flagged += 1;
        let values: Vec<String> = FEATURES
            .iter()
            .zip(reading.values)
            .map(|(name, v)| format!("{name}={v}"))
            .collect();
        let truth = reading
            .label
            .map_or_else(|| String::from("-"), |l| l.to_string());
        writeln!(
            out,
            "anomaly sample={sample} p={p:.3} truth={truth} {}",
            values.join(" ")
        )?;
    }
    let Some(label) = reading.label else {
        return Ok(());
    };
    summary.true_anomalies += u64::from(label == 1);
    summary.correct += u64::from(flagged == (label == 1));
    if args.no_feedback {
        return Ok(());
    }
    match client.feedback(reply.id, GroundTruth::Label(label)) {
        Ok(_) => summary.feedback += 1,
        // The model was swapped between the answer and the feedback: that prediction is gone.
        Err(ClientError::Api { status: 404, .. }) => {}
        Err(err) => return Err(err).context(format!("reading {sample}: feedback was refused")),
    }
    Ok(())
}

fn run(args: &Args) -> Result<Summary> {
    let mut client = match args.tcp {
        Some(addr) => Client::tcp(addr),
        None => Client::unix(&args.socket),
    };
    let schema = schema(&mut client)?;
    let mut summary = Summary::default();
    let mut out = std::io::stdout().lock();
    match &args.input {
        Some(path) => {
            let reader: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(
                    std::fs::File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?,
                )
            };
            for (i, reading) in pump::read_csv(reader).enumerate() {
                let reading = reading?;
                score(
                    &mut client,
                    &schema,
                    args,
                    i as u64,
                    &reading,
                    &mut summary,
                    &mut out,
                )?;
            }
        }
        None => {
            let fault = match args.fault {
                FaultArg::None => None,
                FaultArg::Bearing => Some((Fault::Bearing, args.fault_at)),
                FaultArg::Cavitation => Some((Fault::Cavitation, args.fault_at)),
            };
            let mut pump = Pump::new(args.seed, fault);
            for i in 0..args.samples {
                let reading = pump.next_reading();
                score(
                    &mut client,
                    &schema,
                    args,
                    i,
                    &reading,
                    &mut summary,
                    &mut out,
                )?;
                if args.interval_ms > 0 {
                    std::thread::sleep(Duration::from_millis(args.interval_ms));
                }
            }
        }
    }
    writeln!(
        out,
        "summary samples={} flagged={} true_anomalies={} correct={} feedback={} model={}",
        summary.samples,
        summary.flagged,
        summary.true_anomalies,
        summary.correct,
        summary.feedback,
        summary.model
    )?;
    Ok(summary)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
