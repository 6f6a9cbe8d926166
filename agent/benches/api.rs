//! The agent's local API end to end against a FastAPI + onnxruntime server on the same model, and
//! the agent's idle memory.
//!
//! - Baseline: `agent/benches/fastapi_server.py`, a FastAPI app serving Silero VAD with
//!   onnxruntime (one intra-op thread) on `POST /v1/infer`, with the agent's JSON body shape, run
//!   by uvicorn with one worker on loopback. It runs twice: as `pip install uvicorn` gives it
//!   (asyncio event loop, h11 HTTP parser) and as `pip install 'uvicorn[standard]'` gives it
//!   (uvloop, httptools). A virtualenv with its packages is created under `target/bench-venv`
//!   on first run.
//! - Agent: the `edgefleet-agent` binary of this build (bench profile), started with a fresh state
//!   directory, with a signed Silero VAD bundle installed through its admin socket
//!   (`runtime.threads` = 1, the manifest default: one inference at a time, like the one
//!   onnxruntime thread).
//!
//! Every server is measured by the same Rust client: a minimal HTTP/1.1 client over one
//! keep-alive TCP connection (std `TcpStream`, `httparse`), sending the same JSON request bytes
//! (a 576-sample 440 Hz sine frame and a zero state) and decoding every JSON response. The agent
//! is also measured with `edgefleet_client` (CBOR bodies, its default) as an extra row.
//! Sequential latency: `WARMUP` requests, then `REQUESTS` timed ones. Throughput: `CONNECTIONS`
//! threads, one connection each, sending back to back for `DURATION` (at most
//! `MAX_PER_CONNECTION` requests each). The agent's answers also carry its own timing of the
//! model run (`latency_us`), reported as a separate column. Idle memory is the sum of `VmRSS`
//! (and its `RssAnon`/`RssFile` split, and PSS) over the agent's process tree (supervisor and
//! model worker), read from `/proc` after 2 s without traffic. With `EDGEFLEET_BENCH_OTHER_AGENT`
//! set to another agent binary (e.g. a copy of the release build, which `cargo bench` would
//! overwrite), its idle memory is measured too.
//!
//! Run: `cargo bench -p edgefleet-agent --bench api`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use edgefleet_client::api::InferRequest;
use edgefleet_client::{Client, Tensor};
use edgefleet_tests::agent::{AgentProcess, free_port, wait_until};
use edgefleet_tests::fleet::{BundleSpec, TestFleet};
use edgefleet_tests::models::{SILERO_VAD_16K, fetch};
use serde::Deserialize;

