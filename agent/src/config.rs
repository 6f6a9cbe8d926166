//! Agent configuration: command-line flags (each also read from an `EDGEFLEET_*` environment
//! variable) over an optional TOML file over defaults. Every bad field is reported at once, before
//! anything starts.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use edgefleet_protocol::{Arch, DeviceId};

/// Flags (and their environment variables) that override the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML config file.
    #[arg(long, env = "EDGEFLEET_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// This device's id (letters, digits, `.`, `_`, `-`).
    #[arg(long, env = "EDGEFLEET_DEVICE_ID", global = true)]
    pub device_id: Option<String>,
    /// Directory for the model store, floors and the admin socket.
    #[arg(long, env = "EDGEFLEET_STATE_DIR", global = true)]
    pub state_dir: Option<String>,
    /// The fleet's root keyring (root-v1.cbor), the trust anchor.
    #[arg(long, env = "EDGEFLEET_TRUST_ROOT", global = true)]
    pub trust_root: Option<String>,
    /// Later root keyrings this device follows, in order (comma-separated).
    #[arg(long, env = "EDGEFLEET_ROOT_CHAIN", global = true)]
    pub root_chain: Option<String>,
    /// The release keyring signed by the root.
    #[arg(long, env = "EDGEFLEET_KEYRING", global = true)]
    pub keyring: Option<String>,
    /// Architecture bundles must target (defaults to this build's).
    #[arg(long, env = "EDGEFLEET_ARCH", global = true)]
    pub arch: Option<String>,
    /// Local inference API TCP address; loopback only.
    #[arg(long, env = "EDGEFLEET_API_LISTEN", global = true)]
    pub api_listen: Option<String>,
    /// Local inference API Unix socket.
    #[arg(long, env = "EDGEFLEET_API_SOCKET", global = true)]
    pub api_socket: Option<String>,
    /// Largest inference request body, in bytes.
    #[arg(long, env = "EDGEFLEET_API_MAX_BODY_BYTES", global = true)]
    pub api_max_body_bytes: Option<String>,
    /// Address-space limit of the process that runs models, in MiB.
    #[arg(long, env = "EDGEFLEET_MODEL_MEMORY_LIMIT_MB", global = true)]
    pub model_memory_limit_mb: Option<String>,
    /// Seconds a model may take to load and pass its self-test.
    #[arg(long, env = "EDGEFLEET_MODEL_LOAD_TIMEOUT_S", global = true)]
    pub model_load_timeout_s: Option<String>,
    /// Requests queued for the shadow model before new ones are dropped.
    #[arg(long, env = "EDGEFLEET_SHADOW_QUEUE", global = true)]
    pub shadow_queue: Option<String>,
    /// Log format: plain or json.
    #[arg(long, env = "EDGEFLEET_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Seconds per telemetry window.
    #[arg(long, env = "EDGEFLEET_TELEMETRY_WINDOW_S", global = true)]
    pub telemetry_window_s: Option<String>,
    /// Largest size of the offline report spool, in bytes; the oldest reports are dropped first.
    #[arg(long, env = "EDGEFLEET_SPOOL_MAX_BYTES", global = true)]
    pub spool_max_bytes: Option<String>,
    /// Oldest report the spool keeps, in seconds.
    #[arg(long, env = "EDGEFLEET_SPOOL_MAX_AGE_S", global = true)]
    pub spool_max_age_s: Option<String>,
    /// The MQTT broker, `mqtts://host:port` (empty: no controller link).
    #[arg(long, env = "EDGEFLEET_MQTT_URL", global = true)]
    pub mqtt_url: Option<String>,
    /// The fleet CA certificate (PEM) the broker's certificate must chain to.
    #[arg(long, env = "EDGEFLEET_MQTT_CA", global = true)]
    pub mqtt_ca: Option<String>,
    /// This device's client certificate (PEM).
    #[arg(long, env = "EDGEFLEET_MQTT_CERT", global = true)]
    pub mqtt_cert: Option<String>,
    /// This device's private key (PEM).
    #[arg(long, env = "EDGEFLEET_MQTT_KEY", global = true)]
    pub mqtt_key: Option<String>,
    /// File holding this device's message-authentication key (64 hex digits).
    #[arg(long, env = "EDGEFLEET_MQTT_MAC_KEY", global = true)]
    pub mqtt_mac_key: Option<String>,
    /// Seconds between MQTT keep-alive pings; a dead link is noticed within about twice this.
    #[arg(long, env = "EDGEFLEET_MQTT_KEEP_ALIVE_S", global = true)]
    pub mqtt_keep_alive_s: Option<String>,
    /// Bandwidth cap for bundle downloads, in bytes per second (0: no cap).
    #[arg(long, env = "EDGEFLEET_DOWNLOAD_MAX_BYTES_PER_S", global = true)]
    pub download_max_bytes_per_s: Option<String>,
    /// Recent predictions kept for ground-truth feedback.
    #[arg(long, env = "EDGEFLEET_FEEDBACK_MAX_PREDICTIONS", global = true)]
    pub feedback_max_predictions: Option<String>,
    /// Seconds a prediction can get feedback.
    #[arg(long, env = "EDGEFLEET_FEEDBACK_MAX_AGE_S", global = true)]
    pub feedback_max_age_s: Option<String>,
    /// Largest size of captured data waiting for upload, in bytes.
    #[arg(long, env = "EDGEFLEET_CAPTURE_MAX_BYTES", global = true)]
    pub capture_max_bytes: Option<String>,
    /// The controller to enroll with on first start, `https://host:port`.
    #[arg(long, env = "EDGEFLEET_ENROLL_URL", global = true)]
    pub enroll_url: Option<String>,
    /// The one-time enrollment token.
    #[arg(
        long,
        env = "EDGEFLEET_ENROLL_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub enroll_token: Option<String>,
}

