//! Memory soak of a linked agent under steady load with a broker that keeps dying.
//!
//! The agent (this build's `edgefleet-agent`, bench profile, or the binary in
//! `EDGEFLEET_SOAK_AGENT`, e.g. a copy of the release build) runs Silero VAD, linked over mutual
//! TLS to a real Mosquitto on loopback, with a test peer that plays the controller (opens each
//! report, ingests each sequence number once, acknowledges it) and a telemetry window of 1 s.
//! A client thread sends `LOAD_PER_S` inference requests per second to the local TCP API. Every
//! `BROKER_RESTART_EVERY` the broker is SIGKILLed (losing every session and in-flight message),
//! left down for `BROKER_DOWN`, and restarted. Every `SAMPLE_EVERY` the `VmRSS` and `RssAnon` of
//! the supervisor and of its model worker are read from `/proc/<pid>/status`.
//!
//! At the end the load stops, the spool drains, and the run is checked for exactly-once
//! delivery: every report sequence number arrived (once, after deduplication), the telemetry
//! windows tile the time without a gap, and their inference counts add up to the requests the
//! client had answered.
//!
//! Run (10 minutes; `EDGEFLEET_SOAK_S` sets another duration in seconds):
//! `cargo bench -p edgefleet-agent --bench soak`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgefleet_client::{Client, Tensor};
use edgefleet_protocol::messages::DeviceBody;
use edgefleet_protocol::{DeviceId, DeviceMacKey};
use edgefleet_tests::agent::{AgentProcess, wait_until};
use edgefleet_tests::broker::{Mosquitto, TestPki, mosquitto_available};
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::{SILERO_VAD_16K, fetch};
use edgefleet_tests::peer::ControllerPeer;

