//! `edgefleet device`: list, show, label, assign a model, revoke.

use std::collections::HashMap;

use anyhow::Result;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::label_map;
use crate::cli::output::{OutputFormat, Table, field, labels, short, show, text, time};

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List enrolled devices.
    List {
        /// Only devices with this label, `key=value`.
        #[arg(long)]
        label: Option<String>,
    },
    /// Show a device: status, labels, models, last telemetry, recent events.
    Show { id: String },
    /// Set labels (`key=value`) and remove others (`--remove key`); the rest are kept.
    Label(LabelArgs),
    /// Assign a model (manifest digest or name@version) to a device, with an optional shadow.
    Assign(AssignArgs),
    /// Revoke a device: its certificate, key and broker login stop working (admin).
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    id: String,
    /// Labels to set, `key=value`.
    #[arg(required_unless_present_any = ["remove", "replace"])]
    labels: Vec<String>,
    /// A label key to remove (repeatable).
    #[arg(long = "remove")]
    remove: Vec<String>,
    /// Replace all of the device's labels with the given ones (the API's own semantics).
    #[arg(long, conflicts_with = "remove")]
    replace: bool,
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    id: String,
    /// The model to run: its manifest digest or `name@version`.
    #[arg(required_unless_present = "none")]
    model: Option<String>,
    /// Run no model (the device stops serving).
    #[arg(long, conflicts_with = "model")]
    none: bool,
    /// A model to run in shadow on copies of live inputs.
    #[arg(long)]
    shadow: Option<String>,
    /// An explicit rollback: let the device install a lower release than it has seen.
    #[arg(long)]
    rollback: bool,
}

pub fn run(client: &Client, command: DeviceCommand, format: OutputFormat) -> Result<()> {
    match command {
        DeviceCommand::List { label } => {
            let query: Vec<(&str, String)> = label.into_iter().map(|l| ("label", l)).collect();
            let answer = client.get_with(&["devices"], &query)?;
            show(format, &answer, || print_list(client, &answer))
        }
        DeviceCommand::Show { id } => {
            let answer = client.get(&["devices", &id])?;
            show(format, &answer, || {
                print_device(&answer);
                Ok(())
            })
        }
        DeviceCommand::Label(args) => {
            let answer = label(client, &args)?;
            show(format, &answer, || {
                println!("device {} labels: {}", args.id, labels(&answer["labels"]));
                Ok(())
            })
        }
        DeviceCommand::Assign(args) => {
            let body =
                json!({"model": args.model, "shadow": args.shadow, "rollback": args.rollback});
            let answer = client.send_json(Method::POST, &["devices", &args.id, "assign"], &body)?;
            show(format, &answer, || {
                let assignment = &answer["assignment"];
                let shadow = match &assignment["shadow"] {
                    Value::Null => String::new(),
                    shadow => format!("; shadow {}", model_summary(shadow)),
                };
                println!(
                    "assigned {} to {} (assignment {}, expires {}){shadow}",
                    model_summary(&assignment["active"]),
                    args.id,
                    text(&assignment["seq"]),
                    time(&assignment["expires"]),
                );
                Ok(())
            })
        }
        DeviceCommand::Revoke { id } => {
            let answer = client.send_json(Method::POST, &["devices", &id, "revoke"], &json!({}))?;
            show(format, &answer, || {
                println!(
                    "revoked device {id}: its certificate, key and broker login no longer work"
                );
                Ok(())
            })
        }
    }
}

