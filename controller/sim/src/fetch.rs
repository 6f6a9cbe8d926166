//! Fetching what an assignment names from the controller's device endpoint, over HTTPS with the
//! device's client certificate, and verifying it with `protocol`'s `BundleVerifier` under the
//! device's policy (release signatures against the keyring, the assigned manifest digest, expiry,
//! architecture, the release floor unless the assignment is a rollback).
//!
//! [`FetchMode::Full`] streams the whole bundle through the verifier, payload hashes included,
//! as an agent's download and install do. [`FetchMode::Manifest`] fetches only the header and
//! signed manifest with `Range` requests and verifies those: for large fleets, where ten thousand
//! full downloads would measure loopback bandwidth rather than the rollout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_protocol::bundle::{BundleVerifier, HEADER_LEN};
use edgefleet_protocol::codec::MAX_MANIFEST_BYTES;
use edgefleet_protocol::manifest::Manifest;
use edgefleet_protocol::messages::FailureCode;
use edgefleet_protocol::{BundleError, ReleaseKeyring, Sha256Digest, Verified};

use crate::device::{Failure, FetchRequest, FetchResult};

/// How much of a bundle a simulated device fetches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FetchMode {
    /// The whole bundle, every payload hashed.
    #[default]
    Full,
    /// The header and signed manifest only (`Range` requests).
    Manifest,
}

impl std::str::FromStr for FetchMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(FetchMode::Full),
            "manifest" => Ok(FetchMode::Manifest),
            other => Err(format!("fetch mode {other:?}: use full or manifest")),
        }
    }
}

/// Bytes asked for per `Range` request in manifest mode.
const RANGE_CHUNK: u64 = 64 * 1024;
/// Attempts per fetch; network failures and server errors are retried with backoff.
const ATTEMPTS: u32 = 3;

/// Verified manifests, one copy per digest however many devices hold it.
#[derive(Debug, Default)]
pub struct Manifests {
    by_digest: Mutex<HashMap<Sha256Digest, Arc<Manifest>>>,
}

impl Manifests {
    pub fn intern(&self, digest: Sha256Digest, manifest: Manifest) -> Arc<Manifest> {
        self.by_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(digest)
            .or_insert_with(|| Arc::new(manifest))
            .clone()
    }

    pub fn get(&self, digest: &Sha256Digest) -> Option<Arc<Manifest>> {
        self.by_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(digest)
            .cloned()
    }
}

fn download_failure(message: String) -> Failure {
    Failure {
        code: FailureCode::Download,
        message,
    }
}

fn refused(err: &BundleError) -> Failure {
    Failure {
        code: err.failure_code(),
        message: err.to_string(),
    }
}

/// A fetch that may be retried (network, server error) or not (refused, bad content).
enum Attempt {
    Retry(String),
    Fatal(Failure),
}

/// An HTTPS client presenting the device's certificate, trusting only the fleet CA.
pub fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|err| crate::error_chain(&err))
}

/// Fetches and verifies what `request` names; the verified manifest is interned in `manifests`.
pub async fn fetch(
    client: &reqwest::Client,
    keyring: &Verified<ReleaseKeyring>,
    manifests: &Manifests,
    mode: FetchMode,
    request: &FetchRequest,
) -> FetchResult {
    let mut backoff = Duration::from_millis(250);
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let result = match mode {
            FetchMode::Full => full(client, keyring, request).await,
            FetchMode::Manifest => manifest_only(client, keyring, request).await,
        };
        match result {
            Ok(manifest) => {
                let digest = request.model.manifest_digest;
                return Ok(manifests.intern(digest, manifest));
            }
            Err(Attempt::Fatal(failure)) => return Err(failure),
            Err(Attempt::Retry(message)) => {
                tracing::debug!(url = %request.model.bundle_url, attempt, error = %message, "bundle fetch failed; retrying");
                last = message;
                if attempt < ATTEMPTS {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
    Err(download_failure(format!(
        "{}: gave up after {ATTEMPTS} attempts: {last}",
        request.model.bundle_url
    )))
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    range: Option<(u64, u64)>,
) -> Result<reqwest::Response, Attempt> {
    let mut builder = client.get(url);
    if let Some((start, end)) = range {
        builder = builder.header(reqwest::header::RANGE, format!("bytes={start}-{end}"));
    }
    let response = builder
        .send()
        .await
        .map_err(|err| Attempt::Retry(format!("{url}: {}", crate::error_chain(&err))))?;
    let status = response.status();
    let expected = if range.is_some() {
        reqwest::StatusCode::PARTIAL_CONTENT
    } else {
        reqwest::StatusCode::OK
    };
    if status == expected {
        return Ok(response);
    }
    let message = format!("{url}: the device endpoint answered {status}");
    Err(if status.is_server_error() {
        Attempt::Retry(message)
    } else {
        Attempt::Fatal(download_failure(message))
    })
}

async fn chunk(
    response: &mut reqwest::Response,
    url: &str,
) -> Result<Option<bytes::Bytes>, Attempt> {
    response
        .chunk()
        .await
        .map_err(|err| Attempt::Retry(format!("{url}: {}", crate::error_chain(&err))))
}

/// The whole bundle through the verifier, at most the assigned size.
async fn full(
    client: &reqwest::Client,
    keyring: &Verified<ReleaseKeyring>,
    request: &FetchRequest,
) -> Result<Manifest, Attempt> {
    let url = &request.model.bundle_url;
    let mut response = get(client, url, None).await?;
    let mut verifier = BundleVerifier::new(keyring, request.policy.clone());
    let mut received = 0u64;
    while let Some(bytes) = chunk(&mut response, url).await? {
        received += bytes.len() as u64;
        if received > request.model.bundle_size {
            return Err(Attempt::Fatal(download_failure(format!(
                "{url} sent more than the {} bytes the assignment allows; download refused",
                request.model.bundle_size
            ))));
        }
        verifier
            .feed(&bytes)
            .map_err(|err| Attempt::Fatal(refused(&err)))?;
    }
    let bundle = verifier
        .finish()
        .map_err(|err| Attempt::Fatal(refused(&err)))?;
    Ok(bundle.into_inner().manifest)
}

/// The header and signed manifest only, through the verifier, in `Range` requests.
async fn manifest_only(
    client: &reqwest::Client,
    keyring: &Verified<ReleaseKeyring>,
    request: &FetchRequest,
) -> Result<Manifest, Attempt> {
    let url = &request.model.bundle_url;
    let mut verifier = BundleVerifier::new(keyring, request.policy.clone());
    let limit = ((HEADER_LEN + MAX_MANIFEST_BYTES) as u64).min(request.model.bundle_size);
    let mut offset = 0u64;
    while offset < limit {
        let end = (offset + RANGE_CHUNK).min(limit) - 1;
        let mut response = get(client, url, Some((offset, end))).await?;
        while let Some(bytes) = chunk(&mut response, url).await? {
            let take = bytes.len().min((end + 1 - offset) as usize);
            verifier
                .feed(&bytes[..take])
                .map_err(|err| Attempt::Fatal(refused(&err)))?;
            offset += take as u64;
            if let Some(manifest) = verifier.manifest() {
                return Ok((**manifest).clone());
            }
        }
        if offset <= end {
            return Err(Attempt::Retry(format!(
                "{url}: the range ended at byte {offset}, before {end}"
            )));
        }
    }
    Err(Attempt::Fatal(download_failure(format!(
        "{url}: no complete signed manifest in the bundle's first {limit} bytes"
    ))))
}
