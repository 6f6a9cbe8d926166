//! First-start enrollment: with a one-time token, the device generates its own key pair and a
//! CSR (the private key never leaves the device), and the controller returns the certificate,
//! the fleet CA and the device's message-authentication key. They are stored 0600; later starts
//! use them. Over HTTPS the endpoint must present a certificate issued by the fleet CA
//! (`mqtt.ca`), the device's only root. A refusal (4xx) stops the agent with the controller's
//! reason, and so does an untrusted certificate; network failures are retried with backoff.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgefleet_protocol::enroll::{
    ENROLL_PATH, ENROLL_VERSION, EnrollError, EnrollRequest, EnrollResponse,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{AgentConfig, LinkConfig};
use crate::trust::AGENT_VERSION;

/// Writes `bytes` to a new file with `mode`, atomically (temp, fsync, rename).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Makes sure the device has its certificate, key and MAC key, enrolling if it has none.
pub async fn ensure_identity(config: &AgentConfig, link: &LinkConfig) -> Result<()> {
    let files = [&link.mqtt.cert, &link.mqtt.key, &link.mac_key];
    if files.iter().all(|f| f.exists()) {
        return Ok(());
    }
    let Some((url, token)) = &link.enroll else {
        bail!(
            "this device has no identity yet ({} missing): set `enroll.url` and `enroll.token` to enroll, or provision the files",
            files
                .iter()
                .filter(|f| !f.exists())
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let key = rcgen::KeyPair::generate().context("cannot generate the device key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, config.device_id.as_str());
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let request = EnrollRequest {
        v: ENROLL_VERSION,
        token: token.clone(),
        device: config.device_id.clone(),
        csr_pem,
        arch: config.arch.clone(),
        agent_version: String::from(AGENT_VERSION),
    };
    if url.starts_with("https://") && !link.mqtt.ca.exists() {
        bail!(
            "cannot enroll over HTTPS: the fleet CA {} (`mqtt.ca`) does not exist, and the device trusts only the fleet CA; provision the CA certificate with the device",
            link.mqtt.ca.display()
        );
    }
    // The fleet CA is the only root: the controller's enrollment endpoint must present a
    // certificate it issued, as the broker and the bundle servers do.
    let mut roots = rustls::RootCertStore::empty();
    if link.mqtt.ca.exists() {
        for cert in CertificateDer::pem_file_iter(&link.mqtt.ca)? {
            roots.add(cert?)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .build()?;
    let endpoint = format!("{}{ENROLL_PATH}", url.trim_end_matches('/'));
    let mut backoff = Duration::from_secs(1);
    let response: EnrollResponse = loop {
        match client.post(&endpoint).json(&request).send().await {
            Ok(response) if response.status().is_success() => {
                break response
                    .json()
                    .await
                    .context("the controller sent an unreadable enrollment answer")?;
            }
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                let reason = response
                    .json::<EnrollError>()
                    .await
                    .map(|e| e.error.message)
                    .unwrap_or_default();
                bail!(
                    "enrollment refused by {endpoint} ({status}): {reason}; ask for a new enrollment token"
                );
            }
            Ok(response) => {
                tracing::warn!(status = %response.status(), "enrollment failed; retrying")
            }
            Err(err) => {
                if let Some(reason) = crate::download::certificate_error(&err) {
                    bail!(
                        "cannot enroll: {endpoint} presented a TLS certificate the device does not trust ({reason}); it must be issued by the fleet CA {} (`mqtt.ca`)",
                        link.mqtt.ca.display()
                    );
                }
                tracing::warn!(error = %crate::download::error_chain(&err), "cannot reach the controller to enroll; retrying")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(300));
    };
    if response.device != config.device_id {
        bail!(
            "the controller enrolled device {} instead of {}",
            response.device,
            config.device_id
        );
    }
    let mut mac = [0u8; 32];
    hex::decode_to_slice(response.mac_key_hex.trim(), &mut mac)
        .context("the controller sent a malformed MAC key")?;
    if !link.mqtt.ca.exists() {
        write_file(&link.mqtt.ca, response.ca_pem.as_bytes(), 0o644)?;
    }
    write_file(&link.mqtt.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&link.mac_key, hex::encode(mac).as_bytes(), 0o600)?;
    // The certificate last: its presence marks a complete identity.
    write_file(&link.mqtt.cert, response.certificate_pem.as_bytes(), 0o644)?;
    tracing::info!(device_id = %config.device_id, "enrolled");
    Ok(())
}