const WARMUP: usize = 200;
const REQUESTS: usize = 2000;
/// Upper bound on one sequential latency run, whatever `REQUESTS` says.
const LATENCY_TIME_LIMIT: Duration = Duration::from_secs(120);
const CONNECTIONS: usize = 4;
const DURATION: Duration = Duration::from_secs(5);
const MAX_PER_CONNECTION: usize = 100_000;
const PYTHON_PACKAGES: &[&str] = &[
    "fastapi",
    "uvicorn",
    "onnxruntime",
    "numpy",
    "uvloop",
    "httptools",
];

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then there is nothing to do.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("api: run with `cargo bench -p edgefleet-agent --bench api`");
        return;
    }
    let model = fetch(SILERO_VAD_16K);
    let python = python_env();
    let body = json_request_body();
    let dir = tempfile::tempdir().expect("temp dir");

    // The agent: idle with no model, then with Silero VAD installed.
    let fleet = TestFleet::new(&dir.path().join("fleet"));
    let bin = Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    let mut agent = AgentProcess::start(bin, &fleet, &dir.path().join("state"), &[]);
    agent.wait_ready();
    let agent_pid = agent.pid().expect("agent pid");
    let rss_empty = settled_rss(agent_pid);
    let (bundle, digest) = fleet.bundle(&BundleSpec::silero(&model, 1));
    let answer = agent
        .install(&bundle)
        .unwrap_or_else(|err| panic!("install failed: {err}\nlog:\n{}", agent.log_text()));
    assert_eq!(answer["result"], "activated", "{answer}");
    let rss_loaded = settled_rss(agent_pid);

    let agent_json = ServerResult::measure("EdgeFleet agent", "JSON", || {
        Box::new(JsonClient::connect(agent.api, &body)) as Box<dyn Requester>
    });
    let agent_cbor = ServerResult::measure("EdgeFleet agent (edgefleet-client)", "CBOR", || {
        Box::new(CborClient::new(agent.api)) as Box<dyn Requester>
    });
    let reply = Client::tcp(agent.api)
        .infer(&inputs())
        .expect("agent answers");
    assert_eq!(reply.model.digest, digest, "the installed model answered");
    let rss_after_load = settled_rss(agent_pid);

    let mut fastapi = Vec::new();
    for (label, loop_impl, http_impl) in [
        (
            "FastAPI + onnxruntime (uvicorn: asyncio, h11)",
            "asyncio",
            "h11",
        ),
        (
            "FastAPI + onnxruntime (uvicorn[standard]: uvloop, httptools)",
            "uvloop",
            "httptools",
        ),
    ] {
        let server = PythonServer::start(&python, &model, dir.path(), loop_impl, http_impl);
        let result = ServerResult::measure(label, "JSON", || {
            Box::new(JsonClient::connect(server.addr, &body)) as Box<dyn Requester>
        });
        let rss = tree_rss(server.child.id());
        fastapi.push((result, rss));
    }
    let bench_label = "edgefleet-agent (bench profile)";
    let mut memory = vec![
        RssRow {
            binary: bench_label.to_owned(),
            state: "no model",
            rss: rss_empty,
        },
        RssRow {
            binary: bench_label.to_owned(),
            state: "Silero VAD loaded, before traffic",
            rss: rss_loaded,
        },
        RssRow {
            binary: bench_label.to_owned(),
            state: "Silero VAD loaded, after the load runs",
            rss: rss_after_load,
        },
    ];
    drop(agent);
    // Optionally the same for another build of the agent, e.g. a copy of the release binary.
    if let Some(other) = std::env::var_os("EDGEFLEET_BENCH_OTHER_AGENT") {
        let other = PathBuf::from(other);
        let label = format!("{} (EDGEFLEET_BENCH_OTHER_AGENT)", other.display());
        memory.extend(idle_rss_of(
            &other,
            &label,
            &dir.path().join("other"),
            &model,
        ));
    }

    // Both runtimes must compute the same thing before their speed is compared.
    for (result, _) in &fastapi {
        let diff = (result.probability - agent_json.probability).abs();
        assert!(
            diff < 1e-3,
            "{} says {} but the agent says {}",
            result.label,
            result.probability,
            agent_json.probability
        );
    }

    print_report(
        &python.versions,
        &agent_json,
        &agent_cbor,
        &fastapi,
        &memory,
    );
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// 576 samples of a 440 Hz sine at 16 kHz (amplitude 0.5) and a zero state.
fn inputs() -> [(&'static str, Tensor); 2] {
    let frame: Vec<f32> = (0..576)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin())
        .collect();
    [
        ("input", Tensor::f32(vec![1, 576], frame)),
        ("state", Tensor::f32(vec![2, 1, 128], vec![0.0; 256])),
    ]
}

