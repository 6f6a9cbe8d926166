//! How fast the rollout engine moves a simulated fleet, next to what an operator would do without
//! it: a script that assigns each device through the admin API, one call after another.
//!
//! On one real `edgefleet-controller` (release build) and `--devices` simulated devices:
//!
//! 1. **scripted, first install**: every device assigned `pump-anomaly@1.0.0` by one
//!    `POST /api/v1/devices/{id}/assign` each (a reused HTTP connection, so faster than a shell
//!    loop over the CLI), until every device reports it active;
//! 2. **rollout engine**: `1.0.0 → 1.1.0` in four cumulative waves (1%, 10%, 50%, 100%), no bake,
//!    no evidence required, pacing out of the way (`max_per_minute` 10⁶), until the rollout
//!    completes with every device active on the candidate;
//! 3. **scripted upgrade**: `1.1.0 → 1.2.0` as in 1, the like-for-like comparison for 2;
//! 4. with `--breach`: `1.2.0 → 1.3.0`, a candidate whose devices fail 3% of their requests
//!    (below the manifest's 5% on-device limit, so only the fleet gate can catch it), first wave
//!    50% baking 10 minutes with the default gates; the error-rate gate breaches, the rollout aborts
//!    and assigns the baseline back; for every device that had the candidate, the time from the
//!    abort's audit record to the device installing the baseline again (both wall clock).
//!
//! ```sh
//! cargo build --profile bench -p edgefleet-controller --bin edgefleet-controller
//! cargo bench -p edgefleet-sim --bench rollout -- --devices 1000 --breach
//! cargo bench -p edgefleet-sim --bench rollout -- --devices 10000 --broker mosquitto --fetch manifest
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefleet_protocol::{Clock, Sha256Digest, SystemClock};
use edgefleet_sim::{Behaviour, ErrorRates, FetchMode, Fleet};
use serde_json::{Value, json};

mod common;
use common::Bed;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// `embedded` (the controller's rumqttd) or `mosquitto`.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// `full` (every bundle fetched and hashed) or `manifest` (the signed manifest only).
    #[arg(long, default_value = "full")]
    fetch: String,
    /// Telemetry window of each simulated device, in seconds.
    #[arg(long, default_value_t = 5)]
    window_s: u64,
    /// Also measure a gate breach and the fleet rollback it causes.
    #[arg(long)]
    breach: bool,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 64)]
    max_connecting: usize,
    /// Longest wait for any one phase, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

const MODEL: &str = "pump-anomaly";

struct Run<'a> {
    bed: &'a Bed,
    fleet: &'a Fleet,
    timeout: Duration,
}

