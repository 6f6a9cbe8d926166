//! The fleet controller (`edgefleet-controller`): store, fleet CA and enrollment, model registry,
//! MQTT ingest and assignments, the admin API and the device endpoint.
//!
//! | module | what |
//! |---|---|
//! | `store` | SQLite/PostgreSQL, the only sqlx importer; audit rows in the same transaction |
//! | `audit` | the audit log's hash chain (pure) |
//! | `auth` | API tokens and roles (pure) |
//! | `pki` | the fleet CA (rcgen), TLS configs |
//! | `keys` | the trust directory: root, keyring, controller and online release keys |
//! | `broker` | the embedded MQTT broker (rumqttd) and its login check |
//! | `mqtt` | the controller's MQTT client: ingest, acks, retained assignments |
//! | `api` | the admin HTTP API (`/api/v1`, `/metrics`, OpenAPI) |
//! | `drift` | the drift service: detectors fed by the ingest, events, alerts, retraining, automatic rollouts |
//! | `capture` | data capture: per-device settings, upload offers, uploads, CSV downloads |
//! | `registry` | model upload, validation, signing, storage |
//! | `device_api` | the HTTPS endpoint devices use: enrollment, bundle downloads (Range) |
//! | `refresh` | re-signs assignments before they expire |
//! | `revocation` | cutting a revoked device off: CRL, broker reload, session takeover |
//! | `validate` | uploaded models built and test-run in a memory- and time-limited child process |
//! | `ratelimit`, `metrics` | request rate limits, Prometheus counters |

pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod capture;
pub mod config;
pub mod device_api;
pub mod drift;
pub mod keys;
pub mod metrics;
pub mod mosquitto;
pub mod mqtt;
pub mod pki;
pub mod ratelimit;
pub mod refresh;
pub mod registry;
pub mod revocation;
pub mod rollouts;
pub mod store;
pub mod validate;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use edgefleet_protocol::{Clock, SystemClock};

use self::audit::AuditEntry;
use self::auth::Role;
use self::config::{MqttMode, ServeArgs};
use self::keys::ControllerKeys;
use self::metrics::Metrics;
use self::mqtt::{KeyCache, Publisher, Takeover};
use self::pki::FleetCa;
use self::store::Store;

/// Everything a request handler needs.
pub struct App {
    pub store: Arc<Store>,
    pub ca: FleetCa,
    pub keys: Arc<ControllerKeys>,
    pub publisher: Publisher,
    pub key_cache: Arc<KeyCache>,
    /// The embedded broker's login table (None with an external broker).
    pub logins: Option<broker::Logins>,
    pub metrics: Arc<Metrics>,
    /// The CRL and the MQTT session takeover that cut revoked devices off.
    pub revocation: revocation::Revocation,
    pub clock: Arc<dyn Clock>,
    pub limits: ratelimit::Limits,
    pub data_dir: PathBuf,
    /// Base URL devices use for this controller's device endpoint, e.g. `https://ctl:8443`.
    pub device_url: String,
    /// The broker URL handed to devices at enrollment, `mqtts://host:port`.
    pub device_mqtt_url: String,
    pub max_upload_bytes: u64,
    /// Run as `<validator> validate-model` for each upload.
    pub validator: PathBuf,
    pub validation_memory_mib: u64,
    /// The rollout driver.
    pub rollouts: crate::rollout::driver::RolloutHandle,
    /// The drift service.
    pub drift: drift::DriftHandle,
    /// This controller's admin API as a local process reaches it, e.g. `http://127.0.0.1:8080`.
    pub api_url: String,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("data_dir", &self.data_dir)
            .field("device_url", &self.device_url)
            .field("device_mqtt_url", &self.device_mqtt_url)
            .finish_non_exhaustive()
    }
}

impl App {
    pub fn now_ms(&self) -> i64 {
        self.clock.now().as_millis() as i64
    }

    pub fn bundles_dir(&self) -> PathBuf {
        self.data_dir.join("bundles")
    }
}

/// A running controller: its listeners' addresses.
#[derive(Debug, Clone)]
pub struct Running {
    pub api: SocketAddr,
    pub devices: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub app: Arc<App>,
}