/// The JSON request every server gets, byte for byte.
fn json_request_body() -> Vec<u8> {
    let request = InferRequest {
        inputs: inputs()
            .into_iter()
            .map(|(name, tensor)| (name.to_owned(), tensor))
            .collect(),
        outputs: None,
    };
    serde_json::to_vec(&request).expect("serialise the request")
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One keep-alive connection that sends the inference request and decodes the response.
trait Requester {
    fn call(&mut self) -> Answer;
}

/// What a response says: the speech probability and, from the agent, how long the model ran.
struct Answer {
    probability: f64,
    server_us: Option<u64>,
}

/// The response fields both servers share, plus the agent's `latency_us` (the model run as the
/// agent timed it); other fields are skipped.
#[derive(Deserialize)]
struct Reply {
    outputs: BTreeMap<String, ReplyTensor>,
    latency_us: Option<u64>,
}

#[derive(Deserialize)]
struct ReplyTensor {
    shape: Vec<u64>,
    data: Vec<f64>,
}

fn answer(reply: &Reply) -> Answer {
    let state = &reply.outputs["stateN"];
    assert_eq!(state.shape, [2, 1, 128], "stateN shape");
    assert_eq!(state.data.len(), 256, "stateN values");
    Answer {
        probability: reply.outputs["output"].data[0],
        server_us: reply.latency_us,
    }
}

/// A minimal HTTP/1.1 client: one request written in one `write`, a `Content-Length` response.
struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends one request and returns (status, body).
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n").into_bytes();
        if let Some((content_type, body)) = body {
            request.extend_from_slice(
                format!(
                    "content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(body);
        } else {
            request.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&request)?;
        let mut chunk = [0u8; 64 * 1024];
        let (status, head_len, content_length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let content_length = response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .ok_or_else(|| std::io::Error::other("response has no content-length"))?;
                    break (response.code.unwrap_or(0), head_len, content_length);
                }
                Ok(httparse::Status::Partial) => {}
                Err(err) => return Err(std::io::Error::other(err.to_string())),
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        while self.buf.len() < head_len + content_length {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = self.buf[head_len..head_len + content_length].to_vec();
        self.buf.drain(..head_len + content_length);
        Ok((status, body))
    }
}

/// The same JSON request bytes to any server, JSON response decoded.
struct JsonClient {
    http: Http,
    body: Vec<u8>,
}

impl JsonClient {
    fn connect(addr: SocketAddr, body: &[u8]) -> Self {
        Self {
            http: Http::connect(addr).expect("connect to the server"),
            body: body.to_vec(),
        }
    }
}

impl Requester for JsonClient {
    fn call(&mut self) -> Answer {
        let (status, body) = self
            .http
            .request("POST", "/v1/infer", Some(("application/json", &self.body)))
            .expect("inference request");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let reply: Reply = serde_json::from_slice(&body).expect("JSON inference response");
        answer(&reply)
    }
}

/// The agent's own client: CBOR request and response, request built per call.
struct CborClient {
    client: Client,
    inputs: [(&'static str, Tensor); 2],
}

impl CborClient {
    fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::tcp(addr),
            inputs: inputs(),
        }
    }
}

impl Requester for CborClient {
    fn call(&mut self) -> Answer {
        let reply = self.client.infer(&self.inputs).expect("inference request");
        assert_eq!(reply.outputs["stateN"].data.len(), 256, "stateN values");
        Answer {
            probability: reply.outputs["output"].data[0],
            server_us: Some(reply.latency_us),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Debug)]
struct Latency {
    count: usize,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    /// Median model run time the server reported (the agent only).
    server_p50_us: Option<u64>,
}

#[derive(Debug)]
struct ServerResult {
    label: String,
    encoding: &'static str,
    probability: f64,
    latency: Latency,
    requests: usize,
    elapsed: Duration,
}

impl ServerResult {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn measure(
        label: &str,
        encoding: &'static str,
        connect: impl Fn() -> Box<dyn Requester> + Sync,
    ) -> Self {
        eprintln!("measuring {label} ({encoding})");
        let mut client = connect();
        let mut probability = 0.0;
        for _ in 0..WARMUP {
            probability = client.call().probability;
        }
        let mut samples = Vec::with_capacity(REQUESTS);
        let mut server = Vec::with_capacity(REQUESTS);
        let started = Instant::now();
        while samples.len() < REQUESTS && started.elapsed() < LATENCY_TIME_LIMIT {
            let t = Instant::now();
            let answer = client.call();
            samples.push(t.elapsed());
            let p = answer.probability;
            assert!((p - probability).abs() < 1e-6, "answers differ: {p}");
            server.extend(answer.server_us);
        }
        drop(client);
        let mut latency = latency(samples);
        server.sort_unstable();
        latency.server_p50_us = server.get(server.len() / 2).copied();

        let barrier = Barrier::new(CONNECTIONS);
        let (requests, elapsed) = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..CONNECTIONS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut client = connect();
                        for _ in 0..20 {
                            client.call();
                        }
                        barrier.wait();
                        let started = Instant::now();
                        let mut n = 0;
                        while n < MAX_PER_CONNECTION && started.elapsed() < DURATION {
                            client.call();
                            n += 1;
                        }
                        (n, started.elapsed())
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("load thread"))
                .fold((0, Duration::ZERO), |(n, e), (tn, te)| (n + tn, e.max(te)))
        });
        let result = Self {
            label: label.to_owned(),
            encoding,
            probability,
            latency,
            requests,
            elapsed,
        };
        eprintln!(
            "  p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s",
            result.latency.p50_us,
            result.latency.p99_us,
            result.throughput()
        );
        result
    }
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    assert!(!samples.is_empty(), "no latency samples");
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |p: f64| us(samples[((samples.len() - 1) as f64 * p).round() as usize]);
    Latency {
        count: samples.len(),
        mean_us: samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64,
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        server_p50_us: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

/// A `kB` field of `/proc/<pid>/status` or `/proc/<pid>/smaps_rollup`.
fn proc_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Direct children of `pid`, from the `children` file of every thread (a child belongs to the
/// thread that forked it).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    anon: u64,
    file: u64,
    /// Proportional set size: shared pages (the same executable mapped by the supervisor and
    /// the worker) divided among the processes that map them.
    pss: u64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem {
            rss: self.rss + o.rss,
            anon: self.anon + o.anon,
            file: self.file + o.file,
            pss: self.pss + o.pss,
        }
    }
}

fn mem(pid: u32) -> Option<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Mem {
        rss: proc_kib(&status, "VmRSS")?,
        anon: proc_kib(&status, "RssAnon").unwrap_or(0),
        file: proc_kib(&status, "RssFile").unwrap_or(0),
        pss: proc_kib(&rollup, "Pss").unwrap_or(0),
    })
}

