//! Command line of `edgefleet-controller`. Every flag has an `EDGEFLEET_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-controller",
    version,
    about = "EdgeFleet fleet controller: registry, enrollment, rollouts, telemetry, audit log"
)]
pub struct ControllerCli {
    #[command(subcommand)]
    pub command: Option<ControllerCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Run the controller (the default).
    Serve,
    /// A guided demo: a controller, a real model, enrolled agents, an assignment, inference.
    Demo(crate::demo::DemoArgs),
    /// Write a Mosquitto configuration (mTLS, identity as username, per-device ACL) for this
    /// controller's fleet CA, to run the broker in production.
    MosquittoConfig(MosquittoConfigArgs),
    /// Builds and test-runs one uploaded model in isolation (run by the controller itself).
    #[command(hide = true)]
    ValidateModel,
}

#[derive(Debug, Clone, Args)]
pub struct MosquittoConfigArgs {
    /// Directory to write mosquitto.conf, acl and the certificates into.
    #[arg(long, default_value = "mosquitto")]
    pub out: PathBuf,
    /// Address the broker listens on.
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub listen: SocketAddr,
    /// Host names and addresses devices use to reach the broker (its certificate names).
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
}

/// Where the controller finds its MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttMode {
    /// Start the embedded broker (rumqttd) on `--mqtt-listen`.
    Embedded,
    /// An external broker at `mqtts://host:port`.
    External { host: String, port: u16 },
}

impl FromStr for MqttMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            return Ok(MqttMode::Embedded);
        }
        let rest = s.strip_prefix("mqtts://").ok_or_else(|| {
            format!("--mqtt {s:?}: use `embedded` or mqtts://HOST:PORT (TLS is required)")
        })?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("--mqtt {s:?}: missing :PORT"))?;
        let port = port
            .trim_end_matches('/')
            .parse::<u16>()
            .map_err(|_| format!("--mqtt {s:?}: the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("--mqtt {s:?}: missing host"));
        }
        Ok(MqttMode::External {
            host: host.to_owned(),
            port,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// State directory: database (SQLite), fleet CA, keys, bundles.
    #[arg(
        long,
        env = "EDGEFLEET_DATA_DIR",
        default_value = "edgefleet-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Database URL: sqlite://PATH (default: <data-dir>/edgefleet.db) or postgres://USER@HOST/DB.
    #[arg(long, env = "EDGEFLEET_DATABASE", global = true)]
    pub database: Option<String>,
    /// `embedded` (rumqttd in-process, small fleets) or mqtts://HOST:PORT of an external broker.
    #[arg(
        long,
        env = "EDGEFLEET_MQTT",
        default_value = "embedded",
        global = true
    )]
    pub mqtt: MqttMode,
    /// Where the embedded broker listens (TLS, client certificates required).
    #[arg(
        long,
        env = "EDGEFLEET_MQTT_LISTEN",
        default_value = "127.0.0.1:8883",
        global = true
    )]
    pub mqtt_listen: SocketAddr,
    /// Where the controller keeps the fleet CA's certificate revocation list (PEM), rewritten
    /// atomically on start, on every revocation and daily. Point Mosquitto's `crlfile` here
    /// (`mosquitto-config` does). Default: <data-dir>/pki/crl.pem.
    #[arg(long, env = "EDGEFLEET_CRL_FILE", global = true)]
    pub crl_file: Option<PathBuf>,
    /// A shell command run after each CRL write, to make the broker re-read it (Mosquitto reads
    /// `crlfile` only at start and on SIGHUP), e.g. `systemctl reload mosquitto`. It gets the
    /// file's path in EDGEFLEET_CRL_FILE.
    #[arg(long, env = "EDGEFLEET_CRL_RELOAD_COMMAND", global = true)]
    pub crl_reload_command: Option<String>,
    /// The broker URL handed to devices at enrollment (default: derived from the above).
    #[arg(long, env = "EDGEFLEET_DEVICE_MQTT_URL", global = true)]
    pub device_mqtt_url: Option<String>,
    /// The admin API (HTTP; keep it on loopback or behind a TLS proxy).
    #[arg(
        long,
        env = "EDGEFLEET_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,
    /// The device endpoint (HTTPS): enrollment and bundle downloads.
    #[arg(
        long,
        env = "EDGEFLEET_DEVICE_LISTEN",
        default_value = "127.0.0.1:8443",
        global = true
    )]
    pub device_listen: SocketAddr,
    /// Host name or address devices use to reach this controller (default: the listen address).
    #[arg(long, env = "EDGEFLEET_ADVERTISE", global = true)]
    pub advertise: Option<String>,
    /// Extra names for the server certificate (repeatable).
    #[arg(
        long = "hostname",
        env = "EDGEFLEET_HOSTNAMES",
        value_delimiter = ',',
        global = true
    )]
    pub hostnames: Vec<String>,
    /// Trust directory (`edgefleet keys` layout). Default: <data-dir>/keys, created on first
    /// start with a single-machine root.
    #[arg(long, env = "EDGEFLEET_KEYS_DIR", global = true)]
    pub keys_dir: Option<PathBuf>,
    /// The first admin token (efk_ + 64 hex digits); generated when absent.
    #[arg(
        long,
        env = "EDGEFLEET_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Largest model upload, in MiB.
    #[arg(
        long,
        env = "EDGEFLEET_MAX_UPLOAD_MIB",
        default_value_t = 512,
        global = true
    )]
    pub max_upload_mib: u64,
    /// API requests per minute per token (and enrollment attempts per minute per address).
    #[arg(
        long,
        env = "EDGEFLEET_RATE_LIMIT",
        default_value_t = 600,
        global = true
    )]
    pub rate_limit_per_minute: u32,
    /// Address-space limit of the child process that validates each uploaded model, in MiB.
    #[arg(
        long,
        env = "EDGEFLEET_VALIDATION_MEMORY_MIB",
        default_value_t = crate::server::validate::DEFAULT_MEMORY_MIB,
        global = true
    )]
    pub validation_memory_mib: u64,
    /// The executable run as `<it> validate-model` for each upload (default: this program).
    #[arg(long, env = "EDGEFLEET_VALIDATOR", global = true, hide = true)]
    pub validator: Option<PathBuf>,
}

impl ServeArgs {
    /// The CRL file: `--crl-file`, else `<data-dir>/pki/crl.pem`.
    pub fn crl_path(&self) -> PathBuf {
        self.crl_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki").join("crl.pem"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_modes_parse_with_clear_errors() {
        assert_eq!("embedded".parse::<MqttMode>().unwrap(), MqttMode::Embedded);
        assert_eq!(
            "mqtts://broker.example:8883".parse::<MqttMode>().unwrap(),
            MqttMode::External {
                host: "broker.example".into(),
                port: 8883
            }
        );
        assert!(
            "mqtt://b:1883"
                .parse::<MqttMode>()
                .unwrap_err()
                .contains("TLS is required")
        );
        assert!(
            "mqtts://b"
                .parse::<MqttMode>()
                .unwrap_err()
                .contains("PORT")
        );
    }
}
