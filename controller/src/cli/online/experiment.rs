//! `edgefleet experiment`: A/B experiments — start one over two cohorts, list, show the arms'
//! metrics and the test's verdict, conclude, promote the winner, abort.

use anyhow::Result;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::{label_map, parse_seconds};
use crate::cli::output::{OutputFormat, Table, field, labels, short, show, text, time};

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Start an experiment: model A (control) and B (treatment) on two cohorts.
    Start(StartArgs),
    /// List experiments.
    List,
    /// Show an experiment: both arms' numbers and the test's verdict.
    Status { id: String },
    /// Run the test now, before the planned duration (both arms need their minimum sample).
    Conclude { id: String },
    /// Give the winner to the other cohort.
    Promote { id: String },
    /// End the experiment and put cohort B back on A.
    Abort {
        id: String,
        /// Why: recorded in the audit log with who did it.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The control model: manifest digest or name@version.
    a: String,
    /// The treatment model.
    b: String,
    /// Only devices with this label, `key=value` (repeatable; all must match).
    #[arg(long = "select")]
    select: Vec<String>,
    /// Percentage of the devices in cohort B.
    #[arg(long, default_value_t = 50)]
    split: u8,
    /// What decides: `error_rate` or `accuracy` (two-proportion z-test; accuracy needs
    /// ground-truth feedback), or `latency` (Mann-Whitney U).
    #[arg(long, default_value = "error_rate")]
    metric: String,
    /// Significance level of the two-sided test.
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    /// Samples each arm needs: requests, or feedback labels for accuracy.
    #[arg(long, default_value_t = 1000)]
    min_samples: u64,
    /// The test runs once, no earlier than this (seconds, or with s, m, h, d).
    #[arg(long, default_value = "1h", value_parser = parse_seconds)]
    duration: u64,
    /// Still short of samples by then, the experiment ends without a winner.
    #[arg(long, default_value = "7d", value_parser = parse_seconds)]
    max_duration: u64,
    /// Why: recorded in the audit log.
    #[arg(long)]
    reason: Option<String>,
}

pub fn run(client: &Client, command: ExperimentCommand, format: OutputFormat) -> Result<()> {
    let operate = |id: &str, action: &str, body: Value| -> Result<()> {
        let answer = client.send_json(Method::POST, &["experiments", id, action], &body)?;
        show(format, &answer, || {
            print_status(&answer);
            Ok(())
        })
    };
    match command {
        ExperimentCommand::Start(args) => {
            let body = json!({
                "a": args.a,
                "b": args.b,
                "selector": label_map(&args.select, "select")?,
                "split_percent": args.split,
                "metric": args.metric,
                "alpha": args.alpha,
                "min_samples": args.min_samples,
                "duration_s": args.duration,
                "max_duration_s": args.max_duration,
                "reason": args.reason,
            });
            let answer = client.send_json(Method::POST, &["experiments"], &body)?;
            show(format, &answer, || {
                println!("started experiment {}", text(&answer["id"]));
                println!();
                print_status(&answer);
                Ok(())
            })
        }
        ExperimentCommand::List => {
            let answer = client.get(&["experiments"])?;
            show(format, &answer, || {
                Table::of(
                    &["ID", "PHASE", "METRIC", "WINNER", "P", "A", "B", "STARTED"],
                    &answer["experiments"],
                    |e| {
                        vec![
                            text(&e["id"]),
                            text(&e["phase"]),
                            text(&e["metric"]),
                            text(&e["winner"]),
                            text(&e["p_value"]),
                            short(e["a"].as_str().unwrap_or("-")).to_owned(),
                            short(e["b"].as_str().unwrap_or("-")).to_owned(),
                            time(&e["created_at"]),
                        ]
                    },
                )
                .print_or("no experiments")
            })
        }
        ExperimentCommand::Status { id } => {
            let answer = client.get(&["experiments", &id])?;
            show(format, &answer, || {
                print_status(&answer);
                Ok(())
            })
        }
        ExperimentCommand::Conclude { id } => operate(&id, "conclude", json!({})),
        ExperimentCommand::Promote { id } => operate(&id, "promote", json!({})),
        ExperimentCommand::Abort { id, reason } => {
            operate(&id, "abort", json!({ "reason": reason }))
        }
    }
}

fn model(value: &Value) -> String {
    format!("{}@{}", text(&value["name"]), text(&value["version"]))
}

fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn print_status(experiment: &Value) {
    let progress = &experiment["progress"];
    field("experiment", &text(&experiment["id"]));
    field("A (control)", &model(&experiment["a"]));
    field("B (treatment)", &model(&experiment["b"]));
    field("selector", &labels(&experiment["selector"]));
    field("phase", &text(&progress["phase"]));
    field(
        "test",
        &format!(
            "{} by {} at alpha {}, {} sample(s) per arm",
            text(&progress["metric"]),
            text(&progress["test"]),
            text(&progress["alpha"]),
            text(&progress["min_samples"])
        ),
    );
    field(
        "runs",
        &format!(
            "from {}, test no earlier than {}, at the latest {}",
            time(&progress["started"]),
            time(&progress["ends_no_earlier_than"]),
            time(&progress["ends_at_the_latest"])
        ),
    );
    println!();
    let mut arms = Table::new(&[
        "ARM",
        "DEVICES",
        "ACTIVE",
        "REQUESTS",
        "ERROR RATE",
        "P95 µs",
        "FEEDBACK",
        "ACCURACY",
    ]);
    for (name, arm) in [("A", &progress["a"]), ("B", &progress["b"])] {
        arms.row(vec![
            name.into(),
            text(&arm["devices"]),
            text(&arm["active"]),
            text(&arm["requests"]),
            percent(&arm["error_rate"]),
            text(&arm["p95_latency_us"]),
            text(&arm["feedback"]),
            percent(&arm["accuracy"]),
        ]);
    }
    print!("{}", arms.render());
    println!();
    match progress["verdict"].as_object() {
        Some(_) => field("verdict", &text(&progress["verdict"]["summary"])),
        None => field("so far", &text(&progress["current"]["summary"])),
    }
    if let Some(winner) = progress["winner"].as_str() {
        field("promoted", winner);
    }
    if let Some(reason) = progress["reason"].as_str() {
        field("aborted", reason);
    }
}