/// (command name, pid, memory) of `pid` and all its descendants.
#[derive(Debug)]
struct TreeRss {
    processes: Vec<(String, u32, Mem)>,
}

impl TreeRss {
    fn total(&self) -> Mem {
        self.processes
            .iter()
            .fold(Mem::default(), |sum, (_, _, m)| sum + *m)
    }
}

fn tree_rss(root: u32) -> TreeRss {
    let mut processes = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        let Some(m) = mem(pid) else { continue };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        processes.push((name, pid, m));
        stack.extend(children(pid));
    }
    TreeRss { processes }
}

/// The agent's tree once it is back to a supervisor and one worker and has sat idle for 2 s.
fn settled_rss(agent: u32) -> TreeRss {
    wait_until(
        Duration::from_secs(30),
        "the agent to settle to a supervisor and one worker",
        || (tree_rss(agent).processes.len() == 2).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss = tree_rss(agent);
    assert_eq!(rss.processes.len(), 2, "{rss:?}");
    rss
}

/// One line of the memory table.
struct RssRow {
    binary: String,
    state: &'static str,
    rss: TreeRss,
}

/// Idle memory of another agent binary (no model, then Silero VAD installed), in its own state
/// directory; the agent is stopped afterwards.
fn idle_rss_of(bin: &Path, label: &str, dir: &Path, model: &Path) -> Vec<RssRow> {
    let fleet = TestFleet::new(&dir.join("fleet"));
    let mut agent = AgentProcess::start(bin, &fleet, &dir.join("state"), &[]);
    agent.wait_ready();
    let pid = agent.pid().expect("agent pid");
    let empty = settled_rss(pid);
    let (bundle, _) = fleet.bundle(&BundleSpec::silero(model, 1));
    let answer = agent
        .install(&bundle)
        .unwrap_or_else(|err| panic!("install failed: {err}\nlog:\n{}", agent.log_text()));
    assert_eq!(answer["result"], "activated", "{answer}");
    let loaded = settled_rss(pid);
    vec![
        RssRow {
            binary: label.to_owned(),
            state: "no model",
            rss: empty,
        },
        RssRow {
            binary: label.to_owned(),
            state: "Silero VAD loaded, before traffic",
            rss: loaded,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// The Python baseline

struct PythonEnv {
    python: PathBuf,
    versions: String,
}

/// `target/bench-venv` with the baseline's packages, created on first use.
fn python_env() -> PythonEnv {
    let target = edgefleet_tests::target_dir()
        .parent()
        .expect("target dir has a parent")
        .to_path_buf();
    let venv = target.join("bench-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!("creating {}", venv.display());
        edgefleet_tests::run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    }
    let imports = "import fastapi, uvicorn, onnxruntime, numpy, pydantic, uvloop, httptools; print(f'fastapi {fastapi.__version__}, pydantic {pydantic.VERSION}, uvicorn {uvicorn.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, uvloop {uvloop.__version__}, httptools {httptools.__version__}')";
    let check = || edgefleet_tests::run(Command::new(&python).args(["-c", imports]));
    if !check().success() {
        eprintln!(
            "installing {} into {}",
            PYTHON_PACKAGES.join(" "),
            venv.display()
        );
        edgefleet_tests::run_ok(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(PYTHON_PACKAGES),
        );
    }
    let versions = edgefleet_tests::run_ok(Command::new(&python).args(["-c", imports]))
        .stdout
        .trim()
        .to_owned();
    let python_version = edgefleet_tests::run_ok(Command::new(&python).arg("--version"))
        .stdout
        .trim()
        .to_owned();
    PythonEnv {
        python,
        versions: format!("{python_version}; {versions}"),
    }
}

/// uvicorn serving `fastapi_server.py`, killed (with its process group) on drop.
struct PythonServer {
    child: Child,
    addr: SocketAddr,
}

impl PythonServer {
    fn start(env: &PythonEnv, model: &Path, dir: &Path, loop_impl: &str, http_impl: &str) -> Self {
        let addr = free_port();
        let log_path = dir.join(format!("uvicorn-{loop_impl}-{http_impl}.log"));
        let log = std::fs::File::create(&log_path).expect("create the uvicorn log");
        let child = Command::new(&env.python)
            .args(["-m", "uvicorn", "fastapi_server:app", "--app-dir"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches"))
            .args(["--host", "127.0.0.1", "--port"])
            .arg(addr.port().to_string())
            .args(["--workers", "1", "--loop", loop_impl, "--http", http_impl])
            .args(["--no-access-log", "--log-level", "warning"])
            .env("EDGEFLEET_BENCH_MODEL", model)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start uvicorn");
        let mut server = Self { child, addr };
        wait_until(Duration::from_secs(60), "uvicorn to serve /healthz", || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "uvicorn exited ({status}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            Http::connect(addr)
                .and_then(|mut http| http.request("GET", "/healthz", None))
                .ok()
                .filter(|(status, _)| *status == 200)
        });
        server
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_report(
    python_versions: &str,
    agent_json: &ServerResult,
    agent_cbor: &ServerResult,
    fastapi: &[(ServerResult, TreeRss)],
    memory: &[RssRow],
) {
    println!();
    println!("## Local API vs FastAPI + onnxruntime (Silero VAD 16 kHz)");
    println!();
    println!(
        "Sequential: {WARMUP} warm-up then {} requests on one keep-alive connection. Throughput: {CONNECTIONS} connections for {} s.",
        agent_json.latency.count,
        DURATION.as_secs()
    );
    println!("Baseline: {python_versions}.");
    println!();
    println!(
        "| Server | Body | p50 (µs) | p90 (µs) | p99 (µs) | mean (µs) | Model run, server-reported p50 (µs) | Throughput, {CONNECTIONS} conns (req/s) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let rows = [agent_json, agent_cbor]
        .into_iter()
        .chain(fastapi.iter().map(|(r, _)| r));
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} |",
            r.label,
            r.encoding,
            r.latency.p50_us,
            r.latency.p90_us,
            r.latency.p99_us,
            r.latency.mean_us,
            r.latency
                .server_p50_us
                .map_or_else(|| String::from("—"), |us| us.to_string()),
            r.throughput()
        );
    }
    println!();
    println!(
        "| Agent (JSON) vs | p50 ratio (goal ≤ 0.5×) | p99 ratio | Throughput ratio (goal ≥ 3×) |"
    );
    println!("|---|---:|---:|---:|");
    for (r, _) in fastapi {
        println!(
            "| {} | {:.2}× | {:.2}× | {:.2}× |",
            r.label,
            agent_json.latency.p50_us / r.latency.p50_us,
            agent_json.latency.p99_us / r.latency.p99_us,
            agent_json.throughput() / r.throughput()
        );
    }
    println!();
    println!(
        "Speech probability of the frame: agent {:.6}, FastAPI + onnxruntime {:.6}.",
        agent_json.probability,
        fastapi.first().map_or(f64::NAN, |(r, _)| r.probability)
    );
    println!();
    println!("## Idle memory (sum over the process tree, MiB)");
    println!();
    println!(
        "| Binary | State | VmRSS | RssAnon | RssFile | PSS | Per process VmRSS (RssAnon + RssFile) |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    let rows = memory
        .iter()
        .map(|row| (row.binary.as_str(), row.state, &row.rss))
        .chain(fastapi.iter().map(|(r, rss)| {
            (
                r.label.as_str(),
                "Silero VAD loaded, after the load runs",
                rss,
            )
        }));
    for (binary, state, rss) in rows {
        let parts: Vec<String> = rss
            .processes
            .iter()
            .map(|(name, _, m)| {
                format!(
                    "{name} {:.1} ({:.1} + {:.1})",
                    mib(m.rss),
                    mib(m.anon),
                    mib(m.file)
                )
            })
            .collect();
        let total = rss.total();
        println!(
            "| {binary} | {state} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            mib(total.rss),
            mib(total.anon),
            mib(total.file),
            mib(total.pss),
            parts.join(" + ")
        );
    }
    println!();
    if let Some(row) = memory.first() {
        println!(
            "Goal: agent with no model ≤ 12 MiB VmRSS — measured {:.1} MiB ({}).",
            mib(row.rss.total().rss),
            row.binary
        );
    }
}
