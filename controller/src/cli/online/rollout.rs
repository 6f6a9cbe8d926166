//! `edgefleet rollout`: start a staged rollout, list, show its status (waves and gate values),
//! watch it live, and pause, resume, promote, abort or roll it back.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::Client;
use super::{label_map, parse_seconds};
use crate::cli::output::{OutputFormat, Table, field, labels, print_json, short, show, text, time};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start rolling a candidate model out over the devices a selector picks.
    Start(StartArgs),
    /// List rollouts.
    List,
    /// Show a rollout: plan, phase, progress per wave, gate values, recent records.
    Status { id: String },
    /// Show a rollout's progress live until it finishes (Ctrl-C stops watching, not the rollout).
    Watch {
        id: String,
        /// Seconds between refreshes (or a number with s or m).
        #[arg(long, default_value = "2", value_parser = parse_seconds)]
        interval: u64,
    },
    /// Let a rollout that waits for approval begin.
    Approve(OptionalReason),
    /// Pause the rollout where it is (no new assignments; gates still watched).
    Pause(ReasonArgs),
    /// Resume a paused rollout; the current stage restarts its clock.
    Resume(OptionalReason),
    /// End the current bake (or shadow phase) now, without waiting for more evidence.
    Promote(OptionalReason),
    /// Stop the rollout and roll every device given the candidate back to the baseline.
    Abort(ReasonArgs),
    /// Roll every device given the candidate back, also after the rollout completed.
    Rollback(ReasonArgs),
}

#[derive(Debug, Args)]
pub struct ReasonArgs {
    id: String,
    /// Why: recorded in the audit log with who did it.
    #[arg(long)]
    reason: String,
}

#[derive(Debug, Args)]
pub struct OptionalReason {
    id: String,
    /// Why: recorded in the audit log with who did it.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The model to roll out: manifest digest or name@version.
    candidate: String,
    /// The model the devices run now (default: the one model every selected device runs).
    #[arg(long)]
    baseline: Option<String>,
    /// Only devices with this label, `key=value` (repeatable; all must match).
    #[arg(long = "select")]
    select: Vec<String>,
    /// A wave, in order: `SIZE[,bake=DURATION][,key=value…]` where SIZE is a device count or a
    /// percentage, cumulative; labels narrow the devices the wave counts and picks. Repeatable;
    /// default `1,bake=10m` `10%,bake=10m` `50%,bake=10m` `100%`.
    #[arg(long = "wave")]
    waves: Vec<String>,
    /// Run a shadow phase first on this cohort (a count or a percentage): the candidate runs
    /// beside the baseline on copies of live inputs.
    #[arg(long)]
    shadow: Option<String>,
    /// How long the shadow phase lasts (seconds, or with s, m, h, d).
    #[arg(long, default_value = "10m", value_parser = parse_seconds, requires = "shadow")]
    shadow_duration: u64,
    /// At most this many assignments a minute.
    #[arg(long)]
    max_per_minute: Option<u32>,
    /// A wave that has not installed within this long, or a bake still short of evidence this
    /// long after its end, breaches.
    #[arg(long, value_parser = parse_seconds)]
    progress_deadline: Option<u64>,
    /// A gate limit, `name=value` (repeatable): max_install_failure_rate, min_installs,
    /// max_error_rate_increase, max_p95_latency_ratio, min_inferences, min_shadow_agreement,
    /// min_shadow_compared, max_drift_score, min_drift_windows, require_evidence (true/false).
    #[arg(long = "gate")]
    gates: Vec<String>,
    /// Wait for `edgefleet rollout approve` before the first assignment.
    #[arg(long)]
    approval: bool,
    /// What a breached gate does: `abort` (roll back) or `pause`.
    #[arg(long, default_value = "abort")]
    on_breach: String,
    /// Why: recorded in the audit log.
    #[arg(long)]
    reason: Option<String>,
}

const GATE_NAMES: &[&str] = &[
    "max_install_failure_rate",
    "min_installs",
    "max_error_rate_increase",
    "max_p95_latency_ratio",
    "min_inferences",
    "min_shadow_agreement",
    "min_shadow_compared",
    "max_drift_score",
    "min_drift_windows",
    "require_evidence",
];

