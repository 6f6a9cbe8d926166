//! Runs a simulated fleet: enrolls the devices the state directory does not know yet, connects
//! them at a steady rate, and drives each device's state machine ([`crate::device`]) in a task of
//! its own beside its MQTT poll task, all on the caller's tokio runtime. A persister writes the
//! devices' records (floors, models, reserved sequence numbers) to the state directory whenever
//! they change, at most every second, and before any new sequence number is used.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use edgefleet_protocol::manifest::ManifestPolicy;
use edgefleet_protocol::messages::ModelRef;
use edgefleet_protocol::trust::{ReleaseKeyring, RootKeyring};
use edgefleet_protocol::{
    Arch, AssignedModel, Clock, DeviceId, DeviceMacKey, Sha256Digest, SystemClock, Timestamp,
    TopicKind,
};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::behaviour::{Behaviour, BehaviourTable, Behaviours, DeviceRule, DeviceSelector};
use crate::device::{
    Anchor, Counters, Device, DeviceParams, Effects, FetchRequest, FetchResult, Input,
};
use crate::enroll::Enroller;
use crate::fetch::{FetchMode, Manifests};
use crate::link::{Broker, Link, LinkEvent, LinkSpec};
use crate::state::{DeviceRecord, Identity, Snapshot, StateDir};
use crate::tls::FleetTrust;
use crate::{SimError, device_rng};

/// Labels given to the devices a selector picks (at enrollment; later labels win).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRule {
    pub devices: DeviceSelector,
    pub labels: BTreeMap<String, String>,
}

