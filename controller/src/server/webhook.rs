//! Outgoing notifications: signed JSON webhooks and configured commands, for drift alerts and
//! retraining requests.
//!
//! A webhook is a `POST` of a JSON body with `X-EdgeFleet-Event` (what happened),
//! `X-EdgeFleet-Delivery` (a unique id) and `X-EdgeFleet-Signature: sha256=<hex>`, the HMAC-SHA256
//! of the exact body under the policy's secret, so the receiver can check who sent it (compare in
//! constant time). A delivery is tried up to [`ATTEMPTS`] times with backoff; any 2xx answer
//! counts. A command is run with `sh -c`, the same JSON on its standard input and the event's
//! fields in `EDGEFLEET_*` variables, bounded by [`COMMAND_TIMEOUT`].

use std::process::Stdio;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

pub const ATTEMPTS: u32 = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook {url} answered {status} after {attempts} attempt(s): {body}")]
    Refused {
        url: String,
        status: u16,
        attempts: u32,
        body: String,
    },
    #[error("webhook {url} unreachable after {attempts} attempt(s): {detail}")]
    Unreachable {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("command {command:?} could not run: {detail}")]
    Spawn { command: String, detail: String },
    #[error("command {command:?} exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("command {command:?} did not finish within {} s and was killed", COMMAND_TIMEOUT.as_secs())]
    Timeout { command: String },
}

/// `sha256=<hex>`: the signature header's value for `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook delivery that went through: the status and how many attempts it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub status: u16,
    pub attempts: u32,
}

/// POSTs `payload` to `url`, signed with `secret`, retrying failures and non-2xx answers.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    event: &str,
    delivery: &str,
    payload: &Value,
) -> Result<Delivered, NotifyError> {
    let body = serde_json::to_vec(payload).unwrap_or_default();
    let signed = signature(secret, &body);
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt - 1).pow(2))).await;
        }
        let sent = http
            .post(url)
            .timeout(REQUEST_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-edgefleet-event", event)
            .header("x-edgefleet-delivery", delivery)
            .header("x-edgefleet-signature", &signed)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                return Ok(Delivered {
                    status: response.status().as_u16(),
                    attempts: attempt,
                });
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                last = Some(NotifyError::Refused {
                    url: url.to_owned(),
                    status,
                    attempts: attempt,
                    body: text.chars().take(300).collect(),
                });
            }
            Err(err) => {
                let mut cause: &dyn std::error::Error = &err;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                last = Some(NotifyError::Unreachable {
                    url: url.to_owned(),
                    attempts: attempt,
                    detail: cause.to_string(),
                });
            }
        }
    }
    Err(last.unwrap_or(NotifyError::Unreachable {
        url: url.to_owned(),
        attempts: ATTEMPTS,
        detail: "no attempt made".into(),
    }))
}

/// What a command printed, once it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` with `sh -c`, `payload` on standard input and `env` set; succeeds on exit 0.
pub async fn run_command(
    command: &str,
    payload: &Value,
    env: &[(String, String)],
) -> Result<Ran, NotifyError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NotifyError::Spawn {
            command: command.to_owned(),
            detail: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let body = serde_json::to_vec_pretty(payload).unwrap_or_default();
        // A command that does not read its input is fine.
        let _ = stdin.write_all(&body).await;
    }
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => {
            return Err(NotifyError::Spawn {
                command: command.to_owned(),
                detail: err.to_string(),
            });
        }
        Err(_) => {
            return Err(NotifyError::Timeout {
                command: command.to_owned(),
            });
        }
    };
    let text = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let start = text.len().saturating_sub(4000);
        text[text.floor_char_boundary(start)..].to_owned()
    };
    if !output.status.success() {
        return Err(NotifyError::Failed {
            command: command.to_owned(),
            status: output.status.to_string(),
            stderr: text(&output.stderr),
        });
    }
    Ok(Ran {
        stdout: text(&output.stdout),
        stderr: text(&output.stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_exact_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(signature("a", b"x"), signature("b", b"x"));
    }
}
