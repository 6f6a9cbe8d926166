//! Telemetry ingest end to end through Mosquitto, next to Mosquitto's own ceiling in the same run.
//!
//! One Mosquitto (configured by `edgefleet-controller mosquitto-config`: mTLS, per-device ACL) on
//! a loopback port; `--devices` simulated devices, each with its own enrolled certificate and MAC
//! key, publish `--messages` sealed telemetry windows each at QoS 1 as fast as the broker takes
//! them. Two measurements per round, alternating:
//!
//! - `mosquitto`: the broker's ceiling for this traffic: the same frames from the same clients,
//!   received by one plain MQTT subscriber (the controller's identity, the controller's shared
//!   subscription) that does nothing with them. No controller runs.
//! - `controller`: the real controller (in process, SQLite, `--mqtt mqtts://…`) subscribed
//!   instead; the clock stops when every device holds an acknowledgement for every message, and
//!   an ack is only sent after the report is committed. Afterwards the database must hold exactly
//!   the reports sent: nothing lost, nothing twice.
//!
//! ```sh
//! cargo bench -p edgefleet-controller --bench ingest -- --devices 20 --messages 1000 --rounds 3
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use edgefleet_controller::server::config::{ControllerCli, MosquittoConfigArgs, ServeArgs};
use edgefleet_controller::server::{self, mosquitto, pki};
use edgefleet_protocol::enroll::{ENROLL_PATH, ENROLL_VERSION, EnrollRequest, EnrollResponse};
use edgefleet_protocol::messages::{
    ControllerBody, DeviceBody, ErrorCounts, ModelRef, NamedSketch, ResourceUsage, TelemetryWindow,
};
use edgefleet_protocol::sketch::{LatencyHistogram, ReferenceFeature};
use edgefleet_protocol::{
    Arch, ControllerMessage, DeviceId, DeviceMacKey, DeviceMessage, ModelName, ModelVersion,
    Sha256Digest, TensorName, Timestamp, Topic, TopicKind, topics,
};
use edgefleet_tests::agent::free_port;
use edgefleet_tests::broker::Mosquitto;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Sequence numbers of the controller phase's warm-up frames (one per device and round),
/// far above the measured ones.
const WARM_UP_SEQ: u64 = 1 << 40;

/// Any one phase taking longer than this is a failure, not a measurement.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
struct Args {
    /// Simulated devices, one MQTT connection each.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Telemetry windows each device sends per measurement.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Rounds; each measures Mosquitto alone, then the controller.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One enrolled simulated device.
struct Device {
    id: DeviceId,
    key: DeviceMacKey,
    tls: Arc<rustls::ClientConfig>,
    window: TelemetryWindow,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.devices > 0 && args.messages > 0 && args.rounds > 0,
        "counts must be > 0"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let mqtt_addr = free_port();
    let serve = serve_args(dir.path(), mqtt_addr)?;
    let conf_dir = dir.path().join("mosquitto");
    mosquitto::write_config(
        &serve,
        &MosquittoConfigArgs {
            out: conf_dir.clone(),
            listen: mqtt_addr,
            hostnames: Vec::new(),
        },
    )?;
    // The test harness's runner for a generated configuration (as root it keeps the broker
    // running as root, which can read the controller's private directory).
    let broker = Mosquitto::start_generated(&conf_dir, mqtt_addr);
    let version = broker
        .log_text()
        .lines()
        .find_map(|l| {
            l.split_once(": mosquitto version ")
                .map(|(_, v)| v.to_owned())
        })
        .map(|v| format!("mosquitto {}", v.trim_end_matches(" starting")))
        .unwrap_or_default();

    let devices = Arc::new(with_controller(&serve, |running| {
        enroll(running, args.devices)
    })?);
    let frame_bytes = devices[0].seal(1).len();
    println!(
        "{} devices x {} telemetry windows per measurement ({} B sealed frame), QoS 1, TLS 1.2 mTLS; {version}",
        args.devices, args.messages, frame_bytes
    );
    let ca = pki::FleetCa::open_or_create(&serve.data_dir.join("pki"))?;
    let controller_id = ca.identity("controller", pki::CONTROLLER_CN, &[], false)?;
    let subscriber_tls = Arc::new(pki::client_config(&ca, &controller_id)?);

