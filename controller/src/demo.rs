//! `edgefleet-controller demo`: the whole loop on one machine, for real. It starts a controller
//! with its embedded broker and SQLite, registers the pump-sensor anomaly model the repo trains
//! (`controller/demo/`), issues enrollment tokens, starts real `edgefleet-agent` processes that
//! enroll over HTTPS and connect over mTLS, assigns the model, sends inference requests to every
//! agent's local API, and waits until their telemetry is ingested.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use edgefleet_protocol::DeviceId;
use serde_json::json;

use crate::server::api;
use crate::server::config::ServeArgs;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 3)]
    pub agents: u16,
    /// The agent binary (default: `edgefleet-agent` next to this executable).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// The ONNX model to roll out (default: the repo's pump-sensor model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Its reference CSV for drift statistics.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Inference requests per agent.
    #[arg(long, default_value_t = 200)]
    pub requests: u32,
    /// Keep everything running after the tour until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// Agent processes, killed on drop.
struct Agents(Vec<(String, Child, PathBuf)>);

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends an admin API request; its JSON answer, or an error with `failure` and the answer.
async fn api_json(request: reqwest::RequestBuilder, failure: &str) -> Result<serde_json::Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if !status.is_success() {
        bail!("{failure}: {body}");
    }
    Ok(body)
}

fn demo_asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("demo")
        .join(name)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

