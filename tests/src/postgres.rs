//! A throwaway PostgreSQL cluster for one test: `initdb` into a temporary directory, trust
//! authentication on loopback only, a free `127.0.0.1` port, the Unix socket inside the
//! directory, `fsync=off`. It has a database `edgefleet` owned by a login role `edgefleet`.
//! Stopped (`pg_ctl stop -m immediate`) and deleted on drop; SIGKILLed and restarted on the same
//! port for crash tests.
//!
//! The server binaries come from the newest `/usr/lib/postgresql/<version>/bin` (Debian's
//! `postgresql` package), else from `PATH`. PostgreSQL refuses to run as root, so as root every
//! server tool runs as the `postgres` system user (via `setpriv`) and the directory belongs to it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::agent::free_port;

/// The login role and the database the tests use.
pub const USER: &str = "edgefleet";
pub const DATABASE: &str = "edgefleet";
/// The bootstrap superuser (`initdb -U`).
const SUPERUSER: &str = "postgres";

/// How long a cluster may take to accept connections after the postmaster starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `psql`, `pg_isready` or `pg_ctl stop` run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting the postmaster (a port taken between `free_port` and the bind, or
/// shared memory still held by backends of a killed postmaster).
const START_ATTEMPTS: u32 = 5;

/// Where the PostgreSQL tools are and whom they run as.
#[derive(Debug, Clone)]
struct Install {
    bin: PathBuf,
    /// `Some` when this process is root: the account the server tools run as.
    run_as: Option<Account>,
}

#[derive(Debug, Clone)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

/// The tools the harness runs from the server's bin directory.
const TOOLS: [&str; 5] = ["initdb", "postgres", "pg_ctl", "pg_isready", "psql"];

fn has_tools(dir: &Path) -> bool {
    TOOLS.iter().all(|tool| dir.join(tool).is_file())
}

/// The newest `/usr/lib/postgresql/<version>/bin` with the server tools, else a `PATH` entry.
fn find_bin_dir() -> Option<PathBuf> {
    let version = |name: &str| -> Option<Vec<u32>> {
        name.split('.').map(|part| part.parse().ok()).collect()
    };
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let v = version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((v, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin);
    newest.or_else(|| std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_tools(dir)))
}

