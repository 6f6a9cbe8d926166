//! The worker process: caps its own address space, loads the active (and shadow) model, runs the
//! self-test, reports to the supervisor, then serves the local API until told to drain. Whatever a
//! model does — panic, abort, exhaust memory — ends at most this process.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use edgefleet_client::api::ModelSummary;
use edgefleet_protocol::messages::{FailureCode, ModelRef};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::api::{self, ApiState, Served};
use crate::control::{LoadReport, ModelSpec, WorkerCommand, WorkerEvent, WorkerSpec, WorkerStats};
use crate::feedback::{FeedbackLimits, PredictionLog};
use crate::runtime::{GoldenError, LoadedModel, RuntimeError};
use crate::store::{check_model_dir, read_manifest};
use crate::telemetry::WindowAcc;

static STDOUT: Mutex<()> = Mutex::new(());

/// Writes one event line to the supervisor.
pub fn emit(event: &WorkerEvent) {
    let _guard = STDOUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(event) {
        // If the supervisor is gone there is nobody to tell; the stdin EOF ends this process.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Loads and self-tests one model.
pub fn load(spec: &ModelSpec) -> Result<(Served, LoadReport), (FailureCode, String)> {
    check_model_dir(&spec.dir, &spec.slot).map_err(|err| (FailureCode::PayloadHash, err))?;
    let manifest = read_manifest(&spec.dir).map_err(|err| (FailureCode::Io, format!("{err:#}")))?;
    let payload = manifest.model_payload().ok_or((
        FailureCode::ModelLoad,
        String::from("the bundle has no model payload"),
    ))?;
    let model =
        LoadedModel::load(&spec.dir.join(payload.name.as_str()), &manifest).map_err(|err| {
            let code = match err {
                RuntimeError::UnsupportedOp { .. } => FailureCode::UnsupportedOp,
                RuntimeError::Panic(_) => FailureCode::Crash,
                _ => FailureCode::ModelLoad,
            };
            (code, err.to_string())
        })?;
    let latency_us = if manifest.golden.is_empty() {
        model.smoke_run().map_err(|err| {
            (
                FailureCode::ModelLoad,
                format!("a test inference failed: {err}"),
            )
        })?
    } else {
        model
            .check_golden(&manifest.golden)
            .map_err(|err| match err {
                GoldenError::Mismatch(detail) => (FailureCode::GoldenMismatch, detail),
                GoldenError::Failed(err) => (
                    FailureCode::ModelLoad,
                    format!("a golden vector could not run: {err}"),
                ),
            })?
    };
    let budget_us = u64::from(manifest.runtime.latency_budget_ms) * 1000;
    if latency_us > budget_us {
        return Err((
            FailureCode::LatencyBudget,
            format!(
                "self-test inference took {latency_us} µs; the manifest's latency budget is {} ms",
                manifest.runtime.latency_budget_ms
            ),
        ));
    }
    let summary = ModelSummary {
        name: manifest.name.to_string(),
        version: manifest.version.to_string(),
        release: manifest.release,
        digest: spec.slot.digest.clone(),
    };
    let model_ref = ModelRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        release: manifest.release,
        manifest_digest: spec.slot.digest.parse().map_err(|_| {
            (
                FailureCode::Io,
                format!(
                    "the store names model digest {:?}, not 64 hex digits",
                    spec.slot.digest
                ),
            )
        })?,
    };
    let prediction = manifest.prediction_spec();
    let permits = tokio::sync::Semaphore::new(usize::from(manifest.runtime.threads.max(1)));
    let report = LoadReport {
        latency_us,
        golden_vectors: manifest.golden.len(),
    };
    Ok((
        Served {
            model,
            manifest,
            summary,
            model_ref,
            prediction,
            permits,
        },
        report,
    ))
}

/// Entry point of `edgefleet-agent worker`.
pub fn main() -> ExitCode {
    let mut line = String::new();
    if let Err(err) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("error: worker cannot read its spec: {err}");
        return ExitCode::from(2);
    }
    let spec: WorkerSpec = match serde_json::from_str(&line) {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!("error: worker spec is invalid: {err}");
            return ExitCode::from(2);
        }
    };
    // A worker never outlives its supervisor (whatever kills the supervisor kills this too).
    if let Err(err) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        eprintln!("error: cannot tie the worker's life to the agent's: {err}");
        return ExitCode::from(1);
    }
    // Past this limit allocations fail and the process aborts: the supervisor sees a crash.
    let limit = rustix::process::Rlimit {
        current: Some(spec.memory_limit_bytes),
        maximum: Some(spec.memory_limit_bytes),
    };
    if let Err(err) = rustix::process::setrlimit(rustix::process::Resource::As, limit) {
        eprintln!("error: cannot limit the worker's memory: {err}");
        return ExitCode::from(1);
    }
    let active = match spec.active.as_ref().map(load).transpose() {
        Ok(active) => active,
        Err((code, detail)) => {
            tracing::error!(?code, %detail, "model failed to load");
            emit(&WorkerEvent::LoadFailed { code, detail });
            return ExitCode::from(3);
        }
    };
    let shadow = spec
        .shadow
        .as_ref()
        .map(|s| load(s).map_err(|(code, detail)| format!("{code:?}: {detail}")));
    if active.is_some() {
        crate::failpoint::hit("worker.loaded");
    }
    emit(&WorkerEvent::Loaded {
        active: active.as_ref().map(|(_, report)| report.clone()),
        shadow: shadow.as_ref().map(|r| {
            r.as_ref()
                .map(|(_, report)| report.clone())
                .map_err(Clone::clone)
        }),
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the worker runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let active = active.map(|(served, _)| Arc::new(served));
    let shadow = shadow
        .and_then(Result::ok)
        .map(|(served, _)| Arc::new(served));
    match runtime.block_on(serve(spec, active, shadow)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: worker: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn tcp_listener(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Old and new workers listen side by side during a model swap.
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(1024)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

/// Binds the Unix socket at a temporary path and renames it over `path`, so clients always find
/// a listening socket during a model swap.
fn unix_listener(path: &Path) -> Result<tokio::net::UnixListener> {
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .with_context(|| format!("cannot listen on {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move the API socket to {}", path.display()))?;
    Ok(listener)
}

async fn serve(
    spec: WorkerSpec,
    active: Option<Arc<Served>>,
    shadow: Option<Arc<Served>>,
) -> Result<()> {
    let stats = Arc::new(Mutex::new(WorkerStats::default()));
    let predictions = Arc::new(Mutex::new(PredictionLog::with_random_prefix(
        FeedbackLimits {
            max_predictions: spec.feedback_max_predictions,
            max_age: Duration::from_secs(spec.feedback_max_age_s),
        },
    )));
    let shadow = shadow.map(|served| {
        let (sender, jobs) = std::sync::mpsc::sync_channel(spec.shadow_queue);
        let summary = served.summary.clone();
        let (stats, predictions) = (stats.clone(), predictions.clone());
        std::thread::Builder::new()
            .name(String::from("shadow"))
            .spawn(move || api::shadow_loop(served, jobs, stats, predictions))
            .map(|_| (summary, sender))
    });
    let shadow = shadow
        .transpose()
        .context("cannot start the shadow thread")?;
    let window = active
        .as_ref()
        .map(|served| Arc::new(Mutex::new(WindowAcc::new(&served.manifest))));
    let state = Arc::new(ApiState {
        active,
        shadow,
        stats: stats.clone(),
        window: window.clone(),
        predictions,
        capture: RwLock::new(spec.capture.clone()),
        emit,
        max_body_bytes: spec.max_body_bytes,
    });
    let commands_state = state.clone();
    let window_stats = stats.clone();

    // Commands from the supervisor; EOF (the supervisor is gone) means drain.
    let (serve_tx, mut serve_rx) = watch::channel(false);
    let (drain_tx, drain_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut last_shadow = crate::control::ShadowCounters::default();
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<WorkerCommand>(&line) {
                Ok(WorkerCommand::Serve) => {
                    let _ = serve_tx.send(true);
                }
                Ok(WorkerCommand::Drain) => break,
                Ok(WorkerCommand::Capture(settings)) => {
                    *commands_state
                        .capture
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
                }
                Ok(WorkerCommand::TakeWindow) => {
                    let mut data = window
                        .as_ref()
                        .map(|w| {
                            w.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .take()
                        })
                        .unwrap_or_default();
                    let shadow = window_stats
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .shadow
                        .clone();
                    data.shadow = shadow.since(&last_shadow);
                    last_shadow = shadow;
                    emit(&WorkerEvent::Window(Box::new(data)));
                }
                Err(err) => tracing::warn!(error = %err, "ignoring an unknown command"),
            }
        }
        let _ = drain_tx.send(true);
    });
    let mut early_drain = drain_rx.clone();
    tokio::select! {
        _ = serve_rx.wait_for(|serve| *serve) => {}
        _ = early_drain.wait_for(|drain| *drain) => return Ok(()),
    }
    let tcp = tcp_listener(spec.listen)?;
    let unix = unix_listener(&spec.socket)?;
    emit(&WorkerEvent::Serving);
    let stats_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let snapshot = stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            emit(&WorkerEvent::Stats(snapshot));
        }
    });
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|drain| *drain).await;
    };
    let app = api::router(state);
    let tcp_server =
        axum::serve(tcp, app.clone()).with_graceful_shutdown(shutdown(drain_rx.clone()));
    let unix_server = axum::serve(unix, app).with_graceful_shutdown(shutdown(drain_rx));
    let (tcp_res, unix_res) = tokio::join!(tcp_server, unix_server);
    stats_task.abort();
    tcp_res?;
    unix_res?;
    Ok(())
}
