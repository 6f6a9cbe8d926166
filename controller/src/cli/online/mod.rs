//! The online half of `edgefleet`: commands that drive a controller through its admin API
//! (`/api/v1`, `controller/openapi.json`). They speak HTTP and nothing else: no database, no
//! controller files, no `crate::server`.

pub mod audit;
pub mod capture;
pub mod client;
pub mod device;
pub mod drift;
pub mod experiment;
pub mod model;
pub mod profile;
pub mod rollout;
pub mod token;

use anyhow::Result;
use clap::{Args, Subcommand};

use self::client::Client;
use crate::cli::output::{Column, OutputFormat, Table, show};

/// Where the connection and output flags show in `--help`.
const GLOBAL: &str = "Connection and output";

#[derive(Debug, Args)]
pub struct OutputArg {
    /// `table` for people; `json` prints the API's answer for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table, global = true, help_heading = GLOBAL)]
    pub output: OutputFormat,
}

/// Which controller to talk to, over the saved profile, and how to print.
#[derive(Debug, Args)]
pub struct Remote {
    /// The saved profile to use (default: the current one; see `edgefleet profile list`).
    #[arg(long, env = "EDGEFLEET_PROFILE", global = true, help_heading = GLOBAL)]
    pub profile: Option<String>,
    /// The controller's URL, over the profile's.
    #[arg(long, env = "EDGEFLEET_URL", global = true, help_heading = GLOBAL)]
    pub url: Option<String>,
    /// The API token (efk_…), over the profile's.
    #[arg(
        long,
        env = "EDGEFLEET_TOKEN",
        global = true,
        hide_env_values = true,
        help_heading = GLOBAL
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub output: OutputArg,
}

/// An online command group: the connection flags and one of its subcommands.
#[derive(Debug, Args)]
pub struct Online<C: Subcommand> {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: C,
}

impl Remote {
    pub fn connect(&self) -> Result<Client> {
        let (url, token) = profile::resolve(
            self.profile.as_deref(),
            self.url.as_deref(),
            self.token.as_deref(),
        )?;
        Ok(Client::new(&url, &token)?)
    }
}

/// Connects and runs `handler` with the group's subcommand and output format.
pub fn run<C: Subcommand>(
    online: Online<C>,
    handler: impl FnOnce(&Client, C, OutputFormat) -> Result<()>,
) -> Result<()> {
    let client = online.remote.connect()?;
    handler(&client, online.command, online.remote.output.output)
}

/// `GET path`, shown as the API's JSON or as a table of the array under `key`.
pub fn list(
    client: &Client,
    format: OutputFormat,
    (path, key): (&[&str], &str),
    columns: &[Column],
    empty: &str,
) -> Result<()> {
    let answer = client.get(path)?;
    show(format, &answer, || {
        Table::columns(columns, &answer[key]).print_or(empty)
    })
}

/// Parses repeated `key=value` arguments (labels) into a JSON object.
pub fn label_map(
    items: &[String],
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    Ok(crate::cli::spec::pairs(items, what)?
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect())
}

/// A duration: `90`, `90s`, `15m`, `12h`, `7d` → seconds (0 allowed).
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: use seconds or a number with s, m, h or d")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?} is not a duration"))
}