/// `SIZE[,bake=DURATION][,key=value…]` as the API's wave object.
fn parse_wave(text: &str) -> Result<Value> {
    let mut parts = text.split(',').map(str::trim);
    let size = parts.next().filter(|s| !s.is_empty()).with_context(|| {
        format!("--wave {text:?}: start with a device count or a percentage, e.g. 10%")
    })?;
    let mut bake = 0;
    let mut select = Map::new();
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .with_context(|| format!("--wave {text:?}: {part:?} is not `key=value`"))?;
        if key == "bake" {
            bake =
                parse_seconds(value).map_err(|e| anyhow::anyhow!("--wave {text:?}: bake {e}"))?;
        } else {
            select.insert(key.to_owned(), Value::String(value.to_owned()));
        }
    }
    Ok(json!({"size": size, "bake_s": bake, "select": select}))
}

fn parse_gate(item: &str) -> Result<(String, Value)> {
    let (name, value) = item
        .split_once('=')
        .with_context(|| format!("--gate {item:?} is not `name=value`"))?;
    let name = name.trim().replace('-', "_");
    if !GATE_NAMES.contains(&name.as_str()) {
        bail!(
            "--gate {name:?} is not a gate; use one of {}",
            GATE_NAMES.join(", ")
        );
    }
    let value = value.trim();
    let parsed = if name == "require_evidence" {
        Value::Bool(
            value
                .parse()
                .with_context(|| format!("--gate {name}: {value:?} is not true or false"))?,
        )
    } else if name.starts_with("min_") && name != "min_shadow_agreement" {
        json!(
            value
                .parse::<u64>()
                .with_context(|| format!("--gate {name}: {value:?} is not a whole number"))?
        )
    } else {
        json!(
            value
                .parse::<f64>()
                .with_context(|| format!("--gate {name}: {value:?} is not a number"))?
        )
    };
    Ok((name, parsed))
}

fn start_body(args: &StartArgs) -> Result<Value> {
    let mut body = json!({
        "candidate": args.candidate,
        "selector": label_map(&args.select, "select")?,
        "on_breach": args.on_breach,
        "approval": args.approval,
    });
    if let Some(baseline) = &args.baseline {
        body["baseline"] = json!(baseline);
    }
    if !args.waves.is_empty() {
        body["waves"] = Value::Array(
            args.waves
                .iter()
                .map(|w| parse_wave(w))
                .collect::<Result<_>>()?,
        );
    }
    if let Some(cohort) = &args.shadow {
        body["shadow"] = json!({"cohort": cohort, "duration_s": args.shadow_duration});
    }
    if let Some(n) = args.max_per_minute {
        body["max_per_minute"] = json!(n);
    }
    if let Some(s) = args.progress_deadline {
        body["progress_deadline_s"] = json!(s);
    }
    if !args.gates.is_empty() {
        let gates: Map<String, Value> = args
            .gates
            .iter()
            .map(|g| parse_gate(g))
            .collect::<Result<_>>()?;
        body["gates"] = Value::Object(gates);
    }
    if let Some(reason) = &args.reason {
        body["reason"] = json!(reason);
    }
    Ok(body)
}