impl Run<'_> {
    fn register(&self, version: &str) -> Result<Sha256Digest> {
        let digest = self.bed.controller.register_demo_version(
            json!({"name": MODEL, "version": version, "runtime": {"grace_window_s": 1}}),
        );
        digest
            .parse()
            .map_err(|e: String| anyhow::anyhow!("the registered model's digest {digest:?}: {e}"))
    }

    /// Waits until `done` holds, polling every 20 ms; the time it took.
    fn wait(&self, what: &str, started: Instant, mut done: impl FnMut() -> bool) -> Result<f64> {
        while !done() {
            if started.elapsed() > self.timeout {
                bail!("{what}: not done after {:?}", self.timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    fn all_on(&self, digest: &Sha256Digest) -> bool {
        self.fleet.count_on(digest) == self.fleet.len()
    }

    /// Assigns `digest` to every device with one API call each; (calls done, all active) in s.
    fn scripted(&self, digest: &Sha256Digest) -> Result<(f64, f64)> {
        let started = Instant::now();
        for device in self.fleet.devices() {
            let (status, body) = self.bed.controller.post(
                &format!("/api/v1/devices/{}/assign", device.id),
                &json!({"model": digest.to_string()}),
            );
            if status != 200 {
                bail!("assigning {} to {}: {status} {body}", digest, device.id);
            }
        }
        let issued = started.elapsed().as_secs_f64();
        let active = self.wait("scripted assignment", started, || self.all_on(digest))?;
        Ok((issued, active))
    }

    fn rollout(&self, body: &Value) -> Result<String> {
        let (status, answer) = self.bed.controller.post("/api/v1/rollouts", body);
        if status != 200 && status != 201 {
            bail!("starting the rollout: {status} {answer}");
        }
        answer["id"]
            .as_str()
            .map(str::to_owned)
            .context("the rollout's id")
    }

    fn view(&self, id: &str) -> Value {
        self.bed.controller.get(&format!("/api/v1/rollouts/{id}")).1
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.devices < 100 {
        bail!("--devices must be at least 100 (the first wave is 1% of the fleet)");
    }
    let fetch = match args.fetch.as_str() {
        "full" => FetchMode::Full,
        "manifest" => FetchMode::Manifest,
        other => bail!("--fetch {other:?}: use full or manifest"),
    };
    let dir = tempfile::tempdir()?;
    let bed = Bed::start(dir.path(), &args.broker)?;
    let mut config = bed.sim_config(&dir.path().join("sim"), args.devices)?;
    config.connect_rate = args.connect_rate;
    config.max_connecting = args.max_connecting;
    config.window = Duration::from_secs(args.window_s.max(1));
    config.fetch = fetch;
    config.behaviour.default.inference_rate = 2.0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "{} simulated devices, broker {}, fetch {}, telemetry every {} s",
        args.devices, args.broker, args.fetch, args.window_s
    );
    let started = Instant::now();
    let fleet = runtime.block_on(Fleet::start(config))?;
    println!(
        "fleet enrolled and connected in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let run = Run {
        bed: &bed,
        fleet: &fleet,
        timeout: Duration::from_secs(args.timeout_s),
    };
    let v1 = run.register("1.0.0")?;
    let v2 = run.register("1.1.0")?;
    let v3 = run.register("1.2.0")?;

    let (issued, first) = run.scripted(&v1)?;
    println!(
        "scripted, first install: {} calls in {issued:.1} s, every device active after {first:.1} s",
        args.devices
    );

    let started = Instant::now();
    let id = run.rollout(&json!({
        "candidate": v2.to_string(),
        "waves": [{"size": "1%"}, {"size": "10%"}, {"size": "50%"}, {"size": "100%"}],
        "max_per_minute": 1_000_000,
        "gates": {"require_evidence": false, "max_p95_latency_ratio": 1000.0},
        "reason": "bench: time to 100%",
    }))?;
    let mut waves = BTreeMap::new();
    let engine = run.wait("the rollout", started, || {
        let view = run.view(&id);
        if let Some(stage) = view["progress"]["stage"].as_str() {
            waves
                .entry(stage.to_owned())
                .or_insert_with(|| started.elapsed().as_secs_f64());
        }
        view["progress"]["phase"] == "completed" && run.all_on(&v2)
    })?;
    let stages: Vec<String> = waves
        .iter()
        .map(|(stage, at)| format!("{stage} at {at:.1} s"))
        .collect();
    println!(
        "rollout engine, 4 waves: every device active after {engine:.1} s (first seen: {})",
        stages.join(", ")
    );

    let (issued, scripted) = run.scripted(&v3)?;
    println!(
        "scripted upgrade: {} calls in {issued:.1} s, every device active after {scripted:.1} s",
        args.devices
    );
    println!(
        "ratio rollout engine / scripted upgrade: {:.2}",
        engine / scripted
    );

    if args.breach {
        let v4 = run.register("1.3.0")?;
        fleet.set_behaviour(
            &format!("{MODEL}@1.3.0"),
            Behaviour {
                inference_rate: 2.0,
                errors: ErrorRates {
                    runtime: 0.03,
                    ..ErrorRates::default()
                },
                ..Behaviour::default()
            },
        );
        let started = Instant::now();
        let started_wall = SystemClock.now().0;
        let id = run.rollout(&json!({
            "candidate": v4.to_string(),
            "waves": [{"size": "50%", "bake_s": 600}, {"size": "100%"}],
            "max_per_minute": 1_000_000,
            "gates": {"max_p95_latency_ratio": 1000.0},
            "on_breach": "abort",
            "reason": "bench: a candidate that fails 3% of requests",
        }))?;
        let mut view = Value::Null;
        run.wait("the breach", started, || {
            view = run.view(&id);
            view["progress"]["phase"] == "aborted"
        })?;
        let aborted_at = view["records"]
            .as_array()
            .and_then(|records| records.last())
            .and_then(|r| r["at"].as_u64())
            .context("the abort's audit record")?;
        let breach = view["progress"]["reason"].clone();
        let back = run.wait("the fleet rollback", started, || run.all_on(&v3))?;
        let mut latencies: Vec<f64> = fleet
            .devices()
            .iter()
            .filter(|d| d.previous.as_ref().map(|m| m.manifest_digest) == Some(v4))
            .filter_map(|d| d.last_change_at)
            .map(|at| (at.0 as f64 - aborted_at as f64) / 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        println!(
            "gate breach and abort {:.1} s after the start ({breach}); {} devices back on the baseline {back:.1} s after the start",
            (aborted_at as f64 - started_wall as f64) / 1000.0,
            latencies.len()
        );
        println!(
            "abort → device back on the baseline: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or(f64::NAN)
        );
    }
    let counters = runtime.block_on(fleet.stop())?;
    println!(
        "stopped: {} reports sent, {} acked",
        counters.sent, counters.acked
    );
    drop(bed);
    Ok(())
}
