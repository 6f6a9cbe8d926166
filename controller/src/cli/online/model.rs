//! `edgefleet model`: register (a streamed upload the controller validates, test-runs and signs),
//! list, show, lineage, download the signed bundle, add a detached signature.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use edgefleet_protocol::Sha256Digest;
use edgefleet_protocol::bundle::{HEADER_LEN, split_header};
use edgefleet_protocol::codec::{self, MAX_MANIFEST_BYTES};
use edgefleet_protocol::manifest::Manifest;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::client::{Client, ClientError};
use super::list;
use crate::cli::bundle::{print_manifest, print_signatures};
use crate::cli::output::{Column, OutputFormat, Table, field, short_digest, show, text, time};
use crate::cli::spec::{self, CheckArgs, IdentityArgs, LineageArgs, RuntimeArgs};
use crate::fsutil;

/// Read size of the streamed model upload.
const UPLOAD_CHUNK: usize = 256 * 1024;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload an ONNX model: the controller validates and test-runs it, builds and signs the
    /// bundle, and records its lineage.
    Register(Box<Register>),
    /// List registered models.
    List,
    /// Show a model (manifest digest or name@version): state, signatures, manifest.
    Show { model: String },
    /// A model's ancestors (through lineage parents) and children.
    Lineage { model: String },
    /// Download a model's signed bundle, e.g. to sign it offline.
    Download {
        model: String,
        /// Where to write it (default: NAME-VERSION.efb).
        #[arg(long, short = 'o')]
        output_file: Option<PathBuf>,
    },
    /// Add a detached release signature (`edgefleet bundle sign --detached`) to a model.
    AddSignature {
        model: String,
        /// The detached signature file.
        signature: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct Register {
    /// The ONNX model file.
    model: PathBuf,
    #[command(flatten)]
    id: IdentityArgs,
    /// Release counter (default: one above the highest registered for this name).
    #[arg(long)]
    release: Option<u64>,
    /// Model input `name:dtype:dims[:allow-nan]`, e.g. `input:f32:1x576`, replacing the model's
    /// declaration of that input; by default inputs are read from the model.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Model output, same form as --input (`--output` chooses table or json here).
    #[arg(long = "output-tensor")]
    outputs: Vec<String>,
    /// Drift feature: `name=tensor:index` (index along the tensor's last axis).
    #[arg(long = "feature")]
    features: Vec<String>,
    #[command(flatten)]
    checks: CheckArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    lineage: LineageArgs,
}

const MODEL_COLUMNS: &[Column] = &[
    ("NAME", "name", text),
    ("VERSION", "version", text),
    ("RELEASE", "release", text),
    ("STATE", "state", text),
    ("SIGNATURES", "signatures", text),
    ("DIGEST", "digest", short_digest),
    ("REGISTERED", "created_at", time),
];

pub fn run(client: &Client, command: ModelCommand, format: OutputFormat) -> Result<()> {
    match command {
        ModelCommand::Register(args) => register(client, &args, format),
        ModelCommand::List => list(
            client,
            format,
            (&["models"], "models"),
            MODEL_COLUMNS,
            "no models registered",
        ),
        ModelCommand::Show { model } => {
            let answer = client.get(&["models", &model])?;
            show(format, &answer, || print_model(client, &answer))
        }
        ModelCommand::Lineage { model } => {
            let answer = client.get(&["models", &model, "lineage"])?;
            show(format, &answer, || print_lineage(&answer))
        }
        ModelCommand::Download { model, output_file } => {
            download(client, &model, output_file, format)
        }
        ModelCommand::AddSignature { model, signature } => {
            let bytes = fsutil::read(&signature)?;
            let answer = client.post_bytes(&["models", &model, "signatures"], bytes)?;
            show(format, &answer, || {
                println!(
                    "{} {}: {}",
                    text(&answer["name"]),
                    text(&answer["version"]),
                    state(&answer)
                );
                Ok(())
            })
        }
    }
}

/// `ready (1 of 1 release signatures)`.
fn state(model: &Value) -> String {
    format!(
        "{} ({} of {} release signatures)",
        text(&model["state"]),
        text(&model["signatures"]),
        text(&model["signatures_needed"])
    )
}

/// A byte-count progress bar on stderr, hidden when stderr is not a terminal.
fn progress_bar(total: u64, message: &'static str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

/// Once the last byte is sent the controller validates and test-runs the model: a spinner.
fn wait_for_controller(bar: &ProgressBar) {
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message("the controller is validating, test-running and signing the model");
    bar.enable_steady_tick(Duration::from_millis(120));
}

fn small_part(path: &Path, file_name: &'static str) -> Result<Part> {
    Ok(Part::bytes(fsutil::read(path)?).file_name(file_name))
}

fn register(client: &Client, args: &Register, format: OutputFormat) -> Result<()> {
    let id = &args.id;
    let metadata = json!({
        "name": id.name.as_str(),
        "version": id.version.as_str(),
        "release": args.release,
        "description": id.description,
        "arch": id.arch.as_str(),
        "min_agent_version": id.min_agent_version,
        "inputs": args.inputs,
        "outputs": args.outputs,
        "features": args.features,
        "lineage": spec::lineage_json(&args.lineage.lineage()?),
        // The upload's `runtime` fields are the manifest's.
        "runtime": args.runtime.settings(),
        "expires_days": args.runtime.expires_days,
        "prediction": args.runtime.prediction_json()?,
    });
    let file = std::fs::File::open(&args.model)
        .with_context(|| format!("cannot open {}", args.model.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("cannot read {}", args.model.display()))?
        .len();
    let file_name = args
        .model
        .file_name()
        .map_or_else(|| "model.onnx".into(), |n| n.to_string_lossy().into_owned());
    let bar = progress_bar(size, "uploading");
    let counter = bar.clone();
    let mut sent = 0u64;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), UPLOAD_CHUNK)
            .inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    sent += chunk.len() as u64;
                    counter.inc(chunk.len() as u64);
                    if sent == size {
                        wait_for_controller(&counter);
                    }
                }
            });
    let model =
        Part::stream_with_length(reqwest::Body::wrap_stream(stream), size).file_name(file_name);
    let mut form = Form::new()
        .text("metadata", metadata.to_string())
        .part("model", model);
    if let Some(reference) = &args.checks.reference {
        form = form.part("reference", small_part(reference, "reference.csv")?);
    }
    if let Some(golden) = &args.checks.golden {
        form = form.part("golden", small_part(golden, "golden.json")?);
    }
    let answer = client
        .post_form(&["models"], form)
        .map_err(|err| match err {
            // The controller checks the token before it reads an upload and may close the
            // connection while the model is still being sent; a body-less call with the same
            // role requirement tells why.
            ClientError::Transport { .. } => match client.get(&["enroll-tokens"]) {
                Err(
                    refusal @ (ClientError::Unauthorized { .. }
                    | ClientError::Forbidden { .. }
                    | ClientError::Api { .. }),
                ) => refusal,
                _ => err,
            },
            other => other,
        });
    bar.finish_and_clear();
    let answer = answer?;
    show(format, &answer, || {
        println!(
            "registered {} {} release {}: manifest digest {}",
            text(&answer["name"]),
            text(&answer["version"]),
            text(&answer["release"]),
            text(&answer["digest"])
        );
        let latency = match answer["validation_latency_us"].as_u64() {
            Some(us) if us < 1000 => format!("; slowest test run {us} µs"),
            Some(us) => format!("; slowest test run {:.1} ms", us as f64 / 1000.0),
            None => String::new(),
        };
        println!("{}{latency}", state(&answer));
        if answer["state"] == "awaiting_signatures" {
            let digest = text(&answer["digest"]);
            println!(
                "each further release key holder runs: edgefleet model download {digest} -o B.efb; edgefleet bundle sign B.efb --key RELEASE.key --detached S.sig; edgefleet model add-signature {digest} S.sig"
            );
        }
        let auto = &answer["auto_rollout"];
        if auto["started"] == true {
            println!(
                "rollout {} started by the drift policy of {}",
                text(&auto["rollout"]),
                text(&answer["manifest"]["lineage"]["candidate_for"])
            );
        } else if !auto.is_null() {
            println!(
                "the drift policy's automatic rollout did not start: {}",
                text(&auto["error"])
            );
        }
        Ok(())
    })
}

