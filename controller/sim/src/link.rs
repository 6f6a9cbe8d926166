//! The MQTT v5 connection of one simulated device: rumqttc over rustls (`ring`) with the device's
//! client certificate, as `edgefleet-agent` connects. The rumqttc traps are handled as the agent
//! handles them: the poll task only polls and forwards (publishes use `try_publish` from the
//! device task, never awaited here); subscriptions are renewed on every ConnAck; a refused or
//! broken connection is retried with exponential backoff and jitter. Aborting the poll task
//! closes the socket without a DISCONNECT, so the broker publishes the device's last will.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgefleet_protocol::{DeviceId, Topic, TopicKind};
use rand::{RngExt, SeedableRng};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{Semaphore, mpsc};

/// Where the broker is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub keep_alive_s: u64,
}

impl Broker {
    /// Parses `mqtts://host:port` (what enrollment hands a device).
    pub fn parse(url: &str, keep_alive_s: u64) -> Result<Self, String> {
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| format!("broker URL {url:?} is not mqtts://HOST:PORT"))?;
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("broker URL {url:?} has no :PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("broker URL {url:?}: the port is not a number"))?;
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            keep_alive_s,
        })
    }
}

/// What the link reports to its device task.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Disconnected(String),
    Message { topic: String, payload: Bytes },
}

/// Outgoing QoS 1 publishes in flight per connection (rumqttc allocates state for this many; its
/// default follows the broker's receive maximum, up to 65 535).
const MAX_INFLIGHT: u16 = 16;
/// Incoming events rumqttc buffers before it hands them out: it reserves room for 100 (about
/// 39 KiB a connection); a device gets a few at a time, and the queue grows if it must.
const EVENT_CAPACITY: usize = 4;
/// Requests rumqttc buffers before `try_publish` refuses (the report stays spooled).
const REQUEST_CAPACITY: usize = 64;

/// Who connects, to where, and with which last will.
#[derive(Debug)]
pub struct LinkSpec<'a> {
    pub broker: &'a Broker,
    pub device: &'a DeviceId,
    /// The login the embedded broker checks (the MAC-derived password).
    pub password: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// The retained status with `online: false`.
    pub will: Bytes,
    /// Seeds the reconnect jitter.
    pub seed: u64,
    /// Held while connecting (TCP, TLS, CONNECT until the CONNACK): bounds the handshakes in
    /// flight over the whole fleet, so none waits so long in a broker's queue that it gives up.
    pub connecting: Arc<Semaphore>,
    /// Bound on one connection attempt, in seconds.
    pub connect_timeout_s: u64,
}

/// A running connection: publish with [`Link::publish`]; events arrive on the device's channel.
#[derive(Debug)]
pub struct Link {
    client: AsyncClient,
    device: DeviceId,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Connects in the background; events go to `events`, made by `wrap`.
    pub fn start<M: Send + 'static>(
        spec: LinkSpec<'_>,
        events: mpsc::UnboundedSender<M>,
        wrap: impl Fn(LinkEvent) -> M + Send + 'static,
    ) -> Self {
        let LinkSpec {
            broker,
            device,
            password,
            tls,
            will,
            seed,
            connecting,
            connect_timeout_s,
        } = spec;
        let mut options = MqttOptions::new(device.as_str(), broker.host.clone(), broker.port);
        options.set_keep_alive(Duration::from_secs(broker.keep_alive_s));
        options.set_clean_start(true);
        // Mosquitto takes the identity from the certificate; the embedded broker checks this.
        options.set_credentials(device.as_str(), password);
        options.set_max_packet_size(Some(
            edgefleet_protocol::codec::MAX_MESSAGE_BYTES as u32 + 1024,
        ));
        options.set_connection_timeout(connect_timeout_s);
        options.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
        options.set_last_will(LastWill::new(
            Topic::new(device.clone(), TopicKind::Status).to_string(),
            will,
            QoS::AtLeastOnce,
            true,
            None,
        ));
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        eventloop.state.events = VecDeque::with_capacity(EVENT_CAPACITY);
        let subscriber = client.clone();
        let subscriptions = [TopicKind::Ack, TopicKind::Assignment]
            .map(|kind| Topic::new(device.clone(), kind).to_string());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let initial = Duration::from_millis(500);
            let mut backoff = initial;
            let mut slot = None;
            let mut connected = false;
            loop {
                if !connected && slot.is_none() {
                    slot = connecting.clone().acquire_owned().await.ok();
                }
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = initial;
                        connected = true;
                        slot = None;
                        // A new session has no subscriptions: renew them on every ConnAck.
                        for topic in &subscriptions {
                            if let Err(err) =
                                subscriber.try_subscribe(topic.clone(), QoS::AtLeastOnce)
                            {
                                tracing::warn!(error = %err, %topic, "cannot subscribe");
                            }
                        }
                        LinkEvent::Connected
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => LinkEvent::Message {
                        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                        payload: publish.payload,
                    },
                    Ok(_) => continue,
                    Err(err) => {
                        connected = false;
                        slot = None;
                        if events
                            .send(wrap(LinkEvent::Disconnected(err.to_string())))
                            .is_err()
                        {
                            return;
                        }
                        let jitter = rng.random_range(0..=backoff.as_millis() as u64 / 2);
                        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                };
                if events.send(wrap(event)).is_err() {
                    return;
                }
            }
        });
        Self {
            client,
            device: device.clone(),
            task,
        }
    }

    /// Queues a QoS 1 publish without waiting; false if the queue is full (the report stays in
    /// the spool and is sent again later).
    pub fn publish(&self, kind: TopicKind, payload: Bytes, retain: bool) -> bool {
        let topic = Topic::new(self.device.clone(), kind).to_string();
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_ok()
    }

    /// Drops the connection the way a lost network does (no DISCONNECT: the broker sends the
    /// last will).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}