/// Starts every part and returns once they listen.
pub async fn start(args: &ServeArgs) -> Result<Running> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data_dir = args.data_dir.clone();
    crate::fsutil::create_private_dir(&data_dir)?;
    for sub in ["bundles", "uploads"] {
        crate::fsutil::create_private_dir(&data_dir.join(sub))?;
    }
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&data_dir.join("edgefleet.db")));
    let store = Arc::new(
        Store::connect(&database)
            .await
            .with_context(|| format!("cannot open the database {}", store::redact(&database)))?,
    );
    let ca = FleetCa::open_or_create(&data_dir.join("pki"))?;
    let keys_dir = args
        .keys_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("keys"));
    let keys = ControllerKeys::open(&keys_dir, args.keys_dir.is_none())?;

    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    hosts.extend(args.hostnames.iter().cloned());
    hosts.sort();
    hosts.dedup();
    let server_id = ca.identity("server", "edgefleet-controller-server", &hosts, true)?;
    let client_id = ca.identity("controller", pki::CONTROLLER_CN, &[], false)?;

    let metrics = Arc::new(Metrics::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let key_cache = Arc::new(KeyCache::default());

    let (mqtt_host, mqtt_port, logins, embedded_addr) = match &args.mqtt {
        MqttMode::Embedded => {
            let listen = args.mqtt_listen;
            let logins = broker::Logins::default();
            for device in store.list_devices().await? {
                if device.revoked_at.is_none()
                    && let Ok(key) = <[u8; 32]>::try_from(device.mac_key.as_slice())
                {
                    logins.allow(
                        &device.id,
                        edgefleet_protocol::DeviceMacKey(key).mqtt_password(&device.id),
                    );
                }
            }
            broker::start(listen, &ca.ca_path(), &server_id, logins.clone())?;
            let host = match listen.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                ip => ip.to_string(),
            };
            (host, listen.port(), Some(logins), Some(listen))
        }
        MqttMode::External { host, port } => (host.clone(), *port, None, None),
    };
    let client_name = format!("{}-{}", pki::CONTROLLER_CN, auth::new_id("c"));
    let login = logins.as_ref().map(|l| {
        let secret = auth::new_secret();
        l.allow(&client_name, secret.clone());
        (client_name.clone(), secret)
    });
    let tls = pki::client_config(&ca, &client_id)?;
    let takeover = Takeover::new(mqtt_host.clone(), mqtt_port, tls.clone(), logins.clone());
    let revocation = revocation::Revocation::new(
        args.crl_path(),
        args.crl_reload_command.clone(),
        takeover.clone(),
    );
    revocation
        .publish_crl(&store, &ca, clock.now().as_millis() as i64)
        .await
        .with_context(|| {
            format!(
                "cannot write the certificate revocation list {} (--crl-file)",
                revocation.crl_path().display()
            )
        })?;
    let (rollouts, rollout_queue) = crate::rollout::driver::channel();
    let (drift, drift_queue) = drift::channel();
    let api_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let device_listener = tokio::net::TcpListener::bind(args.device_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--device-listen)", args.device_listen))?;
    let api_addr = api_listener.local_addr()?;
    let device_addr = device_listener.local_addr()?;
    let advertised = args
        .advertise
        .clone()
        .unwrap_or_else(|| match device_addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            ip => ip.to_string(),
        });
    let device_url = format!("https://{}:{}", bracket(&advertised), device_addr.port());
    let device_mqtt_url = args.device_mqtt_url.clone().unwrap_or_else(|| {
        let host = if embedded_addr.is_some() {
            advertised.clone()
        } else {
            mqtt_host.clone()
        };
        format!("mqtts://{}:{mqtt_port}", bracket(&host))
    });

    let publisher = mqtt::start(
        mqtt::MqttSettings {
            host: mqtt_host.clone(),
            port: mqtt_port,
            client_id: client_name,
            login,
            tls,
            shared: embedded_addr.is_none(),
        },
        store.clone(),
        key_cache.clone(),
        clock.clone(),
        metrics.clone(),
        takeover,
        mqtt::Listeners {
            rollouts: rollouts.clone(),
            drift: drift.clone(),
            captures: capture::NoticeAnswers::new(store.clone(), device_url.clone()),
        },
    );

    let app = Arc::new(App {
        store: store.clone(),
        ca,
        keys: Arc::new(keys),
        publisher,
        key_cache,
        logins,
        metrics,
        revocation,
        clock,
        limits: ratelimit::Limits::new(args.rate_limit_per_minute),
        data_dir,
        device_url,
        device_mqtt_url,
        max_upload_bytes: args.max_upload_mib.saturating_mul(1024 * 1024),
        validator: match &args.validator {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("cannot find this program's path to run the model validator")?,
        },
        validation_memory_mib: args.validation_memory_mib,
        rollouts,
        drift,
        api_url: format!(
            "http://{}",
            match api_addr.ip() {
                ip if ip.is_unspecified() => SocketAddr::new(
                    if ip.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    },
                    api_addr.port()
                ),
                _ => api_addr,
            }
        ),
    });
    bootstrap_admin(&app, args).await?;
    refresh::spawn(app.clone());
    crate::rollout::driver::spawn(app.clone(), rollout_queue);
    drift::spawn(app.clone(), drift_queue);

    let refresh = app.clone();
    tokio::spawn(async move {
        let mut every_day = tokio::time::interval(revocation::CRL_REFRESH);
        every_day.tick().await; // the first tick is now; the list was just written
        loop {
            every_day.tick().await;
            if let Err(err) = refresh
                .revocation
                .publish_crl(&refresh.store, &refresh.ca, refresh.now_ms())
                .await
            {
                tracing::error!(error = %format!("{err:#}"), "cannot re-sign the certificate revocation list; it lapses {} days after the last one and a broker using it then refuses every device", pki::CRL_DAYS);
            }
        }
    });

    let router = api::router(app.clone());
    tokio::spawn(async move {
        if let Err(err) = axum::serve(
            api_listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        {
            tracing::error!(%err, "the API listener stopped");
        }
    });
    let tls = Arc::new(pki::device_server_config(&app.ca, &server_id)?);
    device_api::serve(device_listener, tls, app.clone());
    tracing::info!(
        api = %api_addr,
        devices = %device_addr,
        mqtt = %format!("{mqtt_host}:{mqtt_port}"),
        database = store.backend().name(),
        "controller ready"
    );
    Ok(Running {
        api: api_addr,
        devices: device_addr,
        mqtt: embedded_addr,
        app,
    })
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// On first start (no API token yet) creates an admin token and writes it to
/// `<data>/admin-token` (0600), so the operator can log in.
async fn bootstrap_admin(app: &App, args: &ServeArgs) -> Result<()> {
    if app.store.count_api_tokens().await? > 0 {
        return Ok(());
    }
    let secret = match &args.admin_token {
        Some(given) if auth::well_formed(given) => given.clone(),
        Some(_) => anyhow::bail!(
            "--admin-token must look like efk_ followed by 64 hex digits (make one with `openssl rand -hex 32`)"
        ),
        None => auth::new_secret(),
    };
    let row = store::ApiTokenRow {
        id: auth::new_id("tok"),
        name: "admin".into(),
        role: Role::Admin.as_str().into(),
        created_by: "controller".into(),
        created_at: app.now_ms(),
        revoked_at: None,
    };
    let audit = AuditEntry::new(
        "controller",
        "token.create",
        format!("token:{}", row.name),
        serde_json::json!({"role": row.role, "bootstrap": true}),
    );
    app.store
        .create_api_token(app.now_ms(), &row, &auth::hash_secret(&secret), audit)
        .await?;
    let path = app.data_dir.join("admin-token");
    crate::fsutil::write_atomic(
        &path,
        format!("{secret}\n").as_bytes(),
        crate::fsutil::SECRET_MODE,
    )?;
    tracing::warn!(
        file = %path.display(),
        "created the first admin API token; log in with `edgefleet login --token-file {}`",
        path.display()
    );
    Ok(())
}