/// The controller link, when `mqtt.url` is set.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub mqtt: crate::mqtt::MqttConfig,
    pub mac_key: PathBuf,
    /// Where to enroll when the identity files do not exist yet: (url, token).
    pub enroll: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not `plain` or `json`")),
        }
    }
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub state_dir: PathBuf,
    pub trust_root: PathBuf,
    pub root_chain: Vec<PathBuf>,
    pub keyring: PathBuf,
    pub arch: Arch,
    pub api_listen: SocketAddr,
    pub api_socket: PathBuf,
    pub api_max_body_bytes: usize,
    pub model_memory_limit_mb: u64,
    pub model_load_timeout_s: u64,
    pub shadow_queue: usize,
    pub log_format: LogFormat,
    pub telemetry_window_s: u64,
    pub spool_max_bytes: u64,
    pub spool_max_age_s: u64,
    /// Bandwidth cap for bundle downloads in bytes per second; 0 means no cap.
    pub download_max_bytes_per_s: u64,
    pub feedback_max_predictions: usize,
    pub feedback_max_age_s: u64,
    pub capture_max_bytes: u64,
    pub link: Option<LinkConfig>,
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// TOML keys, in `section.key` form, and the flag each maps to (its environment variable is
/// `EDGEFLEET_` + the flag in upper case with `_`).
const KEYS: &[(&str, &str)] = &[
    ("device_id", "device-id"),
    ("state_dir", "state-dir"),
    ("trust.root", "trust-root"),
    ("trust.root_chain", "root-chain"),
    ("trust.keyring", "keyring"),
    ("arch", "arch"),
    ("api.listen", "api-listen"),
    ("api.socket", "api-socket"),
    ("api.max_body_bytes", "api-max-body-bytes"),
    ("model.memory_limit_mb", "model-memory-limit-mb"),
    ("model.load_timeout_s", "model-load-timeout-s"),
    ("model.shadow_queue", "shadow-queue"),
    ("log.format", "log-format"),
    ("telemetry.window_s", "telemetry-window-s"),
    ("spool.max_bytes", "spool-max-bytes"),
    ("spool.max_age_s", "spool-max-age-s"),
    ("mqtt.url", "mqtt-url"),
    ("mqtt.ca", "mqtt-ca"),
    ("mqtt.cert", "mqtt-cert"),
    ("mqtt.key", "mqtt-key"),
    ("mqtt.mac_key", "mqtt-mac-key"),
    ("mqtt.keep_alive_s", "mqtt-keep-alive-s"),
    ("download.max_bytes_per_s", "download-max-bytes-per-s"),
    ("feedback.max_predictions", "feedback-max-predictions"),
    ("feedback.max_age_s", "feedback-max-age-s"),
    ("capture.max_bytes", "capture-max-bytes"),
    ("enroll.url", "enroll-url"),
    ("enroll.token", "enroll-token"),
];

struct Resolver {
    file: toml::Table,
    errors: Vec<String>,
}

