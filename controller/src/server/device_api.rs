//! The HTTPS endpoint devices talk to: enrollment (no client certificate yet; one-time token),
//! bundle downloads (client certificate of an enrolled, unrevoked device; HTTP Range) and
//! capture batch uploads (same certificate; checked by `server::capture`).

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use edgefleet_protocol::DeviceMacKey;
use edgefleet_protocol::enroll::{
    ENROLL_PATH, ENROLL_VERSION, EnrollError, EnrollErrorDetail, EnrollRequest, EnrollResponse,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tower::ServiceExt;

use super::App;
use super::api::ApiError;
use super::audit::AuditEntry;
use super::store::{NewDevice, StoreError};

/// Who is on the other end of a TLS connection.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    /// The common name of a verified client certificate (fleet CA), if one was presented.
    device: Option<String>,
}

/// Accepts TLS connections and serves the device routes on each.
pub fn serve(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, app: Arc<App>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let router = Router::new()
        .route(ENROLL_PATH, post(enroll))
        .route("/api/v1/bundles/{digest}", get(bundle))
        .route(
            "/api/v1/captures/{batch}",
            // The upload streams and is checked against its announced size.
            put(capture_upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(32 * 1024))
        .with_state(app);
    tokio::spawn(async move {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "device endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(Duration::from_secs(15), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::debug!(%err, %addr, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let device = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| super::pki::common_name(c));
                let peer = Peer { addr, device };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let router = router.clone().layer(Extension(peer.clone()));
                        async move { router.oneshot(req.map(Body::new)).await }
                    },
                );
                if let Err(err) = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%err, %addr, "device connection ended with an error");
                }
            });
        }
    });
}

fn enroll_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(EnrollError {
            error: EnrollErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        }),
    )
        .into_response()
}

async fn enroll(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Result<axum::Json<EnrollRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(retry) = app
        .limits
        .take(&format!("enroll:{}", peer.addr.ip()), Instant::now())
    {
        app.metrics.rate_limited();
        return enroll_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many enrollment attempts from this address; retry in {retry} s"),
        );
    }
    let req = match body {
        Ok(axum::Json(req)) => req,
        Err(e) => {
            return enroll_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unreadable enrollment request: {}", e.body_text()),
            );
        }
    };
    if req.v != ENROLL_VERSION {
        return enroll_error(
            StatusCode::BAD_REQUEST,
            "version",
            format!(
                "enrollment version {} is not supported (this controller speaks {ENROLL_VERSION}); update the agent",
                req.v
            ),
        );
    }
    if !super::auth::well_formed(&req.token) {
        return enroll_error(
            StatusCode::FORBIDDEN,
            "bad_token",
            "the enrollment token is malformed; copy it again from `edgefleet enroll-token create`",
        );
    }
    if super::pki::reserved_device_id(req.device.as_str()) {
        return enroll_error(
            StatusCode::BAD_REQUEST,
            "reserved_device_id",
            format!(
                "device id {:?} is reserved for the controller's own certificates; enroll under another id",
                req.device.as_str()
            ),
        );
    }
    let cert = match app.ca.sign_device_csr(&req.csr_pem, req.device.as_str()) {
        Ok(cert) => cert,
        Err(msg) => return enroll_error(StatusCode::BAD_REQUEST, "bad_csr", msg),
    };
    let mut mac = [0u8; 32];
    if getrandom::fill(&mut mac).is_err() {
        return enroll_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no randomness",
        );
    }
    let device = NewDevice {
        id: req.device.to_string(),
        arch: req.arch.to_string(),
        agent_version: req.agent_version.clone(),
        mac_key: mac.to_vec(),
        cert_serial: cert.serial.clone(),
        cert_pem: cert.pem.clone(),
    };
    let (id, serial, addr) = (req.device.to_string(), cert.serial.clone(), peer.addr);
    let result = app
        .store
        .enroll(app.now_ms(), &super::auth::hash_secret(&req.token), device, move |token| {
            AuditEntry::new(
                format!("device:{id}"),
                "device.enroll",
                format!("device:{id}"),
                json!({"enroll_token": token.id, "cert_serial": serial, "from": addr.ip().to_string(), "labels": token.labels}),
            )
        })
        .await;
    match result {
        Ok(_) => {}
        Err(StoreError::Refused(msg)) => {
            return enroll_error(StatusCode::FORBIDDEN, "token_refused", msg);
        }
        Err(StoreError::Conflict(msg)) => {
            return enroll_error(StatusCode::CONFLICT, "already_enrolled", msg);
        }
        Err(err) => {
            tracing::error!(%err, "enrollment failed");
            return enroll_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the controller could not store the enrollment; retry later",
            );
        }
    }
    let key = DeviceMacKey(mac);
    app.key_cache.forget(req.device.as_str());
    if let Some(logins) = &app.logins {
        logins.allow(req.device.as_str(), key.mqtt_password(req.device.as_str()));
    }
    tracing::info!(device = %req.device, "enrolled");
    app.rollouts.device_changed(req.device.clone()).await;
    axum::Json(EnrollResponse {
        v: ENROLL_VERSION,
        device: req.device,
        certificate_pem: cert.pem,
        ca_pem: app.ca.ca_pem.clone(),
        mac_key_hex: hex::encode(mac),
        mqtt_url: app.device_mqtt_url.clone(),
    })
    .into_response()
}

