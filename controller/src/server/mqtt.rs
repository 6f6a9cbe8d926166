//! The controller's MQTT side: a plain MQTT v5 client (the same code for the embedded broker,
//! Mosquitto or EMQX). Reports arrive on shared subscriptions so replicas split the load; each is
//! opened with its device's MAC key, committed in batches idempotently on (device, seq), and only
//! then acknowledged. Assignments are published retained and re-published on every ConnAck. The
//! poll task never awaits a publish (rumqttc would deadlock); other tasks do. A revoked device
//! that still gets a message through has its session taken over ([`Takeover`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use edgefleet_protocol::messages::{ControllerBody, DeviceBody};
use edgefleet_protocol::{
    Clock, ControllerMessage, DeviceId, DeviceMacKey, DeviceMessage, Topic, TopicKind, topics,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

use super::broker::Logins;
use super::capture::NoticeAnswers;
use super::metrics::Metrics;
use super::store::{Report, StatusUpdate, Store};
use crate::rollout::driver::{RolloutHandle, reports_of};

/// How the controller reaches its broker.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// The login the embedded broker checks (external brokers identify us by certificate).
    pub login: Option<(String, String)>,
    pub tls: rustls::ClientConfig,
    /// Subscribe with shared subscriptions (replicas split the reports). Off for the embedded
    /// broker: rumqttd 0.20 keys shared groups by group name alone, so one group cannot span
    /// several filters, and the embedded broker has exactly one controller anyway.
    pub shared: bool,
}

/// Publishes to devices; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: AsyncClient,
}

impl Publisher {
    pub async fn assignment(&self, device: &DeviceId, signed: Vec<u8>) -> Result<()> {
        let topic = Topic::new(device.clone(), TopicKind::Assignment).to_string();
        self.client
            .publish(topic, QoS::AtLeastOnce, true, signed)
            .await?;
        Ok(())
    }

    /// Clears a device's retained assignment (revocation).
    pub async fn clear_assignment(&self, device: &DeviceId) -> Result<()> {
        self.assignment(device, Vec::new()).await
    }
}

/// What the ingest knows about a device.
#[derive(Debug, Clone)]
enum Known {
    Active(DeviceMacKey),
    Revoked,
    Unknown,
}

/// The per-device keys the ingest needs, cached.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: std::sync::Mutex<HashMap<String, Known>>,
}

impl KeyCache {
    pub fn forget(&self, device: &str) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(device);
    }

    async fn get(&self, store: &Store, device: &str) -> Known {
        if let Some(hit) = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(device)
        {
            return hit.clone();
        }
        let known = match store.device_key(device).await {
            Ok(Some((_, true))) => Known::Revoked,
            Ok(Some((bytes, false))) => <[u8; 32]>::try_from(bytes.as_slice())
                .map_or(Known::Unknown, |key| Known::Active(DeviceMacKey(key))),
            Ok(None) => Known::Unknown,
            Err(err) => {
                tracing::warn!(%err, device, "cannot load the device key");
                return Known::Unknown;
            }
        };
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(device.to_owned(), known.clone());
        known
    }
}

/// How often at most the ingest takes over the session of a revoked device that still sends.
const RETAKE_INTERVAL: Duration = Duration::from_secs(10);

/// Ends a device's MQTT session: a client that connects with the same client id makes the broker
/// close the older connection (MQTT session takeover). Mosquitto does this whatever identity the
/// newcomer presents, and so does rumqttd; the controller connects with its own certificate, and
/// on the embedded broker logs in with a one-time secret allowed for that client id meanwhile.
/// Only for revoked devices: on the embedded broker the device's login is removed afterwards.
#[derive(Debug, Clone)]
pub struct Takeover {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    /// The embedded broker's login table (None with an external broker).
    logins: Option<Logins>,
    /// When each revoked device's session was last taken over.
    last: Arc<std::sync::Mutex<HashMap<DeviceId, tokio::time::Instant>>>,
}

