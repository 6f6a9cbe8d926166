//! The admin API against a real controller started in-process (SQLite in a temp dir, the
//! embedded broker, every listener on a free loopback port): authentication and roles, model
//! uploads and their refusals, the audit log's hash chain under tampering, the rate limit,
//! `/metrics`, and the OpenAPI document's coverage of the registered routes.
//!
//! Every refusal is checked for its status, its machine-readable code, a message that says what
//! was wrong, and that it changed nothing (tokens, enrollment tokens, models, devices, audit
//! rows, and the upload and bundle directories are compared before and after).
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_controller::server::api::ASSIGNMENT_TTL_MS;
use edgefleet_controller::server::config::{MqttMode, ServeArgs};
use edgefleet_controller::server::refresh::{Refreshed, refresh_due};
use edgefleet_controller::server::{self, Running};
use edgefleet_protocol::Timestamp;
use edgefleet_protocol::assignment::Assignment;
use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::trust::Signed;
use reqwest::multipart::{Form, Part};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

/// Bound on any single HTTP exchange (model uploads run tract; the machine may be busy).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on starting a controller (CA and keys are generated on first start).
const START_TIMEOUT: Duration = Duration::from_secs(120);

const API_SOURCE: &str = include_str!("../src/server/api.rs");
const REGISTRY_SOURCE: &str = include_str!("../src/server/registry.rs");
const ROLLOUTS_SOURCE: &str = include_str!("../src/server/rollouts.rs");
const CAPTURE_SOURCE: &str = include_str!("../src/server/capture.rs");
const DRIFT_SOURCE: &str = include_str!("../src/server/drift/api.rs");

const REFERENCE_HEADER: &str = "temperature_c,vibration_rms,current_a,pressure_bar\n";

fn demo_model() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/sensor-anomaly.onnx")).unwrap()
}

fn fixture_model(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../agent/tests/models")
            .join(name),
    )
    .unwrap()
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Fails the test if `fut` takes longer than `limit`.
async fn bounded<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A controller running in this process, with its data directory and admin token.
struct Ctl {
    _dir: tempfile::TempDir,
    running: Running,
    base: String,
    admin: String,
    http: reqwest::Client,
}

impl Ctl {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut ServeArgs)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = ServeArgs {
            data_dir: dir.path().join("data"),
            database: None,
            mqtt: MqttMode::Embedded,
            mqtt_listen: free_addr(),
            device_mqtt_url: None,
            crl_file: None,
            crl_reload_command: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            device_listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            hostnames: Vec::new(),
            keys_dir: None,
            admin_token: None,
            max_upload_mib: 512,
            rate_limit_per_minute: 600,
            validation_memory_mib: 4096,
            validator: Some(PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-controller"))),
        };
        adjust(&mut args);
        let running = bounded(
            START_TIMEOUT,
            "the controller to start",
            server::start(&args),
        )
        .await
        .unwrap();
        let admin = std::fs::read_to_string(args.data_dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        // Built after `start`, which installs the rustls crypto provider reqwest needs.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap();
        let base = format!("http://{}", running.api);
        Self {
            _dir: dir,
            running,
            base,
            admin,
            http,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.running.app.data_dir.clone()
    }

    fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        send(self.req(Method::GET, path, token)).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        send(self.req(Method::POST, path, token).json(&body)).await
    }

    async fn upload(&self, token: &str, form: Form) -> (StatusCode, Value) {
        send(
            self.req(Method::POST, "/api/v1/models", Some(token))
                .multipart(form),
        )
        .await
    }

