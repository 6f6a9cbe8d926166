//! Bundle downloads: HTTP(S) with `Range` resume after a broken connection or a restart, a
//! bandwidth cap, a stall timeout, bounded retries with backoff, and a hard stop at the size the
//! signed assignment names (so a server cannot fill the disk). HTTPS servers must present a
//! certificate issued by the fleet CA, the only root of the client's rustls config; a refused
//! certificate fails the download at once. The bundle is verified — every payload hashed while
//! it streams — when it is installed from the finished file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

/// Why a download failed (after its retries).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url}: {message}")]
    Failed { url: String, message: String },
    #[error(
        "{url}: the server's TLS certificate is refused ({reason}); bundle servers must present a certificate issued by the fleet CA (`mqtt.ca`)"
    )]
    Untrusted { url: String, reason: String },
    #[error("{url} sent more than the {expected} bytes the assignment allows; download refused")]
    TooLong { url: String, expected: u64 },
    #[error("cannot write the download to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    dir: PathBuf,
    /// Bytes per second, or unlimited.
    pub bandwidth_bps: Option<u64>,
    pub attempts: u32,
    pub stall_timeout: Duration,
}

impl Downloader {
    /// `tls` is the device's rustls config (fleet CA, client certificate) for HTTPS.
    pub fn new(dir: &Path, tls: Option<rustls::ClientConfig>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(15));
        if let Some(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(Self {
            client: builder.build()?,
            dir: dir.to_owned(),
            bandwidth_bps: None,
            attempts: 5,
            stall_timeout: Duration::from_secs(30),
        })
    }