const DEFAULT_DURATION: Duration = Duration::from_secs(600);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const BROKER_RESTART_EVERY: Duration = Duration::from_secs(30);
const BROKER_DOWN: Duration = Duration::from_secs(2);
const LOAD_PER_S: u64 = 100;
const KEY: [u8; 32] = [7; 32];

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then there is nothing to do.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("soak: run with `cargo bench -p edgefleet-agent --bench soak`");
        return;
    }
    if !mosquitto_available() {
        return;
    }
    let duration = std::env::var("EDGEFLEET_SOAK_S")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("EDGEFLEET_SOAK_S is a number of seconds")))
        .unwrap_or(DEFAULT_DURATION);
    let bin = std::env::var_os("EDGEFLEET_SOAK_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent")));
    let model = fetch(SILERO_VAD_16K);
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();

    let pki = TestPki::new(&root.join("pki"));
    let mut broker = Mosquitto::start(&pki, &root.join("broker"), "edgefleet-controller");
    let controller = pki.issue("edgefleet-controller", &[]);
    let device = DeviceId::new("test-device").expect("device id");
    let peer = ControllerPeer::start(broker.addr, &pki.ca, &controller, device, DeviceMacKey(KEY));
    let identity = pki.issue("test-device", &[]);
    let mac_key = root.join("mac.key");
    std::fs::write(&mac_key, hex::encode(KEY)).expect("write the MAC key");
    let url = format!("mqtts://127.0.0.1:{}", broker.addr.port());
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let env = [
        ("EDGEFLEET_MQTT_URL", url),
        ("EDGEFLEET_MQTT_CA", path(&pki.ca)),
        ("EDGEFLEET_MQTT_CERT", path(&identity.cert)),
        ("EDGEFLEET_MQTT_KEY", path(&identity.key)),
        ("EDGEFLEET_MQTT_MAC_KEY", path(&mac_key)),
        ("EDGEFLEET_MQTT_KEEP_ALIVE_S", String::from("5")),
        ("EDGEFLEET_TELEMETRY_WINDOW_S", String::from("1")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let fleet = TestFleet::new(&root.join("fleet"));
    let mut agent = AgentProcess::start(&bin, &fleet, &root.join("state"), &env);
    agent.wait_ready();
    let (bundle, digest) = fleet.bundle(&BundleSpec::silero(&model, 1));
    let answer = agent
        .install(&bundle)
        .unwrap_or_else(|err| panic!("install failed: {err}\nlog:\n{}", agent.log_text()));
    assert_eq!(answer["result"], "activated", "{answer}");
    let supervisor_pid = agent.pid().expect("agent pid");
    let worker_pid = || {
        agent.status()["worker"]["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
    };
    wait_until(Duration::from_secs(30), "the agent to connect", || {
        peer.with(|i| i.status.clone())
    });
    println!(
        "soak: {} for {} s, {LOAD_PER_S} requests/s, broker SIGKILLed every {} s ({} s down), samples every {} s",
        bin.display(),
        duration.as_secs(),
        BROKER_RESTART_EVERY.as_secs(),
        BROKER_DOWN.as_secs(),
        SAMPLE_EVERY.as_secs()
    );

    // The load: one client, paced to LOAD_PER_S, bounded by count and by time.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let load = {
        let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
        let api = agent.api;
        let digest = digest.clone();
        let time_limit = started + duration + Duration::from_secs(30);
        let max_requests = LOAD_PER_S * (duration.as_secs() + 30);
        std::thread::spawn(move || {
            let mut client = Client::tcp(api);
            let frame: Vec<f32> = (0..576)
                .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin())
                .collect();
            for n in 0..max_requests {
                if stop.load(Ordering::SeqCst) || Instant::now() > time_limit {
                    break;
                }
                let reply = client.infer(&[
                    ("input", Tensor::f32(vec![1, 576], frame.clone())),
                    ("state", Tensor::f32(vec![2, 1, 128], vec![0.0; 256])),
                ]);
                match reply {
                    Ok(reply) if reply.model.digest == digest => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let due = started + Duration::from_micros((n + 1) * 1_000_000 / LOAD_PER_S);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };

    // Samples and broker restarts, until the deadline (and at most a bounded number of steps).
    let deadline = started + duration;
    let mut samples: Vec<Sample> = Vec::new();
    let mut restarts = 0u32;
    let mut next_sample = started;
    let mut next_restart = started + BROKER_RESTART_EVERY;
    let max_steps =
        2 * (duration.as_secs() / SAMPLE_EVERY.as_secs().min(BROKER_RESTART_EVERY.as_secs()) + 2);
    for _ in 0..max_steps {
        let now = Instant::now();
        if now >= next_sample {
            let sample = Sample::take(started, supervisor_pid, worker_pid());
            println!("{}", sample.line());
            samples.push(sample);
            next_sample += SAMPLE_EVERY;
        }
        if now >= deadline {
            break;
        }
        if now >= next_restart {
            broker.kill();
            std::thread::sleep(BROKER_DOWN);
            broker.restart();
            restarts += 1;
            next_restart += BROKER_RESTART_EVERY;
        }
        let wake = next_sample.min(next_restart).min(deadline);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    // The last sample at the end, unless one was just taken.
    if samples
        .last()
        .is_none_or(|last| started.elapsed() >= last.at + Duration::from_secs(1))
    {
        let sample = Sample::take(started, supervisor_pid, worker_pid());
        println!("{}", sample.line());
        samples.push(sample);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    load.join().expect("the load thread");
    let (answered, failed) = (
        answered.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );

    // Let the last requests fall into a closed window, then wait for the spool to drain.
    std::thread::sleep(Duration::from_secs(3));
    wait_until(Duration::from_secs(120), "the spool to drain", || {
        (agent.status()["spool"]["pending"] == 0).then_some(())
    });
    let high_water: u64 = std::fs::read_to_string(agent.state_dir.join("spool/seq"))
        .expect("the spool's sequence file")
        .trim()
        .parse()
        .expect("a sequence number");
    let delivery = peer.with(|ingest| {
        let mut windows: Vec<_> = ingest
            .reports
            .values()
            .filter_map(|m| match &m.body {
                DeviceBody::Telemetry(w) => Some(w.clone()),
                _ => None,
            })
            .collect();
        windows.sort_by_key(|w| w.window_start);
        let gaps = windows
            .windows(2)
            .filter(|pair| pair[1].window_start != pair[0].window_end)
            .count();
        let span_ms = match (windows.first(), windows.last()) {
            (Some(first), Some(last)) => last.window_end.millis_since(first.window_start),
            _ => 0,
        };
        Delivery {
            seqs_complete: ingest.reports.keys().copied().eq(1..=high_water),
            reports: ingest.reports.len() as u64,
            duplicates: ingest.duplicates,
            rejected: ingest.rejected.len(),
            windows: windows.len() as u64,
            gaps,
            span_ms,
            inferences: windows.iter().map(|w| w.inferences).sum(),
        }
    });
    report(
        &samples, elapsed, restarts, answered, failed, high_water, &delivery,
    );
    assert!(
        delivery.seqs_complete && delivery.gaps == 0 && delivery.rejected == 0,
        "reports were lost or refused: {delivery:?}"
    );
    assert_eq!(
        delivery.inferences, answered,
        "the windows count every answered request once"
    );
    assert_eq!(failed, 0, "every request was answered by the model");
}

/// Memory of the supervisor and its worker at one moment, in KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    supervisor: Mem,
    worker: Mem,
}

#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    anon: u64,
}

impl Mem {
    fn of(pid: u32) -> Mem {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Mem {
            rss: field("VmRSS"),
            anon: field("RssAnon"),
        }
    }
}

impl Sample {
    fn take(started: Instant, supervisor: u32, worker: Option<u32>) -> Self {
        Sample {
            at: started.elapsed(),
            supervisor: Mem::of(supervisor),
            worker: worker.map(Mem::of).unwrap_or_default(),
        }
    }

    fn total(&self) -> u64 {
        self.supervisor.rss + self.worker.rss
    }

    fn line(&self) -> String {
        format!(
            "  t={:>4} s  supervisor {:>6} KiB (anon {:>5})  worker {:>6} KiB (anon {:>5})  total {:>6} KiB",
            self.at.as_secs(),
            self.supervisor.rss,
            self.supervisor.anon,
            self.worker.rss,
            self.worker.anon,
            self.total()
        )
    }
}

#[derive(Debug)]
struct Delivery {
    /// The peer holds every sequence number from 1 to the spool's high-water mark.
    seqs_complete: bool,
    reports: u64,
    duplicates: u64,
    rejected: usize,
    windows: u64,
    /// Telemetry windows that do not start where the previous one ended.
    gaps: usize,
    /// From the first window's start to the last window's end.
    span_ms: u64,
    inferences: u64,
}

/// One figure of a sample.
type Metric = fn(&Sample) -> u64;

/// Least-squares slope of `(minutes, KiB)` points, in KiB per minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

fn report(
    samples: &[Sample],
    elapsed: Duration,
    restarts: u32,
    answered: u64,
    failed: u64,
    high_water: u64,
    delivery: &Delivery,
) {
    let half = elapsed / 2;
    let second_half: Vec<&Sample> = samples.iter().filter(|s| s.at >= half).collect();
    println!();
    println!(
        "{} s, {} samples, {restarts} broker SIGKILLs, {answered} requests answered ({failed} failed)",
        elapsed.as_secs(),
        samples.len()
    );
    println!(
        "| Process | Start (KiB) | Steady state, mean of 2nd half (KiB) | End (KiB) | Max (KiB) | Slope, 2nd half (KiB/min) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let rows: [(&str, Metric); 5] = [
        ("supervisor VmRSS", |s| s.supervisor.rss),
        ("supervisor RssAnon", |s| s.supervisor.anon),
        ("worker VmRSS", |s| s.worker.rss),
        ("worker RssAnon", |s| s.worker.anon),
        ("supervisor + worker VmRSS", Sample::total),
    ];
    for (label, value) in rows {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return;
        };
        let max = samples.iter().map(value).max().unwrap_or(0);
        let steady = second_half.iter().map(|s| value(s) as f64).sum::<f64>()
            / second_half.len().max(1) as f64;
        let points: Vec<(f64, f64)> = second_half
            .iter()
            .map(|s| (s.at.as_secs_f64() / 60.0, value(s) as f64))
            .collect();
        println!(
            "| {label} | {} | {steady:.0} | {} | {max} | {:+.1} |",
            value(first),
            value(last),
            slope(&points)
        );
    }
    println!();
    println!(
        "delivery: {} reports (spool high-water mark {high_water}, all sequence numbers present: {}), {} resent copies deduplicated, {} refused",
        delivery.reports, delivery.seqs_complete, delivery.duplicates, delivery.rejected
    );
    println!(
        "telemetry: {} windows delivered over {:.1} s of windows (expected {} one-second windows), {} gaps; {} inferences counted in windows vs {answered} answered",
        delivery.windows,
        delivery.span_ms as f64 / 1000.0,
        (delivery.span_ms + 500) / 1000,
        delivery.gaps,
        delivery.inferences
    );
}