    /// Creates an API token with `role` as admin; returns (id, secret).
    async fn token(&self, name: &str, role: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/v1/tokens",
                Some(&self.admin),
                json!({"name": name, "role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "creating token {name}: {body}");
        assert_eq!(body["role"], role, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }

    async fn audit_count(&self) -> usize {
        self.running
            .app
            .store
            .audit_rows(0, 1_000_000)
            .await
            .unwrap()
            .len()
    }

    /// Everything a refused request must leave alone, read straight from the store and disk
    /// (no API calls, so no rate-limit budget is spent).
    async fn snapshot(&self) -> Value {
        let store = &self.running.app.store;
        let files = |dir: PathBuf| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        json!({
            "api_tokens": store.list_api_tokens().await.unwrap(),
            "enroll_tokens": store.list_enroll_tokens().await.unwrap(),
            "devices": store.list_devices().await.unwrap(),
            "models": store.list_models().await.unwrap(),
            "audit": store.audit_rows(0, 1_000_000).await.unwrap(),
            "uploads": files(self.data_dir().join("uploads")),
            "bundles": files(self.data_dir().join("bundles")),
        })
    }

    async fn assert_unchanged(&self, before: &Value, after_what: &str) {
        let now = self.snapshot().await;
        assert!(
            &now == before,
            "{after_what} changed the controller's state\nbefore: {before:#}\nafter: {now:#}"
        );
    }

    async fn verify(&self) -> Value {
        let (status, body) = self.get("/api/v1/audit/verify", Some(&self.admin)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// Sends a request; the body as JSON, or as a JSON string when it is not JSON.
async fn send(req: RequestBuilder) -> (StatusCode, Value) {
    let response = bounded(REQUEST_TIMEOUT, "an API response", req.send())
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts an error response: status, `error.code`, and that `error.message` contains each of
/// `mentions`.
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, mentions: &[&str]) {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "unexpected status; body: {body}");
    assert_eq!(
        body["error"]["code"], code,
        "unexpected error code; body: {body}"
    );
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {body}"));
    assert!(message.len() > 10, "unhelpfully short message: {body}");
    for m in mentions {
        assert!(
            message.contains(m),
            "the message should mention {m:?}: {message:?}"
        );
    }
}

fn metadata(name: &str, version: &str) -> String {
    json!({"name": name, "version": version}).to_string()
}

fn form(metadata: Option<String>, model: Option<Vec<u8>>, reference: Option<&str>) -> Form {
    let mut form = Form::new();
    if let Some(m) = metadata {
        form = form.text("metadata", m);
    }
    if let Some(bytes) = model {
        form = form.part("model", Part::bytes(bytes).file_name("model.onnx"));
    }
    if let Some(csv) = reference {
        form = form.part(
            "reference",
            Part::bytes(csv.as_bytes().to_vec()).file_name("reference.csv"),
        );
    }
    form
}

// ---- 1. authentication ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_refused_and_change_nothing() {
    let ctl = Ctl::start().await;
    let before = ctl.snapshot().await;
    let audit_rows = ctl.audit_count().await;
    assert_eq!(audit_rows, 1, "only the bootstrap admin token is audited");

    // No Authorization header at all.
    let got = ctl.get("/api/v1/devices", None).await;
    assert_error(
        &got,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        &["Authorization: Bearer", "edgefleet login"],
    );
    let got = ctl
        .post(
            "/api/v1/tokens",
            None,
            json!({"name": "sneaky", "role": "admin"}),
        )
        .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthenticated", &[]);
    // A header that is not a bearer token.
    let got = send(
        ctl.req(Method::POST, "/api/v1/tokens", None)
            .header("authorization", format!("Basic {}", ctl.admin))
            .json(&json!({"name": "sneaky", "role": "admin"})),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthenticated", &[]);
    // The 401 says how to authenticate.
    let response = ctl
        .req(Method::GET, "/api/v1/models", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers().get("www-authenticate").unwrap(),
        "Bearer"
    );

    // Malformed tokens.
    for bad in [
        "nope",
        "efk_1234",
        "efk_zz00000000000000000000000000000000000000000000000000000000000000",
    ] {
        let got = ctl
            .post(
                "/api/v1/tokens",
                Some(bad),
                json!({"name": "sneaky", "role": "admin"}),
            )
            .await;
        assert_error(
            &got,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            &["not valid"],
        );
    }
    // Well-formed, but no such token (this controller's admin token with one digit changed).
    let mut unknown = ctl.admin.clone();
    let last = if unknown.ends_with('0') { "1" } else { "0" };
    unknown.replace_range(unknown.len() - 1.., last);
    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/tokens",
            json!({"name": "sneaky", "role": "admin"}),
        ),
        (Method::POST, "/api/v1/enroll-tokens", json!({})),
        (Method::GET, "/api/v1/devices", json!(null)),
    ] {
        let got = send(ctl.req(method, path, Some(&unknown)).json(&body)).await;
        assert_error(
            &got,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            &["not valid"],
        );
    }

    ctl.assert_unchanged(&before, "requests without a valid token")
        .await;
    assert_eq!(ctl.audit_count().await, audit_rows);
    // The real admin token still works.
    let (status, body) = ctl.get("/api/v1/devices", Some(&ctl.admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"devices": []}));
}

// ---- 2. roles and revocation ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_what_a_token_may_do_and_revoked_tokens_stop_working() {
    let ctl = Ctl::start().await;
    let (viewer_id, viewer) = ctl.token("dashboard", "viewer").await;
    let (_, operator) = ctl.token("ci-pipeline", "operator").await;
    let before = ctl.snapshot().await;

    // A viewer reads.
    let (status, body) = ctl.get("/api/v1/devices", Some(&viewer)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"devices": []}));
    let (status, body) = ctl.get("/api/v1/models", Some(&viewer)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"models": []}));

    // ... and changes nothing.
    let got = ctl.upload(&viewer, demo_upload("1.0.0")).await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["operator role", "\"dashboard\"", "viewer"],
    );
    let got = ctl
        .post(
            "/api/v1/enroll-tokens",
            Some(&viewer),
            json!({"labels": {"site": "a"}}),
        )
        .await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["operator role", "viewer"],
    );
    let got = ctl
        .post(
            "/api/v1/tokens",
            Some(&viewer),
            json!({"name": "escalate", "role": "admin"}),
        )
        .await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin role", "viewer"],
    );

    // An operator cannot mint tokens or revoke devices.
    let got = ctl
        .post(
            "/api/v1/tokens",
            Some(&operator),
            json!({"name": "escalate", "role": "admin"}),
        )
        .await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin role", "\"ci-pipeline\"", "operator"],
    );
    let got = ctl
        .post("/api/v1/devices/x/revoke", Some(&operator), json!(null))
        .await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin role", "operator"],
    );
    ctl.assert_unchanged(&before, "requests refused for their role")
        .await;

    // The operator can do what operators do (so the 403s above were about the role).
    let (status, body) = ctl
        .post("/api/v1/enroll-tokens", Some(&operator), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Revoking the viewer's token: it is refused from then on.
    let (status, body) = send(ctl.req(
        Method::DELETE,
        &format!("/api/v1/tokens/{viewer_id}"),
        Some(&ctl.admin),
    ))
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let before = ctl.snapshot().await;
    for path in ["/api/v1/devices", "/api/v1/models"] {
        let got = ctl.get(path, Some(&viewer)).await;
        assert_error(
            &got,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            &["revoked"],
        );
    }
    ctl.assert_unchanged(&before, "requests with a revoked token")
        .await;
}

