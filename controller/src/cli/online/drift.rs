//! `edgefleet drift`: the drift status of every watched (model version, scope), one model's
//! per-feature evidence and events, and the model's drift policy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use crate::cli::output::{OutputFormat, Table, field, print_json, short_digest, show, text, time};

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// Every watched model version and scope: drifting or not, since when, the last evaluation.
    Status,
    /// One model (a name, `name@version` or a digest): per scope, the per-feature table (χ²
    /// p-value, PSI, Jensen–Shannon, state, top bins); then its drift events and retraining
    /// requests.
    Show { model: String },
    /// A model's drift policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Store a model's policy: a JSON file (`--file`), flags over it.
    Set(SetArgs),
    /// Show a model's policy (the defaults when none is stored).
    Show { model: String },
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The model name the policy is for.
    model: String,
    /// The policy as JSON (see the README's "Drift and the closed loop"); flags override it.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Rows a scope sums before a window is tested.
    #[arg(long)]
    window_samples: Option<u64>,
    /// Per-window false-alarm level, split over the features (Bonferroni).
    #[arg(long)]
    alpha: Option<f64>,
    /// A label whose values form groups watched as scopes (repeat for several).
    #[arg(long = "group-by")]
    group_by: Vec<String>,
    /// The retraining command, run with `sh -c` on the controller's host, the request JSON on
    /// standard input.
    #[arg(long)]
    retrain_command: Option<String>,
    /// A file on the controller's host holding the API token the command gets as
    /// `EDGEFLEET_TOKEN`.
    #[arg(long)]
    retrain_token_file: Option<PathBuf>,
    /// Scope kinds whose detections fire retraining (`device`, `group`, `fleet`; repeat).
    #[arg(long = "retrain-scope")]
    retrain_scopes: Vec<String>,
    /// The rollout plan for retrained candidates, as JSON (a `POST /api/v1/rollouts` body
    /// without `candidate`).
    #[arg(long)]
    auto_rollout_file: Option<PathBuf>,
}

fn read_json(path: &PathBuf) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl SetArgs {
    fn policy(&self) -> Result<Value> {
        let mut policy = match &self.file {
            Some(file) => read_json(file)?,
            None => json!({}),
        };
        if !policy.is_object() {
            anyhow::bail!("the policy file must hold a JSON object");
        }
        if let Some(n) = self.window_samples {
            policy["detector"]["window_samples"] = json!(n);
        }
        if let Some(alpha) = self.alpha {
            policy["detector"]["alpha"] = json!(alpha);
        }
        if !self.group_by.is_empty() {
            policy["group_by"] = json!(self.group_by);
        }
        if let Some(command) = &self.retrain_command {
            policy["retrain"]["command"] = json!(command);
        }
        if let Some(file) = &self.retrain_token_file {
            policy["retrain"]["token_file"] = json!(file);
        }
        if !self.retrain_scopes.is_empty() {
            policy["retrain"]["scopes"] = json!(self.retrain_scopes);
        }
        if let Some(file) = &self.auto_rollout_file {
            policy["auto_rollout"] = read_json(file)?;
        }
        Ok(policy)
    }
}

