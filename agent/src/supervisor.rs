//! The agent daemon: owns the model store, the trust floors and the event journal; runs each
//! model in a worker process; activates new models with a health check and reverts to the previous
//! model on any failure; serves the admin socket; handles SIGTERM and systemd notifications.

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgefleet_protocol::TopicKind;
use edgefleet_protocol::assignment::DeviceTrust;
use edgefleet_protocol::bundle::split_header;
use edgefleet_protocol::capture::{CaptureRecord, CaptureSettings};
use edgefleet_protocol::codec::MAX_MANIFEST_BYTES;
use edgefleet_protocol::manifest::{Manifest, ManifestPolicy};
use edgefleet_protocol::messages::{
    ControllerBody, DeviceBody, DeviceEvent, EventKind, FailureCode, ModelRef, ResourceUsage,
    ShadowStats, TelemetryWindow,
};
use edgefleet_protocol::{Clock, Timestamp, codec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use crate::capture::{Appended, CaptureStore, Offer, UploadError, Uploader};
use crate::config::AgentConfig;
use crate::control::{ModelSpec, WorkerCommand, WorkerEvent, WorkerSpec, WorkerStats};
use crate::events::{Journal, event_json};
use crate::mqtt::{Link, LinkEvent};
use crate::spool::{Spool, SpoolLimits};
use crate::store::{ModelStore, Slot, StoreState, Trial};
use crate::trust::{self, AGENT_VERSION};

/// Requests a worker must have answered before its error rate counts.
pub use edgefleet_protocol::manifest::MIN_GRACE_SAMPLES;
/// Unexpected worker exits within [`CRASH_WINDOW`] that make the agent give up on a model.
const MAX_CRASHES: usize = 3;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// How long a draining worker may take to finish in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Captured records waiting for the supervisor; past this the worker's newest are dropped.
const CAPTURE_QUEUE: usize = 4096;
/// A capture batch announced this long ago and still not uploaded is announced again.
const CAPTURE_RENOTICE: Duration = Duration::from_secs(300);

/// Whether a worker's live error rate breaks the manifest's limit, once enough requests count.
pub fn error_rate_breach(stats: &WorkerStats, max_error_rate: f32) -> Option<String> {
    edgefleet_protocol::manifest::error_rate_breach(stats.ok, stats.runtime_errors, max_error_rate)
}

/// An admin request on the admin socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    Install {
        path: PathBuf,
    },
    /// Run this bundle as the shadow model (or none) beside the active one.
    SetShadow {
        path: Option<PathBuf>,
    },
    Status,
}

/// The answer (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Ok(serde_json::Value),
    Error { code: String, message: String },
}

#[derive(Debug)]
enum WorkerMsg {
    Event(WorkerEvent),
    Exited(String),
}

#[derive(Debug)]
struct Worker {
    generation: u64,
    stdin: ChildStdin,
    kill: Option<oneshot::Sender<()>>,
    pid: Option<u32>,
}