    let total = args.devices as u64 * args.messages;
    let mut results = Vec::new();
    for round in 0..args.rounds {
        let first_seq = round * args.messages + 1;
        let rt = runtime()?;
        let ceiling = rt.block_on(measure_broker(
            mqtt_addr,
            subscriber_tls.clone(),
            devices.clone(),
            first_seq,
            args.messages,
        ))?;
        rt.shutdown_timeout(Duration::from_secs(2));
        let devices_for_ingest = devices.clone();
        let messages = args.messages;
        let ingest = with_controller(&serve, move |running| async move {
            let elapsed =
                measure_controller(mqtt_addr, devices_for_ingest.clone(), first_seq, messages)
                    .await?;
            // Exactly what was sent, once.
            let counts = running.app.store.report_counts().await?;
            for device in devices_for_ingest.iter() {
                let stored = counts
                    .iter()
                    .find(|(d, kind, _)| d == device.id.as_str() && kind == "telemetry")
                    .map_or(0, |(_, _, n)| *n);
                // The measured frames and one warm-up frame per round.
                let expected = ((round + 1) * (messages + 1)) as i64;
                ensure!(
                    stored == expected,
                    "{}: {stored} reports stored, {expected} sent",
                    device.id
                );
            }
            Ok(elapsed)
        })?;
        let (broker_rate, ingest_rate) = (rate(total, ceiling), rate(total, ingest));
        println!(
            "round {}: mosquitto alone {:>8.0} msg/s ({:.2} s)   controller committed {:>8.0} msg/s ({:.2} s)   ratio {:.2}",
            round + 1,
            broker_rate,
            ceiling.as_secs_f64(),
            ingest_rate,
            ingest.as_secs_f64(),
            ingest_rate / broker_rate
        );
        results.push((broker_rate, ingest_rate));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let broker = median(results.iter().map(|r| r.0).collect());
    let ingest = median(results.iter().map(|r| r.1).collect());
    println!(
        "median: mosquitto alone {broker:.0} msg/s, controller committed {ingest:.0} msg/s, ratio {:.2}; every report stored exactly once",
        ingest / broker
    );
    Ok(())
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve_args(dir: &Path, mqtt: SocketAddr) -> Result<ServeArgs> {
    let data = dir.join("data");
    let cli = ControllerCli::try_parse_from([
        "edgefleet-controller".to_owned(),
        "--data-dir".to_owned(),
        data.display().to_string(),
        "--mqtt".to_owned(),
        format!("mqtts://{mqtt}"),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--device-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ])?;
    Ok(cli.serve)
}

/// Runs `f` against a controller started on its own runtime, then stops that runtime: the
/// controller's connections close and nothing of it keeps running into the next measurement.
fn with_controller<T, F, Fut>(serve: &ServeArgs, f: F) -> Result<T>
where
    F: FnOnce(server::Running) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let rt = runtime()?;
    let result = rt.block_on(async {
        let running = server::start(serve).await?;
        f(running).await
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Enrolls `n` devices through the controller's real enrollment endpoint.
async fn enroll(running: server::Running, n: usize) -> Result<Vec<Device>> {
    let data = &running.app.data_dir;
    let admin = std::fs::read_to_string(data.join("admin-token"))?;
    let api = reqwest::Client::new();
    let ca_pem = std::fs::read(running.app.ca.ca_path())?;
    let ca_cert = reqwest::Certificate::from_pem(&ca_pem)?;
    let devices_http = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .build()?;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let id = DeviceId::new(format!("bench-{i:04}"))?;
        let token: serde_json::Value = api
            .post(format!("http://{}/api/v1/enroll-tokens", running.api))
            .bearer_auth(admin.trim())
            .json(&serde_json::json!({}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id.as_str());
        let request = EnrollRequest {
            v: ENROLL_VERSION,
            token: token["token"].as_str().context("no token")?.to_owned(),
            device: id.clone(),
            csr_pem: params.serialize_request(&key)?.pem()?,
            arch: Arch::new("x86_64")?,
            agent_version: "bench".into(),
        };
        let answer: EnrollResponse = devices_http
            .post(format!("{}{ENROLL_PATH}", running.app.device_url))
            .json(&request)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mac = <[u8; 32]>::try_from(hex::decode(&answer.mac_key_hex)?.as_slice())
            .map_err(|_| anyhow::anyhow!("MAC key is not 32 bytes"))?;
        let tls = device_tls(
            &answer.ca_pem,
            &answer.certificate_pem,
            &key.serialize_pem(),
        )?;
        devices.push(Device {
            window: telemetry_window(i as u64)?,
            id,
            key: DeviceMacKey(mac),
            tls: Arc::new(tls),
        });
    }
    Ok(devices)
}

fn device_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?)
}

/// A realistic one-minute window: four feature sketches at ten reference bins, one output
/// sketch, a latency histogram, as an agent running the demo model reports it.
fn telemetry_window(salt: u64) -> Result<TelemetryWindow> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ salt;
    let mut next = move || {
        // SplitMix64 → a value in [0, 1).
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    };
    let reference: Vec<f64> = (0..1000).map(|_| next()).collect();
    let mut sketches = Vec::new();
    for name in [
        "temperature",
        "vibration",
        "current",
        "pressure",
        "anomaly_probability",
    ] {
        let feature = ReferenceFeature::from_samples(TensorName::new(name)?, &reference)
            .map_err(anyhow::Error::msg)?;
        let mut sketch = feature.sketch();
        for _ in 0..1000 {
            sketch.observe(&feature, next() * 1.1);
        }
        sketches.push(NamedSketch {
            name: TensorName::new(name)?,
            sketch,
        });
    }
    let outputs = sketches.split_off(4);
    let mut latency = LatencyHistogram::default();
    for _ in 0..1000 {
        latency.record(200 + (next() * 400.0) as u64);
    }
    Ok(TelemetryWindow {
        model: ModelRef {
            name: ModelName::new("sensor-anomaly")?,
            version: ModelVersion::new("1.0.0")?,
            release: 1,
            manifest_digest: Sha256Digest::of(b"sensor-anomaly 1.0.0"),
        },
        window_start: Timestamp(1_790_000_000_000),
        window_end: Timestamp(1_790_000_060_000),
        inferences: 1000,
        errors: ErrorCounts::default(),
        latency,
        features: sketches,
        outputs,
        shadow: None,
        feedback: None,
        resources: ResourceUsage {
            cpu_percent: 3.5,
            rss_bytes: 48 << 20,
        },
    })
}

impl Device {
    fn seal(&self, seq: u64) -> Vec<u8> {
        DeviceMessage::new(
            self.id.clone(),
            seq,
            Timestamp(1_790_000_060_000 + seq),
            DeviceBody::Telemetry(self.window.clone()),
        )
        .seal(&self.key)
    }

