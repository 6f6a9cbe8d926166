//! An MQTT v5 client for probing a broker's checks from a test: it connects with a given
//! certificate, client id and login, and reports what the broker answered (the CONNACK or the
//! refusal, each SUBACK's reason codes, each PUBACK's reason) and what it delivered. Driven
//! step by step on its own runtime; every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use crate::broker::CertFiles;

/// Bound on any one answer from the broker.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A message the probe received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// How a broker refused a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Before MQTT: the TCP connection or the TLS handshake failed, or the server sent a TLS
    /// alert (e.g. a revoked certificate).
    Handshake(String),
    /// After the TLS handshake: a CONNACK with a failure code, or the connection closed in
    /// answer to the CONNECT (rumqttd's way of refusing a login).
    Connect(String),
}

impl Refused {
    fn of(err: &ConnectionError) -> Self {
        let text = err.to_string();
        // rustls may report the server's alert only when the first MQTT packet is read.
        match err {
            ConnectionError::Tls(_) | ConnectionError::Io(_) | ConnectionError::Timeout(_) => {
                Refused::Handshake(text)
            }
            _ if text.contains("fatal alert") => Refused::Handshake(text),
            _ => Refused::Connect(text),
        }
    }
}

pub struct Probe {
    runtime: tokio::runtime::Runtime,
    client: AsyncClient,
    eventloop: EventLoop,
    /// Messages received while waiting for something else.
    pub delivered: Vec<Delivered>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// Connects to the broker at `addr` trusting `ca`, presenting `identity`, as `client_id`
    /// with `login` (user, password) if given. `Err` says how the broker refused.
    pub fn connect(
        addr: SocketAddr,
        ca: &Path,
        identity: &CertFiles,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Self, Refused> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut options = MqttOptions::new(client_id, "127.0.0.1", addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            crate::mqtt_tls(ca, identity),
        ))));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let connected = runtime.block_on(async {
            tokio::time::timeout(ANSWER_TIMEOUT, async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                        Ok(_) => {}
                        Err(err) => return Err(Refused::of(&err)),
                    }
                }
            })
            .await
        });
        match connected {
            Ok(Ok(())) => Ok(Self {
                runtime,
                client,
                eventloop,
                delivered: Vec::new(),
            }),
            Ok(Err(refused)) => Err(refused),
            Err(_) => Err(Refused::Connect(format!(
                "no CONNACK within {ANSWER_TIMEOUT:?}"
            ))),
        }
    }

    /// Polls until `pick` returns `Some` for an incoming packet; keeps deliveries meanwhile.
    fn until<T>(&mut self, what: &str, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        let (eventloop, delivered) = (&mut self.eventloop, &mut self.delivered);
        self.runtime.block_on(async {
            tokio::time::timeout(ANSWER_TIMEOUT, async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(packet)) => {
                            if let Packet::Publish(publish) = &packet {
                                delivered.push(Delivered {
                                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                                    payload: publish.payload.to_vec(),
                                });
                            }
                            if let Some(found) = pick(&packet) {
                                return found;
                            }
                        }
                        Ok(Event::Outgoing(_)) => {}
                        Err(err) => {
                            panic!("the probe's connection failed waiting for {what}: {err}")
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {what} within {ANSWER_TIMEOUT:?}"))
        })
    }

    /// Subscribes to `filter`; returns the broker's reason code.
    pub fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .try_subscribe(filter, QoS::AtLeastOnce)
            .expect("queue SUBSCRIBE");
        self.until(&format!("the SUBACK for {filter}"), |packet| match packet {
            Packet::SubAck(ack) => ack.return_codes.first().copied(),
            _ => None,
        })
    }

    /// Publishes at QoS 1; returns the broker's PUBACK reason.
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) -> PubAckReason {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .expect("queue PUBLISH");
        self.until(&format!("the PUBACK for {topic}"), |packet| match packet {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
    }

    /// Waits for a message `wanted` picks out (or finds it among those already delivered).
    pub fn receive(&mut self, what: &str, wanted: impl Fn(&Delivered) -> bool) -> Delivered {
        if let Some(found) = self.delivered.iter().find(|d| wanted(d)) {
            return found.clone();
        }
        self.until(what, |packet| match packet {
            Packet::Publish(publish) => {
                let delivered = Delivered {
                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                    payload: publish.payload.to_vec(),
                };
                wanted(&delivered).then_some(delivered)
            }
            _ => None,
        })
    }
}