// ---- 3. model uploads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_uploads_are_validated_and_refusals_leave_nothing_behind() {
    let ctl = Ctl::start_with(|args| args.max_upload_mib = 1).await;
    let admin = ctl.admin.clone();
    let uploads = ctl.data_dir().join("uploads");

    // The real model registers, signed by the online release key.
    let (status, good) = ctl.upload(&admin, demo_upload("1.0.0")).await;
    assert_eq!(status, StatusCode::CREATED, "{good}");
    assert_eq!(good["name"], "pump-anomaly");
    assert_eq!(good["version"], "1.0.0");
    assert_eq!(good["state"], "ready", "{good}");
    assert_eq!(good["signatures"], 1, "{good}");
    let digest = good["digest"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 64, "{good}");
    let before = ctl.snapshot().await;
    assert_eq!(before["models"].as_array().unwrap().len(), 1);
    assert_eq!(before["bundles"].as_array().unwrap().len(), 1);

    // The same name and version again.
    let got = ctl.upload(&admin, demo_upload("1.0.0")).await;
    assert_error(
        &got,
        StatusCode::CONFLICT,
        "conflict",
        &["pump-anomaly 1.0.0", "already registered"],
    );
    ctl.assert_unchanged(&before, "a duplicate registration")
        .await;

    // Bytes that are not ONNX.
    let garbage = b"definitely not a protobuf \xff\xfe\x00\x01".repeat(64);
    let got = ctl
        .upload(
            &admin,
            form(Some(metadata("pump-anomaly", "2.0.0")), Some(garbage), None),
        )
        .await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_model",
        &["not a usable ONNX model"],
    );
    ctl.assert_unchanged(&before, "a garbage model").await;

    // A model with an operator tract cannot run.
    let got = ctl
        .upload(
            &admin,
            form(
                Some(metadata("pump-anomaly", "3.0.0")),
                Some(fixture_model("if_op.onnx")),
                None,
            ),
        )
        .await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_op",
        &["`If`"],
    );
    ctl.assert_unchanged(&before, "a model with an If node")
        .await;

    // No metadata part.
    let got = ctl
        .upload(&admin, form(None, Some(demo_model()), None))
        .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "bad_request",
        &["`metadata`", "missing"],
    );
    ctl.assert_unchanged(&before, "an upload without metadata")
        .await;

    // Metadata with a field the controller does not know (a typo must not be ignored).
    let typo = json!({"name": "pump-anomaly", "version": "4.0.0", "decsription": "typo"});
    let got = ctl
        .upload(
            &admin,
            form(Some(typo.to_string()), Some(demo_model()), None),
        )
        .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "bad_request",
        &["unknown field", "decsription"],
    );
    ctl.assert_unchanged(&before, "metadata with an unknown field")
        .await;

    // A reference CSV with a cell that is not a number: the message names the line.
    let csv = format!("{REFERENCE_HEADER}45.39,1.662,10.34,5.601\n46.37,abc,10.65,5.903\n");
    let got = ctl
        .upload(
            &admin,
            form(
                Some(metadata("pump-anomaly", "6.0.0")),
                Some(demo_model()),
                Some(&csv),
            ),
        )
        .await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "bad_reference",
        &["line 3", "\"abc\""],
    );
    ctl.assert_unchanged(&before, "a bad reference CSV").await;

    // After all of that, exactly the one good model.
    let (status, body) = ctl.get("/api/v1/models", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{body}");
    assert_eq!(models[0]["digest"], digest.as_str());
    assert_eq!(models[0]["name"], "pump-anomaly");
    assert_eq!(models[0]["version"], "1.0.0");
    assert_eq!(models[0]["state"], "ready");
    assert!(
        std::fs::read_dir(&uploads).unwrap().next().is_none(),
        "the uploads directory should be empty after every request"
    );
}

