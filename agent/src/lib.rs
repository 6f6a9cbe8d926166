//! The EdgeFleet device agent: verified atomic model installs, tract inference in a supervised
//! worker process, a local inference API, self-test and local rollback, shadow models.

pub mod api;
pub mod capture;
pub mod config;
pub mod control;
pub mod download;
pub mod enroll;
pub mod events;
pub mod failpoint;
pub mod feedback;
pub mod mqtt;
pub use edgefleet_runtime as runtime;
pub mod spool;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod trust;
pub mod worker;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};

use supervisor::{AdminRequest, AdminResponse};

/// Sends one request to a running agent's admin socket and returns its answer.
pub fn admin_call(socket: &Path, request: &AdminRequest) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the agent at {} (is it running, and are you allowed to use its admin socket?)", socket.display()))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("the agent closed the admin connection")?;
    match serde_json::from_str::<AdminResponse>(&answer)
        .context("the agent sent an unreadable answer")?
    {
        AdminResponse::Ok(value) => Ok(value),
        AdminResponse::Error { code, message } => bail!("{message} [{code}]"),
    }
}