impl Resolver {
    fn file_value(&self, key: &str) -> Option<&toml::Value> {
        let (section, name) = key
            .split_once('.')
            .map_or((None, key), |(s, n)| (Some(s), n));
        match section {
            Some(section) => self.file.get(section)?.as_table()?.get(name),
            None => self.file.get(name),
        }
    }

    /// The raw text of `key`, from the flag/env if given, else the file; with where it came from.
    fn raw(&mut self, key: &str, flag: &Option<String>) -> Option<(String, String)> {
        if let Some(value) = flag {
            return Some((
                value.clone(),
                format!("--{} / EDGEFLEET_{}", flag_name(key), env_name(key)),
            ));
        }
        let value = self.file_value(key)?.clone();
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or(()))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join(","))
                .unwrap_or_else(|()| {
                    self.errors.push(format!(
                        "`{key}` in the config file must be a list of strings"
                    ));
                    String::new()
                }),
            other => {
                self.errors.push(format!(
                    "`{key}` in the config file has unsupported type {}",
                    other.type_str()
                ));
                return None;
            }
        };
        Some((text, String::from("config file")))
    }

    fn get<T: FromStr>(
        &mut self,
        key: &str,
        flag: &Option<String>,
        default: Option<&str>,
    ) -> Option<T>
    where
        T::Err: std::fmt::Display,
    {
        let (text, source) = match self.raw(key, flag) {
            Some(found) => found,
            None => match default {
                Some(default) => (default.to_owned(), String::from("default")),
                None => {
                    self.errors.push(format!(
                        "`{key}` is required: set it in the config file, with --{} or with EDGEFLEET_{}",
                        flag_name(key),
                        env_name(key)
                    ));
                    return None;
                }
            },
        };
        match text.parse::<T>() {
            Ok(value) => Some(value),
            Err(err) => {
                self.errors
                    .push(format!("`{key}` ({source}) = {text:?}: {err}"));
                None
            }
        }
    }
}

fn flag_name(key: &str) -> &str {
    KEYS.iter()
        .find(|(k, _)| *k == key)
        .map_or(key, |(_, flag)| flag)
}

fn env_name(key: &str) -> String {
    flag_name(key).replace('-', "_").to_uppercase()
}