pub fn run(client: &Client, command: RolloutCommand, format: OutputFormat) -> Result<()> {
    let operate = |id: &str, action: &str, reason: Option<&str>| -> Result<()> {
        let answer = client.send_json(
            Method::POST,
            &["rollouts", id, action],
            &json!({ "reason": reason }),
        )?;
        show(format, &answer, || {
            print_status(&answer);
            Ok(())
        })
    };
    match command {
        RolloutCommand::Start(args) => {
            let answer = client.send_json(Method::POST, &["rollouts"], &start_body(&args)?)?;
            show(format, &answer, || {
                println!(
                    "started rollout {} of {} over {} device(s)",
                    text(&answer["id"]),
                    model(&answer["candidate"]),
                    text(&answer["progress"]["members"]["total"])
                );
                for (why, devices) in answer["excluded"].as_object().into_iter().flatten() {
                    let n = devices.as_array().map_or(0, Vec::len);
                    println!("  left out: {n} device(s) {}", why.replace('_', " "));
                }
                println!();
                print_status(&answer);
                Ok(())
            })
        }
        RolloutCommand::List => {
            let answer = client.get(&["rollouts"])?;
            show(format, &answer, || {
                Table::of(
                    &[
                        "ID",
                        "PHASE",
                        "STAGE",
                        "MEMBERS",
                        "ACTIVE",
                        "CANDIDATE",
                        "STARTED",
                        "BY",
                    ],
                    &answer["rollouts"],
                    |r| {
                        vec![
                            text(&r["id"]),
                            text(&r["phase"]),
                            text(&r["stage"]),
                            text(&r["members"]["total"]),
                            text(&r["members"]["active"]),
                            short(r["candidate"].as_str().unwrap_or("-")).to_owned(),
                            time(&r["created_at"]),
                            text(&r["created_by"]),
                        ]
                    },
                )
                .print_or("no rollouts")
            })
        }
        RolloutCommand::Status { id } => {
            let answer = client.get(&["rollouts", &id])?;
            show(format, &answer, || {
                print_status(&answer);
                Ok(())
            })
        }
        RolloutCommand::Watch { id, interval } => watch(client, &id, interval, format),
        RolloutCommand::Approve(args) => operate(&args.id, "approve", args.reason.as_deref()),
        RolloutCommand::Pause(args) => operate(&args.id, "pause", Some(&args.reason)),
        RolloutCommand::Resume(args) => operate(&args.id, "resume", args.reason.as_deref()),
        RolloutCommand::Promote(args) => operate(&args.id, "promote", args.reason.as_deref()),
        RolloutCommand::Abort(args) => operate(&args.id, "abort", Some(&args.reason)),
        RolloutCommand::Rollback(args) => operate(&args.id, "rollback", Some(&args.reason)),
    }
}

fn finished(rollout: &Value) -> bool {
    matches!(
        rollout["progress"]["phase"].as_str(),
        Some("completed" | "aborted" | "rolled_back")
    )
}

/// Redraws the status every `interval` seconds until the rollout finishes; with
/// `--output json`, one JSON document per refresh.
fn watch(client: &Client, id: &str, interval: u64, format: OutputFormat) -> Result<()> {
    let redraw = std::io::stdout().is_terminal();
    loop {
        let answer = client.get(&["rollouts", id])?;
        match format {
            OutputFormat::Json => print_json(&answer)?,
            OutputFormat::Table => {
                if redraw {
                    print!("\x1b[2J\x1b[H");
                }
                print_status(&answer);
                println!();
            }
        }
        if finished(&answer) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(interval.max(1)));
    }
}

fn model(value: &Value) -> String {
    format!("{}@{}", text(&value["name"]), text(&value["version"]))
}