fn id_of(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The PostgreSQL installation, or why tests needing one cannot run here.
fn find_install() -> Result<Install, String> {
    let bin = find_bin_dir().ok_or_else(|| {
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found in \
         /usr/lib/postgresql/*/bin or on PATH (apt-get install postgresql)"
            .to_owned()
    })?;
    if !rustix::process::geteuid().is_root() {
        return Ok(Install { bin, run_as: None });
    }
    let name = SUPERUSER.to_owned();
    let (Some(uid), Some(gid)) = (id_of("-u", &name), id_of("-g", &name)) else {
        return Err(format!(
            "running as root, and PostgreSQL refuses root, but there is no `{name}` system user \
             to run it as (the Debian postgresql package creates it)"
        ));
    };
    let setpriv_found = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !setpriv_found {
        return Err("running as root and setpriv (util-linux) is not installed".to_owned());
    }
    Ok(Install {
        bin,
        run_as: Some(Account { name, uid, gid }),
    })
}

/// Prints to the real stderr, past the test harness's output capture, so a skip is seen even
/// when the test passes.
fn shout(message: &str) {
    let _ = writeln!(std::io::stderr(), "\n{message}\n");
}

/// Whether a PostgreSQL server can run here. Tests needing it may skip locally, never in CI.
pub fn postgres_available() -> bool {
    match find_install() {
        Ok(_) => true,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL must be installed in CI (.ci/run installs it): {why}"
            );
            shout(&format!("SKIPPED: {why}"));
            false
        }
    }
}

/// A fresh cluster for `test_name`, or `None` (after a loud message) when PostgreSQL is not
/// installed and this is not CI. In CI a missing PostgreSQL fails the test, and so does a cluster
/// that does not start anywhere.
pub fn require_postgres(test_name: &str) -> Option<PostgresServer> {
    if let Err(why) = find_install() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test_name}: PostgreSQL must be installed in CI (.ci/run installs it): {why}"
        );
        shout(&format!("SKIPPED {test_name}: {why}"));
        return None;
    }
    match PostgresServer::start() {
        Ok(server) => Some(server),
        Err(err) => panic!("{test_name}: cannot start PostgreSQL: {err:#}"),
    }
}

/// The captured result of a bounded tool run.
#[derive(Debug)]
struct ToolRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` with piped output, killing it after `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> anyhow::Result<ToolRun> {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {description}"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match wait_child(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{description} did not finish within {timeout:?}");
        }
    };
    Ok(ToolRun {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Like [`run_bounded`], and the command must succeed.
fn run_bounded_ok(command: Command, timeout: Duration) -> anyhow::Result<ToolRun> {
    let description = format!("{command:?}");
    let run = run_bounded(command, timeout)?;
    if !run.status.success() {
        bail!(
            "{description} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
    }
    Ok(run)
}

/// Waits up to `timeout` for `child` to exit.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The direct children of `pid`, from `/proc/<pid>/stat`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "<pid> (<comm>) <state> <ppid> ...": comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

fn sigkill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// A running PostgreSQL cluster in a temporary directory, listening on `127.0.0.1` only.
#[derive(Debug)]
pub struct PostgresServer {
    addr: SocketAddr,
    install: Install,
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    log: PathBuf,
    /// The postmaster itself (`setpriv` execs it, so this is its pid).
    child: Option<Child>,
}

impl PostgresServer {
    /// Creates a cluster, starts it on a free loopback port and creates the `edgefleet` role and
    /// database. Every step is bounded in time; errors carry the server log.
    pub fn start() -> anyhow::Result<Self> {
        let install = find_install().map_err(anyhow::Error::msg)?;
        let dir = temp_dir(&install)?;
        let root = dir.path().to_owned();
        let mut server = Self {
            addr: free_port(),
            install,
            data: root.join("data"),
            log: root.join("postgres.log"),
            dir: Some(dir),
            child: None,
        };

        let mut initdb = server.server_tool("initdb");
        initdb
            .arg("-D")
            .arg(&server.data)
            .args(["-U", SUPERUSER, "--auth=trust", "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C"]);
        run_bounded_ok(initdb, INITDB_TIMEOUT).context("initdb")?;

        // Trust, but only over the Unix socket in our own directory and loopback TCP.
        std::fs::write(
            server.data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .context("write pg_hba.conf")?;
        // fsync=off and full_page_writes=off only risk data on an OS crash; synchronous_commit
        // stays on so that work committed before `kill` survives into `restart`.
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(server.data.join("postgresql.conf"))
            .context("open postgresql.conf")?;
        write!(
            conf,
            "\n# edgefleet test cluster\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nmax_connections = 100\nlogging_collector = off\n",
            socket_dir = root.display()
        )
        .context("write postgresql.conf")?;
        drop(conf);

        server.spawn(true)?;
        server
            .psql_as(
                SUPERUSER,
                "postgres",
                &[
                    format!("CREATE ROLE {USER} LOGIN"),
                    format!("CREATE DATABASE {DATABASE} OWNER {USER}"),
                ],
            )
            .context("create the edgefleet role and database")?;
        Ok(server)
    }

    /// `postgres://edgefleet@127.0.0.1:<port>/edgefleet`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@{}/{DATABASE}", self.addr)
    }

    /// The bootstrap superuser's URL, on the `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://{SUPERUSER}@{}/postgres", self.addr)
    }

    /// The loopback address the server listens on (the same after [`restart`](Self::restart)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `sql` with `psql` as `edgefleet` on `edgefleet` and returns its unaligned,
    /// tuples-only output (`|`-separated columns, one row a line).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_as(USER, DATABASE, &[sql.to_owned()])
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs the postmaster and its backends, as in a crash: clients lose their connections
    /// and uncommitted work; committed work survives into [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let backends = children_of(child.id());
            let _ = child.kill();
            for pid in backends {
                sigkill(pid);
            }
            let _ = wait_child(&mut child, TOOL_TIMEOUT);
        }
    }

    /// Stops the server if it runs (immediate shutdown) and starts it again on the same port and
    /// data, waiting until it accepts connections. After [`kill`](Self::kill) this includes
    /// crash recovery.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.shut_down();
        self.spawn(false)
    }

    /// Stops the server and deletes its directory.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shut_down();
        match self.dir.take() {
            Some(dir) => dir.close().context("remove the PostgreSQL directory"),
            None => Ok(()),
        }
    }

    /// A command for one of the server tools, run as the `postgres` user when we are root.
    fn server_tool(&self, tool: &str) -> Command {
        let program = self.install.bin.join(tool);
        let command = match &self.install.run_as {
            Some(account) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", account.name))
                    .arg(format!("--regid={}", account.name))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        };
        self.prepare(command)
    }

    /// A command for a client tool (`psql`, `pg_isready`): loopback TCP with trust needs no
    /// particular OS user, so it runs as we do.
    fn client_tool(&self, tool: &str) -> Command {
        self.prepare(Command::new(self.install.bin.join(tool)))
    }

    fn prepare(&self, mut command: Command) -> Command {
        if let Some(dir) = &self.dir {
            command.current_dir(dir.path());
        }
        // PGHOST, PGSSLMODE, PGDATA and the like must not redirect the harness's tools.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
    }

    fn psql_as(&self, user: &str, database: &str, statements: &[String]) -> anyhow::Result<String> {
        let mut psql = self.client_tool("psql");
        psql.env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(["-U", user, "-d", database]);
        for sql in statements {
            psql.arg("-c").arg(sql);
        }
        Ok(run_bounded_ok(psql, TOOL_TIMEOUT)?.stdout)
    }

    fn is_ready(&self) -> bool {
        let mut ready = self.client_tool("pg_isready");
        ready.args([
            "-q",
            "-t",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
        ]);
        ready.args(["-p", &self.addr.port().to_string()]);
        run_bounded(ready, TOOL_TIMEOUT).is_ok_and(|run| run.status.success())
    }

    /// Starts the postmaster and waits until it accepts connections. `new_port_on_failure`:
    /// a postmaster that exits early is retried on another free port (first start), otherwise
    /// on the same one (restart).
    fn spawn(&mut self, new_port_on_failure: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            if attempt > 1 {
                std::thread::sleep(Duration::from_millis(200));
                if new_port_on_failure {
                    self.addr = free_port();
                }
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .context("open the PostgreSQL log")?;
            let mut postgres = self.server_tool("postgres");
            postgres
                .arg("-D")
                .arg(&self.data)
                .args(["-p", &self.addr.port().to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("PostgreSQL log")?)
                .stderr(log);
            let mut child = postgres.spawn().context("start postgres")?;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    failures.push(format!("attempt {attempt} on {}: {status}", self.addr));
                    break;
                }
                if self.is_ready() {
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = wait_child(&mut child, TOOL_TIMEOUT);
                    bail!(
                        "PostgreSQL did not accept connections on {} within {START_TIMEOUT:?}; \
                         log:\n{}",
                        self.addr,
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        bail!(
            "PostgreSQL exited during startup ({}); log:\n{}",
            failures.join("; "),
            self.log_text()
        )
    }

    /// `pg_ctl stop -m immediate`, falling back to SIGKILL; bounded.
    fn shut_down(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pg_ctl = self.server_tool("pg_ctl");
        pg_ctl
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "20"]);
        let stopped = run_bounded(pg_ctl, TOOL_TIMEOUT).is_ok_and(|run| run.status.success());
        if !stopped || wait_child(&mut child, Duration::from_secs(10)).is_none() {
            self.child = Some(child);
            self.kill();
        }
    }
}

/// A temporary directory the server tools may use: short enough for the Unix socket's path
/// (about 100 bytes at most) and, as root, owned by the `postgres` user in a parent it can reach.
fn temp_dir(install: &Install) -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::temp_dir();
    let usable =
        base.as_os_str().len() <= 60 && (install.run_as.is_none() || reachable_by_others(&base));
    let base = if usable { base } else { PathBuf::from("/tmp") };
    let dir = tempfile::Builder::new()
        .prefix("edgefleet-pg-")
        .tempdir_in(&base)
        .with_context(|| format!("create a temporary directory in {}", base.display()))?;
    if let Some(account) = &install.run_as {
        std::os::unix::fs::chown(dir.path(), Some(account.uid), Some(account.gid))
            .with_context(|| format!("chown {} to {}", dir.path().display(), account.name))?;
    }
    Ok(dir)
}

/// Whether every directory from `/` to `path` lets other users through (o+x).
fn reachable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    path.ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}