/// The API replaces a device's labels; this reads them first unless `--replace` is given.
fn label(client: &Client, args: &LabelArgs) -> Result<Value> {
    let given = label_map(&args.labels, "label")?;
    let labels = if args.replace {
        given
    } else {
        let device = client.get(&["devices", &args.id])?;
        let mut labels = device["device"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for key in &args.remove {
            labels.remove(key);
        }
        labels.extend(given);
        labels
    };
    let body = json!({"labels": labels});
    Ok(client.send_json(Method::PUT, &["devices", &args.id, "labels"], &body)?)
}

/// `name version (release N)` of a model summary, or `no model`.
fn model_summary(model: &Value) -> String {
    if model.is_null() {
        return String::from("no model");
    }
    match model["name"].as_str() {
        Some(name) => format!(
            "{name} {} (release {})",
            text(&model["version"]),
            text(&model["release"])
        ),
        None => format!("model {}", short(model["digest"].as_str().unwrap_or("?"))),
    }
}

fn status(device: &Value) -> &'static str {
    if !device["revoked_at"].is_null() {
        "revoked"
    } else if device["online"].as_bool() == Some(true) {
        "online"
    } else {
        "offline"
    }
}

fn print_list(client: &Client, answer: &Value) -> Result<()> {
    // Devices name their models by digest; people know them by name@version.
    let mut names = HashMap::new();
    let devices = answer["devices"].as_array().into_iter().flatten();
    if devices.into_iter().any(|d| d["active_digest"].is_string()) {
        let models = client.get(&["models"])?;
        for m in models["models"].as_array().into_iter().flatten() {
            if let Some(digest) = m["digest"].as_str() {
                names.insert(
                    digest.to_owned(),
                    format!("{}@{}", text(&m["name"]), text(&m["version"])),
                );
            }
        }
    }
    let headers = ["ID", "STATUS", "LAST SEEN", "ARCH", "MODEL", "LABELS"];
    Table::of(&headers, &answer["devices"], |d| {
        let model = match d["active_digest"].as_str() {
            Some(digest) => names
                .get(digest)
                .cloned()
                .unwrap_or_else(|| short(digest).to_owned()),
            None => "-".into(),
        };
        vec![
            text(&d["id"]),
            status(d).into(),
            time(&d["last_seen"]),
            text(&d["arch"]),
            model,
            labels(&d["labels"]),
        ]
    })
    .print_or("no devices")
}

/// A `field` line for `value`, shown by `show`, unless it is null.
fn optional_field(name: &str, value: &Value, show: impl FnOnce(&Value) -> String) {
    if !value.is_null() {
        field(name, &show(value));
    }
}

fn print_device(answer: &Value) {
    let d = &answer["device"];
    field("device", &text(&d["id"]));
    field("status", status(d));
    field("last seen", &time(&d["last_seen"]));
    field("arch", &text(&d["arch"]));
    field("agent version", &text(&d["agent_version"]));
    field("labels", &labels(&d["labels"]));
    field("enrolled", &time(&d["enrolled_at"]));
    optional_field("revoked", &d["revoked_at"], time);
    for slot in ["active", "previous", "shadow"] {
        optional_field(&format!("{slot} model"), &answer["models"][slot], |model| {
            format!(
                "{} {}",
                model_summary(model),
                model["digest"].as_str().unwrap_or_default()
            )
        });
    }
    optional_field("assignment", &d["assignment"], |assignment| {
        format!(
            "seq {}: {}, issued {}, expires {}",
            text(&assignment["seq"]),
            model_summary(&assignment["active"]),
            time(&assignment["issued_at"]),
            time(&assignment["expires"])
        )
    });
    optional_field("last telemetry", &answer["last_telemetry"], |telemetry| {
        let body = &telemetry["body"];
        let errors: u64 = body["errors"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, n)| n.as_u64())
            .sum();
        format!(
            "{} – {}: {} inferences, {errors} errors",
            time(&body["window_start"]),
            time(&body["window_end"]),
            text(&body["inferences"])
        )
    });
    for event in answer["events"].as_array().into_iter().flatten() {
        let body = &event["body"];
        // Unit kinds are strings (`activated`), the others objects (`{"rolled_back": …}`).
        let kind = match &body["kind"] {
            Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
            other => text(other),
        };
        let detail = body["detail"].as_str().filter(|d| !d.is_empty());
        field(
            "event",
            &format!(
                "{} {kind} {}{}",
                time(&body["at"]),
                model_summary(&body["model"]),
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            ),
        );
    }
}
