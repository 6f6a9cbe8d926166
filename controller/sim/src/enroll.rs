//! Enrollment as a real device does it: a one-time token minted through the controller's admin
//! API (with the device's labels), a key pair and CSR made here (the key never leaves the
//! simulator), and `POST /api/v1/enroll` at the device endpoint over HTTPS, trusting only the
//! fleet CA. The controller rate-limits both calls (per admin token, and per client address for
//! enrollment): a 429 is waited out as the controller says, until the start deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use edgefleet_protocol::enroll::{
    ENROLL_PATH, ENROLL_VERSION, EnrollError, EnrollRequest, EnrollResponse,
};
use edgefleet_protocol::{Arch, DeviceId};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::SimError;
use crate::device::AGENT_VERSION;
use crate::state::Identity;

/// Mints tokens and enrolls devices.
#[derive(Debug)]
pub struct Enroller {
    api: String,
    admin_token: String,
    api_client: reqwest::Client,
    device_client: reqwest::Client,
    arch: Arch,
    token_ttl_s: u64,
    deadline: Instant,
}

/// A `rate_limited` answer waited out, or how the controller refused.
enum Refusal {
    RateLimited(Duration),
    Fatal(SimError),
}

/// The wait a 429 body asks for (`… retry in N s`), or one second.
fn retry_after(message: &str) -> Duration {
    let seconds = message
        .rsplit_once("retry in ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds.clamp(1, 60))
}

fn error_message(body: &Value) -> String {
    match (
        body["error"]["code"].as_str(),
        body["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => body.to_string(),
    }
}

/// Sends a request; a controller that cannot be reached is not retried.
async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, Refusal> {
    request.send().await.map_err(|err| {
        Refusal::Fatal(SimError::Unreachable {
            url: url.to_owned(),
            message: crate::error_chain(&err),
        })
    })
}

impl Enroller {
    pub fn new(
        api: &str,
        admin_token: &str,
        ca_pem: &[u8],
        arch: Arch,
        token_ttl_s: u64,
        deadline: Instant,
    ) -> Result<Self, SimError> {
        let api_client = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::server_only(&[])?)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| SimError::Config(format!("cannot build an HTTP client: {err}")))?;
        let device_client = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::server_only(ca_pem)?)
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| SimError::Config(format!("cannot build an HTTPS client: {err}")))?;
        Ok(Self {
            api: api.trim_end_matches('/').to_owned(),
            admin_token: admin_token.to_owned(),
            api_client,
            device_client,
            arch,
            token_ttl_s,
            deadline,
        })
    }

    /// Waits out rate limiting until the deadline.
    async fn with_retries<T, F, Fut>(&self, url: &str, mut attempt: F) -> Result<T, SimError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Refusal>>,
    {
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(Refusal::Fatal(err)) => return Err(err),
                Err(Refusal::RateLimited(wait)) => {
                    if Instant::now() + wait > self.deadline {
                        return Err(SimError::RateLimited {
                            url: url.to_owned(),
                        });
                    }
                    tracing::warn!(
                        url,
                        wait_s = wait.as_secs(),
                        "the controller is rate-limiting the simulator; waiting (start it with a higher --rate-limit-per-minute)"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// A one-time enrollment token with `labels`: (token, device endpoint URL).
    async fn token(&self, labels: &BTreeMap<String, String>) -> Result<(String, String), SimError> {
        let url = format!("{}/api/v1/enroll-tokens", self.api);
        let body = json!({"labels": labels, "expires_in_s": self.token_ttl_s});
        let created = self
            .with_retries(&url, || async {
                let request = self
                    .api_client
                    .post(&url)
                    .bearer_auth(&self.admin_token)
                    .json(&body);
                let response = send(request, &url).await?;
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                match status.as_u16() {
                    200..=299 => Ok(body),
                    429 => Err(Refusal::RateLimited(retry_after(&error_message(&body)))),
                    401 | 403 => Err(Refusal::Fatal(SimError::TokenRefused {
                        status: status.as_u16(),
                        message: error_message(&body),
                    })),
                    _ => Err(Refusal::Fatal(SimError::Api {
                        url: url.clone(),
                        status: status.as_u16(),
                        message: error_message(&body),
                    })),
                }
            })
            .await?;
        match (created["token"].as_str(), created["enroll_url"].as_str()) {
            (Some(token), Some(enroll_url)) => Ok((token.to_owned(), enroll_url.to_owned())),
            _ => Err(SimError::Api {
                url,
                status: 201,
                message: format!("the answer has no token or enroll_url: {created}"),
            }),
        }
    }

    /// Enrolls `device` with `labels` and returns its new identity.
    pub async fn enroll(
        &self,
        device: &DeviceId,
        labels: &BTreeMap<String, String>,
    ) -> Result<Identity, SimError> {
        let (token, enroll_url) = self.token(labels).await?;
        let enroll_error = |message: String| SimError::Enroll {
            device: device.to_string(),
            message,
        };
        let key = rcgen::KeyPair::generate()
            .map_err(|err| enroll_error(format!("cannot generate a key: {err}")))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|err| enroll_error(err.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device.as_str());
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|err| enroll_error(format!("cannot make a CSR: {err}")))?;
        let request = EnrollRequest {
            v: ENROLL_VERSION,
            token,
            device: device.clone(),
            csr_pem,
            arch: self.arch.clone(),
            agent_version: String::from(AGENT_VERSION),
        };
        let url = format!("{}{ENROLL_PATH}", enroll_url.trim_end_matches('/'));
        let response: EnrollResponse = self
            .with_retries(&url, || async {
                let response = send(self.device_client.post(&url).json(&request), &url).await?;
                let status = response.status();
                if status.is_success() {
                    return response.json::<EnrollResponse>().await.map_err(|err| {
                        Refusal::Fatal(enroll_error(format!("unreadable answer: {err}")))
                    });
                }
                let refusal = response.json::<EnrollError>().await.ok();
                let message = refusal
                    .as_ref()
                    .map(|e| format!("{}: {}", e.error.code, e.error.message))
                    .unwrap_or_else(|| status.to_string());
                Err(match status.as_u16() {
                    429 => Refusal::RateLimited(retry_after(&message)),
                    409 => Refusal::Fatal(SimError::AlreadyEnrolled {
                        device: device.to_string(),
                    }),
                    _ => Refusal::Fatal(enroll_error(format!("refused ({status}): {message}"))),
                })
            })
            .await?;
        if &response.device != device {
            return Err(enroll_error(format!(
                "the controller enrolled {} instead",
                response.device
            )));
        }
        Ok(Identity {
            device: device.to_string(),
            certificate_pem: response.certificate_pem,
            key_pem: key.serialize_pem(),
            mac_key_hex: response.mac_key_hex,
            mqtt_url: response.mqtt_url,
            labels: labels.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