impl Takeover {
    pub fn new(host: String, port: u16, tls: rustls::ClientConfig, logins: Option<Logins>) -> Self {
        Self {
            host,
            port,
            tls: Arc::new(tls),
            logins,
            last: Arc::default(),
        }
    }

    /// For a message from a revoked device (it reconnected before the broker re-read the CRL,
    /// or the broker does not use one; or it is the will the broker sent when its session was
    /// taken over): takes its session over again, unless that happened within
    /// `RETAKE_INTERVAL`.
    fn retake(&self, device: &DeviceId) {
        let now = tokio::time::Instant::now();
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last
                .get(device)
                .is_some_and(|at| now.duration_since(*at) < RETAKE_INTERVAL)
            {
                return;
            }
            last.insert(device.clone(), now);
        }
        let (takeover, device) = (self.clone(), device.clone());
        tokio::spawn(async move {
            match takeover.disconnect_revoked(&device).await {
                Ok(()) => tracing::info!(%device, "ended a revoked device's MQTT session again"),
                Err(err) => {
                    tracing::warn!(%err, %device, "cannot end a revoked device's MQTT session")
                }
            }
        });
    }

    pub async fn disconnect_revoked(&self, device: &DeviceId) -> Result<()> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(device.clone(), tokio::time::Instant::now());
        let secret = self.logins.as_ref().map(|logins| {
            let secret = super::auth::new_secret();
            logins.allow(device.as_str(), secret.clone());
            secret
        });
        let result = self.connect_once(device, secret.as_deref()).await;
        if let Some(logins) = &self.logins {
            logins.deny(device.as_str());
        }
        result
    }

    async fn connect_once(&self, device: &DeviceId, secret: Option<&str>) -> Result<()> {
        let mut options = MqttOptions::new(device.as_str(), self.host.clone(), self.port);
        if let Some(secret) = secret {
            options.set_credentials(device.as_str(), secret);
        }
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_start(true);
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())));
        let (client, mut eventloop) = AsyncClient::new(options, 8);
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return Err(anyhow::anyhow!(err)),
                }
            }
        })
        .await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        connected.map_err(|_| anyhow::anyhow!("no CONNACK from the broker within 10 s"))?
    }
}

struct Incoming {
    device: DeviceId,
    key: DeviceMacKey,
    message: DeviceMessage,
}

/// Who learns of committed reports beyond the store: the rollouts (every newly inserted report
/// and status), the drift service (every newly inserted telemetry window) and the capture
/// notices (answered after their commit).
#[derive(Debug)]
pub struct Listeners {
    pub rollouts: RolloutHandle,
    /// The drift service: every newly inserted telemetry window.
    pub drift: super::drift::DriftHandle,
    pub captures: NoticeAnswers,
}

