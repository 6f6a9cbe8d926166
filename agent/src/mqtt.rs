//! The MQTT v5 link to the controller (rumqttc over rustls with the `ring` provider, mutual TLS).
//!
//! rumqttc's traps are handled here: the polling task never awaits a publish (publishes use
//! `try_publish` from the supervisor); subscriptions are renewed on every ConnAck; a refused or
//! broken connection is retried with exponential backoff and jitter; keep-alive pings notice a
//! dead link. rumqttc forgets unacknowledged QoS 1 messages when the broker starts a new session,
//! so nothing relies on it: the supervisor resends from the on-disk spool after every ConnAck
//! until the controller acknowledges each report.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use edgefleet_protocol::{DeviceId, Topic, TopicKind};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// The fleet CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// This device's client certificate and key (from enrollment).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub keep_alive_s: u64,
}

/// What the link tells the supervisor.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Disconnected(String),
    /// A message on one of this device's topics.
    Message {
        topic: String,
        payload: Vec<u8>,
    },
}

/// Builds a rustls client config with the `ring` provider, the fleet CA as the only root, and
/// the device certificate for mutual TLS.
pub fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&config.ca)
        .with_context(|| format!("cannot read the fleet CA {}", config.ca.display()))?
    {
        roots.add(cert.with_context(|| {
            format!("{} holds an unreadable certificate", config.ca.display())
        })?)?;
    }
    let chain = CertificateDer::pem_file_iter(&config.cert)
        .with_context(|| {
            format!(
                "cannot read the device certificate {}",
                config.cert.display()
            )
        })?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} holds an unreadable certificate", config.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .with_context(|| format!("cannot read the device key {}", config.key.display()))?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the device certificate and key do not match")
}

/// A random duration below `max`, for jitter (seeded per call from the OS via `RandomState`).
fn jitter(max: Duration) -> Duration {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0);
    let millis = max.as_millis().max(1) as u64;
    Duration::from_millis(hasher.finish() % millis)
}

/// The running link: publish with [`Link::publish`]; events arrive on the channel.
#[derive(Debug, Clone)]
pub struct Link {
    client: AsyncClient,
    device: DeviceId,
}

impl Link {
    /// Connects (in the background) with `will` as the retained last-will status.
    pub fn start(
        config: &MqttConfig,
        device: &DeviceId,
        key: &edgefleet_protocol::DeviceMacKey,
        will: Vec<u8>,
        events: mpsc::UnboundedSender<LinkEvent>,
    ) -> Result<Self> {
        let mut options = MqttOptions::new(device.as_str(), config.host.clone(), config.port);
        options.set_keep_alive(Duration::from_secs(config.keep_alive_s));
        options.set_clean_start(true);
        // Mosquitto takes the identity from the certificate; the embedded broker checks this.
        options.set_credentials(device.as_str(), key.mqtt_password(device.as_str()));
        options.set_max_packet_size(Some(
            edgefleet_protocol::codec::MAX_MESSAGE_BYTES as u32 + 1024,
        ));
        options.set_connection_timeout(10);
        options.set_last_will(LastWill::new(
            Topic::new(device.clone(), TopicKind::Status).to_string(),
            will,
            QoS::AtLeastOnce,
            true,
            None,
        ));
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            tls_config(config)?,
        ))));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let subscriber = client.clone();
        let subscriptions = [TopicKind::Ack, TopicKind::Assignment]
            .map(|kind| Topic::new(device.clone(), kind).to_string());
        tokio::spawn(async move {
            let initial = Duration::from_millis(500);
            let mut backoff = initial;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = initial;
                        // A new session has no subscriptions: renew them on every ConnAck.
                        for topic in &subscriptions {
                            if let Err(err) =
                                subscriber.try_subscribe(topic.clone(), QoS::AtLeastOnce)
                            {
                                tracing::warn!(error = %err, %topic, "cannot subscribe");
                            }
                        }
                        if events.send(LinkEvent::Connected).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                        if events
                            .send(LinkEvent::Message {
                                topic,
                                payload: publish.payload.to_vec(),
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        if events
                            .send(LinkEvent::Disconnected(err.to_string()))
                            .is_err()
                        {
                            return;
                        }
                        let wait = backoff + jitter(backoff / 2);
                        tracing::info!(error = %err, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost");
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        });
        Ok(Self {
            client,
            device: device.clone(),
        })
    }

    /// Queues a QoS 1 publish without waiting; false if the queue is full (the report stays in
    /// the spool and is sent again later).
    pub fn publish(&self, kind: TopicKind, payload: Vec<u8>, retain: bool) -> bool {
        let topic = Topic::new(self.device.clone(), kind).to_string();
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_ok()
    }
}
