//! A real `edgefleet-controller` process for tests, driven over its admin API: free loopback
//! ports, its own data directory, the embedded broker or an external one, SQLite or PostgreSQL.
//! Agents enroll with one-time tokens from the API, as on a real device. SIGKILLed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::agent::{AgentProcess, free_port, wait_until};
use crate::{Run, bin, run_ok};

/// Bound on one HTTP exchange (a model upload runs tract; the machine may be busy).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the controller's start (the fleet CA and keys are made on first start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How to run the controller.
#[derive(Debug, Clone, Default)]
pub struct ControllerSpec {
    /// `--database` (default: SQLite in the data directory).
    pub database: Option<String>,
    /// An external broker on this loopback address (`--mqtt mqtts://127.0.0.1:PORT`), and the
    /// `--crl-reload-command` that makes it re-read the CRL.
    pub external: Option<(SocketAddr, String)>,
}

/// A status code and a JSON body (`Null` when the body is not JSON).
pub type Reply = (u16, Value);

#[derive(Debug)]
pub struct ControllerProcess {
    child: Option<Child>,
    spec: ControllerSpec,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub devices: SocketAddr,
    /// The broker the devices use: the embedded one or the external one.
    pub mqtt: SocketAddr,
    pub log: PathBuf,
    token: String,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

/// `edgefleet-controller mosquitto-config` for the controller with data in `data_dir`: a broker
/// on `listen`, its files in `out`.
pub fn mosquitto_config(data_dir: &Path, out: &Path, listen: SocketAddr) -> Run {
    run_ok(
        Command::new(bin("edgefleet-controller"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("mosquitto-config")
            .arg("--out")
            .arg(out)
            .args(["--listen", &listen.to_string()])
            .env("EDGEFLEET_LOG", "warn"),
    )
}

/// For the admin API, which is plain HTTP on loopback: no roots, no client certificate.
fn no_tls() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth()
}

fn http_client(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The files an enrolled agent keeps in its state directory.
pub fn device_identity(state_dir: &Path) -> crate::broker::CertFiles {
    crate::broker::CertFiles {
        cert: state_dir.join("device.pem"),
        key: state_dir.join("device.key"),
    }
}

impl ControllerProcess {
    /// Starts the controller with its state in `data_dir` and waits until its API answers.
    pub fn start(data_dir: &Path, spec: &ControllerSpec) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the data directory");
        let (api, devices) = (free_port(), free_port());
        let mqtt = match &spec.external {
            Some((broker, _)) => *broker,
            None => free_port(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut controller = Self {
            child: None,
            spec: spec.clone(),
            data_dir: data_dir.to_owned(),
            api,
            devices,
            mqtt,
            log: data_dir.with_extension("log"),
            token: String::new(),
            http: http_client(no_tls()),
            runtime,
        };
        controller.spawn();
        controller
    }

    /// Starts the process on this controller's data directory and ports, and waits until its
    /// API answers.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("controller log");
        let mut command = Command::new(bin("edgefleet-controller"));
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &self.api.to_string()])
            .args(["--device-listen", &self.devices.to_string()])
            // The tests poll the API every 20 ms.
            .args(["--rate-limit-per-minute", "1000000"])
            .env("EDGEFLEET_LOG", "info,rumqttd=warn,rumqttc=warn,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(database) = &self.spec.database {
            command.args(["--database", database]);
        }
        match &self.spec.external {
            Some((broker, reload)) => {
                command
                    .args(["--mqtt", &format!("mqtts://{broker}")])
                    .args(["--crl-reload-command", reload]);
            }
            None => {
                command.args(["--mqtt-listen", &self.mqtt.to_string()]);
            }
        }
        self.child = Some(command.spawn().expect("start edgefleet-controller"));
        let (api, data_dir) = (self.api, self.data_dir.clone());
        let token = wait_until(START_TIMEOUT, "the controller's API", || {
            self.assert_running();
            let token = std::fs::read_to_string(data_dir.join("admin-token")).ok()?;
            let url = format!("http://{api}/healthz");
            let up = self
                .runtime
                .block_on(async { self.http.get(&url).send().await.ok() })?;
            up.status().is_success().then(|| token.trim().to_owned())
        });
        self.token = token;
    }

    /// SIGKILLs the controller: no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data directory and ports (after [`Self::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The admin token, for the `edgefleet` CLI (`EDGEFLEET_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `EDGEFLEET_URL` and `EDGEFLEET_TOKEN` for an `edgefleet` CLI talking to this controller.
    pub fn cli_env(&self) -> [(&'static str, String); 2] {
        [
            ("EDGEFLEET_URL", format!("http://{}", self.api)),
            ("EDGEFLEET_TOKEN", self.token.clone()),
        ]
    }

    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("controller running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the controller exited ({status}); log:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The controller's process id (to read its memory use).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The fleet CA certificate (what a device image ships with).
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("pki/ca.pem")
    }

    /// The controller's own MQTT identity (its certificate and key in the PKI directory).
    pub fn controller_identity(&self) -> crate::broker::CertFiles {
        crate::broker::CertFiles {
            cert: self.data_dir.join("pki/controller.pem"),
            key: self.data_dir.join("pki/controller.key"),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        let request = self
            .http
            .get(format!("http://{}{path}", self.api))
            .bearer_auth(&self.token);
        self.runtime
            .block_on(async { reply(request.send().await.expect("GET")).await })
    }

    /// A text answer (e.g. the audit export, JSON lines); panics on a non-2xx status.
    pub fn get_text(&self, path: &str) -> String {
        let request = self
            .http
            .get(format!("http://{}{path}", self.api))
            .bearer_auth(&self.token);
        self.runtime.block_on(async {
            let response = request.send().await.expect("GET");
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            assert!(status.is_success(), "GET {path}: {status} {text}");
            text
        })
    }

    /// `edgefleet` (the admin CLI) set up for this controller: its URL and admin token in the
    /// environment, a CLI config file of its own.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(bin("edgefleet"));
        command
            .env("EDGEFLEET_URL", format!("http://{}", self.api))
            .env("EDGEFLEET_TOKEN", &self.token)
            .env("EDGEFLEET_CONFIG", self.data_dir.with_extension("cli.toml"))
            .env_remove("EDGEFLEET_PROFILE");
        command
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        let request = self
            .http
            .post(format!("http://{}{path}", self.api))
            .bearer_auth(&self.token)
            .json(body);
        self.runtime
            .block_on(async { reply(request.send().await.expect("POST")).await })
    }

    /// Registers the repo's pump-sensor model (`controller/demo/`); returns its manifest digest.
    pub fn register_demo_model(&self) -> String {
        self.register_demo_model_for("any")
    }

    /// Registers the demo model as a release for devices of `arch` only (`aarch64`, …, `any`).
    pub fn register_demo_model_for(&self, arch: &str) -> String {
        self.register_demo_version(json!({"name": "pump-anomaly", "version": "1.0.0", "arch": arch, "runtime": {"grace_window_s": 1}}))
    }

    /// Registers the pump-sensor model under the registration `metadata` given (name, version,
    /// schema overrides, runtime settings, lineage); returns its manifest digest.
    pub fn register_demo_version(&self, metadata: Value) -> String {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/demo");
        let model = std::fs::read(demo.join("sensor-anomaly.onnx")).expect("the demo model");
        let reference = std::fs::read(demo.join("reference.csv")).expect("the demo reference");
        let form = reqwest::multipart::Form::new()
            .text("metadata", metadata.to_string())
            .part(
                "model",
                reqwest::multipart::Part::bytes(model).file_name("model.onnx"),
            )
            .part(
                "reference",
                reqwest::multipart::Part::bytes(reference).file_name("reference.csv"),
            );
        let request = self
            .http
            .post(format!("http://{}/api/v1/models", self.api))
            .bearer_auth(&self.token)
            .multipart(form);
        let (status, body) = self
            .runtime
            .block_on(async { reply(request.send().await.expect("upload")).await });
        assert_eq!(status, 201, "model registration: {body}");
        body["digest"].as_str().expect("a digest").to_owned()
    }

    /// Starts an `edgefleet-agent` for `device` with its state in `state_dir`; it enrolls over
    /// HTTPS with a fresh one-time token and connects to the broker with its new identity.
    pub fn enroll_agent(&self, device: &str, state_dir: &Path) -> AgentProcess {
        self.enroll_agent_via(&[], &bin("edgefleet-agent"), device, state_dir)
    }

    /// `enroll_agent` with another agent binary, run as `runner… agent` (e.g. an aarch64 build
    /// under `cross/qemu-run aarch64`).
    pub fn enroll_agent_via(
        &self,
        runner: &[std::ffi::OsString],
        agent: &Path,
        device: &str,
        state_dir: &Path,
    ) -> AgentProcess {
        let (status, created) = self.post(
            "/api/v1/enroll-tokens",
            &json!({"labels": {"site": "test"}, "expires_in_s": 600}),
        );
        assert!((200..300).contains(&status), "enrollment token: {created}");
        let token = created["token"].as_str().expect("a token");
        std::fs::create_dir_all(state_dir).expect("state dir");
        std::fs::copy(self.ca_path(), state_dir.join("ca.pem")).expect("ship the fleet CA");
        let path = |name: &str| state_dir.join(name).to_string_lossy().into_owned();
        let keys = self.data_dir.join("keys");
        let env = [
            ("EDGEFLEET_DEVICE_ID", device.to_owned()),
            ("EDGEFLEET_ENROLL_URL", format!("https://{}", self.devices)),
            ("EDGEFLEET_ENROLL_TOKEN", token.to_owned()),
            ("EDGEFLEET_MQTT_URL", format!("mqtts://{}", self.mqtt)),
            ("EDGEFLEET_MQTT_CA", path("ca.pem")),
            ("EDGEFLEET_MQTT_CERT", path("device.pem")),
            ("EDGEFLEET_MQTT_KEY", path("device.key")),
            ("EDGEFLEET_MQTT_MAC_KEY", path("mac.key")),
            ("EDGEFLEET_TELEMETRY_WINDOW_S", "2".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        AgentProcess::start_via(
            runner,
            agent,
            (&keys.join("root-v1.cbor"), &keys.join("keyring.cbor")),
            state_dir,
            &env,
        )
    }

    /// The device as the API lists it.
    pub fn device(&self, device: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/devices/{device}"));
        assert_eq!(status, 200, "device {device}: {body}");
        body["device"].clone()
    }

    /// Waits until `check` holds for the device as the API lists it.
    pub fn wait_device(&self, device: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_until(
            Duration::from_secs(90),
            &format!("{device}: {what}"),
            || {
                let row = self.device(device);
                check(&row).then_some(row)
            },
        )
    }

    /// The device's stored telemetry windows: (how many, the inferences they count).
    pub fn telemetry(&self, device: &str) -> (usize, u64) {
        let (status, body) = self.get(&format!(
            "/api/v1/devices/{device}/reports?kind=telemetry&limit=10000"
        ));
        assert_eq!(status, 200, "reports of {device}: {body}");
        let windows = body["reports"].as_array().expect("reports");
        let inferences = windows
            .iter()
            .map(|w| w["body"]["inferences"].as_u64().unwrap_or(0))
            .sum();
        (windows.len(), inferences)
    }

    /// Downloads bundle `digest` from the device endpoint as the enrolled device whose state is
    /// in `state_dir` (its client certificate); returns the status and the body's length.
    pub fn download_as(&self, state_dir: &Path, digest: &str) -> (u16, usize) {
        let identity = device_identity(state_dir);
        let client = http_client(crate::mqtt_tls(&self.ca_path(), &identity));
        let url = format!("https://{}/api/v1/bundles/{digest}", self.devices);
        self.runtime.block_on(async {
            let response = client.get(&url).send().await.expect("bundle request");
            let status = response.status().as_u16();
            (status, response.bytes().await.map_or(0, |b| b.len()))
        })
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
