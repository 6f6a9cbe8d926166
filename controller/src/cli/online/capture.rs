//! `edgefleet capture`: turn data capture on or off for a device, list the captured batches,
//! download them as CSV for retraining.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use crate::cli::output::{Column, OutputFormat, field, short_digest, show, text, time};
use crate::fsutil;

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Capture a sample of a device's inference requests (with outputs and fed-back ground
    /// truth) for retraining; the device applies it with its next assignment, sent at once.
    Enable(EnableArgs),
    /// Stop capturing on a device; batches it has not uploaded yet are refused.
    Disable { device: String },
    /// Show a device's capture settings.
    Show { device: String },
    /// List captured batches (announced and uploaded), oldest first.
    List(Filter),
    /// Download the uploaded batches as CSV: a row per captured input row, a column per input
    /// element (named after the model's features), the outputs, the ground truth.
    Download {
        #[command(flatten)]
        filter: Filter,
        /// Write to this file (replaced atomically) instead of standard output.
        #[arg(long, short = 'o')]
        output_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct EnableArgs {
    device: String,
    /// Fraction of answered requests captured, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    sample_rate: f64,
    /// Close a batch (and offer it for upload) at this many samples…
    #[arg(long, default_value_t = 100)]
    batch_samples: u32,
    /// …or this many seconds after it opened.
    #[arg(long, default_value_t = 300)]
    batch_age_s: u32,
    /// Capture inputs only, not the model's outputs.
    #[arg(long)]
    no_outputs: bool,
    /// Do not capture fed-back ground truth.
    #[arg(long)]
    no_feedback: bool,
}

#[derive(Debug, Args)]
pub struct Filter {
    /// A model: manifest digest, `name@version`, or a name (every version).
    #[arg(long)]
    model: Option<String>,
    /// Only this device's batches.
    #[arg(long)]
    device: Option<String>,
}

impl Filter {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(model) = &self.model {
            query.push(("model", model.clone()));
        }
        if let Some(device) = &self.device {
            query.push(("device", device.clone()));
        }
        query
    }
}

fn print_settings(device: &str, capture: &Value) {
    if capture.is_null() {
        println!("capture is off on {device}");
        return;
    }
    field("device", device);
    field("sample rate", &text(&capture["sample_rate"]));
    field(
        "batches",
        &format!(
            "{} samples or {} s",
            text(&capture["max_batch_samples"]),
            text(&capture["max_batch_age_s"])
        ),
    );
    field("outputs", &text(&capture["outputs"]));
    field("feedback", &text(&capture["feedback"]));
}

pub fn run(client: &Client, command: CaptureCommand, format: OutputFormat) -> Result<()> {
    match command {
        CaptureCommand::Enable(args) => {
            let body = json!({
                "sample_rate": args.sample_rate,
                "max_batch_samples": args.batch_samples,
                "max_batch_age_s": args.batch_age_s,
                "outputs": !args.no_outputs,
                "feedback": !args.no_feedback,
            });
            let answer =
                client.send_json(Method::PUT, &["devices", &args.device, "capture"], &body)?;
            show(format, &answer, || {
                print_settings(&args.device, &answer["capture"]);
                Ok(())
            })
        }
        CaptureCommand::Disable { device } => {
            let answer = client.delete(&["devices", &device, "capture"])?;
            show(format, &answer, || {
                println!("capture is off on {device}");
                Ok(())
            })
        }
        CaptureCommand::Show { device } => {
            let answer = client.get(&["devices", &device, "capture"])?;
            show(format, &answer, || {
                print_settings(&device, &answer["capture"]);
                Ok(())
            })
        }
        CaptureCommand::List(filter) => {
            let answer = client.get_with(&["captures"], &filter.query())?;
            const COLUMNS: &[Column] = &[
                ("DEVICE", "device", text),
                ("BATCH", "batch", text),
                ("MODEL", "model_digest", short_digest),
                ("SAMPLES", "samples", text),
                ("BYTES", "bytes", text),
                ("FIRST", "first_at", time),
                ("UPLOADED", "uploaded_at", time),
            ];
            show(format, &answer, || {
                crate::cli::output::Table::columns(COLUMNS, &answer["captures"])
                    .print_or("no captured batches")
            })
        }
        CaptureCommand::Download {
            filter,
            output_file,
        } => download(client, &filter, output_file, format),
    }
}

fn download(
    client: &Client,
    filter: &Filter,
    output_file: Option<PathBuf>,
    format: OutputFormat,
) -> Result<()> {
    let query = filter.query();
    let path = &["captures", "download"];
    let Some(file) = output_file else {
        let mut out = std::io::stdout().lock();
        client.download_with(path, &query, &mut out, |_| {})?;
        out.flush()?;
        return Ok(());
    };
    let written = fsutil::write_atomic_with(&file, fsutil::SECRET_MODE, |out| {
        Ok(client.download_with(path, &query, out, |_| {})?)
    })?;
    let rows = std::fs::read(&file)
        .map(|bytes| {
            bytes
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                .saturating_sub(1)
        })
        .unwrap_or(0);
    let summary = json!({"file": file, "bytes": written, "rows": rows});
    show(format, &summary, || {
        println!("wrote {} ({rows} rows, {written} bytes)", file.display());
        Ok(())
    })
}