fn plain(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// Parses `bytes=START-` / `bytes=START-END` against `size`.
fn parse_range(value: &str, size: u64) -> Result<(u64, u64), ()> {
    let spec = value.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let start: u64 = start.trim().parse().map_err(|_| ())?;
    let end: u64 = match end.trim() {
        "" => size.checked_sub(1).ok_or(())?,
        e => e
            .parse::<u64>()
            .map_err(|_| ())?
            .min(size.saturating_sub(1)),
    };
    if start > end || start >= size {
        return Err(());
    }
    Ok((start, end))
}

/// The enrolled, unrevoked device the client certificate names, or the refusal.
async fn enrolled<'p>(app: &App, peer: &'p Peer, what: &str) -> Result<&'p str, ApiError> {
    let Some(device) = peer.device.as_deref() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            format!("{what} need the device's client certificate from enrollment"),
        ));
    };
    match app.store.device_key(device).await {
        Ok(Some((_, false))) => Ok(device),
        Ok(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_not_enrolled",
            format!("device {device:?} is not enrolled or was revoked"),
        )),
        Err(err) => {
            tracing::error!(%err, "cannot check a device");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal",
                "retry later",
            ))
        }
    }
}

/// A capture batch the device announced (see `server::capture`).
async fn capture_upload(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(batch): Path<String>,
    body: Body,
) -> Response {
    match enrolled(&app, &peer, "capture uploads").await {
        Ok(device) => super::capture::receive_upload(&app, device, &batch, body).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn bundle(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = enrolled(&app, &peer, "bundle downloads").await {
        return refusal.into_response();
    }
    if edgefleet_protocol::Sha256Digest::from_str(&digest).is_err() {
        return plain(
            StatusCode::BAD_REQUEST,
            "bad_digest",
            "not a manifest digest",
        );
    }
    let model = match app.store.get_model(&digest).await {
        Ok(m) => m,
        Err(StoreError::NotFound(_)) => {
            return plain(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no bundle {digest}"),
            );
        }
        Err(err) => {
            tracing::error!(%err, "cannot load a model");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "internal", "retry later");
        }
    };
    let mut file = match tokio::fs::File::open(&model.bundle_path).await {
        Ok(f) => f,
        Err(err) => {
            tracing::error!(%err, path = model.bundle_path, "a registered bundle is missing");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "missing_blob",
                "the bundle file is missing on the controller",
            );
        }
    };
    let size = model.bundle_size as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, status) = match range {
        None => (0, size.saturating_sub(1), StatusCode::OK),
        Some(value) => match parse_range(value, size) {
            Ok((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            Err(()) => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(Body::empty())
                    .unwrap_or_default();
            }
        },
    };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io",
            "cannot read the bundle",
        );
    }
    let length = if size == 0 { 0 } else { end - start + 1 };
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), 64 * 1024);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""));
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
    }
    builder.body(Body::from_stream(stream)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_and_clamp() {
        assert_eq!(parse_range("bytes=0-", 10), Ok((0, 9)));
        assert_eq!(parse_range("bytes=4-6", 10), Ok((4, 6)));
        assert_eq!(parse_range("bytes=4-100", 10), Ok((4, 9)));
        assert!(parse_range("bytes=10-", 10).is_err());
        assert!(parse_range("bytes=5-4", 10).is_err());
        assert!(parse_range("bytes=0-1,3-4", 10).is_err());
        assert!(parse_range("items=0-1", 10).is_err());
    }
}