impl Worker {
    async fn send(&mut self, command: &WorkerCommand) {
        let mut line = serde_json::to_string(command).expect("commands serialize");
        line.push('\n');
        // A worker that cannot take commands has exited; its exit message follows.
        let _ = self.stdin.write_all(line.as_bytes()).await;
        let _ = self.stdin.flush().await;
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// What an assignment pins: the manifest digest, and whether it may go below the release floor.
#[derive(Debug, Clone, Copy)]
struct Pin {
    digest: edgefleet_protocol::Sha256Digest,
    allow_downgrade: bool,
}

/// A failed activation, reported to the admin caller and journaled.
#[derive(Debug)]
struct Failure {
    code: FailureCode,
    message: String,
}

impl From<Result<serde_json::Value, Failure>> for AdminResponse {
    fn from(result: Result<serde_json::Value, Failure>) -> Self {
        match result {
            Ok(value) => AdminResponse::Ok(value),
            Err(failure) => AdminResponse::Error {
                code: code_name(failure.code),
                message: failure.message,
            },
        }
    }
}

/// An I/O failure (disk, process start) while acting on a model.
fn io_failure(err: anyhow::Error) -> Failure {
    Failure {
        code: FailureCode::Io,
        message: format!("{err:#}"),
    }
}

fn code_name(code: FailureCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

struct Supervisor {
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    trust: DeviceTrust,
    store: Arc<Mutex<ModelStore>>,
    journal: Journal,
    worker: Option<Worker>,
    generation: u64,
    worker_tx: mpsc::UnboundedSender<(u64, WorkerMsg)>,
    worker_rx: mpsc::UnboundedReceiver<(u64, WorkerMsg)>,
    crashes: VecDeque<Instant>,
    ready: bool,
    spool: Spool,
    window_started: Timestamp,
    /// CPU ticks of the agent's processes at the start of the window.
    cpu_ticks: u64,
    link: Option<Link>,
    mac_key: Option<edgefleet_protocol::DeviceMacKey>,
    connected: bool,
    /// Highest spooled sequence published on the current connection.
    sent_up_to: u64,
    started: Instant,
    downloader: Option<crate::download::Downloader>,
    /// The download carrying out the newest assignment, if any: (assignment seq, digest, task).
    download: Option<(u64, String, tokio::task::JoinHandle<()>)>,
    downloads_tx: mpsc::UnboundedSender<Downloaded>,
    capture: CaptureStore,
    /// Captured records from the workers: hex CBOR of (model, record).
    capture_tx: mpsc::Sender<String>,
    uploader: Option<Uploader>,
    uploads_tx: mpsc::UnboundedSender<(u64, Result<(), UploadError>)>,
}

/// A finished (or failed) download for assignment `seq`.
#[derive(Debug)]
struct Downloaded {
    seq: u64,
    assignment: edgefleet_protocol::Verified<edgefleet_protocol::Assignment>,
    /// The bundle is the assignment's shadow model, not its active one.
    shadow: bool,
    result: Result<PathBuf, String>,
}

/// Reads a device MAC key file (64 hex digits).
fn read_mac_key(path: &std::path::Path) -> Result<edgefleet_protocol::DeviceMacKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the device MAC key {}", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .with_context(|| format!("{} must hold 64 hex digits", path.display()))?;
    Ok(edgefleet_protocol::DeviceMacKey(key))
}

/// CPU ticks (user + system) and resident bytes of a process, from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks, pages * rustix::param::page_size() as u64))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig, clock: Arc<dyn Clock>) -> Result<()> {
    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let now = clock.now();
    let trust = trust::load(&config, now)?;
    let store_dir = config.store_dir();
    let (store, repair) =
        tokio::task::spawn_blocking(move || ModelStore::open(&store_dir, now)).await??;
    let journal = Journal::new(&config.events_path());
    let limits = SpoolLimits {
        max_bytes: config.spool_max_bytes,
        max_age_ms: config.spool_max_age_s.saturating_mul(1000),
    };
    let spool =
        Spool::open(&config.spool_dir(), config.device_id.clone(), limits).with_context(|| {
            format!(
                "cannot open the report spool in {}",
                config.spool_dir().display()
            )
        })?;
    let capture = CaptureStore::open(
        &config.capture_dir(),
        config.device_id.clone(),
        config.capture_max_bytes,
    )
    .with_context(|| {
        format!(
            "cannot open the capture directory {}",
            config.capture_dir().display()
        )
    })?;
    for removed in &repair.removed {
        tracing::info!(%removed, "removed leftover of an unfinished install");
    }
    let (worker_tx, worker_rx) = mpsc::unbounded_channel();
    let (downloads_tx, mut downloads_rx) = mpsc::unbounded_channel::<Downloaded>();
    let (capture_tx, mut capture_rx) = mpsc::channel::<String>(CAPTURE_QUEUE);
    let (uploads_tx, mut uploads_rx) = mpsc::unbounded_channel();
    // One crypto provider for every TLS client in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut sup = Supervisor {
        config,
        clock,
        trust,
        store: Arc::new(Mutex::new(store)),
        journal,
        worker: None,
        generation: 0,
        worker_tx,
        worker_rx,
        crashes: VecDeque::new(),
        ready: false,
        spool,
        window_started: now,
        cpu_ticks: 0,
        link: None,
        mac_key: None,
        connected: false,
        sent_up_to: 0,
        started: Instant::now(),
        downloader: None,
        download: None,
        downloads_tx,
        capture,
        capture_tx,
        uploader: None,
        uploads_tx,
    };
    let mut link_rx = None;
    if let Some(link) = sup.config.link.clone() {
        crate::enroll::ensure_identity(&sup.config, &link).await?;
        let key = read_mac_key(&link.mac_key)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let will = sup.status_message(false, &key);
        sup.link = Some(Link::start(
            &link.mqtt,
            &sup.config.device_id,
            &key,
            will,
            tx,
        )?);
        // Bundle servers are trusted as the broker is: through the fleet CA only.
        let tls = crate::mqtt::tls_config(&link.mqtt)?;
        sup.uploader = Some(Uploader::new(tls.clone())?);
        let mut downloader =
            crate::download::Downloader::new(&sup.config.state_dir.join("downloads"), Some(tls))?;
        downloader.bandwidth_bps = Some(sup.config.download_max_bytes_per_s).filter(|&bps| bps > 0);
        sup.downloader = Some(downloader);
        sup.mac_key = Some(key);
        link_rx = Some(rx);
    }
    if let Some((failed, to)) = repair.interrupted_trial {
        sup.record(
            EventKind::RolledBack {
                reason: FailureCode::Crash,
                to: to.as_ref().and_then(Slot::model_ref),
            },
            Some(&failed),
            "the agent stopped while this model was on trial; reverted to the previous model",
        );
    }
    for (slot, reason) in repair.invalid {
        sup.record(
            EventKind::RolledBack {
                reason: FailureCode::PayloadHash,
                to: None,
            },
            Some(&slot),
            &format!("installed files failed their check: {reason}"),
        );
    }
    sup.start_current().await?;

    let admin_path = sup.config.admin_socket();
    let _ = fs::remove_file(&admin_path);
    let admin = UnixListener::bind(&admin_path)
        .with_context(|| format!("cannot listen on {}", admin_path.display()))?;
    fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o600))?;
    let (admin_tx, mut admin_rx) =
        mpsc::channel::<(AdminRequest, oneshot::Sender<AdminResponse>)>(16);
    tokio::spawn(accept_admin(admin, admin_tx));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // The watchdog proves the runtime is alive; it runs apart from the main loop, which may wait
    // through a model's whole grace window during an activation.
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    let mut window_tick = tokio::time::interval(Duration::from_secs(sup.config.telemetry_window_s));
    window_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    window_tick.tick().await;
    sup.cpu_ticks = sup.usage().0;
    let mut resend_tick = tokio::time::interval(Duration::from_secs(30));
    resend_tick.tick().await;
    let mut capture_tick = tokio::time::interval(Duration::from_secs(1));
    capture_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let link_event = async {
            match link_rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(event) = link_event => sup.on_link_event(event).await,
            Some(done) = downloads_rx.recv() => sup.on_downloaded(done).await,
            _ = resend_tick.tick() => {
                // Anything still unacknowledged is sent again; the controller ingests each once.
                sup.sent_up_to = 0;
                sup.flush();
            }
            _ = window_tick.tick() => sup.close_window().await,
            Some(cbor) = capture_rx.recv() => sup.on_captured(&cbor),
            Some((batch, result)) = uploads_rx.recv() => {
                if let Err(err) = sup.capture.uploaded(batch, result, Instant::now()) {
                    tracing::error!(error = %err, batch, "cannot remove an uploaded capture batch");
                }
            }
            _ = capture_tick.tick() => sup.capture_housekeeping(),
            Some((request, reply)) = admin_rx.recv() => {
                let response = sup.admin(request).await;
                let _ = reply.send(response);
            }
            Some((generation, msg)) = sup.worker_rx.recv() => sup.on_worker_msg(generation, msg).await?,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(worker) = sup.worker.take() {
        sup.drain(worker).await;
    }
    let _ = fs::remove_file(&admin_path);
    Ok(())
}