pub async fn run(serve: &ServeArgs, args: &DemoArgs) -> Result<()> {
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| demo_asset("sensor-anomaly.onnx"));
    let reference = args
        .reference
        .clone()
        .or_else(|| args.model.is_none().then(|| demo_asset("reference.csv")));
    if !model.exists() {
        bail!(
            "the demo model {} is missing; regenerate it with `python3 controller/demo/train_sensor_model.py` or pass --model",
            model.display()
        );
    }
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no executable directory")?
            .join("edgefleet-agent"),
    };
    if !agent_bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p edgefleet-agent`) or pass --agent-bin",
            agent_bin.display()
        );
    }

    // A fresh demo directory each run, unless the user pointed --data-dir somewhere.
    let mut serve = serve.clone();
    if serve.data_dir == Path::new("edgefleet-data") {
        serve.data_dir = PathBuf::from("edgefleet-demo");
        if serve.data_dir.join(".edgefleet-demo").exists() {
            std::fs::remove_dir_all(&serve.data_dir)?;
        }
    }
    crate::fsutil::create_private_dir(&serve.data_dir)?;
    std::fs::write(serve.data_dir.join(".edgefleet-demo"), b"")?;
    let data_dir = std::fs::canonicalize(&serve.data_dir)?;
    serve.data_dir = data_dir.clone();
    serve.listen = format!("127.0.0.1:{}", free_port()?).parse()?;
    serve.device_listen = format!("127.0.0.1:{}", free_port()?).parse()?;
    serve.mqtt_listen = format!("127.0.0.1:{}", free_port()?).parse()?;

    step(
        1,
        "Starting the controller (embedded MQTT broker, SQLite, fleet CA, signing keys)",
    );
    let running = crate::server::start(&serve).await?;
    let app = running.app.clone();
    println!(
        "    API http://{}   device endpoint https://{}   broker mqtts://{}",
        running.api, running.devices, serve.mqtt_listen
    );
    let admin = std::fs::read_to_string(data_dir.join("admin-token"))
        .context("the admin token was not written")?;
    let admin = admin.trim().to_owned();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(crate::server::pki::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
        .build()?;
    let api_url = format!("http://{}", running.api);

    step(
        2,
        &format!(
            "Registering {} (validated and test-run with tract, signed)",
            model.display()
        ),
    );
    let mut form = reqwest::multipart::Form::new()
        .text(
            "metadata",
            json!({
                "name": "pump-anomaly",
                "version": "1.0.0",
                "description": "pump sensor anomaly classifier",
                "lineage": {"code_commit": "demo", "parameters": {"trainer": "controller/demo/train_sensor_model.py"}},
                // A short health-check window after activation keeps the tour brisk.
                "runtime": {"grace_window_s": 5},
            })
            .to_string(),
        )
        .part(
            "model",
            reqwest::multipart::Part::bytes(std::fs::read(&model)?).file_name("model.onnx"),
        );
    if let Some(reference) = &reference {
        form = form.part(
            "reference",
            reqwest::multipart::Part::bytes(std::fs::read(reference)?).file_name("reference.csv"),
        );
    }
    let registered = api_json(
        http.post(format!("{api_url}/api/v1/models"))
            .bearer_auth(&admin)
            .multipart(form),
        "registration failed",
    )
    .await?;
    let digest = registered["digest"].as_str().unwrap_or_default().to_owned();
    println!(
        "    {} {} release {} → manifest {}… ({} signature(s), {})",
        registered["name"].as_str().unwrap_or_default(),
        registered["version"].as_str().unwrap_or_default(),
        registered["release"],
        &digest[..16.min(digest.len())],
        registered["signatures"],
        registered["state"].as_str().unwrap_or_default()
    );

    step(
        3,
        &format!(
            "Enrolling {} agents (one-time tokens → CSR → fleet CA certificate)",
            args.agents
        ),
    );
    let mut agents = Agents(Vec::new());
    for i in 1..=args.agents {
        let device = format!("pump-{i:02}");
        let line = if device.ends_with('1') { "a" } else { "b" };
        let created = api_json(
            http.post(format!("{api_url}/api/v1/enroll-tokens"))
                .bearer_auth(&admin)
                .json(&json!({"labels": {"site": "demo", "line": line}, "expires_in_s": 3600})),
            "cannot create an enrollment token",
        )
        .await?;
        let token = created["token"].as_str().unwrap_or_default().to_owned();
        let state = data_dir.join("agents").join(&device);
        std::fs::create_dir_all(&state)?;
        let api_port = free_port()?;
        // The fleet CA ships with the device image; enrollment gives it the rest.
        std::fs::write(state.join("ca.pem"), &app.ca.ca_pem)?;
        let log = std::fs::File::create(state.join("agent.log"))?;
        let child = Command::new(&agent_bin)
            .env("EDGEFLEET_DEVICE_ID", &device)
            .env("EDGEFLEET_STATE_DIR", &state)
            .env("EDGEFLEET_API_LISTEN", format!("127.0.0.1:{api_port}"))
            .env("EDGEFLEET_TRUST_ROOT", app.keys.root_anchor_path())
            .env("EDGEFLEET_KEYRING", app.keys.keyring_path())
            .env("EDGEFLEET_ENROLL_URL", &app.device_url)
            .env("EDGEFLEET_ENROLL_TOKEN", &token)
            .env("EDGEFLEET_API_SOCKET", state.join("api.sock"))
            .env("EDGEFLEET_MQTT_URL", &app.device_mqtt_url)
            .env("EDGEFLEET_MQTT_CA", state.join("ca.pem"))
            .env("EDGEFLEET_MQTT_CERT", state.join("device.pem"))
            .env("EDGEFLEET_MQTT_KEY", state.join("device.key"))
            .env("EDGEFLEET_MQTT_MAC_KEY", state.join("mac.key"))
            .env("EDGEFLEET_TELEMETRY_WINDOW_S", "5")
            .env("EDGEFLEET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", agent_bin.display()))?;
        agents.0.push((device, child, state.clone()));
    }
    wait_for(
        Duration::from_secs(60),
        "every agent to enroll and connect",
        || async {
            let devices = app.store.list_devices().await.ok()?;
            (devices.iter().filter(|d| d.online).count() == usize::from(args.agents)).then_some(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "agent logs are in {}/agents/*/agent.log",
            data_dir.display()
        )
    })?;
    println!("    {} devices enrolled and online", args.agents);

    step(
        4,
        "Assigning the model to every device (signed, retained assignments)",
    );
    let model_row = app.store.get_model(&digest).await?;
    for (device, _, _) in &agents.0 {
        api::issue_assignment(
            &app,
            "token:admin",
            &DeviceId::new(device)?,
            Some(&model_row),
            None,
            false,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    }
    wait_for(
        Duration::from_secs(90),
        "every device to activate the model",
        || async {
            let devices = app.store.list_devices().await.ok()?;
            devices
                .iter()
                .all(|d| d.active_digest.as_deref() == Some(digest.as_str()))
                .then_some(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "agent logs are in {}/agents/*/agent.log",
            data_dir.display()
        )
    })?;
    println!(
        "    all devices activated {}… after download, verification and self-test",
        &digest[..16]
    );

    step(
        5,
        &format!(
            "Sending {} inference requests to each agent's local API",
            args.requests
        ),
    );
    let rows = sample_rows(reference.as_deref(), args.requests as usize)?;
    for (device, _, state) in &agents.0 {
        let socket = state.join("api.sock");
        let mut client = edgefleet_client::Client::unix(&socket);
        let mut answered = 0;
        let mut last = None;
        let mut error = None;
        for row in &rows {
            let input = edgefleet_client::Tensor::f32(vec![1, 4], row.clone());
            match client.infer(&[("features", input)]) {
                Ok(reply) => {
                    answered += 1;
                    last = Some(reply);
                }
                Err(err) => error = Some(err.to_string()),
            }
        }
        let last = last
            .and_then(|r| {
                r.outputs
                    .iter()
                    .next()
                    .map(|(name, t)| format!(", last {name} = {:?} in {} µs", t.data, r.latency_us))
            })
            .unwrap_or_default();
        println!("    {device}: {answered}/{} answered{last}", rows.len());
        if let Some(err) = error {
            println!("    {device}: some requests failed: {err}");
        }
    }

    step(
        6,
        "Waiting for the telemetry windows (spooled on the device, acked after commit)",
    );
    let expected = u64::from(args.agents) * u64::from(args.requests);
    wait_for(
        Duration::from_secs(120),
        "the telemetry of those requests",
        || async {
            let mut seen = 0u64;
            for device in app.store.list_devices().await.ok()? {
                for report in app
                    .store
                    .recent_reports(&device.id, Some("telemetry"), 1000)
                    .await
                    .ok()?
                {
                    seen += report.body["inferences"].as_u64().unwrap_or(0);
                }
            }
            (seen >= expected).then_some(())
        },
    )
    .await?;
    for (device, _, _) in &agents.0 {
        let windows = app
            .store
            .recent_reports(device, Some("telemetry"), 1000)
            .await?;
        let inferences: u64 = windows
            .iter()
            .map(|w| w.body["inferences"].as_u64().unwrap_or(0))
            .sum();
        println!(
            "    {device}: {} telemetry windows, {inferences} inferences ingested",
            windows.len()
        );
    }
    let audit = app.store.audit_rows(0, 100_000).await?;
    let head = crate::server::audit::verify(audit, None).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "    audit log: {} rows, hash chain intact (head {}…)",
        head.rows,
        &head.head_hash[..16]
    );

    println!(
        "\nDone. Where to look next (with --keep-running, while the demo runs):\n\
         \x20 curl -H \"Authorization: Bearer $(cat {dir}/admin-token)\" {api_url}/api/v1/devices\n\
         \x20 curl -H \"Authorization: Bearer $(cat {dir}/admin-token)\" {api_url}/api/v1/audit/verify\n\
         \x20 {api_url}/metrics   ·   {api_url}/api/v1/openapi.json\n\
         \x20 agent logs: {dir}/agents/*/agent.log   ·   everything the demo made: {dir}",
        dir = data_dir.display()
    );
    if args.keep_running {
        println!("\nRunning until Ctrl-C.");
        tokio::signal::ctrl_c().await?;
    }
    drop(agents);
    // Let the agents' last wills ("offline") reach the store before it closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.store.close().await;
    Ok(())
}

/// Rows of the reference CSV (or a fixed pattern) as model inputs.
fn sample_rows(reference: Option<&Path>, n: usize) -> Result<Vec<Vec<f32>>> {
    let mut rows = Vec::new();
    if let Some(path) = reference {
        let mut reader = csv::Reader::from_path(path)?;
        for record in reader.records() {
            let record = record?;
            rows.push(
                record
                    .iter()
                    .map(|v| v.trim().parse::<f32>().unwrap_or(0.0))
                    .collect(),
            );
            if rows.len() == n {
                break;
            }
        }
    }
    if rows.is_empty() {
        rows.push(vec![0.0; 4]);
    }
    let base = rows.clone();
    while rows.len() < n {
        rows.push(base[rows.len() % base.len()].clone());
    }
    Ok(rows)
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<()>>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}