impl AgentConfig {
    /// Resolves flags/env over the config file over defaults, reporting every bad field.
    pub fn resolve(args: &ConfigArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let file = match &args.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(table) => table,
                    Err(err) => {
                        errors.push(format!("{} is not valid TOML: {err}", path.display()));
                        toml::Table::new()
                    }
                },
                Err(err) => {
                    errors.push(format!("cannot read config file {}: {err}", path.display()));
                    toml::Table::new()
                }
            },
            None => toml::Table::new(),
        };
        let known: BTreeSet<&str> = KEYS.iter().map(|(key, _)| *key).collect();
        for (key, value) in &file {
            match value.as_table() {
                Some(section) if known.iter().any(|k| k.starts_with(&format!("{key}."))) => {
                    for name in section.keys() {
                        if !known.contains(format!("{key}.{name}").as_str()) {
                            errors
                                .push(format!("unknown setting `{key}.{name}` in the config file"));
                        }
                    }
                }
                _ if known.contains(key.as_str()) => {}
                _ => errors.push(format!("unknown setting `{key}` in the config file")),
            }
        }
        let mut r = Resolver { file, errors };
        let state_dir: Option<PathBuf> =
            r.get("state_dir", &args.state_dir, Some("/var/lib/edgefleet"));
        let default_socket = state_dir
            .as_ref()
            .map(|d| d.join("agent.sock").to_string_lossy().into_owned());
        let device_id = r.get::<DeviceId>("device_id", &args.device_id, None);
        let trust_root = r.get::<PathBuf>(
            "trust.root",
            &args.trust_root,
            Some("/etc/edgefleet/root-v1.cbor"),
        );
        let root_chain = r.get::<String>("trust.root_chain", &args.root_chain, Some(""));
        let keyring = r.get::<PathBuf>(
            "trust.keyring",
            &args.keyring,
            Some("/etc/edgefleet/keyring.cbor"),
        );
        let arch = r.get::<Arch>("arch", &args.arch, Some(std::env::consts::ARCH));
        let api_listen =
            r.get::<SocketAddr>("api.listen", &args.api_listen, Some("127.0.0.1:8470"));
        let api_socket =
            r.get::<PathBuf>("api.socket", &args.api_socket, default_socket.as_deref());
        let api_max_body_bytes = r.get::<usize>(
            "api.max_body_bytes",
            &args.api_max_body_bytes,
            Some("8388608"),
        );
        let model_memory_limit_mb = r.get::<u64>(
            "model.memory_limit_mb",
            &args.model_memory_limit_mb,
            Some("2048"),
        );
        let model_load_timeout_s = r.get::<u64>(
            "model.load_timeout_s",
            &args.model_load_timeout_s,
            Some("60"),
        );
        let shadow_queue = r.get::<usize>("model.shadow_queue", &args.shadow_queue, Some("64"));
        let log_format = r.get::<LogFormat>("log.format", &args.log_format, Some("plain"));
        let telemetry_window_s =
            r.get::<u64>("telemetry.window_s", &args.telemetry_window_s, Some("60"));
        let spool_max_bytes =
            r.get::<u64>("spool.max_bytes", &args.spool_max_bytes, Some("16777216"));
        let spool_max_age_s =
            r.get::<u64>("spool.max_age_s", &args.spool_max_age_s, Some("604800"));
        let download_max_bytes_per_s = r.get::<u64>(
            "download.max_bytes_per_s",
            &args.download_max_bytes_per_s,
            Some("0"),
        );
        let feedback_max_predictions = r.get::<usize>(
            "feedback.max_predictions",
            &args.feedback_max_predictions,
            Some("16384"),
        );
        let feedback_max_age_s =
            r.get::<u64>("feedback.max_age_s", &args.feedback_max_age_s, Some("3600"));
        let capture_max_bytes = r.get::<u64>(
            "capture.max_bytes",
            &args.capture_max_bytes,
            Some("67108864"),
        );
        let mqtt_url = r.get::<String>("mqtt.url", &args.mqtt_url, Some(""));
        let link = match mqtt_url.as_deref() {
            None | Some("") => None,
            Some(url) => {
                let ca = r.get::<PathBuf>("mqtt.ca", &args.mqtt_ca, None);
                let cert = r.get::<PathBuf>("mqtt.cert", &args.mqtt_cert, None);
                let key = r.get::<PathBuf>("mqtt.key", &args.mqtt_key, None);
                let mac_key = r.get::<PathBuf>("mqtt.mac_key", &args.mqtt_mac_key, None);
                let keep_alive_s =
                    r.get::<u64>("mqtt.keep_alive_s", &args.mqtt_keep_alive_s, Some("30"));
                let enroll_url = r.get::<String>("enroll.url", &args.enroll_url, Some(""));
                let enroll_token = r.get::<String>("enroll.token", &args.enroll_token, Some(""));
                let enroll = match (enroll_url.as_deref(), enroll_token.as_deref()) {
                    (Some(""), _) | (None, _) => None,
                    (Some(url), Some(token))
                        if !token.is_empty()
                            && (url.starts_with("https://") || url.starts_with("http://")) =>
                    {
                        Some((url.to_owned(), token.to_owned()))
                    }
                    (Some(url), _) => {
                        r.errors.push(format!(
                            "`enroll.url` = {url:?} needs an http(s) URL and `enroll.token`"
                        ));
                        None
                    }
                };
                let host_port = url
                    .strip_prefix("mqtts://")
                    .and_then(|rest| rest.rsplit_once(':'))
                    .and_then(|(host, port)| {
                        Some((
                            host.trim_matches(['[', ']']).to_owned(),
                            port.parse::<u16>().ok()?,
                        ))
                    });
                if host_port.is_none() {
                    r.errors
                        .push(format!("`mqtt.url` = {url:?} is not `mqtts://host:port`"));
                }
                // rumqttc refuses (panics on) keep-alives under 5 s.
                if let Some(keep_alive) = keep_alive_s
                    && keep_alive < 5
                {
                    r.errors.push(format!(
                        "`mqtt.keep_alive_s` = {keep_alive} is below the minimum 5"
                    ));
                }
                match (host_port, ca, cert, key, mac_key, keep_alive_s) {
                    (
                        Some((host, port)),
                        Some(ca),
                        Some(cert),
                        Some(key),
                        Some(mac_key),
                        Some(keep_alive_s),
                    ) => Some(LinkConfig {
                        mqtt: crate::mqtt::MqttConfig {
                            host,
                            port,
                            ca,
                            cert,
                            key,
                            keep_alive_s,
                        },
                        mac_key,
                        enroll,
                    }),
                    _ => None,
                }
            }
        };
        let mut errors = r.errors;
        if let Some(addr) = api_listen
            && !addr.ip().is_loopback()
        {
            errors.push(format!("`api.listen` = {addr}: the local API binds loopback only (127.0.0.0/8 or ::1); use the Unix socket for other local users"));
        }
        for (key, value, min) in [
            (
                "api.max_body_bytes",
                api_max_body_bytes.map(|v| v as u64),
                1024,
            ),
            ("model.memory_limit_mb", model_memory_limit_mb, 64),
            ("model.load_timeout_s", model_load_timeout_s, 1),
            ("model.shadow_queue", shadow_queue.map(|v| v as u64), 1),
            ("telemetry.window_s", telemetry_window_s, 1),
            ("spool.max_bytes", spool_max_bytes, 65_536),
            ("spool.max_age_s", spool_max_age_s, 60),
            ("feedback.max_age_s", feedback_max_age_s, 1),
            ("capture.max_bytes", capture_max_bytes, 1_048_576),
        ] {
            if let Some(value) = value
                && value < min
            {
                errors.push(format!("`{key}` = {value} is below the minimum {min}"));
            }
        }
        let root_chain: Vec<PathBuf> = root_chain
            .map(|chain| {
                chain
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let (
            Some(device_id),
            Some(state_dir),
            Some(trust_root),
            Some(keyring),
            Some(arch),
            Some(api_listen),
            Some(api_socket),
            Some(api_max_body_bytes),
            Some(model_memory_limit_mb),
            Some(model_load_timeout_s),
            Some(shadow_queue),
            Some(log_format),
            Some(telemetry_window_s),
            Some(spool_max_bytes),
            Some(spool_max_age_s),
            Some(download_max_bytes_per_s),
            Some(feedback_max_predictions),
            Some(feedback_max_age_s),
            Some(capture_max_bytes),
        ) = (
            device_id,
            state_dir,
            trust_root,
            keyring,
            arch,
            api_listen,
            api_socket,
            api_max_body_bytes,
            model_memory_limit_mb,
            model_load_timeout_s,
            shadow_queue,
            log_format,
            telemetry_window_s,
            spool_max_bytes,
            spool_max_age_s,
            download_max_bytes_per_s,
            feedback_max_predictions,
            feedback_max_age_s,
            capture_max_bytes,
        )
        else {
            return Err(ConfigErrors(vec![String::from("incomplete configuration")]));
        };
        Ok(Self {
            device_id,
            state_dir,
            trust_root,
            root_chain,
            keyring,
            arch,
            api_listen,
            api_socket,
            api_max_body_bytes,
            model_memory_limit_mb,
            model_load_timeout_s,
            shadow_queue,
            log_format,
            telemetry_window_s,
            spool_max_bytes,
            spool_max_age_s,
            download_max_bytes_per_s,
            feedback_max_predictions,
            feedback_max_age_s,
            capture_max_bytes,
            link,
        })
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    pub fn floors_path(&self) -> PathBuf {
        self.state_dir.join("floors.cbor")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    pub fn events_path(&self) -> PathBuf {
        self.state_dir.join("events.log")
    }

    pub fn capture_dir(&self) -> PathBuf {
        self.state_dir.join("capture")
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        let q =
            |p: &std::path::Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "device_id = {}",
            toml::Value::String(self.device_id.to_string())
        );
        let _ = writeln!(out, "state_dir = {}", q(&self.state_dir));
        let _ = writeln!(out, "arch = {}", toml::Value::String(self.arch.to_string()));
        let _ = writeln!(out, "\n[trust]\nroot = {}", q(&self.trust_root));
        let chain: Vec<String> = self.root_chain.iter().map(|p| q(p)).collect();
        let _ = writeln!(out, "root_chain = [{}]", chain.join(", "));
        let _ = writeln!(out, "keyring = {}", q(&self.keyring));
        let _ = writeln!(
            out,
            "\n[api]\nlisten = {}",
            toml::Value::String(self.api_listen.to_string())
        );
        let _ = writeln!(out, "socket = {}", q(&self.api_socket));
        let _ = writeln!(out, "max_body_bytes = {}", self.api_max_body_bytes);
        let _ = writeln!(
            out,
            "\n[model]\nmemory_limit_mb = {}",
            self.model_memory_limit_mb
        );
        let _ = writeln!(out, "load_timeout_s = {}", self.model_load_timeout_s);
        let _ = writeln!(out, "shadow_queue = {}", self.shadow_queue);
        let format = match self.log_format {
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        };
        let _ = writeln!(out, "\n[log]\nformat = \"{format}\"");
        let _ = writeln!(out, "\n[telemetry]\nwindow_s = {}", self.telemetry_window_s);
        let _ = writeln!(out, "\n[spool]\nmax_bytes = {}", self.spool_max_bytes);
        let _ = writeln!(out, "max_age_s = {}", self.spool_max_age_s);
        let _ = writeln!(
            out,
            "\n[download]\nmax_bytes_per_s = {}",
            self.download_max_bytes_per_s
        );
        let _ = writeln!(
            out,
            "\n[feedback]\nmax_predictions = {}\nmax_age_s = {}",
            self.feedback_max_predictions, self.feedback_max_age_s
        );
        let _ = writeln!(out, "\n[capture]\nmax_bytes = {}", self.capture_max_bytes);
        if let Some(link) = &self.link {
            let _ = writeln!(
                out,
                "\n[mqtt]\nurl = \"mqtts://{}:{}\"",
                link.mqtt.host, link.mqtt.port
            );
            let _ = writeln!(
                out,
                "ca = {}\ncert = {}\nkey = {}",
                q(&link.mqtt.ca),
                q(&link.mqtt.cert),
                q(&link.mqtt.key)
            );
            let _ = writeln!(
                out,
                "mac_key = {}\nkeep_alive_s = {}",
                q(&link.mac_key),
                link.mqtt.keep_alive_s
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_with_file(text: &str) -> (tempfile::TempDir, ConfigArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        (
            dir,
            ConfigArgs {
                config: Some(path),
                ..Default::default()
            },
        )
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let (_dir, args) = args_with_file(
            "device_id = \"a/b\"\nbogus = 1\n[api]\nlisten = \"0.0.0.0:80\"\nmax_body_bytes = \"lots\"\nport = 3\n[model]\nmemory_limit_mb = 1\n",
        );
        let err = AgentConfig::resolve(&args).unwrap_err();
        let text = err.to_string();
        for needle in [
            "`device_id` (config file) = \"a/b\": device id \"a/b\" contains '/'",
            "unknown setting `bogus`",
            "unknown setting `api.port`",
            "`api.max_body_bytes` (config file) = \"lots\"",
            "binds loopback only",
            "`model.memory_limit_mb` = 1 is below the minimum 64",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.0.len(), 6, "{text}");
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let (_dir, mut args) = args_with_file(
            "device_id = \"from-file\"\nstate_dir = \"/data/ef\"\n[model]\nshadow_queue = 8\n",
        );
        args.device_id = Some(String::from("from-flag"));
        let config = AgentConfig::resolve(&args).unwrap();
        assert_eq!(config.device_id.as_str(), "from-flag");
        assert_eq!(config.state_dir, PathBuf::from("/data/ef"));
        assert_eq!(config.api_socket, PathBuf::from("/data/ef/agent.sock"));
        assert_eq!(config.shadow_queue, 8);
        assert_eq!(config.api_listen.to_string(), "127.0.0.1:8470");
        assert_eq!(
            config.download_max_bytes_per_s, 0,
            "no bandwidth cap by default"
        );
        let printed = config.to_toml();
        let again: toml::Table = printed.parse().unwrap();
        assert_eq!(again["device_id"].as_str(), Some("from-flag"));
        assert_eq!(again["download"]["max_bytes_per_s"].as_integer(), Some(0));
    }

    #[test]
    fn the_packaged_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/agent.toml");
        let config = AgentConfig::resolve(&ConfigArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.device_id.as_str(), "pump-0001");
        assert_eq!(config.model_memory_limit_mb, 2048);
    }

    #[test]
    fn mqtt_settings_are_checked_together() {
        let (_dir, mut args) = args_with_file(
            "device_id = \"d\"\n[mqtt]\nurl = \"mqtt://broker:1883\"\nkeep_alive_s = 2\n",
        );
        args.config = args.config.clone();
        let err = AgentConfig::resolve(&args).unwrap_err().to_string();
        for needle in [
            "is not `mqtts://host:port`",
            "`mqtt.keep_alive_s` = 2 is below the minimum 5",
            "`mqtt.ca` is required",
            "`mqtt.mac_key` is required",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn a_missing_device_id_says_how_to_set_it() {
        let err = AgentConfig::resolve(&ConfigArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`device_id` is required: set it in the config file, with --device-id or with EDGEFLEET_DEVICE_ID"), "{err}");
    }
}
