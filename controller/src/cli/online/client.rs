//! The controller's admin API (`/api/v1`) as blocking calls: one reqwest client on a small
//! current-thread runtime, bearer authentication, and every failure — transport, status, body —
//! turned into a [`ClientError`] that says what went wrong and what to do.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on an ordinary API call. Uploads and downloads have none: the controller test-runs an
/// uploaded model before it answers, and bundles may be large.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot connect to the controller at {url}: {detail}; check that edgefleet-controller is running and listening there (`edgefleet login --url …` or --url to change it)"
    )]
    Connect { url: String, detail: String },
    #[error("the controller at {url} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error("the request to {url} failed: {detail}")]
    Transport { url: String, detail: String },
    #[error(
        "the controller rejected the API token: {message}; log in again with `edgefleet login`"
    )]
    Unauthorized { message: String },
    #[error("permission denied: {message}; ask an admin for a token with that role")]
    Forbidden { message: String },
    #[error("the controller answered {status} ({code}): {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("the controller's answer from {url} is not the JSON this CLI expects: {detail}")]
    Unexpected { url: String, detail: String },
    #[error("{0}")]
    Local(String),
}

/// The innermost cause of an error, which names the real problem ("Connection refused").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The `{"error": {"code", "message"}}` body of a refusal, or what there is of it.
fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    let code = error
        .and_then(|e| e["code"].as_str())
        .unwrap_or("no_code")
        .to_owned();
    let message = error
        .and_then(|e| e["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                String::from("(no message)")
            } else {
                text.chars().take(300).collect()
            }
        });
    match status {
        StatusCode::UNAUTHORIZED => ClientError::Unauthorized { message },
        StatusCode::FORBIDDEN => ClientError::Forbidden { message },
        _ => ClientError::Api {
            status,
            code,
            message,
        },
    }
}

