//! A real `edgefleet-agent` process for tests: started in its own process group with a state
//! directory and a loopback port, driven over its admin socket and local API, killed for real.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use edgefleet_client::Client;

use crate::fleet::TestFleet;

/// A free loopback port (bound, then released for the agent to take).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// Polls `cond` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = cond() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request on an agent's admin socket; `Err` carries the agent's error message and code.
pub fn admin_at(socket: &Path, request: &serde_json::Value) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("admin socket: {e}"))?;
    writeln!(stream, "{request}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
    if let Some(ok) = answer.get("ok") {
        return Ok(ok.clone());
    }
    Err(format!(
        "{} [{}]",
        answer["error"]["message"].as_str().unwrap_or(&line),
        answer["error"]["code"].as_str().unwrap_or("")
    ))
}

#[derive(Debug)]
pub struct AgentProcess {
    bin: PathBuf,
    /// A program the binary runs under (e.g. `cross/qemu-run aarch64`), or empty.
    runner: Vec<OsString>,
    child: Option<Child>,
    pub state_dir: PathBuf,
    pub api: SocketAddr,
    pub socket: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    starts: usize,
}

impl AgentProcess {
    /// Starts an agent trusting `fleet`, with its state in `state_dir`.
    pub fn start(
        bin: &Path,
        fleet: &TestFleet,
        state_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::start_trusting(
            bin,
            (&fleet.root_path, &fleet.keyring_path),
            state_dir,
            extra_env,
        )
    }

    /// Starts an agent trusting the root anchor and release keyring at `trust`.
    pub fn start_trusting(
        bin: &Path,
        trust: (&Path, &Path),
        state_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::start_via(&[], bin, trust, state_dir, extra_env)
    }

    /// Like `start_trusting`, with `bin` run as `runner… bin` (every start and admin command),
    /// as a foreign-architecture build runs under qemu-user.
    pub fn start_via(
        runner: &[OsString],
        bin: &Path,
        (root, keyring): (&Path, &Path),
        state_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(state_dir).expect("create state dir");
        let api = free_port();
        let socket = state_dir.join("agent.sock");
        let mut env: Vec<(String, String)> = vec![
            ("EDGEFLEET_DEVICE_ID".into(), "test-device".into()),
            (
                "EDGEFLEET_STATE_DIR".into(),
                state_dir.to_string_lossy().into_owned(),
            ),
            (
                "EDGEFLEET_TRUST_ROOT".into(),
                root.to_string_lossy().into_owned(),
            ),
            (
                "EDGEFLEET_KEYRING".into(),
                keyring.to_string_lossy().into_owned(),
            ),
            ("EDGEFLEET_API_LISTEN".into(), api.to_string()),
            (
                "EDGEFLEET_API_SOCKET".into(),
                socket.to_string_lossy().into_owned(),
            ),
            ("EDGEFLEET_LOG".into(), "info".into()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut agent = Self {
            bin: bin.to_owned(),
            runner: runner.to_vec(),
            child: None,
            state_dir: state_dir.to_owned(),
            api,
            socket,
            log: state_dir.join("agent.log"),
            env,
            starts: 0,
        };
        agent.spawn();
        agent
    }

    fn command(&self) -> Command {
        let mut command = match self.runner.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.bin);
                command
            }
            None => Command::new(&self.bin),
        };
        command
            .env_remove("EDGEFLEET_FAILPOINT")
            .env_remove("NOTIFY_SOCKET");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let mut command = self.command();
        command
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        self.child = Some(command.spawn().expect("start edgefleet-agent"));
    }

    /// Sets an environment variable for later starts (and admin commands).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the agent again after it was killed or stopped.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Waits until the API answers `/healthz` over the Unix socket.
    pub fn wait_ready(&mut self) -> serde_json::Value {
        let socket = self.socket.clone();
        let log = self.log.clone();
        let child = self.child.as_mut().expect("agent running");
        wait_until(
            Duration::from_secs(30),
            "the agent to serve /healthz",
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the agent exited ({status}) before it was ready; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Client::unix(&socket).health().ok()
            },
        )
    }

    pub fn client(&self) -> Client {
        Client::unix(&self.socket)
    }

    /// One admin request; `Err` carries the agent's error message.
    pub fn admin(&self, request: &serde_json::Value) -> Result<serde_json::Value, String> {
        admin_at(&self.admin_socket(), request)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    pub fn install(&self, bundle: &Path) -> Result<serde_json::Value, String> {
        self.admin(&serde_json::json!({"install": {"path": bundle}}))
    }

    pub fn status(&self) -> serde_json::Value {
        self.admin(&serde_json::json!("status")).expect("status")
    }

    /// Runs `edgefleet-agent <args>` with this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .args(args)
            .output()
            .expect("run edgefleet-agent")
    }

    /// SIGKILLs the agent and everything it started (its process group).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait();
        }
    }

    /// Waits for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        wait_until(timeout, "the agent to exit", || {
            child.try_wait().ok().flatten()
        })
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("send SIGTERM");
        let status = wait_until(timeout, "the agent to exit after SIGTERM", || {
            child.try_wait().ok().flatten()
        });
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        status
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
