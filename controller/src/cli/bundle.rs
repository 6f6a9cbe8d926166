//! `edgefleet bundle`: build a bundle from an ONNX model, sign it (k-of-n, one holder at a time),
//! verify it as a device would, and inspect it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use edgefleet_protocol::bundle::{
    BundleVerifier, DetachedSignature, HEADER_LEN, bundle_header, split_header,
};
use edgefleet_protocol::codec::{self, MAX_MANIFEST_BYTES, MAX_MESSAGE_BYTES};
use edgefleet_protocol::crypto::Domain;
use edgefleet_protocol::manifest::{Manifest, ManifestPolicy};
use edgefleet_protocol::trust::{ReleaseKeyring, Signed, Verified};
use edgefleet_protocol::{Arch, Clock, Sha256Digest, SystemClock, Timestamp};
use serde_json::json;

use super::output::{self, OutputFormat};
use super::{keyfile, spec, trustdir};
use crate::fsutil;
use crate::release::{self, ReleaseSpec, SpecFile};

const CHUNK: usize = 256 * 1024;

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build a bundle from an ONNX model and manifest fields (unsigned unless --key is given):
    /// the schema is read from the model, and the model is loaded and test-run before writing.
    Build(Box<Build>),
    /// Add a signature (or write it detached, or merge detached ones) to a bundle.
    Sign(SignBundle),
    /// Verify a bundle the way a device does: root chain → keyring → manifest → payload hashes.
    Verify(VerifyBundle),
    /// Show a bundle's manifest without verifying it.
    Inspect(Inspect),
}