/// A logged-in connection to one controller.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// Parses and checks a controller URL: `http(s)://host[:port][/prefix]`.
pub fn parse_url(url: &str) -> Result<Url, ClientError> {
    let bad = |reason: &str| ClientError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url.trim())
        .map_err(|e| bad(&format!("{e}; use http://HOST:PORT or https://HOST")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(bad("use http://HOST:PORT or https://HOST"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a controller URL has no query or fragment"));
    }
    Ok(parsed)
}

impl Client {
    pub fn new(url: &str, token: &str) -> Result<Self, ClientError> {
        let base = parse_url(url)?;
        let local = |what: &str, err: &dyn std::fmt::Display| {
            ClientError::Local(format!("cannot {what}: {err}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| local("start the I/O runtime", &e))?;
        // reqwest is built without a default crypto provider; ring is the workspace's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("edgefleet/", env!("CARGO_PKG_VERSION")));
        if base.scheme() == "http" {
            // No TLS on this connection: skip loading the system's CA certificates.
            let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| local("set up TLS", &e))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = {
            let _context = runtime.enter();
            builder
                .build()
                .map_err(|e| local("set up the HTTP client", &root_cause(&e)))?
        };
        Ok(Self {
            runtime,
            http,
            base,
            token: token.trim().to_owned(),
        })
    }

    /// The controller's URL as given (for messages and profiles).
    pub fn base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// `/api/v1/<path…>`, each segment percent-encoded.
    fn endpoint(&self, path: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(["api", "v1"]).extend(path);
        }
        url
    }

    fn request(&self, method: Method, path: &[&str], query: &[(&str, String)]) -> RequestBuilder {
        let mut url = self.endpoint(path);
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (k, v)));
        }
        self.http.request(method, url).bearer_auth(&self.token)
    }

    /// Sends `request`; a refusal becomes the matching [`ClientError`].
    async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let base = self.base().to_owned();
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Connect {
                    url: base.clone(),
                    detail: root_cause(&e),
                }
            } else if e.is_timeout() {
                ClientError::Timeout { url: base.clone() }
            } else {
                ClientError::Transport {
                    url: base.clone(),
                    detail: root_cause(&e),
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(refusal(status, &body))
    }

    fn body(&self, request: RequestBuilder) -> Result<Bytes, ClientError> {
        self.runtime.block_on(async {
            let response = self.send(request).await?;
            let url = response.url().to_string();
            response.bytes().await.map_err(|e| ClientError::Transport {
                url,
                detail: root_cause(&e),
            })
        })
    }

    fn json(&self, request: RequestBuilder) -> Result<Value, ClientError> {
        let url = self.base().to_owned();
        let body = self.body(request)?;
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
            url,
            detail: e.to_string(),
        })
    }

    pub fn get(&self, path: &[&str]) -> Result<Value, ClientError> {
        self.get_with(path, &[])
    }

    pub fn get_with(&self, path: &[&str], query: &[(&str, String)]) -> Result<Value, ClientError> {
        self.json(
            self.request(Method::GET, path, query)
                .timeout(REQUEST_TIMEOUT),
        )
    }

    /// A JSON body sent with `method` (POST, PUT); the JSON answer.
    pub fn send_json(
        &self,
        method: Method,
        path: &[&str],
        body: &Value,
    ) -> Result<Value, ClientError> {
        self.json(
            self.request(method, path, &[])
                .json(body)
                .timeout(REQUEST_TIMEOUT),
        )
    }

    pub fn post_bytes(&self, path: &[&str], body: Vec<u8>) -> Result<Value, ClientError> {
        self.json(
            self.request(Method::POST, path, &[])
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body)
                .timeout(REQUEST_TIMEOUT),
        )
    }

    pub fn delete(&self, path: &[&str]) -> Result<Value, ClientError> {
        self.json(
            self.request(Method::DELETE, path, &[])
                .timeout(REQUEST_TIMEOUT),
        )
    }

    /// A multipart upload, with no time limit (the body may be a stream).
    pub fn post_form(
        &self,
        path: &[&str],
        form: reqwest::multipart::Form,
    ) -> Result<Value, ClientError> {
        self.json(self.request(Method::POST, path, &[]).multipart(form))
    }

    /// A text answer (the audit log's JSON lines).
    pub fn get_text(&self, path: &[&str], query: &[(&str, String)]) -> Result<String, ClientError> {
        let body = self.body(
            self.request(Method::GET, path, query)
                .timeout(REQUEST_TIMEOUT),
        )?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Unexpected {
            url: self.base().to_owned(),
            detail: e.to_string(),
        })
    }

    /// Streams a download into `out`, calling `progress` with each chunk's length; returns the
    /// bytes written.
    pub fn download(
        &self,
        path: &[&str],
        out: &mut dyn Write,
        progress: impl FnMut(usize),
    ) -> Result<u64, ClientError> {
        self.download_with(path, &[], out, progress)
    }

    /// [`Client::download`] with a query string.
    pub fn download_with(
        &self,
        path: &[&str],
        query: &[(&str, String)],
        out: &mut dyn Write,
        mut progress: impl FnMut(usize),
    ) -> Result<u64, ClientError> {
        self.runtime.block_on(async {
            let mut response = self.send(self.request(Method::GET, path, query)).await?;
            let mut written = 0u64;
            loop {
                let chunk = response.chunk().await.map_err(|e| ClientError::Transport {
                    url: self.base().to_owned(),
                    detail: format!("the download broke off: {}", root_cause(&e)),
                })?;
                let Some(chunk) = chunk else { break };
                out.write_all(&chunk)
                    .map_err(|e| ClientError::Local(format!("cannot write the download: {e}")))?;
                written += chunk.len() as u64;
                progress(chunk.len());
            }
            Ok(written)
        })
    }

    /// The start of a download: reads until `enough` says the bytes so far suffice, or `max`
    /// bytes, then drops the connection.
    pub fn get_prefix(
        &self,
        path: &[&str],
        max: usize,
        mut enough: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, ClientError> {
        self.runtime.block_on(async {
            let request = self
                .request(Method::GET, path, &[])
                .timeout(REQUEST_TIMEOUT);
            let mut response = self.send(request).await?;
            let mut prefix = Vec::new();
            while prefix.len() < max && !enough(&prefix) {
                match response.chunk().await {
                    Ok(Some(chunk)) => prefix.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => {
                        return Err(ClientError::Transport {
                            url: self.base().to_owned(),
                            detail: root_cause(&e),
                        });
                    }
                }
            }
            Ok(prefix)
        })
    }

    /// Runs `future` on this client's runtime (e.g. to open files for a streamed upload).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_servers_code_and_message() {
        let body = br#"{"error":{"code":"not_found","message":"device pump-9 not found"}}"#;
        let err = refusal(StatusCode::NOT_FOUND, body);
        assert_eq!(
            err.to_string(),
            "the controller answered 404 Not Found (not_found): device pump-9 not found"
        );
        let err = refusal(
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":"forbidden","message":"this needs the operator role; token \"ro\" has viewer"}}"#,
        );
        assert!(matches!(err, ClientError::Forbidden { .. }));
        assert!(err.to_string().contains("needs the operator role"), "{err}");
        assert!(matches!(
            refusal(StatusCode::UNAUTHORIZED, b""),
            ClientError::Unauthorized { .. }
        ));
        // A proxy's HTML page, or nothing at all: still a message, never a panic.
        let err = refusal(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert!(
            err.to_string()
                .contains("502 Bad Gateway (no_code): <html>")
        );
        let err = refusal(StatusCode::INTERNAL_SERVER_ERROR, &[0xff, 0xfe]);
        assert!(err.to_string().starts_with("the controller answered 500"));
    }

    #[test]
    fn urls_need_a_scheme_and_host_and_paths_are_encoded() {
        assert!(parse_url("127.0.0.1:8080").is_err());
        assert!(parse_url("ftp://host").is_err());
        assert!(parse_url("http://host/?x=1").is_err());
        let client = Client::new("http://127.0.0.1:8080/edge/", "efk_x").unwrap();
        assert_eq!(client.base(), "http://127.0.0.1:8080/edge");
        assert_eq!(
            client.endpoint(&["models", "pump@1.0/x"]).as_str(),
            "http://127.0.0.1:8080/edge/api/v1/models/pump@1.0%2Fx"
        );
    }
}
