//! A test peer playing the controller over a real broker, through the protocol crate: it opens
//! each device report with the device's MAC key, ingests it once per sequence number, and
//! acknowledges it on the device's ack topic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_protocol::messages::{ControllerBody, DeviceBody};
use edgefleet_protocol::{
    ControllerMessage, DeviceId, DeviceMacKey, DeviceMessage, Timestamp, Topic, TopicKind, topics,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use crate::broker::CertFiles;

/// What the peer has seen.
#[derive(Debug, Default)]
pub struct Ingest {
    /// Each report once, by sequence number.
    pub reports: BTreeMap<u64, DeviceMessage>,
    /// Copies of reports already ingested (resends after reconnects).
    pub duplicates: u64,
    /// Frames refused (bad MAC, wrong device, unreadable).
    pub rejected: Vec<String>,
    /// The latest retained status.
    pub status: Option<DeviceMessage>,
}

impl Ingest {
    pub fn telemetry(&self) -> usize {
        self.reports
            .values()
            .filter(|m| matches!(m.body, DeviceBody::Telemetry(_)))
            .count()
    }
}

#[derive(Debug)]
pub struct ControllerPeer {
    pub ingest: Arc<Mutex<Ingest>>,
    client: AsyncClient,
    device: DeviceId,
    runtime: tokio::runtime::Runtime,
}

impl ControllerPeer {
    /// Connects as `identity` (the controller's certificate) and serves `device` with `key`.
    pub fn start(
        broker: std::net::SocketAddr,
        ca: &std::path::Path,
        identity: &CertFiles,
        device: DeviceId,
        key: DeviceMacKey,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ingest = Arc::new(Mutex::new(Ingest::default()));
        let mqtt = crate::mqtt_tls(ca, identity);
        let mut options = MqttOptions::new("edgefleet-test-controller", "127.0.0.1", broker.port());
        options.set_keep_alive(Duration::from_secs(5));
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(mqtt))));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let shared = ingest.clone();
        let (publisher, peer_device) = (client.clone(), device.clone());
        runtime.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for kind in [TopicKind::Status, TopicKind::Telemetry, TopicKind::Event] {
                            let _ =
                                client.try_subscribe(topics::fleet_filter(kind), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                        let Ok(parsed) = Topic::parse(&topic) else {
                            continue;
                        };
                        let opened = if parsed.device == device {
                            DeviceMessage::open(&key, &parsed.device, &publish.payload)
                        } else {
                            continue;
                        };
                        let mut ingest = shared
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        match opened {
                            Err(err) => ingest.rejected.push(err.to_string()),
                            Ok(message) if parsed.kind == TopicKind::Status => {
                                ingest.status = Some(message)
                            }
                            Ok(message) => {
                                let seq = message.seq;
                                if ingest.reports.insert(seq, message).is_some() {
                                    ingest.duplicates += 1;
                                }
                                drop(ingest);
                                let ack = ControllerMessage::new(
                                    device.clone(),
                                    Timestamp(0),
                                    ControllerBody::Ack { seqs: vec![seq] },
                                )
                                .seal(&key);
                                let _ = client.try_publish(
                                    Topic::new(device.clone(), TopicKind::Ack).to_string(),
                                    QoS::AtLeastOnce,
                                    false,
                                    ack,
                                );
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Self {
            ingest,
            client: publisher,
            device: peer_device,
            runtime,
        }
    }

    /// Publishes a signed assignment, retained, on the device's assignment topic.
    pub fn assign(&self, signed_assignment: Vec<u8>) {
        let topic = Topic::new(self.device.clone(), TopicKind::Assignment).to_string();
        self.client
            .try_publish(topic, QoS::AtLeastOnce, true, signed_assignment)
            .expect("queue the assignment");
    }

    /// The events ingested so far, as `(kind, model digest)`.
    pub fn events(&self) -> Vec<(String, Option<String>)> {
        self.with(|i| {
            i.reports
                .values()
                .filter_map(|m| match &m.body {
                    DeviceBody::Event(e) => Some((
                        format!("{:?}", e.kind)
                            .split([' ', '{'])
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                        e.model.as_ref().map(|m| m.manifest_digest.to_hex()),
                    )),
                    _ => None,
                })
                .collect()
        })
    }

    pub fn with<T>(&self, f: impl FnOnce(&Ingest) -> T) -> T {
        f(&self
            .ingest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl Drop for ControllerPeer {
    fn drop(&mut self) {
        // The runtime's tasks end with it.
        let _ = &self.runtime;
    }
}