/// Which part of the start a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Enrolling,
    Connecting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to run a simulated fleet. [`SimConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct SimConfig {
    /// The controller's admin API, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// An operator or admin API token (mints the enrollment tokens).
    pub admin_token: String,
    /// The fleet CA certificate (`<controller data dir>/pki/ca.pem`): the devices' only root.
    pub ca: PathBuf,
    /// The controller's trust directory (`<controller data dir>/keys`): `root-v1.cbor` (and
    /// any `root-v2.cbor`, … rotations) and `keyring.cbor`.
    pub keys_dir: PathBuf,
    /// Identities and device records; a later run with the same directory reuses the devices.
    pub state_dir: PathBuf,
    pub devices: usize,
    /// Device ids are this prefix and the device's index, e.g. `sim-00042`.
    pub id_prefix: String,
    pub labels: Vec<LabelRule>,
    pub behaviour: BehaviourTable,
    /// Seeds every device's random draws (behaviour, fraction selectors, jitter).
    pub seed: u64,
    /// Telemetry window length.
    pub window: Duration,
    pub fetch: FetchMode,
    /// New MQTT connections per second while the fleet starts.
    pub connect_rate: f64,
    /// Connection attempts (TCP, TLS, CONNECT) in flight at once, over the whole fleet.
    pub max_connecting: usize,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
    /// Bundle fetches in flight at once, over the whole fleet.
    pub fetch_concurrency: usize,
    /// Unacknowledged reports each device keeps (the oldest are dropped beyond it, and reported).
    pub spool_max: usize,
    pub keep_alive_s: u64,
    /// The architecture devices enroll with and check bundles against.
    pub arch: Arch,
    /// Validity of the enrollment tokens minted for the devices.
    pub token_ttl_s: u64,
    /// Bound on enrolling and connecting every device.
    pub start_timeout: Duration,
    /// Called as devices enroll and connect during the start.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("api", &self.api)
            .field("ca", &self.ca)
            .field("keys_dir", &self.keys_dir)
            .field("state_dir", &self.state_dir)
            .field("devices", &self.devices)
            .field("id_prefix", &self.id_prefix)
            .field("seed", &self.seed)
            .field("window", &self.window)
            .field("fetch", &self.fetch)
            .field("connect_rate", &self.connect_rate)
            .finish_non_exhaustive()
    }
}

impl SimConfig {
    pub fn new(
        api: impl Into<String>,
        admin_token: impl Into<String>,
        ca: impl Into<PathBuf>,
        keys_dir: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        devices: usize,
    ) -> Self {
        Self {
            api: api.into(),
            admin_token: admin_token.into().trim().to_owned(),
            ca: ca.into(),
            keys_dir: keys_dir.into(),
            state_dir: state_dir.into(),
            devices,
            id_prefix: String::from("sim-"),
            labels: Vec::new(),
            behaviour: BehaviourTable::default(),
            seed: 1,
            window: Duration::from_secs(60),
            fetch: FetchMode::Full,
            connect_rate: 500.0,
            max_connecting: 64,
            connect_timeout: Duration::from_secs(30),
            enroll_concurrency: 16,
            fetch_concurrency: 64,
            spool_max: 1000,
            keep_alive_s: 30,
            arch: Arch::new(std::env::consts::ARCH).unwrap_or_else(|_| Arch::any()),
            token_ttl_s: 3600,
            start_timeout: Duration::from_secs(600),
            progress: None,
        }
    }

    /// The id of device `index`.
    pub fn device_id(&self, index: usize) -> String {
        let width = self.devices.saturating_sub(1).to_string().len().max(5);
        format!("{}{index:0width$}", self.id_prefix)
    }
}

/// What the fleet shows of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    pub index: usize,
    pub id: DeviceId,
    /// Connected to the broker now.
    pub online: bool,
    pub active: Option<ModelRef>,
    pub previous: Option<ModelRef>,
    pub shadow: Option<ModelRef>,
    pub assignment_seq: u64,
    /// When the active model last changed (installed on trial, or reverted), wall clock.
    pub last_change_at: Option<Timestamp>,
    /// Reports not yet acknowledged by the controller.
    pub unacked: usize,
    pub counters: Counters,
    /// The last connection error, if the link failed since it was last up.
    pub last_error: Option<String>,
}

/// The device endpoint's view of one device (its TLS and ids), as its tasks need it.
#[derive(Debug)]
struct Wire {
    broker: Broker,
    password: String,
    tls: Arc<rustls::ClientConfig>,
}

enum Msg {
    Link { generation: u64, event: LinkEvent },
    Fetched { job: u64, result: FetchResult },
    Disconnect,
    Reconnect,
    Stop(oneshot::Sender<()>),
}

/// What every device task shares.
struct Shared {
    anchor: Arc<Anchor>,
    behaviours: RwLock<Behaviours>,
    manifests: Manifests,
    fetch_slots: Semaphore,
    mode: FetchMode,
    views: Vec<Mutex<DeviceView>>,
    records: Vec<Mutex<DeviceRecord>>,
    durable: Vec<AtomicU64>,
    dirty: AtomicBool,
    wake_persister: Notify,
    connected_once: AtomicUsize,
    connecting: Arc<Semaphore>,
    connect_timeout_s: u64,
    clock: SystemClock,
}

impl Shared {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

struct DeviceTask {
    tx: mpsc::UnboundedSender<Msg>,
    join: tokio::task::JoinHandle<()>,
}

/// A running simulated fleet. Stop it with [`Fleet::stop`]; dropping it aborts every device.
pub struct Fleet {
    shared: Arc<Shared>,
    tasks: Vec<DeviceTask>,
    persister: Option<(tokio::task::JoinHandle<()>, Arc<Notify>, Arc<StateDir>)>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

/// Reads the fleet's trust: `root-v1.cbor`, any rotations after it, and `keyring.cbor`.
fn load_anchor(keys_dir: &Path, arch: Arch, now: Timestamp) -> Result<Anchor, SimError> {
    let read = |name: &str| {
        let path = keys_dir.join(name);
        std::fs::read(&path).map_err(|err| SimError::Trust {
            path: path.clone(),
            message: format!("cannot read it: {err}"),
        })
    };
    let trust_error = |name: &str, err: edgefleet_protocol::TrustError| SimError::Trust {
        path: keys_dir.join(name),
        message: err.to_string(),
    };
    let mut root = RootKeyring::verify_anchor(&read("root-v1.cbor")?)
        .map_err(|err| trust_error("root-v1.cbor", err))?;
    for version in 2.. {
        let name = format!("root-v{version}.cbor");
        if !keys_dir.join(&name).exists() {
            break;
        }
        root = RootKeyring::verify_rotation(&root, &read(&name)?)
            .map_err(|err| trust_error(&name, err))?;
    }
    let keyring = ReleaseKeyring::verify(&read("keyring.cbor")?, &root, now, 0)
        .map_err(|err| trust_error("keyring.cbor", err))?;
    Ok(Anchor {
        root,
        keyring,
        arch,
    })
}

fn mac_key(identity: &Identity) -> Result<DeviceMacKey, SimError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(identity.mac_key_hex.trim(), &mut key).map_err(|_| {
        SimError::State(crate::state::StateError::Corrupt {
            path: PathBuf::from(format!("identities/{}.json", identity.device)),
            message: String::from("the MAC key is not 64 hex digits"),
        })
    })?;
    Ok(DeviceMacKey(key))
}

/// The labels `index` enrolls with.
fn labels_for(rules: &[(Vec<bool>, &LabelRule)], index: usize) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (selected, rule) in rules {
        if selected.get(index).copied().unwrap_or(false) {
            labels.extend(rule.labels.clone());
        }
    }
    labels
}

/// The identity of every device: from the state directory, or enrolled now.
async fn identities(
    config: &SimConfig,
    state: &Arc<StateDir>,
    ids: &[String],
    deadline: Instant,
) -> Result<Vec<Identity>, SimError> {
    let mut known: Vec<Option<Identity>> = Vec::with_capacity(ids.len());
    for id in ids {
        known.push(state.load_identity(id)?);
    }
    let missing: Vec<usize> = (0..ids.len()).filter(|&i| known[i].is_none()).collect();
    let total = ids.len();
    let report = |done: usize| {
        if let Some(progress) = &config.progress {
            progress(Progress {
                phase: Phase::Enrolling,
                done,
                total,
            });
        }
    };
    report(total - missing.len());
    if !missing.is_empty() {
        let ca = std::fs::read(&config.ca).map_err(|err| {
            SimError::Config(format!(
                "cannot read the fleet CA {}: {err}",
                config.ca.display()
            ))
        })?;
        let enroller = Arc::new(Enroller::new(
            &config.api,
            &config.admin_token,
            &ca,
            config.arch.clone(),
            config.token_ttl_s,
            deadline,
        )?);
        let resolved: Vec<(Vec<bool>, &LabelRule)> = config
            .labels
            .iter()
            .map(|rule| (rule.devices.resolve(ids, config.seed), rule))
            .collect();
        let slots = Arc::new(Semaphore::new(config.enroll_concurrency.max(1)));
        let mut running = tokio::task::JoinSet::new();
        for &index in &missing {
            let (enroller, slots, state) = (enroller.clone(), slots.clone(), state.clone());
            let id = DeviceId::new(ids[index].clone())
                .map_err(|err| SimError::Config(format!("device id {}: {err}", ids[index])))?;
            let labels = labels_for(&resolved, index);
            running.spawn(async move {
                let _slot = slots.acquire().await;
                let identity = enroller.enroll(&id, &labels).await?;
                let saving = identity.clone();
                tokio::task::spawn_blocking(move || state.save_identity(&saving))
                    .await
                    .map_err(|err| SimError::Config(err.to_string()))??;
                Ok::<_, SimError>((index, identity))
            });
        }
        let mut done = total - missing.len();
        let mut failure = None;
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok(Ok((index, identity))) => {
                    known[index] = Some(identity);
                    done += 1;
                    if done.is_multiple_of(100) || done == total {
                        report(done);
                    }
                }
                Ok(Err(err)) => {
                    failure.get_or_insert(err);
                    running.abort_all();
                }
                Err(err) if err.is_cancelled() => {}
                Err(err) => {
                    failure.get_or_insert(SimError::Config(format!(
                        "an enrollment task failed: {err}"
                    )));
                }
            }
        }
        // What did enroll stays enrolled, even when another device failed.
        let syncing = state.clone();
        tokio::task::spawn_blocking(move || syncing.sync())
            .await
            .map_err(|err| SimError::Config(err.to_string()))??;
        if let Some(err) = failure {
            return Err(err);
        }
    }
    Ok(known.into_iter().flatten().collect())
}

/// Fetches, once per digest, the manifests of the models the state directory records.
async fn recorded_manifests(
    snapshot: &Snapshot,
    anchor: &Anchor,
    client: &reqwest::Client,
    manifests: &Manifests,
    now: Timestamp,
) -> Result<(), SimError> {
    let mut wanted: BTreeMap<Sha256Digest, AssignedModel> = BTreeMap::new();
    for record in snapshot.devices.values() {
        for model in [&record.active, &record.previous, &record.shadow]
            .into_iter()
            .flatten()
        {
            wanted
                .entry(model.manifest_digest)
                .or_insert_with(|| model.clone());
        }
    }
    for (digest, model) in wanted {
        let request = FetchRequest {
            job: 0,
            model: model.clone(),
            policy: ManifestPolicy {
                now,
                device_arch: Some(anchor.arch.clone()),
                agent_version: Some(String::from(crate::AGENT_VERSION)),
                release_floor: None,
                allow_downgrade: true,
                expected_digest: Some(digest),
            },
        };
        crate::fetch::fetch(
            client,
            &anchor.keyring,
            manifests,
            FetchMode::Manifest,
            &request,
        )
        .await
        .map_err(|failure| SimError::Manifest {
            model: format!("{}@{}", model.name, model.version),
            message: failure.message,
        })?;
    }
    Ok(())
}

impl Fleet {
    /// Enrolls (or reuses) and connects `config.devices` devices; returns once every one is
    /// connected, or fails with what went wrong.
    pub async fn start(config: SimConfig) -> Result<Fleet, SimError> {
        if config.devices == 0 {
            return Err(SimError::Config(String::from(
                "--devices must be at least 1",
            )));
        }
        if !config.connect_rate.is_finite() || config.connect_rate <= 0.0 {
            return Err(SimError::Config(String::from(
                "the connect rate must be above 0 per second",
            )));
        }
        let deadline = Instant::now() + config.start_timeout;
        // Each device holds a socket; the default soft limit of 1024 would stop a big fleet.
        if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
            tracing::warn!(error = %err, "cannot raise the open-file limit");
        }
        let clock = SystemClock;
        let now = clock.now();
        let anchor = Arc::new(load_anchor(&config.keys_dir, config.arch.clone(), now)?);
        let ca_pem = std::fs::read(&config.ca).map_err(|err| {
            SimError::Config(format!(
                "cannot read the fleet CA {}: {err}",
                config.ca.display()
            ))
        })?;
        let fleet_trust = FleetTrust::new(&ca_pem)?;
        let state = Arc::new(StateDir::open(&config.state_dir)?);
        let ids: Vec<String> = (0..config.devices).map(|i| config.device_id(i)).collect();
        let identities = identities(&config, &state, &ids, deadline).await?;

        let mut snapshot = state.load_snapshot()?;
        let manifests = Manifests::default();
        let first_tls = fleet_trust
            .device(&identities[0].certificate_pem, &identities[0].key_pem)
            .map_err(|message| SimError::Enroll {
                device: identities[0].device.clone(),
                message,
            })?;
        let client = crate::fetch::client(first_tls).map_err(SimError::Config)?;
        recorded_manifests(&snapshot, &anchor, &client, &manifests, now).await?;

        let ramp = Duration::from_secs_f64(1.0 / config.connect_rate);
        let mut devices = Vec::with_capacity(config.devices);
        let mut wires = Vec::with_capacity(config.devices);
        for (index, identity) in identities.iter().enumerate() {
            let id = DeviceId::new(identity.device.clone())
                .map_err(|err| SimError::Config(format!("device id {}: {err}", identity.device)))?;
            let key = mac_key(identity)?;
            let tls = fleet_trust
                .device(&identity.certificate_pem, &identity.key_pem)
                .map_err(|message| SimError::Enroll {
                    device: identity.device.clone(),
                    message,
                })?;
            let broker =
                Broker::parse(&identity.mqtt_url, config.keep_alive_s).map_err(SimError::Config)?;
            wires.push(Wire {
                broker,
                password: key.mqtt_password(id.as_str()),
                tls: Arc::new(tls),
            });
            let record = snapshot
                .devices
                .remove(&identity.device)
                .unwrap_or_default();
            let params = DeviceParams {
                index,
                id,
                key,
                anchor: anchor.clone(),
                window_ms: config.window.as_millis() as u64,
                spool_max: config.spool_max,
                rng: device_rng(config.seed, index as u64),
            };
            // A device starts (its uptime, its first telemetry window) when it first connects.
            let starts = now.plus_millis(ramp.mul_f64(index as f64).as_millis() as u64);
            devices.push(Device::new(
                params,
                record,
                &|digest| manifests.get(digest),
                starts,
            ));
        }
        // Reserve the first block of sequence numbers for every device before any is used.
        let records: Vec<DeviceRecord> = devices.iter().map(Device::record).collect();
        let snapshot = Snapshot {
            devices: identities
                .iter()
                .zip(&records)
                .map(|(identity, record)| (identity.device.clone(), record.clone()))
                .collect(),
        };
        let saving = state.clone();
        tokio::task::spawn_blocking(move || saving.save_snapshot(&snapshot))
            .await
            .map_err(|err| SimError::Config(err.to_string()))??;

        let shared = Arc::new(Shared {
            anchor,
            behaviours: RwLock::new(Behaviours::new(config.behaviour.clone(), ids, config.seed)),
            manifests,
            fetch_slots: Semaphore::new(config.fetch_concurrency.max(1)),
            mode: config.fetch,
            views: devices
                .iter()
                .map(|d| Mutex::new(view_of(d, None)))
                .collect(),
            durable: records
                .iter()
                .map(|r| AtomicU64::new(r.seq_limit))
                .collect(),
            records: records.into_iter().map(Mutex::new).collect(),
            dirty: AtomicBool::new(false),
            wake_persister: Notify::new(),
            connected_once: AtomicUsize::new(0),
            connecting: Arc::new(Semaphore::new(config.max_connecting.max(1))),
            connect_timeout_s: config.connect_timeout.as_secs().max(1),
            clock,
        });
        let stop_persister = Arc::new(Notify::new());
        let persister = tokio::spawn(persist(
            shared.clone(),
            state.clone(),
            stop_persister.clone(),
        ));
        let mut tasks = Vec::with_capacity(devices.len());
        for (device, wire) in devices.into_iter().zip(wires) {
            let (tx, rx) = mpsc::unbounded_channel();
            let delay = ramp.mul_f64(device.index() as f64);
            let join = tokio::spawn(run_device(
                device,
                wire,
                rx,
                tx.clone(),
                shared.clone(),
                delay,
                config.seed,
            ));
            tasks.push(DeviceTask { tx, join });
        }
        let fleet = Fleet {
            shared,
            tasks,
            persister: Some((persister, stop_persister, state)),
        };
        fleet.wait_connected(&config, deadline).await?;
        Ok(fleet)
    }

    async fn wait_connected(&self, config: &SimConfig, deadline: Instant) -> Result<(), SimError> {
        let total = self.tasks.len();
        let mut last_reported = usize::MAX;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let connected = self.shared.connected_once.load(Ordering::Relaxed);
            if connected != last_reported
                && (connected == total
                    || Instant::now() >= deadline
                    || connected / 500 != last_reported / 500)
            {
                if let Some(progress) = &config.progress {
                    progress(Progress {
                        phase: Phase::Connecting,
                        done: connected,
                        total,
                    });
                }
                last_reported = connected;
            }
            if connected == total {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
                for view in self.devices().into_iter().filter(|v| !v.online) {
                    *reasons
                        .entry(
                            view.last_error
                                .unwrap_or_else(|| String::from("no answer yet")),
                        )
                        .or_default() += 1;
                }
                let reasons = reasons
                    .into_iter()
                    .map(|(reason, n)| format!("{n} × {reason}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(SimError::Connect {
                    connected,
                    total,
                    timeout_s: config.start_timeout.as_secs(),
                    reasons: format!(
                        "last errors: {reasons}; is the broker the controller names (enrollment's mqtt_url) running, and does it take this many connections?"
                    ),
                });
            }
            tick.tick().await;
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Every device, by index.
    pub fn devices(&self) -> Vec<DeviceView> {
        self.shared
            .views
            .iter()
            .map(|v| {
                v.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    pub fn device(&self, index: usize) -> Option<DeviceView> {
        self.shared.views.get(index).map(|v| {
            v.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Devices connected to the broker now.
    pub fn online(&self) -> usize {
        self.fold(0, |n, view| n + usize::from(view.online))
    }

    /// Devices whose active model is `digest`.
    pub fn count_on(&self, digest: &Sha256Digest) -> usize {
        self.fold(0, |n, view| {
            n + usize::from(
                view.active
                    .as_ref()
                    .is_some_and(|m| &m.manifest_digest == digest),
            )
        })
    }

    /// How many devices run each model (`None`: no model).
    pub fn active_counts(&self) -> BTreeMap<Option<Sha256Digest>, usize> {
        self.fold(BTreeMap::new(), |mut map, view| {
            *map.entry(view.active.as_ref().map(|m| m.manifest_digest))
                .or_default() += 1;
            map
        })
    }

    /// The fleet's counters, summed over its devices.
    pub fn counters(&self) -> Counters {
        self.fold(Counters::default(), |mut sum, view| {
            sum.add(&view.counters);
            sum
        })
    }

    fn fold<T>(&self, init: T, mut f: impl FnMut(T, &DeviceView) -> T) -> T {
        self.shared.views.iter().fold(init, |acc, view| {
            f(
                acc,
                &view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        })
    }

    /// Replaces what every device does with `model` (`name@version`) from now on.
    pub fn set_behaviour(&self, model: &str, behaviour: Behaviour) {
        self.shared
            .behaviours
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_model(model.to_owned(), behaviour);
    }

    /// Adds a rule for some devices (applied after the rules already there).
    pub fn add_rule(&self, rule: DeviceRule) {
        self.shared
            .behaviours
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add_rule(rule);
    }

    fn send(&self, devices: &[usize], msg: impl Fn() -> Msg) {
        for &index in devices {
            if let Some(task) = self.tasks.get(index) {
                let _ = task.tx.send(msg());
            }
        }
    }

    /// Cuts these devices off as a lost network would (the broker publishes their last will);
    /// they stay offline until [`Fleet::reconnect`].
    pub fn disconnect(&self, devices: &[usize]) {
        self.send(devices, || Msg::Disconnect);
    }

    /// Connects these devices again (a device rejoining the fleet).
    pub fn reconnect(&self, devices: &[usize]) {
        self.send(devices, || Msg::Reconnect);
    }

    /// Stops every device (their connections drop, so the broker publishes their last wills) and
    /// writes the final device records. Returns the fleet's counters.
    pub async fn stop(mut self) -> Result<Counters, SimError> {
        let mut waits = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            let (tx, rx) = oneshot::channel();
            if task.tx.send(Msg::Stop(tx)).is_ok() {
                waits.push(rx);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.join.await;
        }
        let counters = self.counters();
        if let Some((persister, stop, state)) = self.persister.take() {
            stop.notify_one();
            let _ = persister.await;
            let (snapshot, _) = snapshot_of(&self.shared);
            tokio::task::spawn_blocking(move || state.save_snapshot(&snapshot))
                .await
                .map_err(|err| SimError::Config(err.to_string()))??;
        }
        Ok(counters)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.join.abort();
        }
        if let Some((persister, _, _)) = &self.persister {
            persister.abort();
        }
    }
}

fn view_of(device: &Device, last_error: Option<String>) -> DeviceView {
    DeviceView {
        index: device.index(),
        id: device.id().clone(),
        online: device.connected(),
        active: device.active(),
        previous: device.previous(),
        shadow: device.shadow(),
        assignment_seq: device.assignment_seq(),
        last_change_at: device.last_change_at(),
        unacked: device.unacked(),
        counters: device.counters(),
        last_error,
    }
}

/// The device records as they are now, and each device's sequence limit (by index).
fn snapshot_of(shared: &Shared) -> (Snapshot, Vec<u64>) {
    let mut snapshot = Snapshot::default();
    let mut limits = Vec::with_capacity(shared.records.len());
    for (view, record) in shared.views.iter().zip(&shared.records) {
        let id = view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .id
            .to_string();
        let record = record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        limits.push(record.seq_limit);
        snapshot.devices.insert(id, record);
    }
    (snapshot, limits)
}

/// Writes the device records whenever they change (at most every second), then raises each
/// device's durable sequence limit to what was written.
async fn persist(shared: Arc<Shared>, state: Arc<StateDir>, stop: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = shared.wake_persister.notified() => {}
            _ = stop.notified() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.notified() => return,
        }
        if !shared.dirty.swap(false, Ordering::AcqRel) {
            continue;
        }
        let (snapshot, limits) = snapshot_of(&shared);
        let saving = state.clone();
        match tokio::task::spawn_blocking(move || saving.save_snapshot(&snapshot)).await {
            Ok(Ok(())) => {
                for (durable, limit) in shared.durable.iter().zip(limits) {
                    durable.fetch_max(limit, Ordering::AcqRel);
                }
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cannot write the device records; retrying");
                shared.dirty.store(true, Ordering::Release);
                shared.wake_persister.notify_one();
            }
            Err(err) => tracing::error!(error = %err, "the device-record writer failed"),
        }
    }
}

/// The driver side of a device's effects.
struct Driver<'a> {
    index: usize,
    link: Option<&'a Link>,
    shared: &'a Arc<Shared>,
    tls: &'a Arc<rustls::ClientConfig>,
    tx: &'a mpsc::UnboundedSender<Msg>,
    fetches: &'a mut HashMap<u64, AbortHandle>,
}

impl Effects for Driver<'_> {
    fn publish(&mut self, kind: TopicKind, payload: Bytes, retain: bool) -> bool {
        self.link
            .is_some_and(|link| link.publish(kind, payload, retain))
    }

    fn fetch(&mut self, request: FetchRequest) {
        let (shared, tls, tx) = (self.shared.clone(), self.tls.clone(), self.tx.clone());
        let job = request.job;
        let handle = tokio::spawn(async move {
            let result = match shared.fetch_slots.acquire().await {
                Ok(_slot) => match crate::fetch::client((*tls).clone()) {
                    Ok(client) => {
                        crate::fetch::fetch(
                            &client,
                            &shared.anchor.keyring,
                            &shared.manifests,
                            shared.mode,
                            &request,
                        )
                        .await
                    }
                    Err(message) => Err(crate::device::Failure {
                        code: edgefleet_protocol::messages::FailureCode::Download,
                        message,
                    }),
                },
                Err(_) => return,
            };
            let _ = tx.send(Msg::Fetched { job, result });
        });
        self.fetches.insert(job, handle.abort_handle());
    }

    fn cancel_fetch(&mut self, job: u64) {
        if let Some(handle) = self.fetches.remove(&job) {
            handle.abort();
        }
    }

    fn behaviour(&self, model: &str) -> Behaviour {
        self.shared
            .behaviours
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(self.index, model)
    }

    fn seq_durable(&self) -> u64 {
        self.shared.durable[self.index].load(Ordering::Acquire)
    }
}

/// Runs one device until it is stopped.
async fn run_device(
    mut device: Device,
    wire: Wire,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
    start_after: Duration,
    seed: u64,
) {
    let index = device.index();
    let mut link: Option<Link> = None;
    let mut generation = 0u64;
    let mut connect_at = Some(Instant::now() + start_after);
    let mut fetches: HashMap<u64, AbortHandle> = HashMap::new();
    let mut last_error: Option<String> = None;
    let mut ever_connected = false;
    let step = |device: &mut Device,
                link: Option<&Link>,
                fetches: &mut HashMap<u64, AbortHandle>,
                input: Input<'_>| {
        let mut driver = Driver {
            index,
            link,
            shared: &shared,
            tls: &wire.tls,
            tx: &tx,
            fetches,
        };
        device.handle(shared.now(), input, &mut driver);
    };
    loop {
        let now = shared.now();
        let wake = Instant::now() + Duration::from_millis(device.next_deadline().millis_since(now));
        let msg = tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => Some(msg),
                None => break,
            },
            _ = tokio::time::sleep_until(wake) => None,
            _ = tokio::time::sleep_until(connect_at.unwrap_or(wake)), if connect_at.is_some() => {
                connect_at = None;
                generation += 1;
                let this = generation;
                let spec = LinkSpec {
                    broker: &wire.broker,
                    device: device.id(),
                    password: wire.password.clone(),
                    tls: wire.tls.clone(),
                    will: device.status_frame(false, shared.now()),
                    seed: seed ^ ((index as u64) << 20) ^ generation,
                    connecting: shared.connecting.clone(),
                    connect_timeout_s: shared.connect_timeout_s,
                };
                link = Some(Link::start(spec, tx.clone(), move |event| Msg::Link {
                    generation: this,
                    event,
                }));
                continue;
            }
        };
        match msg {
            None => step(&mut device, link.as_ref(), &mut fetches, Input::Tick),
            Some(Msg::Link {
                generation: g,
                event,
            }) if g == generation && link.is_some() => match event {
                LinkEvent::Connected => {
                    last_error = None;
                    if !ever_connected {
                        ever_connected = true;
                        shared.connected_once.fetch_add(1, Ordering::Relaxed);
                    }
                    step(&mut device, link.as_ref(), &mut fetches, Input::Connected);
                }
                LinkEvent::Disconnected(error) => {
                    last_error = Some(error);
                    step(
                        &mut device,
                        link.as_ref(),
                        &mut fetches,
                        Input::Disconnected,
                    );
                }
                LinkEvent::Message { topic, payload } => {
                    let input = Input::Message {
                        topic: &topic,
                        payload: &payload,
                    };
                    step(&mut device, link.as_ref(), &mut fetches, input);
                }
            },
            Some(Msg::Link { .. }) => {}
            Some(Msg::Fetched { job, result }) => {
                fetches.remove(&job);
                step(
                    &mut device,
                    link.as_ref(),
                    &mut fetches,
                    Input::Fetched { job, result },
                );
            }
            Some(Msg::Disconnect) => {
                connect_at = None;
                if let Some(link) = link.take() {
                    link.abort();
                    step(&mut device, None, &mut fetches, Input::Disconnected);
                }
            }
            Some(Msg::Reconnect) => {
                if link.is_none() && connect_at.is_none() {
                    connect_at = Some(Instant::now());
                }
            }
            Some(Msg::Stop(done)) => {
                if let Some(link) = link.take() {
                    link.abort();
                }
                for (_, handle) in fetches.drain() {
                    handle.abort();
                }
                sync(&mut device, &shared, &last_error);
                let _ = done.send(());
                return;
            }
        }
        sync(&mut device, &shared, &last_error);
    }
}

/// Publishes what changed of the device to the fleet: its view, and its record for the persister.
fn sync(device: &mut Device, shared: &Shared, last_error: &Option<String>) {
    let index = device.index();
    {
        let mut view = shared.views[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if device.take_view_changed() {
            *view = view_of(device, last_error.clone());
        } else {
            view.counters = device.counters();
            view.unacked = device.unacked();
            if &view.last_error != last_error {
                view.last_error = last_error.clone();
            }
        }
    }
    if device.take_dirty() {
        *shared.records[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = device.record();
        shared.dirty.store(true, Ordering::Release);
        shared.wake_persister.notify_one();
    }
}