async fn accept_admin(
    listener: UnixListener,
    requests: mpsc::Sender<(AdminRequest, oneshot::Sender<AdminResponse>)>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<AdminRequest>(&line) {
                    Ok(request) => {
                        let (tx, rx) = oneshot::channel();
                        if requests.send((request, tx)).await.is_err() {
                            return;
                        }
                        rx.await.unwrap_or(AdminResponse::Error {
                            code: String::from("stopping"),
                            message: String::from("the agent is stopping"),
                        })
                    }
                    Err(err) => AdminResponse::Error {
                        code: String::from("bad_request"),
                        message: format!("not an admin request: {err}"),
                    },
                };
                let mut out = serde_json::to_string(&response).unwrap_or_default();
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

impl Supervisor {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn state(&self) -> StoreState {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .state()
            .clone()
    }

    async fn commit(&self, state: StoreState) -> Result<()> {
        let store = self.store.clone();
        let now = self.now();
        tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .commit(state, now)
        })
        .await?
    }

    fn record(&mut self, kind: EventKind, slot: Option<&Slot>, detail: &str) {
        let event = DeviceEvent {
            at: self.now(),
            kind,
            model: slot.and_then(Slot::model_ref),
            assignment_seq: None,
            detail: detail.to_owned(),
        };
        tracing::info!(event = %event_json(&event), "event");
        if let Err(err) = self.journal.append(&event) {
            tracing::error!(error = %err, "cannot record an event in the journal");
        }
        let now = self.now();
        if let Err(err) = self
            .spool
            .append(TopicKind::Event, DeviceBody::Event(event), now)
        {
            tracing::error!(error = %err, "cannot spool an event for the controller");
        }
        self.publish_status();
        self.flush();
    }

    /// The retained status: online or not, what runs, as a sealed report (sequence 0: status
    /// is not spooled; the newest one wins).
    fn status_message(&self, online: bool, key: &edgefleet_protocol::DeviceMacKey) -> Vec<u8> {
        let state = self.state();
        let status = edgefleet_protocol::messages::Status {
            online,
            agent_version: String::from(AGENT_VERSION),
            arch: self.config.arch.clone(),
            active: state.active.as_ref().and_then(Slot::model_ref),
            previous: state.previous.as_ref().and_then(Slot::model_ref),
            shadow: state.shadow.as_ref().and_then(Slot::model_ref),
            assignment_seq: self.trust.floors.assignment_seq,
            uptime_s: self.started.elapsed().as_secs(),
        };
        edgefleet_protocol::DeviceMessage::new(
            self.config.device_id.clone(),
            0,
            self.now(),
            DeviceBody::Status(status),
        )
        .seal(key)
    }

    fn publish_status(&self) {
        if let (true, Some(link), Some(key)) = (self.connected, &self.link, &self.mac_key) {
            link.publish(TopicKind::Status, self.status_message(true, key), true);
        }
    }

    /// Publishes spooled reports not yet sent on this connection, oldest first.
    fn flush(&mut self) {
        let (true, Some(link), Some(key)) = (self.connected, &self.link, &self.mac_key) else {
            return;
        };
        let pending = match self.spool.pending() {
            Ok(pending) => pending,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the report spool");
                return;
            }
        };
        let sent_up_to = self.sent_up_to;
        for report in pending.into_iter().filter(|r| r.seq > sent_up_to) {
            if !link.publish(report.kind, report.message.seal(key), false) {
                break;
            }
            self.sent_up_to = report.seq;
        }
    }

    async fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                tracing::info!("connected to the controller's broker");
                self.connected = true;
                self.sent_up_to = 0;
                self.publish_status();
                self.flush();
            }
            LinkEvent::Disconnected(_) => self.connected = false,
            LinkEvent::Message { topic, payload } => {
                let Some(key) = &self.mac_key else { return };
                match edgefleet_protocol::Topic::parse(&topic) {
                    Ok(parsed)
                        if parsed.device == self.config.device_id
                            && parsed.kind == TopicKind::Ack =>
                    {
                        match edgefleet_protocol::ControllerMessage::open(
                            key,
                            &self.config.device_id,
                            &payload,
                        ) {
                            Ok(message) => match message.body {
                                ControllerBody::Ack { seqs } => {
                                    if let Err(err) = self.spool.ack(&seqs) {
                                        tracing::error!(error = %err, "cannot remove acknowledged reports from the spool");
                                    }
                                }
                                ControllerBody::CaptureUpload { batch, url } => {
                                    self.on_capture_offer(batch, url);
                                }
                            },
                            Err(err) => {
                                tracing::warn!(error = %err, %topic, "rejected a controller message")
                            }
                        }
                    }
                    Ok(parsed)
                        if parsed.device == self.config.device_id
                            && parsed.kind == TopicKind::Assignment =>
                    {
                        self.on_assignment(&payload).await;
                    }
                    Ok(parsed) => {
                        tracing::warn!(kind = ?parsed.kind, device = %parsed.device, "ignoring a message for another device or kind")
                    }
                    Err(err) => tracing::warn!(error = %err, "message on an unexpected topic"),
                }
            }
        }
    }

    /// CPU ticks and resident bytes of the supervisor and its worker together.
    fn usage(&self) -> (u64, u64) {
        let own = proc_usage(std::process::id()).unwrap_or_default();
        let worker = self
            .worker
            .as_ref()
            .and_then(|w| w.pid)
            .and_then(proc_usage)
            .unwrap_or_default();
        (own.0 + worker.0, own.1 + worker.1)
    }

    /// Ends the telemetry window: takes the worker's counts and sketches, adds resource usage,
    /// and spools the report.
    async fn close_window(&mut self) {
        let now = self.now();
        let started = std::mem::replace(&mut self.window_started, now);
        let state = self.state();
        let Some(active) = state.active.as_ref().and_then(Slot::model_ref) else {
            return;
        };
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let generation = worker.generation;
        worker.send(&WorkerCommand::TakeWindow).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let data = loop {
            match self.next_msg(generation, deadline).await {
                Some(WorkerMsg::Event(WorkerEvent::Window(data))) => break *data,
                Some(WorkerMsg::Event(_)) => continue,
                Some(WorkerMsg::Exited(status)) => {
                    if let Err(err) = self
                        .on_worker_msg(generation, WorkerMsg::Exited(status))
                        .await
                    {
                        tracing::error!(error = %err, "cannot restart the model worker");
                    }
                    return;
                }
                None => {
                    tracing::warn!("the model worker did not send its telemetry window in time");
                    return;
                }
            }
        };
        let (ticks, rss_bytes) = self.usage();
        let elapsed_s = (now.millis_since(started) as f64 / 1000.0).max(0.001);
        let cpu_percent = ticks.saturating_sub(self.cpu_ticks) as f64
            / rustix::param::clock_ticks_per_second() as f64
            / elapsed_s
            * 100.0;
        self.cpu_ticks = ticks;
        let shadow = state
            .shadow
            .as_ref()
            .and_then(Slot::model_ref)
            .map(|model| ShadowStats {
                model,
                compared: data.shadow.compared,
                dropped: data.shadow.dropped,
                errors: data.shadow.errors,
                argmax_agree: data.shadow.argmax_agree,
                abs_diff_sum: data.shadow.abs_diff_sum,
                latency: data.shadow.latency.clone(),
                feedback: (data.shadow_feedback.count > 0).then_some(data.shadow_feedback),
            });
        let window = TelemetryWindow {
            model: active,
            window_start: started,
            window_end: now,
            inferences: data.inferences,
            errors: data.errors,
            latency: data.latency,
            features: data.features,
            outputs: data.outputs,
            shadow,
            feedback: (data.feedback.count > 0).then_some(data.feedback),
            resources: ResourceUsage {
                cpu_percent: cpu_percent as f32,
                rss_bytes,
            },
        };
        if let Err(err) =
            self.spool
                .append(TopicKind::Telemetry, DeviceBody::Telemetry(window), now)
        {
            tracing::error!(error = %err, "cannot spool a telemetry window; it is lost");
        }
        self.flush();
    }

    /// Applies the capture settings of an accepted assignment and tells the worker.
    async fn set_capture(&mut self, settings: Option<CaptureSettings>) {
        if let Some(settings) = &settings
            && let Err(reason) = settings.validate()
        {
            tracing::warn!(%reason, "ignoring the assignment's capture settings");
            return;
        }
        match self.capture.set_settings(settings.clone()) {
            Ok(false) => return,
            Ok(true) => {}
            Err(err) => {
                tracing::error!(error = %err, "cannot store the capture settings; capture stays as it was");
                return;
            }
        }
        tracing::info!(on = settings.is_some(), "data capture settings changed");
        if let Some(worker) = self.worker.as_mut() {
            worker.send(&WorkerCommand::Capture(settings)).await;
        }
        self.capture_housekeeping();
    }

    /// A record a worker captured.
    fn on_captured(&mut self, cbor: &str) {
        let record = hex::decode(cbor)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                codec::decode::<(ModelRef, CaptureRecord)>(
                    "captured record",
                    &bytes,
                    edgefleet_protocol::capture::MAX_CAPTURE_BATCH_BYTES as usize,
                )
                .map_err(|e| e.to_string())
            });
        let (model, record) = match record {
            Ok(decoded) => decoded,
            Err(err) => {
                tracing::warn!(error = %err, "the worker sent an unreadable captured record");
                return;
            }
        };
        match self.capture.append(&model, &record, self.now()) {
            Ok(Appended::Stored | Appended::Off | Appended::Dropped(_)) => {}
            Err(err) => tracing::error!(error = %err, "cannot store a captured record"),
        }
        self.spool_capture_notices();
    }

    /// Closes capture batches past their age and announces what waits for upload.
    fn capture_housekeeping(&mut self) {
        if let Err(err) = self.capture.tick(self.now()) {
            tracing::error!(error = %err, "cannot close a capture batch");
        }
        self.spool_capture_notices();
    }

    /// Spools the notices due; while disconnected they wait (rather than piling up).
    fn spool_capture_notices(&mut self) {
        if self.link.is_none() || !self.connected {
            return;
        }
        let now = self.now();
        let notices = self.capture.due_notices(Instant::now(), CAPTURE_RENOTICE);
        if notices.is_empty() {
            return;
        }
        for notice in notices {
            if let Err(err) =
                self.spool
                    .append(TopicKind::Capture, DeviceBody::Capture(notice), now)
            {
                tracing::error!(error = %err, "cannot spool a capture notice; it is sent again later");
            }
        }
        self.flush();
    }

    /// The controller's answer to a capture notice.
    fn on_capture_offer(&mut self, batch: u64, url: Option<String>) {
        let offer = match self.capture.offer(batch, url) {
            Ok(offer) => offer,
            Err(err) => {
                tracing::error!(error = %err, batch, "cannot act on a capture upload offer");
                return;
            }
        };
        let (Offer::Upload { path, url }, Some(uploader)) = (offer, self.uploader.clone()) else {
            return;
        };
        let done = self.uploads_tx.clone();
        tokio::spawn(async move {
            let result = uploader.upload(&path, &url).await;
            let _ = done.send((batch, result));
        });
    }

    fn model_spec(&self, slot: &Slot) -> ModelSpec {
        let dir = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .model_dir(slot);
        ModelSpec {
            dir,
            slot: slot.clone(),
        }
    }

    async fn spawn_worker(
        &mut self,
        active: Option<&Slot>,
        shadow: Option<&Slot>,
    ) -> Result<Worker> {
        self.generation += 1;
        let generation = self.generation;
        let spec = WorkerSpec {
            active: active.map(|s| self.model_spec(s)),
            shadow: shadow.map(|s| self.model_spec(s)),
            listen: self.config.api_listen,
            socket: self.config.api_socket.clone(),
            memory_limit_bytes: self
                .config
                .model_memory_limit_mb
                .saturating_mul(1024 * 1024),
            max_body_bytes: self.config.api_max_body_bytes,
            shadow_queue: self.config.shadow_queue,
            feedback_max_predictions: self.config.feedback_max_predictions,
            feedback_max_age_s: self.config.feedback_max_age_s,
            capture: self.capture.settings().cloned(),
        };
        let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
        let mut child: Child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the model worker process")?;
        let pid = child.id();
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut line = serde_json::to_string(&spec)?;
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .context("cannot hand the worker its spec")?;
        let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
        let tx = self.worker_tx.clone();
        let capture_tx = self.capture_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut killed = false;
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(line)) => match serde_json::from_str::<WorkerEvent>(&line) {
                            // Captured records bypass the control flow (and never wait for it).
                            Ok(WorkerEvent::Captured { cbor }) => {
                                if capture_tx.try_send(cbor).is_err() {
                                    tracing::warn!("the capture queue is full; a captured record was dropped");
                                }
                            }
                            Ok(event) => { let _ = tx.send((generation, WorkerMsg::Event(event))); }
                            Err(err) => tracing::warn!(error = %err, %line, "unreadable worker message"),
                        },
                        Ok(None) | Err(_) => break,
                    },
                    _ = &mut kill_rx, if !killed => {
                        killed = true;
                        let _ = child.start_kill();
                    }
                }
            }
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("unknown ({err})"),
            };
            let _ = tx.send((generation, WorkerMsg::Exited(status)));
        });
        tracing::info!(generation, pid, model = ?active.map(|s| format!("{}@{}", s.name, s.version)), "started model worker");
        Ok(Worker {
            generation,
            stdin,
            kill: Some(kill_tx),
            pid,
        })
    }

    /// Waits for the next message of worker `generation`, until `deadline`.
    async fn next_msg(&mut self, generation: u64, deadline: Instant) -> Option<WorkerMsg> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.worker_rx.recv()).await {
                Ok(Some((g, msg))) if g == generation => return Some(msg),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Starts a worker for `active`/`shadow` and waits until it serves. On failure the worker is
    /// gone and the reason returned.
    async fn launch(
        &mut self,
        active: Option<&Slot>,
        shadow: Option<&Slot>,
    ) -> Result<Worker, Failure> {
        let mut worker = self
            .spawn_worker(active, shadow)
            .await
            .map_err(io_failure)?;
        let deadline = Instant::now() + Duration::from_secs(self.config.model_load_timeout_s);
        loop {
            match self.next_msg(worker.generation, deadline).await {
                Some(WorkerMsg::Event(WorkerEvent::Loaded {
                    shadow: Some(Err(reason)),
                    ..
                })) => {
                    tracing::warn!(%reason, "shadow model failed to load; serving without it");
                    self.record(EventKind::ShadowStopped, shadow, &reason);
                    break;
                }
                Some(WorkerMsg::Event(WorkerEvent::Loaded { .. })) => break,
                Some(WorkerMsg::Event(WorkerEvent::LoadFailed { code, detail })) => {
                    self.reap(&mut worker).await;
                    return Err(Failure {
                        code,
                        message: detail,
                    });
                }
                Some(WorkerMsg::Exited(status)) => {
                    return Err(Failure {
                        code: FailureCode::Crash,
                        message: format!(
                            "the model worker died while loading the model ({status}); the model crashed it or exhausted its memory limit"
                        ),
                    });
                }
                Some(WorkerMsg::Event(_)) => continue,
                None => {
                    self.reap(&mut worker).await;
                    return Err(Failure {
                        code: FailureCode::ModelLoad,
                        message: format!(
                            "the model did not load within {} s (model.load_timeout_s)",
                            self.config.model_load_timeout_s
                        ),
                    });
                }
            }
        }
        worker.send(&WorkerCommand::Serve).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.next_msg(worker.generation, deadline).await {
                Some(WorkerMsg::Event(WorkerEvent::Serving)) => return Ok(worker),
                Some(WorkerMsg::Exited(status)) => {
                    return Err(Failure {
                        code: FailureCode::Crash,
                        message: format!("the model worker exited before serving ({status})"),
                    });
                }
                Some(WorkerMsg::Event(_)) => continue,
                None => {
                    self.reap(&mut worker).await;
                    return Err(Failure {
                        code: FailureCode::Io,
                        message: String::from("the model worker could not open the API sockets"),
                    });
                }
            }
        }
    }

    /// Kills a worker and waits for its exit.
    async fn reap(&mut self, worker: &mut Worker) {
        worker.kill();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while let Some(msg) = self.next_msg(worker.generation, deadline).await {
            if let WorkerMsg::Exited(_) = msg {
                return;
            }
        }
    }

    /// Asks a worker to finish in-flight requests and exit; kills it if it does not.
    async fn drain(&mut self, mut worker: Worker) {
        worker.send(&WorkerCommand::Drain).await;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while let Some(msg) = self.next_msg(worker.generation, deadline).await {
            if let WorkerMsg::Exited(_) = msg {
                return;
            }
        }
        tracing::warn!(
            generation = worker.generation,
            "worker did not drain in time; killing it"
        );
        self.reap(&mut worker).await;
    }

    fn notify_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!(listen = %self.config.api_listen, socket = %self.config.api_socket.display(), "agent ready");
        }
    }

    /// Serves the committed state; if its active model no longer loads, falls back to the
    /// previous one, then to serving no model.
    async fn start_current(&mut self) -> Result<()> {
        loop {
            let state = self.state();
            match self
                .launch(state.active.as_ref(), state.shadow.as_ref())
                .await
            {
                Ok(worker) => {
                    if let Some(old) = self.worker.replace(worker) {
                        self.drain(old).await;
                    }
                    self.notify_ready();
                    return Ok(());
                }
                Err(failure) => {
                    let Some(failed) = state.active.clone() else {
                        anyhow::bail!("cannot start the model worker: {}", failure.message);
                    };
                    self.fall_back(&state, &failed, failure.code, &failure.message)
                        .await?;
                }
            }
        }
    }

    /// Puts the previous model back after `failed` (the active model of `state`) failed:
    /// commits, journals the rollback with its reason, removes the failed model's files.
    async fn fall_back(
        &mut self,
        state: &StoreState,
        failed: &Slot,
        code: FailureCode,
        detail: &str,
    ) -> Result<()> {
        let next = StoreState {
            active: state.previous.clone(),
            previous: None,
            shadow: state.shadow.clone(),
            trial: None,
        };
        self.commit(next).await?;
        self.record(
            EventKind::RolledBack {
                reason: code,
                to: state.previous.as_ref().and_then(Slot::model_ref),
            },
            Some(failed),
            detail,
        );
        let _ = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove_unreferenced(failed);
        Ok(())
    }

    async fn on_worker_msg(&mut self, generation: u64, msg: WorkerMsg) -> Result<()> {
        let current = self.worker.as_ref().map(|w| w.generation);
        if Some(generation) != current {
            return Ok(());
        }
        if let WorkerMsg::Exited(status) = msg {
            self.worker = None;
            let state = self.state();
            tracing::error!(%status, "the model worker died unexpectedly; restarting it");
            let now = Instant::now();
            self.crashes.push_back(now);
            while self
                .crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
            {
                self.crashes.pop_front();
            }
            if self.crashes.len() >= MAX_CRASHES
                && let Some(failed) = state.active.clone()
            {
                self.crashes.clear();
                let detail = &format!(
                    "the model worker crashed {MAX_CRASHES} times within {} s (last: {status})",
                    CRASH_WINDOW.as_secs()
                );
                self.fall_back(&state, &failed, FailureCode::Crash, detail)
                    .await?;
            }
            self.start_current().await?;
        }
        Ok(())
    }

    async fn admin(&mut self, request: AdminRequest) -> AdminResponse {
        match request {
            AdminRequest::Status => AdminResponse::Ok(self.status()),
            AdminRequest::Install { path } => self.install(path).await.into(),
            AdminRequest::SetShadow { path } => self.set_shadow(path).await.into(),
        }
    }

    /// A signed assignment from the controller: verify it, persist the floors, and converge.
    async fn on_assignment(&mut self, payload: &[u8]) {
        let now = self.now();
        let assignment = match self.trust.check_assignment(payload, now) {
            Ok(assignment) => assignment,
            // The retained assignment comes again on every reconnect: not news.
            Err(edgefleet_protocol::TrustError::Replay { have, got }) if have == got => return,
            Err(err) => {
                let code = err.failure_code();
                self.record(
                    EventKind::InstallFailed { reason: code },
                    None,
                    &format!("assignment refused: {err}"),
                );
                return;
            }
        };
        self.trust.record_assignment(&assignment);
        let floors_path = self.config.floors_path();
        let floors = self.trust.floors.clone();
        if let Err(err) =
            tokio::task::spawn_blocking(move || trust::save_floors(&floors_path, &floors))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        {
            tracing::error!(error = %err, "cannot persist the assignment floors; ignoring the assignment");
            return;
        }
        self.set_capture(assignment.capture.clone()).await;
        let Some(model) = assignment.active.clone() else {
            tracing::info!(seq = assignment.seq, "assignment names no model");
            return;
        };
        let active = self.state().active;
        if active
            .as_ref()
            .is_some_and(|slot| slot.digest == model.manifest_digest.to_hex())
        {
            self.converge_shadow(assignment).await;
            return;
        }
        self.fetch(assignment, model, false).await;
    }

    /// With the assigned model already active: starts, replaces or stops the shadow model the
    /// assignment names (a rollout's shadow phase).
    async fn converge_shadow(
        &mut self,
        assignment: edgefleet_protocol::Verified<edgefleet_protocol::Assignment>,
    ) {
        let want = assignment
            .shadow
            .as_ref()
            .map(|m| m.manifest_digest.to_hex());
        let have = self.state().shadow.map(|slot| slot.digest);
        if want == have {
            tracing::info!(seq = assignment.seq, "already running the assigned model");
            return;
        }
        match assignment.shadow.clone() {
            None => {
                if let Err(failure) = self.set_shadow(None).await {
                    tracing::warn!(code = ?failure.code, message = %failure.message, "cannot stop the shadow model");
                }
            }
            Some(shadow) => self.fetch(assignment, shadow, true).await,
        }
    }

    /// Downloads `model` (the assignment's active model, or its shadow) in the background; the
    /// result comes back as a [`Downloaded`].
    async fn fetch(
        &mut self,
        assignment: edgefleet_protocol::Verified<edgefleet_protocol::Assignment>,
        model: edgefleet_protocol::assignment::AssignedModel,
        shadow: bool,
    ) {
        let Some(downloader) = self.downloader.clone() else {
            return;
        };
        // A newer assignment supersedes a download still under way.
        if let Some((seq, digest, handle)) = self.download.take() {
            tracing::info!(
                superseded = seq,
                by = assignment.seq,
                "cancelling the superseded download"
            );
            handle.abort();
            let _ = handle.await;
            if digest != model.manifest_digest.to_hex() {
                let _ = tokio::fs::remove_file(downloader.part_path(&digest)).await;
            }
        }
        let slot = Slot {
            digest: model.manifest_digest.to_hex(),
            name: model.name.to_string(),
            version: model.version.to_string(),
            release: model.release,
        };
        self.record(
            EventKind::Downloading,
            Some(&slot),
            &format!("assignment {} from {}", assignment.seq, model.bundle_url),
        );
        let tx = self.downloads_tx.clone();
        let seq = assignment.seq;
        let model_digest = model.manifest_digest.to_hex();
        let handle = tokio::spawn(async move {
            let result = downloader
                .fetch(
                    &model.bundle_url,
                    model.bundle_size,
                    &model.manifest_digest.to_hex(),
                )
                .await
                .map_err(|err| err.to_string());
            let _ = tx.send(Downloaded {
                seq,
                assignment,
                shadow,
                result,
            });
        });
        self.download = Some((seq, model_digest, handle));
    }

    async fn on_downloaded(&mut self, done: Downloaded) {
        if self
            .download
            .as_ref()
            .is_some_and(|(seq, _, _)| *seq == done.seq)
        {
            self.download = None;
        } else {
            // A superseded download that finished anyway: drop its bundle, unless the download
            // under way is of the same bundle (it will replace the file itself).
            let model = if done.shadow {
                &done.assignment.shadow
            } else {
                &done.assignment.active
            };
            if let (Ok(path), Some(model)) = (&done.result, model) {
                let same = self
                    .download
                    .as_ref()
                    .is_some_and(|(_, digest, _)| *digest == model.manifest_digest.to_hex());
                if !same {
                    let _ = tokio::fs::remove_file(path).await;
                }
            }
            return;
        }
        let model = if done.shadow {
            done.assignment.shadow.clone()
        } else {
            done.assignment.active.clone()
        };
        let Some(model) = model else {
            return;
        };
        let path = match done.result {
            Ok(path) => path,
            Err(message) => {
                let slot = Slot {
                    digest: model.manifest_digest.to_hex(),
                    name: model.name.to_string(),
                    version: model.version.to_string(),
                    release: model.release,
                };
                self.record(
                    EventKind::InstallFailed {
                        reason: FailureCode::Download,
                    },
                    Some(&slot),
                    &message,
                );
                return;
            }
        };
        let pin = Pin {
            digest: model.manifest_digest,
            allow_downgrade: done.assignment.rollback,
        };
        let result = if done.shadow {
            self.set_shadow_pinned(Some(path.clone()), Some(pin))
                .await
                .map(|_| ())
        } else {
            self.install_pinned(path.clone(), Some(pin))
                .await
                .map(|_| ())
        };
        let _ = tokio::fs::remove_file(&path).await;
        if let Err(failure) = result {
            tracing::warn!(code = ?failure.code, message = %failure.message, "assignment not carried out");
        }
    }

    fn status(&self) -> serde_json::Value {
        let events = self.journal.read().unwrap_or_default();
        let recent: Vec<serde_json::Value> = events
            .iter()
            .rev()
            .take(100)
            .rev()
            .map(event_json)
            .collect();
        let floors = &self.trust.floors;
        serde_json::json!({
            "device_id": self.config.device_id.as_str(),
            "agent_version": AGENT_VERSION,
            "arch": self.config.arch.as_str(),
            "state": self.state(),
            "worker": self.worker.as_ref().map(|w| serde_json::json!({"generation": w.generation, "pid": w.pid})),
            "floors": {
                "assignment_seq": floors.assignment_seq,
                "keyring_version": floors.keyring_version,
                "releases": floors.releases.iter().map(|f| (f.model.to_string(), f.release)).collect::<std::collections::BTreeMap<_, _>>(),
            },
            "events": recent,
            "spool": {"pending": self.spool.len()},
            "capture": {
                "on": self.capture.settings().is_some(),
                "settings": self.capture.settings(),
                "batches_pending": self.capture.pending(),
                "bytes": self.capture.bytes(),
                "records": self.capture.stored(),
                "dropped": self.capture.dropped(),
            },
        })
    }

    /// Standalone install: verify and unpack the bundle, commit it on trial, start it in a new
    /// worker, watch it through its grace window, then keep it or revert.
    /// Verifies a bundle file against the trust state and floors and unpacks it into the store.
    async fn unpack(
        &mut self,
        path: &std::path::Path,
        pin: Option<Pin>,
    ) -> Result<
        (
            edgefleet_protocol::Verified<edgefleet_protocol::Bundle>,
            Slot,
        ),
        Failure,
    > {
        let now = self.now();
        let store = self.store.clone();
        let keyring = self.trust.keyring.clone();
        let floors = self.trust.floors.clone();
        let arch = self.trust.arch.clone();
        let read_path = path.to_owned();
        let res = tokio::task::spawn_blocking(move || {
            let mut file = fs::File::open(&read_path).map_err(|err| Failure {
                code: FailureCode::Io,
                message: format!("cannot open {}: {err}", read_path.display()),
            })?;
            // The release floor is per model: read the (not yet verified) name to pick it;
            // verification then checks the same bytes.
            let name = peek_model_name(&mut file).map_err(|message| Failure {
                code: FailureCode::Signature,
                message,
            })?;
            let policy = ManifestPolicy {
                now: floors.effective_now(now),
                device_arch: Some(arch),
                agent_version: Some(String::from(AGENT_VERSION)),
                release_floor: floors
                    .releases
                    .iter()
                    .find(|f| f.model.as_str() == name)
                    .map(|f| f.release),
                allow_downgrade: pin.is_some_and(|p| p.allow_downgrade),
                expected_digest: pin.map(|p| p.digest),
            };
            let file = fs::File::open(&read_path).map_err(|err| Failure {
                code: FailureCode::Io,
                message: format!("cannot open {}: {err}", read_path.display()),
            })?;
            store
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .install(std::io::BufReader::new(file), &keyring, policy)
                .map_err(|err| Failure {
                    code: err.failure_code(),
                    message: err.to_string(),
                })
        })
        .await
        .map_err(|err| Failure {
            code: FailureCode::Io,
            message: err.to_string(),
        })?;
        if let Err(failure) = &res {
            let detail = format!("{}: {}", path.display(), failure.message);
            self.record(
                EventKind::InstallFailed {
                    reason: failure.code,
                },
                None,
                &detail,
            );
        }
        res
    }

    /// Runs `path`'s model as the shadow (or stops the shadow), swapping in a new worker.
    async fn set_shadow(&mut self, path: Option<PathBuf>) -> Result<serde_json::Value, Failure> {
        self.set_shadow_pinned(path, None).await
    }

    /// [`Self::set_shadow`] for an assignment's shadow: the bundle must be the one it names.
    async fn set_shadow_pinned(
        &mut self,
        path: Option<PathBuf>,
        pin: Option<Pin>,
    ) -> Result<serde_json::Value, Failure> {
        let slot = match &path {
            Some(path) => Some(self.unpack(path, pin).await?.1),
            None => None,
        };
        let before = self.state();
        let next = StoreState {
            shadow: slot.clone(),
            ..before.clone()
        };
        self.commit(next).await.map_err(io_failure)?;
        match self.launch(before.active.as_ref(), slot.as_ref()).await {
            Ok(worker) => {
                if let Some(old) = self.worker.replace(worker) {
                    self.drain(old).await;
                }
                if let Some(old) = &before.shadow {
                    self.record(EventKind::ShadowStopped, Some(old), "replaced");
                    let _ = self
                        .store
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove_unreferenced(old);
                }
                if let Some(slot) = &slot {
                    self.record(
                        EventKind::ShadowStarted,
                        Some(slot),
                        "running on copies of live requests",
                    );
                }
                Ok(serde_json::json!({"result": "shadow_set", "shadow": slot}))
            }
            Err(failure) => {
                self.commit(before).await.map_err(io_failure)?;
                if let Some(slot) = &slot {
                    let _ = self
                        .store
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove_unreferenced(slot);
                }
                Err(failure)
            }
        }
    }

    /// Standalone install: verify and unpack the bundle, commit it on trial, start it in a new
    /// worker, watch it through its grace window, then keep it or revert.
    async fn install(&mut self, path: PathBuf) -> Result<serde_json::Value, Failure> {
        self.install_pinned(path, None).await
    }

    async fn install_pinned(
        &mut self,
        path: PathBuf,
        pin: Option<Pin>,
    ) -> Result<serde_json::Value, Failure> {
        let now = self.now();
        let (bundle, slot) = self.unpack(&path, pin).await?;
        let state = self.state();
        if state.active.as_ref() == Some(&slot) {
            return Ok(serde_json::json!({"result": "already_active", "model": slot}));
        }
        // Floors first, then the commit: a crash between them leaves a higher floor, never a
        // model installed below it.
        self.trust.record_install(&bundle);
        let floors_path = self.config.floors_path();
        let floors = self.trust.floors.clone();
        tokio::task::spawn_blocking(move || trust::save_floors(&floors_path, &floors))
            .await
            .map_err(|err| Failure {
                code: FailureCode::Io,
                message: err.to_string(),
            })?
            .map_err(io_failure)?;
        let previous = state.active.clone();
        let trial = StoreState {
            active: Some(slot.clone()),
            previous: previous.clone(),
            shadow: state.shadow.clone(),
            trial: Some(Trial { started_at: now }),
        };
        self.commit(trial).await.map_err(io_failure)?;
        self.record(
            EventKind::Installed,
            Some(&slot),
            &format!("installed from {}", path.display()),
        );
        let manifest: Manifest = bundle.into_inner().manifest;
        match self.activate(&slot, previous.as_ref(), &manifest).await {
            Ok(()) => {
                let done = StoreState {
                    active: Some(slot.clone()),
                    previous: previous.clone(),
                    shadow: state.shadow.clone(),
                    trial: None,
                };
                self.commit(done).await.map_err(io_failure)?;
                self.record(
                    EventKind::Activated,
                    Some(&slot),
                    "passed its self-test and grace window",
                );
                Ok(serde_json::json!({"result": "activated", "model": slot, "previous": previous}))
            }
            Err(failure) => {
                let on_trial = StoreState {
                    active: Some(slot.clone()),
                    previous: previous.clone(),
                    shadow: state.shadow.clone(),
                    trial: None,
                };
                self.fall_back(&on_trial, &slot, failure.code, &failure.message)
                    .await
                    .map_err(io_failure)?;
                if self.worker.is_none() {
                    self.start_current().await.map_err(io_failure)?;
                }
                let to = previous.as_ref().map_or_else(
                    || String::from("no model"),
                    |p| format!("{}@{}", p.name, p.version),
                );
                Err(Failure {
                    code: failure.code,
                    message: format!(
                        "{}@{} was rolled back to {to}: {}",
                        slot.name, slot.version, failure.message
                    ),
                })
            }
        }
    }

    /// Starts the new model beside the old one; swaps when it serves; watches the grace window.
    async fn activate(
        &mut self,
        slot: &Slot,
        _previous: Option<&Slot>,
        manifest: &Manifest,
    ) -> Result<(), Failure> {
        let shadow = self.state().shadow;
        let worker = self.launch(Some(slot), shadow.as_ref()).await?;
        let generation = worker.generation;
        if let Some(old) = self.worker.replace(worker) {
            self.drain(old).await;
        }
        let grace = Duration::from_secs(u64::from(manifest.runtime.grace_window_s));
        let deadline = Instant::now() + grace;
        while let Some(msg) = self.next_msg(generation, deadline).await {
            match msg {
                WorkerMsg::Event(WorkerEvent::Stats(stats)) => {
                    if let Some(reason) = error_rate_breach(&stats, manifest.runtime.max_error_rate)
                    {
                        if let Some(mut worker) = self.worker.take() {
                            self.reap(&mut worker).await;
                        }
                        return Err(Failure {
                            code: FailureCode::ErrorRate,
                            message: reason,
                        });
                    }
                }
                WorkerMsg::Exited(status) => {
                    self.worker = None;
                    return Err(Failure {
                        code: FailureCode::Crash,
                        message: format!(
                            "the model worker died during the grace window ({status})"
                        ),
                    });
                }
                WorkerMsg::Event(_) => {}
            }
        }
        Ok(())
    }
}