fn number(value: &Value) -> String {
    match value.as_f64() {
        None => "-".into(),
        Some(v) if v != 0.0 && v.abs() < 1e-3 => format!("{v:.2e}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn model_cell(item: &Value) -> String {
    format!(
        "{}@{}",
        text(&item["model"]["name"]),
        text(&item["model"]["version"])
    )
}

fn state_cell(item: &Value) -> String {
    if item["drifting"] == true {
        "drifting".into()
    } else {
        "stable".into()
    }
}

fn top_bins(value: &Value) -> String {
    let bins: Vec<String> = value
        .as_array()
        .into_iter()
        .flatten()
        .map(|bin| {
            let edge = |v: &Value| v.as_f64().map_or_else(|| "∞".into(), |x| format!("{x}"));
            format!(
                "[{}, {}) {}/{:.0}",
                bin["lower"]
                    .as_f64()
                    .map_or_else(|| "-∞".into(), |x| format!("{x}")),
                edge(&bin["upper"]),
                text(&bin["observed"]),
                bin["expected"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    if bins.is_empty() {
        "-".into()
    } else {
        bins.join("; ")
    }
}

fn print_status(answer: &Value) -> Result<()> {
    Table::of(
        &[
            "MODEL",
            "DIGEST",
            "SCOPE",
            "STATE",
            "SINCE",
            "WINDOWS",
            "SCORE",
            "EVALUATED",
        ],
        &answer["scopes"],
        |s| {
            vec![
                model_cell(s),
                short_digest(&s["model"]["digest"]),
                text(&s["scope_text"]),
                state_cell(s),
                time(&s["since"]),
                text(&s["windows"]),
                text(&s["score"]),
                time(&s["last_evaluated_at"]),
            ]
        },
    )
    .print_or("no model is watched for drift yet (no telemetry with reference features)")?;
    print_retrains(&answer["retrains"])
}

fn print_retrains(retrains: &Value) -> Result<()> {
    if retrains.as_array().is_none_or(|r| r.is_empty()) {
        return Ok(());
    }
    println!();
    Table::of(
        &["RETRAIN EVENT", "MODEL", "STATUS", "REQUESTED", "DETAIL"],
        retrains,
        |r| {
            vec![
                text(&r["event"]),
                text(&r["model_name"]),
                text(&r["status"]),
                time(&r["requested_at"]),
                text(&r["detail"]),
            ]
        },
    )
    .print_or("")
}

fn print_show(answer: &Value) -> Result<()> {
    field("model", &text(&answer["model"]));
    let scopes = answer["scopes"].as_array().cloned().unwrap_or_default();
    if scopes.is_empty() {
        println!("\nno scope of this model has been watched yet");
    }
    for scope in &scopes {
        println!();
        println!(
            "{} {} — {} (since {}, window {}, score {})",
            model_cell(scope),
            text(&scope["scope_text"]),
            state_cell(scope),
            time(&scope["since"]),
            text(&scope["windows"]),
            text(&scope["score"])
        );
        Table::of(
            &["FEATURE", "P", "PSI", "JS", "STATE", "FLAGGED", "TOP BINS"],
            &scope["features"],
            |f| {
                vec![
                    text(&f["name"]),
                    number(&f["p"]),
                    number(&f["psi"]),
                    number(&f["js"]),
                    text(&f["state"]),
                    text(&f["flagged"]),
                    top_bins(&f["top_bins"]),
                ]
            },
        )
        .print_or("  (no window evaluated yet)")?;
    }
    println!();
    Table::of(
        &["EVENT", "AT", "KIND", "VERSION", "SCOPE"],
        &answer["events"],
        |e| {
            vec![
                text(&e["id"]),
                time(&e["at"]),
                text(&e["kind"]),
                text(&e["version"]),
                text(&e["scope_text"]),
            ]
        },
    )
    .print_or("no drift events")?;
    print_retrains(&answer["retrains"])
}

pub fn run(client: &Client, command: DriftCommand, format: OutputFormat) -> Result<()> {
    match command {
        DriftCommand::Status => {
            let answer = client.get(&["drift"])?;
            show(format, &answer, || print_status(&answer))
        }
        DriftCommand::Show { model } => {
            let answer = client.get(&["drift", &model])?;
            show(format, &answer, || print_show(&answer))
        }
        DriftCommand::Policy {
            command: PolicyCommand::Show { model },
        } => {
            let answer = client.get(&["models", &model, "drift-policy"])?;
            show(format, &answer, || {
                field("model", &text(&answer["model"]));
                field("stored", &text(&answer["stored"]));
                print_json(&answer["policy"])
            })
        }
        DriftCommand::Policy {
            command: PolicyCommand::Set(args),
        } => {
            let policy = args.policy()?;
            let answer = client.send_json(
                Method::PUT,
                &["models", &args.model, "drift-policy"],
                &policy,
            )?;
            show(format, &answer, || {
                println!("stored the drift policy of {}", args.model);
                print_json(&answer["policy"])
            })
        }
    }
}
