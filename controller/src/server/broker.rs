//! The embedded MQTT broker (rumqttd): the zero-setup default for small fleets.
//!
//! What it enforces: TLS with a client certificate from the fleet CA on every connection, and a
//! login on every CONNECT — the client id must be an enrolled, unrevoked device whose password
//! is the MAC of its id under its device key (or the controller's own login). What it does NOT
//! enforce: topic ACLs. A device with a valid certificate and key can subscribe to other
//! devices' topics (reports are authenticated, not encrypted) and publish on them; the controller
//! and the agents drop anything whose per-device MAC or signature does not verify, so no device
//! can speak for another, but it can read others' reports and disturb their retained messages.
//! Fleets where that matters use Mosquitto (`edgefleet-controller mosquitto-config`), whose ACL
//! keeps each device to its own topics. rumqttd keeps messages in memory only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use super::pki::Identity;

/// Who may log in: device id → MQTT password, plus the controller's own login.
#[derive(Debug, Default, Clone)]
pub struct Logins {
    inner: Arc<RwLock<HashMap<String, String>>>,
}

impl Logins {
    pub fn allow(&self, client_id: &str, password: String) {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client_id.to_owned(), password);
    }

    pub fn deny(&self, client_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(client_id);
    }

    pub fn check(&self, client_id: &str, user: &str, password: &str) -> bool {
        if client_id != user {
            return false;
        }
        let map = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(client_id) {
            Some(expected) => constant_time_eq(expected.as_bytes(), password.as_bytes()),
            None => false,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Starts the broker's threads (rumqttd runs its own runtimes); it lives as long as the process.
pub fn start(
    listen: SocketAddr,
    ca: &std::path::Path,
    server: &Identity,
    logins: Logins,
) -> Result<()> {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: edgefleet_protocol::codec::MAX_MESSAGE_BYTES + 4096,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = logins.check(&client_id, &user, &pass);
        if !ok {
            tracing::warn!(client_id, "embedded broker refused a login");
        }
        async move { ok }
    });
    let settings = ServerSettings {
        name: "edgefleet-v5".into(),
        listen,
        tls: Some(TlsConfig::Rustls {
            capath: Some(ca.display().to_string()),
            certpath: server.cert.display().to_string(),
            keypath: server.key.display().to_string(),
        }),
        next_connection_delay_ms: 1,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // The in-memory log per subscription filter is capped at 2 × 4 MiB.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v5: Some(HashMap::from([("edgefleet".to_owned(), settings)])),
        ..Config::default()
    };
    // Bind check first, so a port in use is a clear error rather than a log line in a thread.
    std::net::TcpListener::bind(listen)
        .with_context(|| format!("the embedded MQTT broker cannot listen on {listen} (use --mqtt-listen to pick another address, or --mqtt to use an external broker)"))?;
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(err) = broker.start() {
                tracing::error!(%err, "the embedded MQTT broker stopped");
            }
        })
        .context("cannot start the embedded broker thread")?;
    Ok(())
}