    fn connect(&self, broker: SocketAddr) -> (AsyncClient, EventLoop) {
        let mut options =
            MqttOptions::new(self.id.as_str(), broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())));
        AsyncClient::new(options, 1024)
    }
}

/// Sends every device's frames (sealed beforehand, outside the clock) once all are connected;
/// returns when `progress` reaches every frame sent. With `warm_up`, each device first sends
/// that one sequence number until it is acknowledged: the controller is subscribed and its
/// pipeline running before the clock starts (a broker drops what nobody subscribes to yet).
async fn run_devices(
    addr: SocketAddr,
    devices: &[Device],
    first_seq: u64,
    messages: u64,
    warm_up: Option<u64>,
    acks: Arc<AtomicU64>,
    progress: Arc<AtomicU64>,
) -> Result<Duration> {
    let total = devices.len() as u64 * messages;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Arc::new(tokio::sync::Barrier::new(devices.len() + 1));
    for device in devices {
        let frames: Vec<Vec<u8>> = (first_seq..first_seq + messages)
            .map(|seq| device.seal(seq))
            .collect();
        let (client, mut eventloop) = device.connect(addr);
        let topic = Topic::new(device.id.clone(), TopicKind::Telemetry).to_string();
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel::<()>();
        let (id, key, acks) = (device.id.clone(), device.key.clone(), acks.clone());
        let ack_topic = Topic::new(id.clone(), TopicKind::Ack).to_string();
        let sub = client.clone();
        let warmed = Arc::new(tokio::sync::Notify::new());
        let warmed_rx = warmed.clone();
        tasks.push(tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(message) = ControllerMessage::open(&key, &id, &p.payload)
                            && let ControllerBody::Ack { seqs } = message.body
                        {
                            let measured = seqs.iter().filter(|s| Some(**s) != warm_up).count();
                            if measured < seqs.len() {
                                warmed.notify_one();
                            }
                            acks.fetch_add(measured as u64, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        eprintln!("{id}: connection lost: {err}");
                        return;
                    }
                }
            }
        }));
        let barrier = start.clone();
        let sent = sent.clone();
        let warm_frame = warm_up.map(|seq| device.seal(seq));
        tasks.push(tokio::spawn(async move {
            if connected_rx.await.is_err() {
                barrier.wait().await;
                return;
            }
            if let Some(frame) = warm_frame {
                loop {
                    let _ = client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, frame.clone())
                        .await;
                    let acked =
                        tokio::time::timeout(Duration::from_millis(500), warmed_rx.notified());
                    if acked.await.is_ok() {
                        break;
                    }
                }
            }
            barrier.wait().await;
            for frame in frames {
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, frame)
                    .await
                    .is_err()
                {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(60), start.wait())
        .await
        .context("devices did not connect (and warm up) within 60 s")?;
    let began = Instant::now();
    while progress.load(Ordering::Relaxed) < total {
        if began.elapsed() > PHASE_LIMIT {
            bail!(
                "not done after {PHASE_LIMIT:?}: {} of {total} sent, {} of {total} through",
                sent.load(Ordering::Relaxed),
                progress.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = began.elapsed();
    for task in tasks {
        task.abort();
    }
    Ok(elapsed)
}

/// Mosquitto's ceiling: the devices' frames to one subscriber that only counts them.
async fn measure_broker(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    devices: Arc<Vec<Device>>,
    first_seq: u64,
    messages: u64,
) -> Result<Duration> {
    let received = Arc::new(AtomicU64::new(0));
    let mut options = MqttOptions::new(
        format!("{}-bench", pki::CONTROLLER_CN),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_clean_start(true);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let counter = received.clone();
    let subscriber = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(
                        topics::shared_filter(TopicKind::Telemetry),
                        QoS::AtLeastOnce,
                    );
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(err) => {
                    eprintln!("subscriber: connection lost: {err}");
                    return;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the subscriber did not connect")??;
    let elapsed = run_devices(
        addr,
        &devices,
        first_seq,
        messages,
        None,
        Arc::new(AtomicU64::new(0)),
        received,
    )
    .await;
    subscriber.abort();
    elapsed
}

/// The controller: done when every message is acknowledged (acks follow the commit).
async fn measure_controller(
    addr: SocketAddr,
    devices: Arc<Vec<Device>>,
    first_seq: u64,
    messages: u64,
) -> Result<Duration> {
    let acks = Arc::new(AtomicU64::new(0));
    let warm_up = Some(WARM_UP_SEQ + first_seq);
    run_devices(
        addr,
        &devices,
        first_seq,
        messages,
        warm_up,
        acks.clone(),
        acks,
    )
    .await
}
