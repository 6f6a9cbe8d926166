//! `edgefleet audit`: verify the controller's hash-chained audit log, export it as JSON lines.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::Client;
use crate::cli::output::{OutputFormat, print_json, show, text};
use crate::fsutil;

/// Rows per export request (the API's largest page).
const PAGE_ROWS: u64 = 10_000;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain on the controller; exits non-zero when it is broken.
    Verify,
    /// Export audit rows as JSON lines, oldest first (admin).
    Export {
        /// Write to this file (replaced atomically) instead of standard output.
        #[arg(long, short = 'o')]
        output_file: Option<PathBuf>,
        /// Only rows after this sequence number, e.g. the last one of an earlier export.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

pub fn run(client: &Client, command: AuditCommand, format: OutputFormat) -> Result<()> {
    match command {
        AuditCommand::Verify => verify(client, format),
        AuditCommand::Export {
            output_file: None,
            after,
        } => {
            let (rows, last) = export(client, after, &mut std::io::stdout().lock())?;
            // Standard output holds the rows; the summary goes beside them.
            eprintln!("exported {rows} audit rows (last seq {last})");
            Ok(())
        }
        AuditCommand::Export {
            output_file: Some(path),
            after,
        } => {
            // Readable by its owner only: the log names people, devices and tokens.
            let (rows, last) = fsutil::write_atomic_with(&path, fsutil::SECRET_MODE, |file| {
                export(client, after, file)
            })?;
            let summary = json!({"file": path, "rows": rows, "last_seq": last});
            show(format, &summary, || {
                println!(
                    "exported {rows} audit rows (last seq {last}) to {}",
                    path.display()
                );
                Ok(())
            })
        }
    }
}

fn verify(client: &Client, format: OutputFormat) -> Result<()> {
    let answer = client.get(&["audit", "verify"])?;
    if format == OutputFormat::Json {
        print_json(&answer)?;
    }
    match answer["ok"].as_bool() {
        Some(true) => {
            if format == OutputFormat::Table {
                let head = &answer["head"];
                println!(
                    "audit log intact: {} rows, last seq {}, head hash {}",
                    text(&head["rows"]),
                    text(&head["last_seq"]),
                    text(&head["head_hash"])
                );
            }
            Ok(())
        }
        Some(false) => bail!(
            "the audit log's hash chain is broken: {}",
            answer["message"]
                .as_str()
                .unwrap_or("the controller did not say where")
        ),
        None => bail!("the controller's answer to audit verify has no `ok` field: {answer}"),
    }
}

/// Copies every row after `after` into `out`, page by page; returns the row count and last seq.
fn export(client: &Client, mut after: i64, out: &mut dyn Write) -> Result<(u64, i64)> {
    let mut rows = 0u64;
    loop {
        let page = client.get_text(
            &["audit"],
            &[
                ("after", after.to_string()),
                ("limit", PAGE_ROWS.to_string()),
            ],
        )?;
        let lines: Vec<&str> = page.lines().filter(|l| !l.trim().is_empty()).collect();
        let Some(last) = lines.last() else { break };
        let last: Value = serde_json::from_str(last)
            .context("the controller's audit export is not JSON lines")?;
        let seq = last["seq"]
            .as_i64()
            .filter(|&seq| seq > after)
            .context("the controller's audit export has rows without a growing `seq`")?;
        for line in &lines {
            writeln!(out, "{line}").context("cannot write the export")?;
        }
        rows += lines.len() as u64;
        after = seq;
        if (lines.len() as u64) < PAGE_ROWS {
            break;
        }
    }
    out.flush().context("cannot write the export")?;
    Ok((rows, after))
}
