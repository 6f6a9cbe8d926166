//! Keeps every device's assignment valid. Assignments expire ([`ASSIGNMENT_TTL_MS`]) so that a
//! captured old one cannot be replayed to freeze a device; a device that reconnects or reboots
//! must therefore always find an unexpired one retained for it. Once half an assignment's
//! lifetime has passed, the controller re-signs the same content (models, shadow, rollback flag,
//! rollout) under the device's next sequence number with a fresh expiry, stores it with an audit
//! row, and publishes it retained. A refresh never overwrites a newer assignment: if an operator
//! or the rollout engine assigned meanwhile, the refresh of the old one is dropped.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use edgefleet_protocol::assignment::Assignment;
use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::trust::Signed;
use edgefleet_protocol::{DeviceId, Timestamp};
use serde_json::json;

use super::App;
use super::api::{ASSIGNMENT_TTL_MS, store_assignment};
use super::audit::AuditEntry;
use super::store::StoreError;

/// How often the controller looks for assignments to refresh.
pub const CHECK_EVERY: Duration = Duration::from_secs(600);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// Re-signed, stored and published.
    pub renewed: usize,
    /// Superseded by a newer assignment while being refreshed.
    pub superseded: usize,
}

/// True when `assignment` has less than half its lifetime left at `now`.
pub fn due(assignment: &Assignment, now: Timestamp) -> bool {
    assignment.expires.as_millis() < now.as_millis().saturating_add(ASSIGNMENT_TTL_MS / 2)
}

/// One pass over every unrevoked device's current assignment, renewing those [`due`] at `now`.
pub async fn refresh_due(app: &App, now: Timestamp) -> Result<Refreshed> {
    let mut done = Refreshed::default();
    for (device, bytes) in app.store.assignments().await? {
        if bytes.is_empty() {
            continue;
        }
        let current = match Signed::decode("assignment", &bytes, MAX_MESSAGE_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|signed| {
                codec::decode::<Assignment>("assignment", &signed.body, MAX_MESSAGE_BYTES)
                    .map_err(|e| e.to_string())
            }) {
            Ok(current) => current,
            Err(err) => {
                tracing::error!(device, %err, "a stored assignment cannot be decoded; assign the device again");
                continue;
            }
        };
        if !due(&current, now) {
            continue;
        }
        let Ok(id) = DeviceId::new(&device) else {
            tracing::error!(device, "a stored device id is invalid");
            continue;
        };
        let audit = AuditEntry::new(
            "controller",
            "device.assignment_refresh",
            format!("device:{device}"),
            json!({"replaces_seq": current.seq, "expired_at": current.expires.as_millis()}),
        );
        let replaces = current.seq;
        match store_assignment(app, current, Some(replaces), audit).await {
            Ok(signed) => {
                app.publisher.assignment(&id, signed).await?;
                done.renewed += 1;
            }
            Err(StoreError::Refused(reason)) => {
                tracing::info!(device, %reason, "assignment refresh skipped");
                done.superseded += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(done)
}

/// Runs [`refresh_due`] every [`CHECK_EVERY`] for the life of the controller (the first pass at
/// start, so a controller that was down for a day heals its fleet at once).
pub fn spawn(app: Arc<App>) {
    tokio::spawn(async move {
        loop {
            match refresh_due(&app, app.clock.now()).await {
                Ok(done) if done.renewed > 0 || done.superseded > 0 => {
                    tracing::info!(
                        renewed = done.renewed,
                        superseded = done.superseded,
                        "assignments refreshed"
                    );
                }
                Ok(_) => {}
                Err(err) => tracing::error!(%err, "cannot refresh assignments; retrying later"),
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    });
}
