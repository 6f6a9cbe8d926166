//! What a simulated fleet costs: the time to enroll and to connect `--devices` simulated devices
//! to a real `edgefleet-controller` (its embedded broker, or Mosquitto run with the configuration
//! `mosquitto-config` writes), the time to connect them again from the state directory (no
//! enrollment), and the memory each simulated device takes in the simulator's process, next to
//! what the broker holds for it.
//!
//! The controller runs with `--rate-limit-per-minute 1000000` (its default 600 per token and per
//! address would pace 10 000 enrollments over 16 minutes). Memory is `VmRSS` and `RssAnon` from
//! `/proc/<pid>/status`: of this process before the fleet starts and after every device is
//! connected, and of the broker's process (the controller's, for the embedded broker).
//!
//! ```sh
//! cargo build --profile bench -p edgefleet-controller --bin edgefleet-controller
//! cargo bench -p edgefleet-sim --bench scale -- --devices 1000 --broker embedded
//! cargo bench -p edgefleet-sim --bench scale -- --devices 10000 --broker mosquitto
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefleet_sim::{Fleet, Phase, Progress, SimConfig};

mod common;
use common::Bed;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// `embedded` (the controller's rumqttd) or `mosquitto`.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 64)]
    max_connecting: usize,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `VmRSS` and `RssAnon` of a process, in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// When each start phase was complete, from the fleet's progress reports.
#[derive(Debug, Default)]
struct Phases {
    enrolled: Option<Instant>,
    connected: Option<Instant>,
}

fn sim_config(
    bed: &Bed,
    state: &std::path::Path,
    args: &Args,
) -> Result<(SimConfig, Arc<Mutex<Phases>>)> {
    let mut config = bed.sim_config(state, args.devices)?;
    config.connect_rate = args.connect_rate;
    config.enroll_concurrency = args.enroll_concurrency;
    config.max_connecting = args.max_connecting;
    let phases = Arc::new(Mutex::new(Phases::default()));
    let seen = phases.clone();
    config.progress = Some(Arc::new(move |p: Progress| {
        if p.done == p.total {
            let mut phases = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match p.phase {
                Phase::Enrolling => phases.enrolled.get_or_insert_with(Instant::now),
                Phase::Connecting => phases.connected.get_or_insert_with(Instant::now),
            };
        }
    }));
    Ok((config, phases))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let bed = Bed::start(dir.path(), &args.broker)?;
    let (broker_pid, broker_name) = bed.broker_process()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let me = std::process::id();
    let state = dir.path().join("sim");
    println!(
        "{} simulated devices, connect rate {}/s, {} connecting and {} enrolling at once; broker: {}",
        args.devices, args.connect_rate, args.max_connecting, args.enroll_concurrency, args.broker
    );

    let (before, _) = memory(me)?;
    let (broker_before, _) = memory(broker_pid)?;
    let (config, phases) = sim_config(&bed, &state, &args)?;
    let started = Instant::now();
    let fleet = runtime.block_on(Fleet::start(config))?;
    let phases = std::mem::take(
        &mut *phases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let enrolled = phases.enrolled.context("enrollment progress")?;
    let connected = phases.connected.context("connection progress")?;
    let (after, anon) = memory(me)?;
    let (broker_after, _) = memory(broker_pid)?;
    let n = args.devices as f64;
    println!(
        "first start: enrolled in {:.1} s ({:.0}/s), then connected in {:.1} s ({:.0}/s)",
        (enrolled - started).as_secs_f64(),
        n / (enrolled - started).as_secs_f64(),
        (connected - enrolled).as_secs_f64(),
        n / (connected - enrolled).as_secs_f64(),
    );
    println!(
        "simulator: VmRSS {:.1} MiB before, {:.1} MiB with every device connected (RssAnon {:.1} MiB): {:.1} KiB per device",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        anon as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / n
    );
    println!(
        "{broker_name}: VmRSS {:.1} MiB before, {:.1} MiB with every device connected: {:.1} KiB per device",
        broker_before as f64 / 1024.0,
        broker_after as f64 / 1024.0,
        (broker_after.saturating_sub(broker_before)) as f64 / n
    );
    let counters = runtime.block_on(fleet.stop())?;
    println!(
        "stopped: {} reports sent, {} acked",
        counters.sent, counters.acked
    );

    let (config, phases) = sim_config(&bed, &state, &args)?;
    let started = Instant::now();
    let fleet = runtime.block_on(Fleet::start(config))?;
    let connected = phases
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .connected
        .context("connection progress")?;
    println!(
        "second start (identities from the state directory): connected in {:.1} s ({:.0}/s)",
        (connected - started).as_secs_f64(),
        n / (connected - started).as_secs_f64()
    );
    runtime.block_on(fleet.stop())?;
    drop(bed);
    Ok(())
}