/// Starts the client, the ingest batcher and the ack sender.
pub fn start(
    settings: MqttSettings,
    store: Arc<Store>,
    keys: Arc<KeyCache>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    takeover: Takeover,
    listeners: Listeners,
) -> Publisher {
    let Listeners {
        rollouts,
        drift,
        captures,
    } = listeners;
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    options.set_keep_alive(Duration::from_secs(15));
    options.set_clean_start(true);
    options.set_max_packet_size(Some(
        edgefleet_protocol::codec::MAX_MESSAGE_BYTES as u32 + 4096,
    ));
    if let Some((user, pass)) = &settings.login {
        options.set_credentials(user.clone(), pass.clone());
    }
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
        settings.tls.clone(),
    ))));
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let publisher = Publisher {
        client: client.clone(),
    };
    let (raw_tx, mut raw_rx) = mpsc::channel::<(String, bytes::Bytes)>(8192);
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel::<()>();

    // The poll task: only polls, forwards, and queues subscriptions with try_*.
    let poll_client = client.clone();
    let shared = settings.shared;
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(250);
                    tracing::info!("connected to the MQTT broker");
                    for kind in [TopicKind::Telemetry, TopicKind::Event, TopicKind::Capture] {
                        let filter = if shared {
                            topics::shared_filter(kind)
                        } else {
                            topics::fleet_filter(kind)
                        };
                        let _ = poll_client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                    // Retained messages are not delivered to shared subscriptions: every replica
                    // reads statuses directly.
                    let _ = poll_client
                        .try_subscribe(topics::fleet_filter(TopicKind::Status), QoS::AtLeastOnce);
                    let _ = connected_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if raw_tx.send((topic, publish.payload)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%err, "MQTT connection lost; reconnecting in {backoff:?}");
                    let jitter = Duration::from_millis(u64::from(rand_u16() % 250));
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });

    // Re-publish every retained assignment on each (re)connect: a broker without persistence
    // forgets them.
    let (republish_client, republish_store) = (publisher.clone(), store.clone());
    tokio::spawn(async move {
        while connected_rx.recv().await.is_some() {
            match republish_store.assignments().await {
                Ok(all) => {
                    for (device, signed) in all {
                        let Ok(id) = DeviceId::new(&device) else {
                            tracing::error!(device, "a stored device id is invalid");
                            continue;
                        };
                        if let Err(err) = republish_client.assignment(&id, signed).await {
                            tracing::warn!(%err, device, "cannot re-publish an assignment");
                        }
                    }
                }
                Err(err) => tracing::error!(%err, "cannot load assignments to re-publish"),
            }
        }
    });

    // Open and route each frame; batch reports for the store.
    let (report_tx, mut report_rx) = mpsc::channel::<Incoming>(8192);
    let (open_store, open_metrics, open_clock) = (store.clone(), metrics.clone(), clock.clone());
    let open_rollouts = rollouts.clone();
    tokio::spawn(async move {
        while let Some((topic, payload)) = raw_rx.recv().await {
            let Ok(parsed) = Topic::parse(&topic) else {
                open_metrics.rejected("topic");
                continue;
            };
            if !parsed.kind.from_device() {
                continue;
            }
            if payload.is_empty() {
                continue; // a cleared retained message
            }
            let key = match keys.get(&open_store, parsed.device.as_str()).await {
                Known::Active(key) => key,
                Known::Unknown => {
                    open_metrics.rejected("unknown_device");
                    continue;
                }
                Known::Revoked => {
                    open_metrics.rejected("revoked_device");
                    takeover.retake(&parsed.device);
                    continue;
                }
            };
            let message = match DeviceMessage::open(&key, &parsed.device, &payload) {
                Ok(message) => message,
                Err(err) => {
                    open_metrics.rejected("bad_frame");
                    tracing::warn!(device = %parsed.device, %err, "refused a device message");
                    continue;
                }
            };
            if let DeviceBody::Status(status) = &message.body {
                let update = StatusUpdate {
                    online: status.online,
                    agent_version: status.agent_version.clone(),
                    status: serde_json::to_value(status).unwrap_or_default(),
                    active: status.active.as_ref().map(|m| m.manifest_digest.to_hex()),
                    previous: status.previous.as_ref().map(|m| m.manifest_digest.to_hex()),
                    shadow: status.shadow.as_ref().map(|m| m.manifest_digest.to_hex()),
                };
                let now = open_clock.now().as_millis() as i64;
                if let Err(err) = open_store
                    .update_status(now, parsed.device.as_str(), update)
                    .await
                {
                    tracing::error!(%err, "cannot store a device status");
                    continue;
                }
                open_rollouts
                    .status(
                        parsed.device.clone(),
                        status.online,
                        status.active.as_ref().map(|m| m.manifest_digest),
                    )
                    .await;
                continue;
            }
            let incoming = Incoming {
                device: parsed.device,
                key,
                message,
            };
            if report_tx.send(incoming).await.is_err() {
                return;
            }
        }
    });

    // Commit in batches, then ack what was committed.
    let ack_client = client;
    tokio::spawn(async move {
        loop {
            let Some(first) = report_rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match report_rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let now = clock.now().as_millis() as i64;
            let reports: Vec<Report> = batch.iter().map(to_report).collect();
            let mut delay = Duration::from_millis(100);
            let fresh = loop {
                match store.ingest(now, &reports).await {
                    Ok(new) => {
                        let n = new.len() as u64;
                        metrics.ingested(n, reports.len() as u64 - n);
                        break new;
                    }
                    Err(err) => {
                        // Nothing is acked, so devices keep the reports; retry the same batch.
                        tracing::error!(%err, "cannot commit reports; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            };
            // The rollouts learn of each report once: only those this commit inserted.
            let fresh: std::collections::HashSet<(String, i64)> = fresh.into_iter().collect();
            let observed: Vec<_> = batch
                .iter()
                .filter(|item| fresh.contains(&(item.device.to_string(), item.message.seq as i64)))
                .flat_map(|item| {
                    reports_of(&item.message.body)
                        .into_iter()
                        .map(|report| (item.device.clone(), report))
                })
                .collect();
            rollouts.observe(observed).await;
            let windows: Vec<_> = batch
                .iter()
                .filter(|item| fresh.contains(&(item.device.to_string(), item.message.seq as i64)))
                .filter_map(|item| match &item.message.body {
                    DeviceBody::Telemetry(window) => Some((item.device.clone(), window.clone())),
                    _ => None,
                })
                .collect();
            drift.observe(windows).await;
            let mut acks: BTreeMap<String, (DeviceId, DeviceMacKey, Vec<u64>)> = BTreeMap::new();
            for item in &batch {
                acks.entry(item.device.to_string())
                    .or_insert_with(|| (item.device.clone(), item.key.clone(), Vec::new()))
                    .2
                    .push(item.message.seq);
            }
            for (_, (device, key, seqs)) in acks {
                let ack = ControllerMessage::new(
                    device.clone(),
                    clock.now(),
                    ControllerBody::Ack { seqs },
                )
                .seal(&key);
                let topic = Topic::new(device, TopicKind::Ack).to_string();
                if let Err(err) = ack_client
                    .publish(topic, QoS::AtLeastOnce, false, ack)
                    .await
                {
                    tracing::warn!(%err, "cannot queue an ack; the device will resend");
                }
            }
            // Committed capture notices get their upload URL (or refusal) on the same topic.
            for item in &batch {
                let DeviceBody::Capture(notice) = &item.message.body else {
                    continue;
                };
                let Some(answer) = captures.answer(now, &item.device, notice).await else {
                    continue;
                };
                let message = ControllerMessage::new(item.device.clone(), clock.now(), answer)
                    .seal(&item.key);
                let topic = Topic::new(item.device.clone(), TopicKind::Ack).to_string();
                if let Err(err) = ack_client
                    .publish(topic, QoS::AtLeastOnce, false, message)
                    .await
                {
                    tracing::warn!(%err, "cannot queue a capture answer; the device announces the batch again");
                }
            }
        }
    });
    publisher
}

fn to_report(item: &Incoming) -> Report {
    let m = &item.message;
    let (kind, model) = match &m.body {
        DeviceBody::Telemetry(t) => ("telemetry", Some(&t.model)),
        DeviceBody::Event(e) => ("event", e.model.as_ref()),
        DeviceBody::Capture(c) => ("capture", Some(&c.model)),
        DeviceBody::Status(s) => ("status", s.active.as_ref()),
    };
    let body = match &m.body {
        DeviceBody::Telemetry(t) => serde_json::to_string(t),
        DeviceBody::Event(e) => serde_json::to_string(e),
        DeviceBody::Capture(c) => serde_json::to_string(c),
        DeviceBody::Status(s) => serde_json::to_string(s),
    }
    .unwrap_or_else(|_| String::from("null"));
    Report {
        device: item.device.to_string(),
        seq: m.seq as i64,
        kind,
        sent_at: m.sent_at.as_millis() as i64,
        model_digest: model.map(|m| m.manifest_digest.to_hex()),
        body,
    }
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}