#[derive(Debug, Args)]
pub struct Build {
    /// The ONNX model file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    id: spec::IdentityArgs,
    /// Release counter: must grow with every release of this model name.
    #[arg(long)]
    release: u64,
    /// Model input: `name:dtype:dims[:allow-nan]`, e.g. `input:f32:1x576` (`?` = dynamic).
    /// Replaces the model's declared input of that name (to fix a dynamic dimension or allow
    /// NaN); by default inputs are read from the model.
    #[arg(long = "input", value_parser = spec::tensor_spec)]
    inputs: Vec<edgefleet_protocol::manifest::TensorSpec>,
    /// Model output, same form as --input; by default outputs are read from the model.
    #[arg(long = "output", value_parser = spec::tensor_spec)]
    outputs: Vec<edgefleet_protocol::manifest::TensorSpec>,
    /// Drift feature: `name=tensor:index` (index along the tensor's last axis).
    #[arg(long = "feature", value_parser = spec::feature_spec)]
    features: Vec<edgefleet_protocol::manifest::FeatureSpec>,
    #[command(flatten)]
    checks: spec::CheckArgs,
    /// Extra payload files (labels, …).
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    #[command(flatten)]
    runtime: spec::RuntimeArgs,
    #[command(flatten)]
    lineage: spec::LineageArgs,
    /// Release key file(s) to sign with right away.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// Where to write the bundle.
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SignBundle {
    bundle: PathBuf,
    /// Release key file of this signer.
    #[arg(long, required_unless_present = "add_signature")]
    key: Option<PathBuf>,
    /// Write the signature to this file instead of into the bundle (to merge later).
    #[arg(long, requires = "key")]
    detached: Option<PathBuf>,
    /// Merge detached signature files into the bundle.
    #[arg(long = "add-signature", conflicts_with = "detached")]
    add_signature: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrustArgs {
    /// Key directory holding root-v1.cbor (+ later roots) and keyring.cbor.
    #[arg(long, conflicts_with_all = ["root", "keyring"])]
    keys: Option<PathBuf>,
    /// Trust anchor (root keyring v1) when not using --keys.
    #[arg(long, requires = "keyring")]
    root: Option<PathBuf>,
    /// Later root keyrings, in order.
    #[arg(long = "root-chain", requires = "root")]
    root_chain: Vec<PathBuf>,
    /// Release keyring when not using --keys.
    #[arg(long, requires = "root")]
    keyring: Option<PathBuf>,
}

impl TrustArgs {
    pub fn load(&self, now: Timestamp) -> Result<Verified<ReleaseKeyring>> {
        match (&self.keys, &self.root, &self.keyring) {
            (Some(dir), _, _) => {
                let (root, _) = trustdir::load_root(dir)?;
                trustdir::load_keyring(&trustdir::keyring_path(dir), &root, now)
            }
            (None, Some(root), Some(keyring)) => {
                let root = trustdir::load_root_files(root, &self.root_chain)?;
                trustdir::load_keyring(keyring, &root, now)
            }
            _ => bail!("say what to trust: --keys DIR, or --root FILE --keyring FILE"),
        }
    }
}

#[derive(Debug, Args)]
pub struct VerifyBundle {
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Check the bundle runs on this architecture.
    #[arg(long)]
    arch: Option<Arch>,
    /// Check the bundle runs on this agent version.
    #[arg(long)]
    agent_version: Option<String>,
    /// Refuse releases below this floor.
    #[arg(long)]
    release_floor: Option<u64>,
    /// Check the manifest digest is this one.
    #[arg(long)]
    digest: Option<Sha256Digest>,
}

#[derive(Debug, Args)]
pub struct Inspect {
    bundle: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

pub fn run(command: BundleCommand) -> Result<()> {
    match command {
        BundleCommand::Build(args) => build(&args, SystemClock.now()),
        BundleCommand::Sign(args) => sign(&args),
        BundleCommand::Verify(args) => verify(&args, SystemClock.now()),
        BundleCommand::Inspect(args) => inspect(&args),
    }
}

fn release_spec(args: &Build) -> Result<ReleaseSpec> {
    let id = &args.id;
    let mut spec = ReleaseSpec::new(id.name.clone(), id.version.clone(), args.release);
    spec.description = id.description.clone();
    spec.arch = id.arch.clone();
    spec.min_agent_version = id.min_agent_version.clone();
    spec.inputs = args.inputs.clone();
    spec.outputs = args.outputs.clone();
    spec.features = args.features.clone();
    spec.reference = args.checks.reference.clone().map(SpecFile::Path);
    spec.golden = args.checks.golden.clone().map(SpecFile::Path);
    spec.data = args.data.clone();
    spec.lineage = args.lineage.lineage()?;
    spec.runtime = args.runtime.settings();
    spec.expires_days = args.runtime.expires_days;
    spec.prediction_output = args.runtime.prediction_output.clone();
    spec.prediction_kind = args.runtime.prediction_kind()?;
    Ok(spec)
}

fn tensors(specs: &[edgefleet_protocol::manifest::TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{} {:?} [{}]", s.name, s.dtype, dims(&s.shape)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn build(args: &Build, now: Timestamp) -> Result<()> {
    let spec = release_spec(args)?;
    let keys = args
        .keys
        .iter()
        .map(|key| Ok(keyfile::read(key)?.key))
        .collect::<Result<Vec<_>>>()?;
    let built = release::build_release(&args.model, &spec, now)?;
    let mut signed = built.unsigned();
    release::sign(&mut signed, &keys);
    release::write_bundle(&signed, &built.sources, &args.out)?;
    let manifest = &built.manifest;
    println!(
        "built {} ({} {} release {}, {} payload bytes, {} signature(s)); manifest digest {}",
        args.out.display(),
        manifest.name,
        manifest.version,
        manifest.release,
        manifest.payload_bytes(),
        signed.signatures.len(),
        built.digest()
    );
    println!(
        "inputs {}; outputs {}; {} golden vector(s) {}, slowest run {:.1} ms here",
        tensors(&manifest.inputs),
        tensors(&manifest.outputs),
        manifest.golden.len(),
        if built.golden_generated {
            "generated"
        } else {
            "checked"
        },
        built.latency_us as f64 / 1000.0
    );
    if signed.signatures.is_empty() {
        println!(
            "sign it with `edgefleet bundle sign {} --key RELEASE.key`",
            args.out.display()
        );
    }
    Ok(())
}

/// Reads the fixed header and signed manifest from the start of a bundle file.
fn read_head(file: &mut File, path: &Path) -> Result<(Signed, u64)> {
    let mut prefix = vec![0u8; HEADER_LEN];
    file.read_exact(&mut prefix)
        .with_context(|| format!("{} is too short to be a bundle", path.display()))?;
    let len = u32::from_be_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]) as usize;
    split_header(&prefix).with_context(|| format!("{} is not a bundle", path.display()))?;
    if len > MAX_MANIFEST_BYTES {
        bail!(
            "{}: manifest of {len} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
            path.display()
        );
    }
    prefix.resize(HEADER_LEN + len, 0);
    file.read_exact(&mut prefix[HEADER_LEN..])
        .with_context(|| format!("{} ends inside its manifest", path.display()))?;
    let (signed, offset) = split_header(&prefix)?
        .with_context(|| format!("{} ends inside its manifest", path.display()))?;
    Ok((signed, offset as u64))
}

fn sign(args: &SignBundle) -> Result<()> {
    let mut file = File::open(&args.bundle)
        .with_context(|| format!("cannot open {}", args.bundle.display()))?;
    let (mut signed, payload_offset) = read_head(&mut file, &args.bundle)?;
    let digest = Sha256Digest::of(&signed.body);
    let mut added = Vec::new();
    if let Some(key) = &args.key {
        let key = keyfile::read(key)?.key;
        let signature = edgefleet_protocol::trust::KeySignature {
            key_id: key.key_id(),
            signature: key.sign(Domain::Manifest, &signed.body),
        };
        if let Some(out) = &args.detached {
            let detached = DetachedSignature {
                manifest_digest: digest,
                signature,
            };
            fsutil::write_atomic(out, &codec::encode(&detached), fsutil::PUBLIC_MODE)?;
            println!(
                "wrote detached signature by key {} for manifest {digest} to {}",
                key.key_id(),
                out.display()
            );
            return Ok(());
        }
        added.push(signature);
    }
    for path in &args.add_signature {
        let detached: DetachedSignature = codec::decode(
            "detached signature",
            &fsutil::read(path)?,
            MAX_MESSAGE_BYTES,
        )
        .with_context(|| format!("{} is not a detached signature", path.display()))?;
        if detached.manifest_digest != digest {
            bail!(
                "{} signs manifest {}, not this bundle's {digest}",
                path.display(),
                detached.manifest_digest
            );
        }
        added.push(detached.signature);
    }
    let mut new_ids = Vec::new();
    for signature in added {
        let key_id = signature.key_id;
        if signed.add_signature(signature) {
            new_ids.push(key_id.to_string());
        } else {
            println!("key {key_id} had signed already; its signature counts once");
        }
    }
    if new_ids.is_empty() {
        return Ok(());
    }
    let header = bundle_header(&signed.encode())?;
    fsutil::write_atomic_with(&args.bundle, fsutil::PUBLIC_MODE, |out| {
        out.write_all(&header)?;
        file.seek(SeekFrom::Start(payload_offset))?;
        io::copy(&mut file, out)?;
        Ok(())
    })?;
    println!(
        "signed {} with key(s) {}; it has {} signature(s)",
        args.bundle.display(),
        new_ids.join(", "),
        signed.signatures.len()
    );
    Ok(())
}

fn verify(args: &VerifyBundle, now: Timestamp) -> Result<()> {
    let keyring = args.trust.load(now)?;
    let policy = ManifestPolicy {
        now,
        device_arch: args.arch.clone(),
        agent_version: args.agent_version.clone(),
        release_floor: args.release_floor,
        allow_downgrade: false,
        expected_digest: args.digest,
    };
    let mut file = File::open(&args.bundle)
        .with_context(|| format!("cannot open {}", args.bundle.display()))?;
    let mut verifier = BundleVerifier::new(&keyring, policy);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", args.bundle.display()))?;
        if n == 0 {
            break;
        }
        verifier
            .feed(&buf[..n])
            .with_context(|| format!("{} failed verification", args.bundle.display()))?;
    }
    let bundle = verifier
        .finish()
        .with_context(|| format!("{} failed verification", args.bundle.display()))?;
    let signed = Signed::decode(
        "signed manifest",
        &bundle.signed_manifest,
        MAX_MANIFEST_BYTES,
    )?;
    println!(
        "OK {}: {} {} release {} — {} of {} required release signatures valid, {} payload(s) match their sha256, manifest digest {}",
        args.bundle.display(),
        bundle.manifest.name,
        bundle.manifest.version,
        bundle.manifest.release,
        signed
            .signatures
            .iter()
            .filter(|s| keyring.release.keys.iter().any(|k| k.key_id() == s.key_id))
            .count(),
        keyring.release.threshold,
        bundle.manifest.payloads.len(),
        bundle.manifest_digest
    );
    Ok(())
}

fn dims(shape: &[Option<u64>]) -> String {
    shape
        .iter()
        .map(|d| d.map_or_else(|| String::from("?"), |d| d.to_string()))
        .collect::<Vec<_>>()
        .join("x")
}

fn inspect(args: &Inspect) -> Result<()> {
    let mut file = File::open(&args.bundle)
        .with_context(|| format!("cannot open {}", args.bundle.display()))?;
    let (signed, _) = read_head(&mut file, &args.bundle)?;
    let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)?;
    let digest = Sha256Digest::of(&signed.body);
    match args.output {
        OutputFormat::Json => {
            let value = manifest_json(&manifest, &digest, &signed);
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        OutputFormat::Table => {
            print_manifest(&manifest, &digest);
            print_signatures(&signed);
            println!(
                "(not verified; run `edgefleet bundle verify` to check signatures and hashes)"
            );
        }
    }
    Ok(())
}

fn manifest_json(m: &Manifest, digest: &Sha256Digest, signed: &Signed) -> serde_json::Value {
    let tensors = |specs: &[edgefleet_protocol::manifest::TensorSpec]| -> Vec<serde_json::Value> {
        specs.iter().map(|s| json!({"name": s.name.as_str(), "dtype": format!("{:?}", s.dtype).to_lowercase(), "shape": s.shape, "nan": format!("{:?}", s.nan).to_lowercase()})).collect()
    };
    json!({
        "manifest_digest": digest.to_hex(),
        "verified": false,
        "name": m.name.as_str(),
        "version": m.version.as_str(),
        "release": m.release,
        "description": m.description,
        "target": {"arch": m.target.arch.as_str(), "min_agent_version": m.target.min_agent_version},
        "created_at": m.created_at.to_rfc3339(),
        "expires": m.expires.to_rfc3339(),
        "payloads": m.payloads.iter().map(|p| json!({"name": p.name.as_str(), "role": format!("{:?}", p.role).to_lowercase(), "sha256": p.sha256.to_hex(), "size": p.size})).collect::<Vec<_>>(),
        "runtime": {"threads": m.runtime.threads, "latency_budget_ms": m.runtime.latency_budget_ms, "grace_window_s": m.runtime.grace_window_s, "max_error_rate": m.runtime.max_error_rate},
        "inputs": tensors(&m.inputs),
        "outputs": tensors(&m.outputs),
        "prediction": m.prediction_spec().map(|p| prediction_text(&p)),
        "features": m.features.iter().map(|f| json!({"name": f.name.as_str(), "tensor": f.tensor.as_str(), "index": f.index})).collect::<Vec<_>>(),
        "golden_vectors": m.golden.len(),
        "reference": m.reference.as_ref().map(|r| json!({
            "sample_count": r.sample_count,
            "features": r.features.iter().map(|f| json!({"name": f.name.as_str(), "edges": f.edges, "proportions": f.proportions, "min": f.min, "max": f.max})).collect::<Vec<_>>(),
        })),
        "lineage": spec::lineage_json(&m.lineage),
        "signatures": signed.signatures.iter().map(|s| s.key_id.to_string()).collect::<Vec<_>>(),
    })
}

/// How feedback is scored, e.g. `anomaly_probability: classification at threshold 0.5`.
fn prediction_text(p: &edgefleet_protocol::manifest::PredictionSpec) -> String {
    match p.kind {
        edgefleet_protocol::manifest::PredictionKind::Classification { threshold } => {
            format!(
                "{}: classification (a single score at threshold {threshold})",
                p.output
            )
        }
        edgefleet_protocol::manifest::PredictionKind::Regression => {
            format!("{}: regression", p.output)
        }
    }
}

/// The manifest's fields, one `field value` line each (`bundle inspect`, `model show`).
pub fn print_manifest(m: &Manifest, digest: &Sha256Digest) {
    let row = output::field;
    row(
        "model",
        &format!("{} {} (release {})", m.name, m.version, m.release),
    );
    if let Some(description) = &m.description {
        row("description", description);
    }
    row("manifest digest", &digest.to_hex());
    row(
        "target",
        &format!(
            "arch {}, agent ≥ {}",
            m.target.arch,
            m.target.min_agent_version.as_deref().unwrap_or("any")
        ),
    );
    row("created", &m.created_at.to_rfc3339());
    row("expires", &m.expires.to_rfc3339());
    for p in &m.payloads {
        row(
            "payload",
            &format!(
                "{} ({:?}, {} bytes, sha256 {})",
                p.name, p.role, p.size, p.sha256
            ),
        );
    }
    row(
        "runtime",
        &format!(
            "{} thread(s), latency budget {} ms, grace {} s, max error rate {}",
            m.runtime.threads,
            m.runtime.latency_budget_ms,
            m.runtime.grace_window_s,
            m.runtime.max_error_rate
        ),
    );
    for s in &m.inputs {
        row(
            "input",
            &format!("{} {:?} [{}]", s.name, s.dtype, dims(&s.shape)),
        );
    }
    for s in &m.outputs {
        row(
            "output",
            &format!("{} {:?} [{}]", s.name, s.dtype, dims(&s.shape)),
        );
    }
    for f in &m.features {
        let bins = m
            .reference
            .as_ref()
            .and_then(|r| r.features.iter().find(|rf| rf.name == f.name))
            .map_or(0, |rf| rf.proportions.len());
        row(
            "feature",
            &format!(
                "{} = {}[{}] ({bins} reference bins)",
                f.name, f.tensor, f.index
            ),
        );
    }
    if let Some(prediction) = m.prediction_spec() {
        row("prediction", &prediction_text(&prediction));
    }
    row("golden vectors", &m.golden.len().to_string());
    let l = &m.lineage;
    if let Some(d) = &l.training_data_digest {
        row(
            "training data",
            &format!(
                "sha256 {d}{}",
                l.training_data_uri
                    .as_deref()
                    .map(|u| format!(" ({u})"))
                    .unwrap_or_default()
            ),
        );
    } else if let Some(uri) = &l.training_data_uri {
        row("training data", uri);
    }
    if let Some(c) = &l.code_commit {
        row("code commit", c);
    }
    for p in &l.parameters {
        row("parameter", &format!("{} = {}", p.name, p.value));
    }
    for p in &l.metrics {
        row("metric", &format!("{} = {}", p.name, p.value));
    }
    if let Some(r) = &l.mlflow_run_id {
        row("mlflow run", r);
    }
    if let Some(p) = &l.parent {
        row("parent", p);
    }
    if let Some(c) = &l.candidate_for {
        row("candidate for", c.as_str());
    }
}

pub fn print_signatures(signed: &Signed) {
    let ids: Vec<String> = signed
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    output::field(
        "signatures",
        &if ids.is_empty() {
            String::from("none")
        } else {
            ids.join(", ")
        },
    );
}
