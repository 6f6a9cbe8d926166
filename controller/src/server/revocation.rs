//! Cutting a revoked device off. The revocation itself is one store transaction (with its audit
//! row) that marks the device revoked and drops its assignment; this module does the rest.
//!
//! What is enforced, and by whom:
//! - the ingest forgets the device's key: nothing it sends is stored or acknowledged
//!   (`edgefleet_messages_rejected_total{reason="revoked_device"}`);
//! - the device endpoint refuses its bundle downloads (the store is checked on every request);
//! - its retained assignment is cleared on the broker;
//! - the certificate revocation list (`<data>/pki/crl.pem` or `--crl-file`), signed by the fleet
//!   CA, is rewritten atomically and `--crl-reload-command` runs. Mosquitto with `crlfile` then
//!   refuses the device's certificate at the TLS handshake. Mosquitto reads `crlfile` only at start
//!   and on SIGHUP (measured with 2.0.11: a rewritten file is ignored until the signal, and
//!   connections open at the signal stay open), hence the command;
//! - its MQTT session is taken over ([`Takeover`]), which closes its connection on either broker.
//!   On the embedded broker its login is gone, so it is refused at CONNECT from then on (rumqttd
//!   cannot load a CRL; the login is the check there). If it still gets a message through on an
//!   external broker, the ingest takes its session over again (at most every 10 s).
//!
//! What is not enforced: with an external broker and no reload command (or a broker on another
//! machine that has not received the new file), the device can reconnect with its still-accepted
//! certificate. The ACL keeps it to its own topics, nothing it sends is accepted, it receives no
//! assignment, and when it sends its session is taken over again (at most every 10 s); a device
//! that only listens stays connected until the broker re-reads the CRL. Copy the file to remote
//! brokers (any file sync) before reloading them. A bundle response already streaming runs to its
//! end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use edgefleet_protocol::DeviceId;

use super::App;
use super::mqtt::Takeover;
use super::pki::{FleetCa, RevokedCert};
use super::store::Store;
use crate::fsutil;

/// How long the reload command may run.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the CRL is re-signed while the controller runs (it is valid for `pki::CRL_DAYS`).
pub const CRL_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug)]
pub struct Revocation {
    crl: PathBuf,
    reload_command: Option<String>,
    pub takeover: Takeover,
    /// One CRL write at a time, so an older list never replaces a newer one.
    writing: tokio::sync::Mutex<()>,
}

impl Revocation {
    pub fn new(crl: PathBuf, reload_command: Option<String>, takeover: Takeover) -> Self {
        Self {
            crl,
            reload_command,
            takeover,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn crl_path(&self) -> &Path {
        &self.crl
    }

    /// Signs the list of every revoked device certificate in the store, writes it atomically,
    /// then runs the reload command (whose failure is logged, not returned: the file is written).
    pub async fn publish_crl(&self, store: &Store, ca: &FleetCa, now_ms: i64) -> Result<()> {
        let _one_at_a_time = self.writing.lock().await;
        let revoked: Vec<RevokedCert> = store
            .revoked_certificates()
            .await?
            .into_iter()
            .map(|(serial, revoked_at)| RevokedCert { serial, revoked_at })
            .collect();
        write_crl(ca, &self.crl, &revoked, now_ms)?;
        tracing::info!(file = %self.crl.display(), revoked = revoked.len(), "wrote the certificate revocation list");
        if let Some(command) = &self.reload_command
            && let Err(err) = run_reload(command, &self.crl).await
        {
            tracing::error!(
                error = %format!("{err:#}"),
                "the CRL reload command failed; until the broker re-reads {}, revoked devices can reconnect to it",
                self.crl.display()
            );
        }
        Ok(())
    }
}

/// Signs `revoked` into a CRL at `path` (atomically, world-readable: the broker reads it).
pub fn write_crl(ca: &FleetCa, path: &Path, revoked: &[RevokedCert], now_ms: i64) -> Result<()> {
    let pem = ca.crl_pem(revoked, now_ms)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fsutil::write_atomic(path, pem.as_bytes(), fsutil::PUBLIC_MODE)
}

async fn run_reload(command: &str, crl: &Path) -> Result<()> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("EDGEFLEET_CRL_FILE", crl)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run `sh -c {command:?}` (--crl-reload-command)"))?;
    let status = tokio::time::timeout(RELOAD_TIMEOUT, child.wait())
        .await
        .with_context(|| format!("`{command}` did not finish within {RELOAD_TIMEOUT:?}"))??;
    anyhow::ensure!(status.success(), "`{command}` exited with {status}");
    Ok(())
}

/// After the store marked `device` revoked: everything the module documentation lists.
pub async fn cut_off(app: &App, device: &DeviceId) {
    app.key_cache.forget(device.as_str());
    if let Some(logins) = &app.logins {
        logins.deny(device.as_str());
    }
    if let Err(err) = app.publisher.clear_assignment(device).await {
        tracing::warn!(%err, %device, "cannot clear the revoked device's assignment");
    }
    // The CRL first, then the takeover: a device that reconnects must meet the new list.
    if let Err(err) = app
        .revocation
        .publish_crl(&app.store, &app.ca, app.now_ms())
        .await
    {
        tracing::error!(
            error = %format!("{err:#}"),
            %device,
            "cannot write the certificate revocation list; an external broker still accepts the revoked device's certificate"
        );
    }
    match app.revocation.takeover.disconnect_revoked(device).await {
        Ok(()) => tracing::info!(%device, "ended the revoked device's MQTT session"),
        Err(err) => {
            tracing::warn!(%err, %device, "could not take over the revoked device's MQTT session");
        }
    }
}