/// The signed manifest as devices get it (read from the head of the bundle), then the
/// registry's fields.
fn print_model(client: &Client, m: &Value) -> Result<()> {
    let digest = text(&m["digest"]);
    let head = client.get_prefix(
        &["models", &digest, "bundle"],
        HEADER_LEN + MAX_MANIFEST_BYTES,
        |prefix| !matches!(split_header(prefix), Ok(None)),
    )?;
    let signed = split_header(&head)
        .ok()
        .flatten()
        .map(|(signed, _)| signed)
        .context("the controller's bundle does not start with a readable header")?;
    let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)
        .context("the controller's bundle holds an unreadable manifest")?;
    print_manifest(&manifest, &Sha256Digest::of(&signed.body));
    print_signatures(&signed);
    field("state", &state(m));
    field(
        "registered",
        &format!("{} by {}", time(&m["created_at"]), text(&m["created_by"])),
    );
    field("bundle size", &format!("{} bytes", text(&m["bundle_size"])));
    Ok(())
}

fn print_lineage(answer: &Value) -> Result<()> {
    // The API lists ancestors nearest first; the table reads oldest to newest.
    let ancestors = answer["ancestors"].as_array().into_iter().flatten().rev();
    let children = answer["children"].as_array().into_iter().flatten();
    let rows: Vec<Value> = ancestors
        .map(|m| ("ancestor", m))
        .chain([("this", &answer["model"])])
        .chain(children.map(|m| ("child", m)))
        .map(|(relation, m)| json!({"relation": relation, "model": m}))
        .collect();
    let headers = [
        "RELATION",
        "NAME",
        "VERSION",
        "RELEASE",
        "DIGEST",
        "REGISTERED",
    ];
    Table::of(&headers, &Value::Array(rows), |row| {
        let m = &row["model"];
        vec![
            text(&row["relation"]),
            if m["missing"] == true {
                String::from("(not registered)")
            } else {
                text(&m["name"])
            },
            text(&m["version"]),
            text(&m["release"]),
            short_digest(&m["digest"]),
            time(&m["created_at"]),
        ]
    })
    .print_or("")
}

fn download(
    client: &Client,
    model: &str,
    output_file: Option<PathBuf>,
    format: OutputFormat,
) -> Result<()> {
    let info = client.get(&["models", model])?;
    let digest = text(&info["digest"]);
    let path = output_file.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}.efb",
            text(&info["name"]),
            text(&info["version"])
        ))
    });
    let bar = progress_bar(info["bundle_size"].as_u64().unwrap_or(0), "downloading");
    let written = fsutil::write_atomic_with(&path, fsutil::PUBLIC_MODE, |file| {
        Ok(client.download(&["models", &digest, "bundle"], file, |n| {
            bar.inc(n as u64);
        })?)
    })?;
    bar.finish_and_clear();
    let summary = json!({"file": path, "bytes": written, "digest": digest});
    show(format, &summary, || {
        println!(
            "wrote {} ({written} bytes, manifest digest {digest})",
            path.display()
        );
        Ok(())
    })
}