/// Reads the model name from a bundle's manifest without verifying it (to pick its floor).
fn peek_model_name(file: &mut fs::File) -> Result<String, String> {
    let mut prefix = vec![0u8; edgefleet_protocol::bundle::HEADER_LEN];
    file.read_exact(&mut prefix)
        .map_err(|_| String::from("the file is too short to be a bundle"))?;
    let len = u32::from_be_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]) as usize;
    if len > MAX_MANIFEST_BYTES {
        return Err(format!(
            "bundle manifest of {len} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit"
        ));
    }
    split_header(&prefix).map_err(|err| err.to_string())?;
    prefix.resize(prefix.len() + len, 0);
    file.read_exact(&mut prefix[edgefleet_protocol::bundle::HEADER_LEN..])
        .map_err(|_| String::from("the bundle ends inside its manifest"))?;
    let (signed, _) = split_header(&prefix)
        .map_err(|err| err.to_string())?
        .ok_or("the bundle ends inside its manifest")?;
    let manifest: Manifest = codec::decode("manifest", &signed.body, MAX_MANIFEST_BYTES)
        .map_err(|err| err.to_string())?;
    Ok(manifest.name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rate_needs_a_minimum_sample_then_compares_with_the_limit() {
        let stats = |ok, runtime_errors| WorkerStats {
            ok,
            runtime_errors,
            ..Default::default()
        };
        assert_eq!(
            error_rate_breach(&stats(0, 19), 0.05),
            None,
            "19 requests are too few to judge"
        );
        assert_eq!(
            error_rate_breach(&stats(19, 1), 0.05),
            None,
            "5% is not above 5%"
        );
        let breach = error_rate_breach(&stats(18, 2), 0.05).unwrap();
        assert_eq!(
            breach,
            "live error rate 10.0% (2 of 20 requests) is above the manifest's limit 5.0%"
        );
        let invalid_input_does_not_count = WorkerStats {
            ok: 20,
            invalid_input: 500,
            ..Default::default()
        };
        assert_eq!(error_rate_breach(&invalid_input_does_not_count, 0.05), None);
    }
}
