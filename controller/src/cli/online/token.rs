//! `edgefleet token` (API tokens: create, list, revoke) and `edgefleet enroll-token` (one-time
//! device enrollment tokens: create, list). Secrets are shown once, when created.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::json;

use super::client::Client;
use super::{label_map, list};
use crate::cli::output::{Column, OutputFormat, field, labels, show, text, time};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// Read devices, models and the audit chain's state.
    Viewer,
    /// Also register models, label and assign devices, create enrollment tokens.
    Operator,
    /// Also manage API tokens, revoke devices, export the audit log.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token (admin); the secret is shown only this once.
    Create {
        /// A name for the audit log, e.g. `ci` or `alice`.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
    },
    /// List API tokens (admin).
    List,
    /// Revoke an API token by its id (`tok_…`) (admin).
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum EnrollTokenCommand {
    /// Create a one-time enrollment token; the device gets its labels when it enrolls.
    Create {
        /// A label for the device, `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// How long the token stays valid: seconds, or a number with s, m, h or d (at most 30d).
        #[arg(long, default_value = "1d", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// List enrollment tokens: labels, expiry, and which device used each.
    List,
}

/// A positive duration: `90`, `90s`, `15m`, `12h`, `7d` → seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    match super::parse_seconds(s)? {
        0 => Err(format!("{s:?} is not a positive duration")),
        secs => Ok(secs),
    }
}

const TOKEN_COLUMNS: &[Column] = &[
    ("ID", "id", text),
    ("NAME", "name", text),
    ("ROLE", "role", text),
    ("CREATED", "created_at", time),
    ("BY", "created_by", text),
    ("REVOKED", "revoked_at", time),
];

const ENROLL_TOKEN_COLUMNS: &[Column] = &[
    ("ID", "id", text),
    ("LABELS", "labels", labels),
    ("CREATED", "created_at", time),
    ("BY", "created_by", text),
    ("EXPIRES", "expires_at", time),
    ("USED BY", "used_by", text),
    ("USED", "used_at", time),
];

pub fn run_api(client: &Client, command: TokenCommand, format: OutputFormat) -> Result<()> {
    match command {
        TokenCommand::Create { name, role } => {
            let body = json!({"name": name, "role": role.as_str()});
            let answer = client.send_json(Method::POST, &["tokens"], &body)?;
            show(format, &answer, || {
                for key in ["id", "name", "role", "token"] {
                    field(key, &text(&answer[key]));
                }
                println!(
                    "the token is shown only this once; use it with `edgefleet login --profile NAME`"
                );
                Ok(())
            })
        }
        TokenCommand::List => list(
            client,
            format,
            (&["tokens"], "tokens"),
            TOKEN_COLUMNS,
            "no API tokens",
        ),
        TokenCommand::Revoke { id } => {
            client.delete(&["tokens", &id])?;
            show(format, &json!({"id": id, "revoked": true}), || {
                println!("revoked API token {id}");
                Ok(())
            })
        }
    }
}

pub fn run_enroll(
    client: &Client,
    command: EnrollTokenCommand,
    format: OutputFormat,
) -> Result<()> {
    match command {
        EnrollTokenCommand::Create { labels: given, ttl } => {
            let body = json!({"labels": label_map(&given, "label")?, "expires_in_s": ttl});
            let answer = client.send_json(Method::POST, &["enroll-tokens"], &body)?;
            show(format, &answer, || {
                field("id", &text(&answer["id"]));
                field("token", &text(&answer["token"]));
                field("labels", &labels(&answer["labels"]));
                field("expires", &time(&answer["expires_at"]));
                field("enroll url", &text(&answer["enroll_url"]));
                println!(
                    "give the device EDGEFLEET_ENROLL_URL and EDGEFLEET_ENROLL_TOKEN (enroll.url, enroll.token); the token works once and is shown only this once"
                );
                Ok(())
            })
        }
        EnrollTokenCommand::List => list(
            client,
            format,
            (&["enroll-tokens"], "enroll_tokens"),
            ENROLL_TOKEN_COLUMNS,
            "no enrollment tokens",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_seconds_or_a_unit() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("12h"), Ok(43_200));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1w").unwrap_err().contains("s, m, h or d"));
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
