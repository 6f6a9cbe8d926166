//! The online half of `edgefleet` against a real `edgefleet-controller` process (SQLite and the
//! embedded broker in a temp dir, loopback ports): login and profiles, enrollment tokens, model
//! registration with lineage, roles, API tokens, the audit log (intact, exported, then broken
//! behind the database's back), devices with a real enrolled agent, and the errors a person sees
//! when the token, the role or the controller is wrong.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgefleet_tests::agent::{free_port, wait_until};
use edgefleet_tests::{Run, bin, run_err, run_ok};
use serde_json::Value;

/// Bound on the controller's first start (fleet CA and keys are generated then).
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../controller/demo")
        .join(name)
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: controller\r\n\r\n")
        .and_then(|()| stream.read_to_string(&mut answer))
        .is_ok()
        && answer.starts_with("HTTP/1.")
        && answer.contains(" 200 ")
}

/// A controller process with its data directory, and the CLI's config file beside it.
struct Controller {
    process: Killed,
    dir: tempfile::TempDir,
    api: SocketAddr,
    devices: SocketAddr,
    mqtt: SocketAddr,
}

impl Controller {
    fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), &[])
    }

    /// Starts a controller with its state in `dir`, passing it `extra` arguments. Ports come
    /// from `free_port`, which another test may take before the controller binds them: a start
    /// that fails with "Address already in use" is retried on fresh ports.
    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let mut dir = Some(dir);
        for attempt in 1.. {
            let (api, devices, mqtt) = (free_port(), free_port(), free_port());
            let log = File::create(dir.as_ref().unwrap().path().join("controller.log")).unwrap();
            let child = Command::new(bin("edgefleet-controller"))
                .arg("--data-dir")
                .arg(dir.as_ref().unwrap().path().join("data"))
                .args(["--listen", &api.to_string()])
                .args(["--device-listen", &devices.to_string()])
                .args(["--mqtt-listen", &mqtt.to_string()])
                .args(extra)
                .env("EDGEFLEET_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut controller = Self {
                process: Killed(child),
                dir: dir.take().unwrap(),
                api,
                devices,
                mqtt,
            };
            let started = wait_until(START_TIMEOUT, "the controller to answer /healthz", || {
                if let Ok(Some(status)) = controller.process.0.try_wait() {
                    return Some(Err(status));
                }
                healthy(api).then_some(Ok(()))
            });
            match started {
                Ok(()) => return controller,
                Err(_) if attempt < 5 && controller.log().contains("Address already in use") => {
                    dir = Some(std::mem::replace(
                        &mut controller.dir,
                        tempfile::tempdir().unwrap(),
                    ));
                }
                Err(status) => panic!("the controller exited ({status}):\n{}", controller.log()),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cli").join("config.toml")
    }

    /// `edgefleet` with its config in the temp dir and no connection settings from outside.
    fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin("edgefleet"));
        command
            .args(args)
            .env("EDGEFLEET_CONFIG", self.config())
            .env_remove("EDGEFLEET_URL")
            .env_remove("EDGEFLEET_TOKEN")
            .env_remove("EDGEFLEET_PROFILE")
            .stdin(Stdio::null());
        command
    }

    fn ok(&self, args: &[&str]) -> Run {
        run_ok(&mut self.cli(args))
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = self.ok(&args);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{}", out.stdout))
    }

    /// Runs a command that must fail with exit status `code` and say each of `needles`.
    fn fails(&self, args: &[&str], code: i32, needles: &[&str]) -> Run {
        let out = run_err(&mut self.cli(args));
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", out.stderr);
        for needle in needles {
            assert!(
                out.stderr.contains(needle),
                "{args:?}: {needle:?} not in:\n{}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        out
    }

    fn login_admin(&self) {
        let token_file = self.data().join("admin-token");
        let out = self.ok(&[
            "login",
            "--url",
            &self.url(),
            "--token-file",
            token_file.to_str().unwrap(),
        ]);
        assert!(out.stdout.contains("logged in to"), "{}", out.stdout);
    }

    fn register(&self, version: &str, extra: &[&str]) -> Value {
        let reference = demo_file("reference.csv");
        let mut args = register_args(version);
        args.extend(["--reference".into(), reference.display().to_string()]);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        self.json(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn models(&self) -> Vec<Value> {
        self.json(&["model", "list"])["models"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// `model register` of the demo model as `pump-anomaly` `version`.
fn register_args(version: &str) -> Vec<String> {
    let model = demo_file("sensor-anomaly.onnx");
    [
        "model",
        "register",
        model.to_str().unwrap(),
        "--name",
        "pump-anomaly",
        "--version",
        version,
    ]
    .map(String::from)
    .to_vec()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn cli_logs_in_registers_models_with_lineage_and_checks_the_audit_chain() {
    let ctl = Controller::start();

    // Nothing saved yet: a configuration error (2) that says what to do.
    ctl.fails(&["model", "list"], 2, &["edgefleet login"]);
    ctl.login_admin();
    assert_eq!(mode(&ctl.config()), 0o600);
    let config = std::fs::read_to_string(ctl.config()).unwrap();
    assert!(config.contains(&ctl.url()), "{config}");

    let enroll = ctl.json(&[
        "enroll-token",
        "create",
        "--label",
        "site=lab",
        "--ttl",
        "1h",
    ]);
    assert!(enroll["token"].as_str().unwrap().starts_with("efk_"));
    assert_eq!(enroll["labels"]["site"], "lab");
    let listed = ctl.json(&["enroll-token", "list"]);
    assert_eq!(listed["enroll_tokens"][0]["id"], enroll["id"]);

    let v1 = ctl.register(
        "1.0.0",
        &["--code-commit", "4f1c2e9", "--metric", "roc_auc=0.97"],
    );
    assert_eq!(v1["state"], "ready", "{v1}");
    let d1 = v1["digest"].as_str().unwrap().to_owned();
    let v2 = ctl.register("1.1.0", &["--parent", "pump-anomaly@1.0.0"]);
    let d2 = v2["digest"].as_str().unwrap().to_owned();
    assert_eq!(v2["parent"], d1.as_str(), "{v2}");
    assert_eq!(v2["release"], 2, "the release counter grows by default");

    let models = ctl.models();
    assert_eq!(models.len(), 2);
    let table = ctl.ok(&["model", "list"]).stdout;
    assert!(table.starts_with("NAME "), "{table}");
    for needle in ["1.0.0", "1.1.0", "ready", &d1[..12]] {
        assert!(table.contains(needle), "{needle:?} not in:\n{table}");
    }

    // `show` prints the signed manifest from the bundle, plus the registry's state.
    let shown = ctl.ok(&["model", "show", "pump-anomaly@1.1.0"]).stdout;
    for needle in [
        "pump-anomaly 1.1.0 (release 2)",
        &format!("manifest digest    {d2}"),
        &format!("parent             {d1}"),
        "state              ready (1 of 1 release signatures)",
        "feature",
    ] {
        assert!(shown.contains(needle), "{needle:?} not in:\n{shown}");
    }
    let shown = ctl.json(&["model", "show", &d1]);
    assert_eq!(shown["manifest"]["lineage"]["code_commit"], "4f1c2e9");

    let lineage = ctl.json(&["model", "lineage", "pump-anomaly@1.1.0"]);
    assert_eq!(lineage["model"]["digest"], d2.as_str());
    assert_eq!(lineage["ancestors"][0]["digest"], d1.as_str());
    let lineage = ctl.ok(&["model", "lineage", "pump-anomaly@1.0.0"]).stdout;
    let rows: Vec<&str> = lineage.lines().skip(1).collect();
    assert!(
        rows[0].starts_with("this") && rows[0].contains("1.0.0"),
        "{lineage}"
    );
    assert!(
        rows[1].starts_with("child") && rows[1].contains("1.1.0"),
        "{lineage}"
    );

    // The bundle comes down byte for byte as registered.
    let bundle = ctl.dir.path().join("v1.efb");
    ctl.ok(&["model", "download", &d1, "-o", bundle.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().len(),
        v1["bundle_size"].as_u64().unwrap()
    );

    // A viewer reads, but cannot register: a clear refusal and nothing changes.
    let viewer = ctl.json(&["token", "create", "--name", "ro", "--role", "viewer"]);
    let secret = viewer["token"].as_str().unwrap();
    let mut login = ctl.cli(&["login", "--url", &ctl.url(), "--profile", "ro"]);
    login.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = login.spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{secret}").unwrap();
    assert!(child.wait().unwrap().success(), "login from stdin");
    let profiles = ctl.json(&["profile", "list"]);
    assert_eq!(profiles["profiles"].as_array().unwrap().len(), 2);
    assert!(
        !profiles.to_string().contains(secret),
        "profile list shows no token"
    );
    assert_eq!(
        ctl.json(&["model", "list", "--profile", "ro"])["models"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // 16 MiB: the controller refuses the token before reading the body, so the CLI is still
    // sending when the connection closes, and must still report the refusal.
    let big = ctl.dir.path().join("big.onnx");
    std::fs::write(&big, vec![0u8; 16 << 20]).unwrap();
    let mut refused = register_args("9.0.0");
    refused[2] = big.display().to_string();
    ctl.fails(
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
        1,
        &["permission denied", "operator role", "viewer"],
    );
    ctl.ok(&["profile", "use", "default"]);
    assert_eq!(
        ctl.models().len(),
        2,
        "the refused upload registered nothing"
    );

    // A wrong token, and a token that was revoked, are refused with the way out.
    let wrong = format!("efk_{}", "0".repeat(64));
    ctl.fails(
        &["device", "list", "--token", &wrong],
        1,
        &["rejected the API token", "edgefleet login"],
    );
    let tokens = ctl.json(&["token", "list"]);
    assert!(
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "ro")
    );
    ctl.ok(&["token", "revoke", viewer["id"].as_str().unwrap()]);
    ctl.fails(
        &["model", "list", "--profile", "ro"],
        1,
        &["rejected the API token"],
    );
    ctl.ok(&["logout", "--profile", "ro"]);
    ctl.fails(
        &["model", "list", "--profile", "ro"],
        2,
        &["no profile \"ro\""],
    );

    // No devices yet; a missing one is the server's 404, code and message.
    assert_eq!(ctl.ok(&["device", "list"]).stdout.trim(), "no devices");
    ctl.fails(
        &["device", "show", "pump-99"],
        1,
        &["404", "not_found", "\"pump-99\" not found"],
    );

    // The audit chain: intact, exported as JSON lines (stdout and a 0600 file).
    let verified = ctl.ok(&["audit", "verify"]).stdout;
    assert!(verified.starts_with("audit log intact"), "{verified}");
    let export = ctl.ok(&["audit", "export"]).stdout;
    let rows: Vec<Value> = export
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    for action in [
        "enroll_token.create",
        "model.register",
        "token.create",
        "token.revoke",
    ] {
        assert!(actions.contains(&action), "{action} not in {actions:?}");
    }
    let file = ctl.dir.path().join("audit.jsonl");
    ctl.ok(&["audit", "export", "--output-file", file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), export);
    assert_eq!(mode(&file), 0o600);
    let later = ctl.ok(&["audit", "export", "--after", "2"]).stdout;
    assert_eq!(later.lines().count(), rows.len() - 2);

    // Someone with the database file drops the append-only trigger and edits row 2.
    edit_audit_row(&ctl.data().join("edgefleet.db"), 2);
    let out = ctl.fails(
        &["audit", "verify"],
        1,
        &["hash chain is broken", "row 2 was edited"],
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

/// Edits an audit row behind the controller's back, as an attacker with the file could.
fn edit_audit_row(db: &Path, seq: u32) {
    let script = "import sqlite3, sys\n\
        db = sqlite3.connect(sys.argv[1], timeout=10)\n\
        db.execute('DROP TRIGGER audit_log_no_update')\n\
        n = db.execute(\"UPDATE audit_log SET details = '{}' WHERE seq = ?\", (int(sys.argv[2]),)).rowcount\n\
        db.commit()\n\
        assert n == 1, n\n";
    run_ok(
        Command::new("python3")
            .args(["-c", script])
            .arg(db)
            .arg(seq.to_string()),
    );
}

#[test]
fn cli_labels_assigns_and_revokes_a_real_enrolled_device() {
    let ctl = Controller::start();
    ctl.login_admin();
    ctl.register("1.0.0", &[]);
    let enroll = ctl.json(&["enroll-token", "create", "--label", "site=lab"]);

    // A real agent enrolls with that token (CSR over HTTPS, then mTLS to the broker).
    let state = ctl.dir.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(ctl.data().join("pki/ca.pem"), state.join("ca.pem")).unwrap();
    let log = File::create(state.join("agent.log")).unwrap();
    let _agent = Killed(
        Command::new(bin("edgefleet-agent"))
            .env("EDGEFLEET_DEVICE_ID", "pump-01")
            .env("EDGEFLEET_STATE_DIR", &state)
            .env("EDGEFLEET_API_LISTEN", free_port().to_string())
            .env("EDGEFLEET_API_SOCKET", state.join("api.sock"))
            .env("EDGEFLEET_TRUST_ROOT", ctl.data().join("keys/root-v1.cbor"))
            .env("EDGEFLEET_KEYRING", ctl.data().join("keys/keyring.cbor"))
            .env("EDGEFLEET_ENROLL_URL", format!("https://{}", ctl.devices))
            .env("EDGEFLEET_ENROLL_TOKEN", enroll["token"].as_str().unwrap())
            .env("EDGEFLEET_MQTT_URL", format!("mqtts://{}", ctl.mqtt))
            .env("EDGEFLEET_MQTT_CA", state.join("ca.pem"))
            .env("EDGEFLEET_MQTT_CERT", state.join("device.pem"))
            .env("EDGEFLEET_MQTT_KEY", state.join("device.key"))
            .env("EDGEFLEET_MQTT_MAC_KEY", state.join("mac.key"))
            .env("EDGEFLEET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until(START_TIMEOUT, "the agent to enroll", || {
        let devices = ctl.json(&["device", "list"]);
        (devices["devices"].as_array()?.len() == 1).then_some(())
    });

    // `label` keeps the labels it is not told to change; `--replace` is the API's own PUT.
    let labels = ctl.json(&["device", "label", "pump-01", "line=b", "zone=1"]);
    assert_eq!(
        labels["labels"],
        serde_json::json!({"site": "lab", "line": "b", "zone": "1"})
    );
    let out = ctl
        .ok(&["device", "label", "pump-01", "--remove", "zone"])
        .stdout;
    assert_eq!(out.trim(), "device pump-01 labels: line=b, site=lab");
    let listed = ctl.ok(&["device", "list", "--label", "line=b"]).stdout;
    assert!(listed.starts_with("ID "), "{listed}");
    assert!(
        listed.contains("pump-01") && listed.contains("line=b, site=lab"),
        "{listed}"
    );
    assert_eq!(
        ctl.ok(&["device", "list", "--label", "line=z"])
            .stdout
            .trim(),
        "no devices"
    );
    ctl.fails(
        &["device", "label", "pump-01", "bad key=x"],
        1,
        &["400", "label key"],
    );

    let assigned = ctl
        .ok(&["device", "assign", "pump-01", "pump-anomaly@1.0.0"])
        .stdout;
    assert!(
        assigned.starts_with("assigned pump-anomaly 1.0.0 (release 1) to pump-01"),
        "{assigned}"
    );
    let shown = ctl.json(&["device", "show", "pump-01"]);
    assert_eq!(
        shown["device"]["assignment"]["active"]["version"], "1.0.0",
        "{shown}"
    );
    let shown = ctl.ok(&["device", "show", "pump-01"]).stdout;
    assert!(
        shown.contains("labels             line=b, site=lab"),
        "{shown}"
    );
    assert!(
        shown.contains("assignment         seq 1: pump-anomaly 1.0.0"),
        "{shown}"
    );
    ctl.fails(
        &["device", "assign", "pump-01", "pump-anomaly@7.0.0"],
        1,
        &["404", "not found"],
    );

    ctl.ok(&["device", "revoke", "pump-01"]);
    let shown = ctl.json(&["device", "show", "pump-01"]);
    assert!(shown["device"]["revoked_at"].is_i64(), "{shown}");
    assert!(ctl.ok(&["device", "list"]).stdout.contains("revoked"));
}

#[test]
fn cli_collects_an_offline_release_signature() {
    // A 2-of-2 release role: the controller holds one key, the other stays offline.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keys_arg = keys.to_str().unwrap();
    let edgefleet = |args: &[&str]| run_ok(Command::new(bin("edgefleet")).args(args));
    edgefleet(&[
        "keys",
        "init-root",
        "--dir",
        keys_arg,
        "--keys",
        "1",
        "--threshold",
        "1",
    ]);
    edgefleet(&[
        "keys",
        "add-release-key",
        "--dir",
        keys_arg,
        "--name",
        "online",
        "--name",
        "offline",
        "--threshold",
        "2",
    ]);
    let offline = dir.path().join("offline.key");
    std::fs::rename(keys.join("release-offline.key"), &offline).unwrap();
    let ctl = Controller::start_in(dir, &["--keys-dir", keys_arg]);
    ctl.login_admin();

    let model = ctl.register("1.0.0", &[]);
    assert_eq!(model["state"], "awaiting_signatures", "{model}");
    let digest = model["digest"].as_str().unwrap();
    let out = ctl.ok(&["model", "show", digest]).stdout;
    assert!(
        out.contains("awaiting_signatures (1 of 2 release signatures)"),
        "{out}"
    );

    // Download, sign offline (detached), hand the signature back.
    let bundle = ctl.dir.path().join("b.efb");
    let signature = ctl.dir.path().join("offline.sig");
    ctl.ok(&["model", "download", digest, "-o", bundle.to_str().unwrap()]);
    ctl.ok(&[
        "bundle",
        "sign",
        bundle.to_str().unwrap(),
        "--key",
        offline.to_str().unwrap(),
        "--detached",
        signature.to_str().unwrap(),
    ]);
    let out = ctl.ok(&[
        "model",
        "add-signature",
        "pump-anomaly@1.0.0",
        signature.to_str().unwrap(),
    ]);
    assert_eq!(
        out.stdout.trim(),
        "pump-anomaly 1.0.0: ready (2 of 2 release signatures)"
    );
    let shown = ctl.json(&["model", "show", digest]);
    assert_eq!(shown["signatures"], 2, "{shown}");
    // Not a signature file: the server's refusal, code and all.
    ctl.fails(
        &["model", "add-signature", digest, bundle.to_str().unwrap()],
        1,
        &["400", "bad_request", "detached signature"],
    );
}

#[test]
fn cli_explains_an_unreachable_controller_and_prints_completions() {
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let out = run_err(
        Command::new(bin("edgefleet"))
            .args(["device", "list", "--url", &format!("http://{closed}")])
            .args(["--token", &format!("efk_{}", "1".repeat(64))])
            .env("EDGEFLEET_CONFIG", dir.path().join("config.toml")),
    );
    assert_eq!(out.status.code(), Some(1));
    for needle in [
        &format!("cannot connect to the controller at http://{closed}"),
        "edgefleet-controller is running",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?} not in {}",
            out.stderr
        );
    }
    let out = run_err(
        Command::new(bin("edgefleet"))
            .args([
                "login",
                "--url",
                &format!("http://{closed}"),
                "--token",
                "efk_x",
            ])
            .env("EDGEFLEET_CONFIG", dir.path().join("config.toml")),
    );
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(
        !dir.path().join("config.toml").exists(),
        "a failed login saves nothing"
    );

    let script = run_ok(Command::new(bin("edgefleet")).args(["completions", "bash"])).stdout;
    assert!(
        script.contains("edgefleet") && script.contains("enroll-token"),
        "{script}"
    );
}