/// The demo model as pump-anomaly `version`, with no reference data.
fn demo_upload(version: &str) -> Form {
    form(
        Some(metadata("pump-anomaly", version)),
        Some(demo_model()),
        None,
    )
}

/// Registers the demo model as pump-anomaly 1.0.0; returns its digest.
async fn register_good_model(ctl: &Ctl) -> String {
    let (status, good) = ctl.upload(&ctl.admin, demo_upload("1.0.0")).await;
    assert_eq!(status, StatusCode::CREATED, "{good}");
    good["digest"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_refused_and_its_temp_file_removed() {
    let ctl = Ctl::start_with(|args| args.max_upload_mib = 1).await;
    let uploads = ctl.data_dir().join("uploads");
    let digest = register_good_model(&ctl).await;
    let before = ctl.snapshot().await;

    // ~2 MiB against --max-upload-mib 1.
    let big = vec![0x5a_u8; 2 * 1024 * 1024];
    let sent = bounded(
        REQUEST_TIMEOUT,
        "the oversized upload",
        ctl.req(Method::POST, "/api/v1/models", Some(&ctl.admin))
            .multipart(form(
                Some(metadata("pump-anomaly", "5.0.0")),
                Some(big),
                None,
            ))
            .send(),
    )
    .await;

    // Whatever the client saw, the server side must be clean: no temp file, nothing stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(&uploads)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still holds {left:?} after the refused upload",
            uploads.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctl.assert_unchanged(&before, "an oversized upload").await;
    let (status, body) = ctl.get("/api/v1/models", Some(&ctl.admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{body}");
    assert_eq!(models[0]["digest"], digest.as_str());

    // And the client gets the 413 with its explanation. The handler answers after reading about
    // 1 MiB and leaves the rest of the body unread; if the connection is then reset before the
    // client reads the answer, the explanation is lost (see the report on registry.rs).
    let response = sent.unwrap_or_else(|err| {
        panic!(
            "the client never received the 413: {err:?} (the controller answered without \
             reading the rest of the request body, and the connection was reset)"
        )
    });
    let status = response.status();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    assert_error(
        &(status, body),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        &["1 MiB", "--max-upload-mib"],
    );
}

// ---- 4. audit log ----

/// A few audited changes: two tokens, an enrollment token, a revocation (plus the bootstrap row).
async fn make_changes(ctl: &Ctl) {
    let (viewer_id, _) = ctl.token("auditor", "viewer").await;
    ctl.token("deployer", "operator").await;
    let (status, body) = ctl
        .post(
            "/api/v1/enroll-tokens",
            Some(&ctl.admin),
            json!({"labels": {"site": "plant-7"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send(ctl.req(
        Method::DELETE,
        &format!("/api/v1/tokens/{viewer_id}"),
        Some(&ctl.admin),
    ))
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_append_only_and_an_edited_row_is_found() {
    let ctl = Ctl::start().await;
    make_changes(&ctl).await;
    let rows = ctl.audit_count().await;
    assert_eq!(rows, 5, "bootstrap + 2 tokens + enroll token + revocation");

    let verified = ctl.verify().await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["head"]["rows"], rows, "{verified}");
    assert_eq!(verified["head"]["last_seq"], rows, "{verified}");

    // The export: one JSON object per line, in seq order, admin only.
    let response = ctl
        .req(Method::GET, "/api/v1/audit", Some(&ctl.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/x-ndjson"
    );
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), rows, "{text}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.is_object(), "{line}");
        assert_eq!(
            line["seq"],
            i as i64 + 1,
            "seq must increase by one: {text}"
        );
        for field in [
            "at",
            "actor",
            "action",
            "object",
            "details",
            "prev_hash",
            "hash",
        ] {
            assert!(line.get(field).is_some(), "line {i} lacks {field}: {line}");
        }
    }
    assert_eq!(lines[0]["action"], "token.create");
    assert_eq!(lines[4]["action"], "token.revoke");
    let (_, viewer) = ctl.token("reader", "viewer").await;
    let before = ctl.snapshot().await;
    let got = ctl.get("/api/v1/audit", Some(&viewer)).await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        &["admin role", "viewer"],
    );
    ctl.assert_unchanged(&before, "a viewer's audit export")
        .await;
    let rows = ctl.audit_count().await;
    assert_eq!(rows, 6);

    // With the triggers in place even direct database access cannot edit or delete rows.
    let store = &ctl.running.app.store;
    let err = store
        .execute_raw("UPDATE audit_log SET details = '{\"role\":\"admin\"}' WHERE seq = 2")
        .await
        .expect_err("the append-only trigger must refuse an UPDATE");
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = store
        .execute_raw("DELETE FROM audit_log WHERE seq = 3")
        .await
        .expect_err("the append-only trigger must refuse a DELETE");
    assert!(err.to_string().contains("append-only"), "{err}");
    ctl.assert_unchanged(&before, "refused raw UPDATE/DELETE")
        .await;
    let verified = ctl.verify().await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["head"]["rows"], rows);

    // An attacker who can write the file drops the triggers and edits a row.
    store
        .execute_raw("DROP TRIGGER audit_log_no_update")
        .await
        .unwrap();
    store
        .execute_raw("DROP TRIGGER audit_log_no_delete")
        .await
        .unwrap();
    let original = &before["audit"][1];
    assert_eq!(original["seq"], 2);
    let changed = store
        .execute_raw(
            "UPDATE audit_log SET details = '{\"id\":\"tok_x\",\"role\":\"viewer\"}' WHERE seq = 2",
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let verified = ctl.verify().await;
    assert_eq!(verified["ok"], false, "{verified}");
    assert_eq!(verified["break"]["kind"], "edited", "{verified}");
    assert_eq!(verified["break"]["seq"], 2, "{verified}");
    assert_eq!(
        verified["break"]["action"], original["action"],
        "{verified}"
    );
    let message = verified["message"].as_str().unwrap();
    assert!(message.contains("row 2 was edited"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_audit_row_is_named() {
    let ctl = Ctl::start().await;
    make_changes(&ctl).await;
    let verified = ctl.verify().await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["head"]["rows"], 5, "{verified}");

    let store = &ctl.running.app.store;
    store
        .execute_raw("DROP TRIGGER audit_log_no_delete")
        .await
        .unwrap();
    assert_eq!(
        store
            .execute_raw("DELETE FROM audit_log WHERE seq = 3")
            .await
            .unwrap(),
        1
    );
    let verified = ctl.verify().await;
    assert_eq!(verified["ok"], false, "{verified}");
    assert_eq!(verified["break"]["kind"], "deleted", "{verified}");
    assert_eq!(verified["break"]["first"], 3, "{verified}");
    assert_eq!(verified["break"]["last"], 3, "{verified}");
    assert_eq!(verified["break"]["previous"], 2, "{verified}");
    assert_eq!(verified["break"]["next"], 4, "{verified}");
    let message = verified["message"].as_str().unwrap();
    assert!(message.contains("3..=3"), "{message}");
}

// ---- 5. rate limit ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_request_in_a_minute_is_rate_limited_per_token() {
    let ctl = Ctl::start_with(|args| args.rate_limit_per_minute = 5).await;
    let started = Instant::now();
    // Request 1 creates a second token (it has its own bucket), 2–5 read.
    let (_, viewer) = ctl.token("wallboard", "viewer").await;
    for i in 2..=5 {
        let (status, body) = ctl.get("/api/v1/tokens", Some(&ctl.admin)).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    let before = ctl.snapshot().await;
    let got = ctl
        .post(
            "/api/v1/tokens",
            Some(&ctl.admin),
            json!({"name": "one-too-many", "role": "viewer"}),
        )
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "the six requests took {elapsed:?}, long enough for the bucket to refill"
    );
    assert_error(
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &["too many requests", "retry in"],
    );
    ctl.assert_unchanged(&before, "a rate-limited request")
        .await;

    // Another token is not held back by the admin's budget.
    let (status, body) = ctl.get("/api/v1/devices", Some(&viewer)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, metrics) = ctl.get("/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "edgefleet_http_rate_limited_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |l| l == "edgefleet_http_requests_total{route=\"/api/v1/tokens\",status=\"429\"} 1"
        ),
        "{metrics}"
    );
}

// ---- 6. metrics and OpenAPI ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let ctl = Ctl::start().await;
    let (status, _) = ctl.get("/api/v1/devices", Some(&ctl.admin)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = ctl.get("/api/v1/devices", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let response = ctl.req(Method::GET, "/metrics", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "content-type {content_type}"
    );
    let text = response.text().await.unwrap();
    for needle in [
        "# TYPE edgefleet_devices_enrolled gauge",
        "\nedgefleet_devices_enrolled 0\n",
        "# TYPE edgefleet_http_requests_total counter",
        "\nedgefleet_http_requests_total{route=\"/api/v1/devices\",status=\"200\"} 1\n",
        "\nedgefleet_http_requests_total{route=\"/api/v1/devices\",status=\"401\"} 1\n",
    ] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }
    // Every sample line is `name{labels} number`.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        assert!(series.starts_with("edgefleet_"), "{line:?}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
    }
}

/// `(path, methods)` of every `.route("…", …)` in a router's source.
fn routes_in(source: &str) -> Vec<(String, Vec<&'static str>)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let Some(literal) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        let end = literal.find('"').unwrap();
        let path = literal[..end].to_owned();
        let after = &literal[end + 1..];
        // The method router runs until the next route (or the end of the builder).
        let stop = [".route(", ".merge(", ".with_state(", "\n}"]
            .iter()
            .filter_map(|m| after.find(m))
            .min()
            .unwrap_or(after.len());
        let segment = &after[..stop];
        let methods = ["get", "post", "put", "delete", "patch"]
            .into_iter()
            .filter(|m| {
                segment.match_indices(&format!("{m}(")).any(|(i, _)| {
                    !segment[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                })
            })
            .collect();
        out.push((path, methods));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_api_route() {
    let ctl = Ctl::start().await;
    let response = ctl
        .req(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();

    let routes: Vec<_> = routes_in(API_SOURCE)
        .into_iter()
        .chain(routes_in(REGISTRY_SOURCE))
        .chain(routes_in(ROLLOUTS_SOURCE))
        .chain(routes_in(CAPTURE_SOURCE))
        .chain(routes_in(DRIFT_SOURCE))
        .filter(|(path, _)| path.starts_with("/api/v1/"))
        .collect();
    // The scan itself works: it finds routes written on one line and across lines.
    let found: Vec<&str> = routes.iter().map(|(p, _)| p.as_str()).collect();
    for known in [
        "/api/v1/tokens",
        "/api/v1/enroll-tokens",
        "/api/v1/models",
        "/api/v1/models/{digest}/signatures",
        "/api/v1/audit/verify",
    ] {
        assert!(found.contains(&known), "the scan missed {known}: {found:?}");
    }
    let models = routes.iter().find(|(p, _)| p == "/api/v1/models").unwrap();
    assert_eq!(models.1, ["get", "post"]);

    let mut missing = Vec::new();
    for (path, methods) in &routes {
        assert!(!methods.is_empty(), "no methods found for {path}");
        match paths.get(path) {
            None => missing.push(format!("{path} (the whole path)")),
            Some(item) => {
                for method in methods {
                    if item.get(*method).is_none() {
                        missing.push(format!("{} {path}", method.to_uppercase()));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "routes registered in api.rs/registry.rs/rollouts.rs/capture.rs/drift/api.rs but not documented in controller/openapi.json: {missing:?}"
    );
    // And nothing documented that is not served.
    let stale: Vec<_> = paths
        .keys()
        .filter(|p| !found.contains(&p.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "documented in openapi.json but not registered: {stale:?}"
    );
}

/// Enrolls `device` through the controller's HTTPS enrollment endpoint, as an agent does.
async fn enroll(ctl: &Ctl, device: &str) {
    let (status, token) = ctl
        .post("/api/v1/enroll-tokens", Some(&ctl.admin), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device);
    let request = json!({
        "v": edgefleet_protocol::enroll::ENROLL_VERSION,
        "token": token["token"],
        "device": device,
        "csr_pem": params.serialize_request(&key).unwrap().pem().unwrap(),
        "arch": "x86_64",
        "agent_version": "test",
    });
    let ca = std::fs::read(ctl.running.app.ca.ca_path()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let url = format!(
        "{}{}",
        ctl.running.app.device_url,
        edgefleet_protocol::enroll::ENROLL_PATH
    );
    let (status, body) = send(client.post(url).json(&request)).await;
    assert_eq!(status, StatusCode::OK, "enrolling {device}: {body}");
}

/// The current signed assignment of `device`, decoded.
async fn stored_assignment(ctl: &Ctl, device: &str) -> Assignment {
    let (_, bytes) = ctl
        .running
        .app
        .store
        .assignments()
        .await
        .unwrap()
        .into_iter()
        .find(|(d, _)| d == device)
        .unwrap();
    let signed = Signed::decode("assignment", &bytes, MAX_MESSAGE_BYTES).unwrap();
    codec::decode("assignment", &signed.body, MAX_MESSAGE_BYTES).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_are_re_signed_with_the_same_content_before_they_expire() {
    let ctl = Ctl::start().await;
    enroll(&ctl, "pump-01").await;
    let digest = register_good_model(&ctl).await;
    let (status, body) = ctl
        .post(
            "/api/v1/devices/pump-01/assign",
            Some(&ctl.admin),
            json!({"model": digest, "rollback": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = stored_assignment(&ctl, "pump-01").await;
    assert_eq!(first.seq, 1);
    let app = &ctl.running.app;

    // Fresh, and still at half its lifetime less a minute: nothing to do.
    let half = ASSIGNMENT_TTL_MS / 2;
    for at in [
        first.issued_at.as_millis(),
        first.expires.as_millis() - half - 60_000,
    ] {
        let done = refresh_due(app, Timestamp(at)).await.unwrap();
        assert_eq!(done, Refreshed::default(), "at {at}");
    }
    assert_eq!(stored_assignment(&ctl, "pump-01").await, first);

    // Past half its lifetime: re-signed under the next sequence number, content unchanged.
    let later = Timestamp(first.expires.as_millis() - half + 60_000);
    let done = refresh_due(app, later).await.unwrap();
    assert_eq!(
        done,
        Refreshed {
            renewed: 1,
            superseded: 0
        }
    );
    let second = stored_assignment(&ctl, "pump-01").await;
    assert_eq!(second.seq, 2);
    assert!(second.expires >= first.expires, "{second:?}");
    assert_eq!(
        (
            &second.device,
            &second.active,
            &second.shadow,
            second.rollback,
            &second.rollout
        ),
        (
            &first.device,
            &first.active,
            &first.shadow,
            first.rollback,
            &first.rollout
        )
    );
    let (_, shown) = ctl.get("/api/v1/devices/pump-01", Some(&ctl.admin)).await;
    assert_eq!(shown["device"]["assignment"]["seq"], 2, "{shown}");

    // Recorded in the audit log, whose chain still holds.
    let rows = app.store.audit_rows(0, 1_000).await.unwrap();
    let refresh = rows
        .iter()
        .find(|r| r.action == "device.assignment_refresh")
        .expect("an audit row for the refresh");
    assert_eq!(refresh.object, "device:pump-01");
    assert_eq!(refresh.actor, "controller");
    assert_eq!(ctl.verify().await["ok"], true);

    // A revoked device's assignment is not renewed.
    let (status, body) = ctl
        .post(
            "/api/v1/devices/pump-01/revoke",
            Some(&ctl.admin),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let much_later = Timestamp(second.expires.as_millis());
    assert_eq!(
        refresh_due(app, much_later).await.unwrap(),
        Refreshed::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_crashes_the_validator_is_refused_and_the_controller_keeps_serving() {
    // The validator child may use 24 MiB of address space: loading any model aborts it, as a
    // model that exhausts memory or makes the inference library panic would.
    let ctl = Ctl::start_with(|args| args.validation_memory_mib = 24).await;
    let before = ctl.snapshot().await;
    let got = ctl.upload(&ctl.admin, demo_upload("1.0.0")).await;
    assert_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "model_crashed",
        &["validator", "cannot be run safely"],
    );
    ctl.assert_unchanged(&before, "an upload that crashed the validator")
        .await;
    let (status, _) = ctl.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_state_and_outbox_commit_together_and_stale_writers_are_refused() {
    use edgefleet_controller::server::audit::AuditEntry;
    use edgefleet_controller::server::store::{
        OutboxAssignment, OutboxOutcome, RolloutChange, RolloutRow, StoreError,
    };

    let ctl = Ctl::start().await;
    let baseline = register_good_model(&ctl).await;
    let (status, candidate) = ctl.upload(&ctl.admin, demo_upload("2.0.0")).await;
    assert_eq!(status, StatusCode::CREATED, "{candidate}");
    let candidate = candidate["digest"].as_str().unwrap().to_owned();
    enroll(&ctl, "pump-7").await;
    let store = &ctl.running.app.store;
    let change = |phase: &str, actions: &[&str]| RolloutChange {
        phase: phase.into(),
        state: json!({"phase": phase}),
        next_deadline: Some(1_000),
        outbox: actions.iter().map(|a| (*a).to_owned()).collect(),
    };
    let row = RolloutRow {
        id: "ro_1".into(),
        kind: "rollout".into(),
        candidate: candidate.clone(),
        baseline: baseline.clone(),
        selector: json!({"site": "lab"}),
        phase: String::new(),
        state: Value::Null,
        version: 0,
        next_deadline: None,
        created_by: "token:admin".into(),
        created_at: 0,
        updated_at: 0,
    };
    let audit = || AuditEntry::new("token:admin", "rollout.start", "rollout:ro_1", json!({}));
    let audits_before = ctl.audit_count().await;
    store
        .create_rollout(
            10,
            &row,
            change("installing", &["a1", "a2"]),
            vec![audit(), audit()],
        )
        .await
        .unwrap();
    assert_eq!(ctl.audit_count().await, audits_before + 2);
    let saved = store.get_rollout("ro_1").await.unwrap();
    assert_eq!(
        (
            saved.version,
            saved.phase.as_str(),
            saved.state["phase"].as_str(),
            saved.selector["site"].as_str()
        ),
        (1, "installing", Some("installing"), Some("lab"))
    );

    // The next state and its actions land together; a writer holding the old version is refused
    // and changes nothing (no outbox entry, no audit row).
    let v2 = store
        .save_rollout(20, "ro_1", 1, change("baking", &["a3"]), Vec::new())
        .await
        .unwrap();
    assert_eq!(v2, 2);
    let audits = ctl.audit_count().await;
    let stale = store
        .save_rollout(30, "ro_1", 1, change("completed", &["a4"]), vec![audit()])
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(ctl.audit_count().await, audits);
    let saved = store.get_rollout("ro_1").await.unwrap();
    assert_eq!((saved.version, saved.phase.as_str()), (2, "baking"));
    let outbox = store.rollout_outbox("ro_1").await.unwrap();
    assert_eq!(
        outbox,
        vec![(1, "a1".into()), (2, "a2".into()), (3, "a3".into())]
    );

    // Each carried-out entry leaves the outbox in the transaction that stores the device's next
    // assignment: carried out again (a restart after the commit), it is skipped, so a device is
    // never assigned twice. An unknown device is refused and its entry removed.
    let item = |seq: i64, device: &str| OutboxAssignment {
        seq,
        device: device.into(),
        build: Box::new(move |n: u64| Ok((format!("signed-{n}").into_bytes(), json!({"seq": n})))),
        audit: AuditEntry::new("controller", "device.assign", "device:pump-7", json!({})),
    };
    let done = store
        .assign_from_outbox(50, "ro_1", vec![item(1, "pump-7"), item(2, "pump-ghost")])
        .await
        .unwrap();
    assert_eq!(
        done,
        vec![
            OutboxOutcome::Signed {
                device: "pump-7".into(),
                bytes: b"signed-1".to_vec()
            },
            OutboxOutcome::Refused {
                device: "pump-ghost".into(),
                reason: "the device is not enrolled".into()
            },
        ]
    );
    let again = store
        .assign_from_outbox(60, "ro_1", vec![item(1, "pump-7")])
        .await
        .unwrap();
    assert_eq!(again, vec![OutboxOutcome::AlreadyDone]);
    let device = store.get_device("pump-7").await.unwrap();
    assert_eq!(device.assignment_seq, 1, "assigned once");
    store
        .save_rollout(40, "ro_1", 2, change("completed", &["a5"]), vec![audit()])
        .await
        .unwrap();
    assert_eq!(
        store.rollout_outbox("ro_1").await.unwrap(),
        vec![(3, "a3".into()), (4, "a5".into())]
    );
    assert_eq!(store.list_rollouts().await.unwrap().len(), 1);
    assert_eq!(
        store
            .unfinished_rollouts(&["completed"])
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(ctl.verify().await["ok"], true);
}