    /// Where a bundle with this manifest digest is downloaded to.
    pub fn part_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.part"))
    }

    /// Downloads `url` (exactly `size` bytes) and returns the finished file. Resumes a partial
    /// file left by an earlier attempt or an earlier run.
    pub async fn fetch(
        &self,
        url: &str,
        size: u64,
        digest: &str,
    ) -> Result<PathBuf, DownloadError> {
        let part = self.part_path(digest);
        let mut last_error = String::new();
        let mut backoff = Duration::from_millis(250);
        for attempt in 1..=self.attempts {
            match self.attempt(url, size, &part).await {
                Ok(()) => {
                    let done = self.dir.join(format!("{digest}.efb"));
                    tokio::fs::rename(&part, &done)
                        .await
                        .map_err(|source| DownloadError::Io {
                            path: done.clone(),
                            source,
                        })?;
                    return Ok(done);
                }
                Err(AttemptError::Fatal(err)) => return Err(err),
                Err(AttemptError::Retry(message)) => {
                    tracing::info!(%url, attempt, error = %message, "download interrupted; resuming");
                    last_error = message;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        Err(DownloadError::Failed {
            url: url.to_owned(),
            message: format!("gave up after {} attempts: {last_error}", self.attempts),
        })
    }

    async fn attempt(&self, url: &str, size: u64, part: &Path) -> Result<(), AttemptError> {
        let io = |source| {
            AttemptError::Fatal(DownloadError::Io {
                path: part.to_owned(),
                source,
            })
        };
        let mut offset = tokio::fs::metadata(part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if offset > size {
            tokio::fs::remove_file(part).await.map_err(io)?;
            offset = 0;
        }
        if offset == size {
            return Ok(());
        }
        let mut request = self.client.get(url);
        if offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let mut response = request.send().await.map_err(|err| {
            match certificate_error(&err) {
                // Retrying cannot make an untrusted server trusted.
                Some(reason) => AttemptError::Fatal(DownloadError::Untrusted {
                    url: url.to_owned(),
                    reason,
                }),
                None => AttemptError::Retry(error_chain(&err)),
            }
        })?;
        let status = response.status();
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await
            .map_err(io)?;
        if status == reqwest::StatusCode::OK && offset > 0 {
            // The server ignored the range: start over.
            file.set_len(0).await.map_err(io)?;
            offset = 0;
        } else if status != reqwest::StatusCode::PARTIAL_CONTENT
            && status != reqwest::StatusCode::OK
        {
            let message = format!("server answered {status}");
            return Err(if status.is_client_error() {
                AttemptError::Fatal(DownloadError::Failed {
                    url: url.to_owned(),
                    message,
                })
            } else {
                AttemptError::Retry(message)
            });
        }
        let started = Instant::now();
        let mut received = 0u64;
        loop {
            let chunk = tokio::time::timeout(self.stall_timeout, response.chunk())
                .await
                .map_err(|_| {
                    AttemptError::Retry(format!("no data for {} s", self.stall_timeout.as_secs()))
                })?
                .map_err(|err| AttemptError::Retry(error_chain(&err)))?;
            let Some(chunk) = chunk else { break };
            if offset + chunk.len() as u64 > size {
                drop(file);
                let _ = tokio::fs::remove_file(part).await;
                return Err(AttemptError::Fatal(DownloadError::TooLong {
                    url: url.to_owned(),
                    expected: size,
                }));
            }
            file.write_all(&chunk).await.map_err(io)?;
            offset += chunk.len() as u64;
            received += chunk.len() as u64;
            if let Some(bps) = self.bandwidth_bps {
                let due = Duration::from_secs_f64(received as f64 / bps as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        file.sync_all().await.map_err(io)?;
        if offset < size {
            return Err(AttemptError::Retry(format!(
                "connection closed at byte {offset} of {size}"
            )));
        }
        Ok(())
    }
}

enum AttemptError {
    Retry(String),
    Fatal(DownloadError),
}

/// An error and its causes, `: `-separated (reqwest's own message names only the request).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        next = cause.source();
    }
    text
}

/// Why the server's certificate was refused, if a request failed for that reason: it is not
/// issued by a trusted CA, is not valid for the host, has expired, or is missing.
pub fn certificate_error(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(cause) = next {
        if let Some(
            tls @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
        ) = cause.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        // An `io::Error` (TLS errors arrive wrapped in two) reports its inner error's causes as
        // its own: step into the inner error itself.
        next = match cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner),
            None => cause.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use edgefleet_tests::broker::TestPki;
    use edgefleet_tests::bundle_server::BundleServer;

    use super::*;
    use crate::mqtt::{MqttConfig, tls_config};

    /// A downloader with the device's production TLS config: the fleet CA as the only root and
    /// a device certificate.
    fn downloader(dir: &Path, pki: &TestPki) -> Downloader {
        let device = pki.issue("device", &[]);
        let tls = tls_config(&MqttConfig {
            host: String::from("127.0.0.1"),
            port: 8883,
            ca: pki.ca.clone(),
            cert: device.cert,
            key: device.key,
            keep_alive_s: 30,
        })
        .unwrap();
        Downloader::new(&dir.join("downloads"), Some(tls)).unwrap()
    }

    #[tokio::test]
    async fn https_downloads_resume_after_a_cut_and_trust_only_the_fleet_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(&dir.path().join("pki"));
        let downloader = downloader(dir.path(), &pki);
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let size = bytes.len() as u64;

        let server = BundleServer::start(&pki);
        let url = server.put("b.efb", bytes.clone());
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        server.faults.lock().unwrap().cut_next_after = Some(50_000);
        let path = downloader.fetch(&url, size, "one").await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(
            server.requests(),
            ["/bundles/b.efb -", "/bundles/b.efb bytes=50000-"]
        );

        // The same file from a server whose certificate another CA issued: refused on the
        // first attempt, before any request is sent.
        let foreign = TestPki::new(&dir.path().join("foreign"));
        let impostor = BundleServer::start(&foreign);
        let url = impostor.put("b.efb", bytes);
        let err = downloader.fetch(&url, size, "two").await.unwrap_err();
        assert!(matches!(err, DownloadError::Untrusted { .. }), "{err:?}");
        // The impostor CA has the fleet CA's name, so its signature is what fails.
        assert_eq!(
            err.to_string(),
            format!(
                "{url}: the server's TLS certificate is refused (invalid peer certificate: BadSignature); bundle servers must present a certificate issued by the fleet CA (`mqtt.ca`)"
            )
        );
        assert!(impostor.requests().is_empty());
        assert!(!downloader.part_path("two").exists());
    }
}
