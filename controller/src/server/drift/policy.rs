//! A model's drift policy (`PUT /api/v1/models/{name}/drift-policy`): the detector settings,
//! the label that forms groups, the alert webhook, the retraining trigger, and the rollout plan a
//! retrained candidate gets. Secrets are never stored: the policy names files on the
//! controller's host that hold them, read each time they are used.

use std::path::{Path, PathBuf};

use edgefleet_protocol::Sha256Digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::drift::{DetectorConfig, Scope};
use crate::rollout::driver::{StartRequest, plan};

/// The scope kinds a trigger listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Device,
    Group,
    Fleet,
}

impl ScopeKind {
    pub fn of(scope: &Scope) -> Self {
        match scope {
            Scope::Device(_) => ScopeKind::Device,
            Scope::Group { .. } => ScopeKind::Group,
            Scope::Fleet => ScopeKind::Fleet,
        }
    }
}

fn all_scopes() -> Vec<ScopeKind> {
    vec![ScopeKind::Device, ScopeKind::Group, ScopeKind::Fleet]
}

fn retrain_scopes() -> Vec<ScopeKind> {
    vec![ScopeKind::Group, ScopeKind::Fleet]
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftPolicy {
    /// Detector settings; each left out takes [`DetectorConfig::default`]'s value.
    #[serde(default)]
    pub detector: DetectorConfig,
    /// Labels whose values form groups (e.g. `site`): each group is watched as one scope.
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrain: Option<Retrain>,
    /// The rollout plan for a candidate registered with `candidate_for` this model: the body of
    /// `POST /api/v1/rollouts` without `candidate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollout: Option<Value>,
}

/// A signed webhook for detections and clearances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub url: String,
    /// A file on the controller's host holding the HMAC secret.
    pub secret_file: PathBuf,
    #[serde(default = "all_scopes")]
    pub scopes: Vec<ScopeKind>,
}

/// A signed webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    pub secret_file: PathBuf,
}

/// What a detection fires, once per drift episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retrain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// Run with `sh -c` on the controller's host, the request JSON on standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A file holding the API token handed to the command as `EDGEFLEET_TOKEN`, so it can
    /// download the captured data and register the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Detections in these scopes fire it (default: groups and the fleet).
    #[serde(default = "retrain_scopes")]
    pub scopes: Vec<ScopeKind>,
}

fn check_url(what: &str, url: &str) -> Result<(), String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(format!(
            "{what} {url:?} is not an http(s) URL; give e.g. https://hooks.example.com/drift"
        ))
    }
}

fn check_file(what: &str, path: &Path) -> Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{what} {} must be an absolute path on the controller's host",
            path.display()
        ))
    }
}

impl DriftPolicy {
    /// Every value checked; the error says which and what to give instead.
    pub fn validate(&self) -> Result<(), String> {
        self.detector.validate().map_err(|e| e.to_string())?;
        for label in &self.group_by {
            if label.trim().is_empty() {
                return Err("group_by: a label name is empty".into());
            }
        }
        if let Some(alert) = &self.alert {
            check_url("alert.url", &alert.url)?;
            check_file("alert.secret_file", &alert.secret_file)?;
        }
        if let Some(retrain) = &self.retrain {
            match (&retrain.webhook, &retrain.command) {
                (Some(hook), None) => {
                    check_url("retrain.webhook.url", &hook.url)?;
                    check_file("retrain.webhook.secret_file", &hook.secret_file)?;
                }
                (None, Some(command)) if !command.trim().is_empty() => {}
                _ => {
                    return Err(
                        "retrain needs exactly one of `webhook` or `command` (a non-empty shell command)".into(),
                    );
                }
            }
            if let Some(file) = &retrain.token_file {
                check_file("retrain.token_file", file)?;
            }
            if retrain.scopes.is_empty() {
                return Err("retrain.scopes is empty; give e.g. [\"group\", \"fleet\"]".into());
            }
        }
        if let Some(plan) = &self.auto_rollout {
            self.start_request("0".repeat(64), None, None)
                .and_then(|request| {
                    plan::spec_of(&request, Sha256Digest([1; 32]), Sha256Digest([2; 32]))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("auto_rollout: {e}"))?;
            if plan.get("candidate").is_some() {
                return Err(
                    "auto_rollout: leave out `candidate`; the registered candidate is rolled out"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The rollout request for `candidate` from the `auto_rollout` plan (`None` without one).
    pub fn start_request(
        &self,
        candidate: String,
        baseline: Option<String>,
        trigger: Option<Value>,
    ) -> Result<StartRequest, String> {
        let Some(Value::Object(plan)) = &self.auto_rollout else {
            return Err("auto_rollout must be a JSON object (a rollout plan)".into());
        };
        let mut body = plan.clone();
        body.remove("candidate");
        body.insert("candidate".into(), Value::String(candidate));
        if let Some(baseline) = baseline
            && !body.contains_key("baseline")
        {
            body.insert("baseline".into(), Value::String(baseline));
        }
        let mut request: StartRequest =
            serde_json::from_value(Value::Object(body)).map_err(|e| e.to_string())?;
        request.trigger = trigger;
        Ok(request)
    }
}

#[cfg(test)]
mod tests;