fn number(value: &Value) -> String {
    match value.as_f64() {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e9 => format!("{v:.0}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// A gate's standing: judged fine, breached, off, or waiting for its sample.
fn gate_state(gate: &Value) -> &'static str {
    let (samples, needed) = (
        gate["samples"].as_u64().unwrap_or(0),
        gate["needed"].as_u64().unwrap_or(0),
    );
    let (Some(value), Some(limit)) = (gate["value"].as_f64(), gate["limit"].as_f64()) else {
        return if gate["limit"].is_null() {
            "off"
        } else {
            "waiting"
        };
    };
    if samples < needed.max(1) {
        return "waiting";
    }
    let lower_is_better = gate["gate"].as_str() != Some("shadow_agreement");
    let ok = if lower_is_better {
        value <= limit
    } else {
        value >= limit
    };
    if ok { "ok" } else { "breached" }
}

fn print_status(rollout: &Value) {
    let progress = &rollout["progress"];
    field("rollout", &text(&rollout["id"]));
    field("candidate", &model(&rollout["candidate"]));
    field("baseline", &model(&rollout["baseline"]));
    field("selector", &labels(&rollout["selector"]));
    let mut phase = text(&progress["phase"]);
    if let Some(stage) = progress["stage"].as_str() {
        phase.push_str(&format!(" ({stage})"));
    }
    field("phase", &phase);
    if let Some(reason) = progress["reason"].as_str() {
        field("reason", reason);
    }
    if !progress["until"].is_null() {
        field("until", &time(&progress["until"]));
    }
    if let Some(missing) = progress["evidence_missing"].as_str() {
        field("waiting for", missing);
    }
    let m = &progress["members"];
    field(
        "members",
        &format!(
            "{} ({} online): {} active, {} installing, {} failed, {} rolled back, {} shadowing, {} waiting",
            text(&m["total"]),
            text(&m["online"]),
            text(&m["active"]),
            text(&m["pending"]),
            text(&m["failed"]),
            text(&m["rolled_back"]),
            text(&m["shadowing"]),
            text(&m["waiting"])
        ),
    );
    field(
        "started",
        &format!(
            "{} by {}",
            time(&rollout["created_at"]),
            text(&rollout["created_by"])
        ),
    );
    println!();
    let waves = Table::of(
        &[
            "WAVE",
            "SIZE",
            "SELECT",
            "BAKE",
            "TARGET",
            "GIVEN",
            "ACTIVE",
            "FAILED",
            "PENDING",
            "ROLLED BACK",
        ],
        &progress["waves"],
        |w| {
            vec![
                text(&w["wave"]),
                text(&w["size"]),
                labels(&w["select"]),
                format!("{}s", text(&w["bake_s"])),
                format!("{}/{}", text(&w["target"]), text(&w["in_scope"])),
                text(&w["given"]),
                text(&w["active"]),
                text(&w["failed"]),
                text(&w["pending"]),
                text(&w["rolled_back"]),
            ]
        },
    );
    print!("{}", waves.render());
    println!();
    let gates = Table::of(
        &["GATE", "VALUE", "LIMIT", "SAMPLES", "STATE", "DETAIL"],
        &progress["gates"],
        |g| {
            vec![
                text(&g["gate"]),
                number(&g["value"]),
                number(&g["limit"]),
                format!("{}/{}", text(&g["samples"]), text(&g["needed"])),
                gate_state(g).into(),
                text(&g["detail"]),
            ]
        },
    );
    print!("{}", gates.render());
    let records: Vec<&Value> = rollout["records"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if !records.is_empty() {
        println!();
        for record in records.iter().rev().take(10).rev() {
            let what = record["text"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    let action = text(&record["action"]);
                    match record["reason"].as_str() {
                        Some(reason) => format!("{action}: {reason}"),
                        None => action,
                    }
                });
            println!(
                "{}  {}  {what}",
                time(&record["at"]),
                text(&record["actor"])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_and_gates_parse_into_the_api_request() {
        assert_eq!(
            parse_wave("10%,bake=10m,site=lab").unwrap(),
            json!({"size": "10%", "bake_s": 600, "select": {"site": "lab"}})
        );
        assert_eq!(
            parse_wave("1").unwrap(),
            json!({"size": "1", "bake_s": 0, "select": {}})
        );
        assert!(parse_wave(",bake=1m").is_err());
        assert!(parse_wave("5,bake=soon").is_err());
        assert_eq!(
            parse_gate("max-error-rate-increase=0.02").unwrap(),
            ("max_error_rate_increase".into(), json!(0.02))
        );
        assert_eq!(
            parse_gate("min_inferences=50").unwrap(),
            ("min_inferences".into(), json!(50))
        );
        assert_eq!(
            parse_gate("require_evidence=false").unwrap(),
            ("require_evidence".into(), json!(false))
        );
        let err = parse_gate("max_speed=3").unwrap_err().to_string();
        assert!(err.contains("is not a gate"), "{err}");
    }

    #[test]
    fn gate_states_read_limits_the_right_way_round() {
        let gate = |name: &str, value: f64, limit: f64| json!({"gate": name, "value": value, "limit": limit, "samples": 10, "needed": 5});
        assert_eq!(
            gate_state(&gate("error_rate_increase", 0.02, 0.01)),
            "breached"
        );
        assert_eq!(gate_state(&gate("error_rate_increase", 0.0, 0.01)), "ok");
        assert_eq!(gate_state(&gate("shadow_agreement", 0.99, 0.95)), "ok");
        assert_eq!(gate_state(&gate("shadow_agreement", 0.5, 0.95)), "breached");
        assert_eq!(
            gate_state(&json!({"gate": "drift_score", "value": null, "limit": null})),
            "off"
        );
        assert_eq!(
            gate_state(
                &json!({"gate": "p95_latency_ratio", "value": 3.0, "limit": 1.5, "samples": 1, "needed": 200})
            ),
            "waiting"
        );
    }
}
