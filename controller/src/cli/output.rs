//! What the `edgefleet` commands print: `--output table|json`, aligned tables, `field value`
//! blocks, and the small formatters they share (times, labels, digests).

use std::io::Write;

use anyhow::Result;
use clap::ValueEnum;
use edgefleet_protocol::Timestamp;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns and fields, for people.
    Table,
    /// JSON, pretty-printed, for scripts (`| jq`).
    Json,
}

/// Width of the name column in `field value` blocks.
const FIELD_WIDTH: usize = 18;

/// One `name value` line of a block, the names aligned.
pub fn field(name: &str, value: &str) {
    println!("{name:<FIELD_WIDTH$} {value}");
}

pub fn print_json(value: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints `value` as JSON, or runs `human` to print it for people.
pub fn show(format: OutputFormat, value: &Value, human: impl FnOnce() -> Result<()>) -> Result<()> {
    match format {
        OutputFormat::Json => print_json(value),
        OutputFormat::Table => human(),
    }
}

/// A table column: its header, the JSON key it shows, and how.
pub type Column = (&'static str, &'static str, fn(&Value) -> String);

/// Rows under a header, each column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// A table with a row per element of the JSON array `items` (none for anything else).
    pub fn of(headers: &[&str], items: &Value, row: impl Fn(&Value) -> Vec<String>) -> Self {
        let mut table = Self::new(headers);
        for item in items.as_array().into_iter().flatten() {
            table.row(row(item));
        }
        table
    }

    /// A table of `columns` (header, the item's key, how to show its value) over `items`.
    pub fn columns(columns: &[Column], items: &Value) -> Self {
        let headers: Vec<&str> = columns.iter().map(|(header, _, _)| *header).collect();
        Self::of(&headers, items, |item| {
            columns
                .iter()
                .map(|(_, key, show)| show(&item[*key]))
                .collect()
        })
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.len() == 1
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(i))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table, or `empty` (e.g. "no devices") when it has no rows. A long table may
    /// meet a closed pipe (`| head`): that is an error to report, not a panic.
    pub fn print_or(&self, empty: &str) -> Result<()> {
        let mut out = std::io::stdout().lock();
        if self.is_empty() {
            writeln!(out, "{empty}")?;
        } else {
            out.write_all(self.render().as_bytes())?;
        }
        Ok(())
    }
}

/// A JSON string as is, a number or boolean as JSON, null or absent as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Unix milliseconds as RFC 3339 (UTC); null or absent as `-`.
pub fn time(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| "-".into(), |ms| Timestamp(ms).to_rfc3339())
}

/// A label object as `key=value, …` in key order; none as `-`.
pub fn labels(value: &Value) -> String {
    let mut pairs: Vec<String> = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(", ")
    }
}

/// The first 12 hex digits of a digest, enough to tell models apart on screen.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// A digest value shortened as [`short`]; `-` when absent.
pub fn short_digest(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| "-".into(), |d| short(d).to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_align_columns_on_the_widest_cell() {
        let mut table = Table::new(&["ID", "STATE", "LABELS"]);
        assert!(table.is_empty());
        table.row(vec!["pump-01".into(), "online".into(), "site=a".into()]);
        table.row(vec!["p2".into(), "-".into(), "-".into()]);
        assert_eq!(
            table.render(),
            "ID       STATE   LABELS\npump-01  online  site=a\np2       -       -\n"
        );
    }

    #[test]
    fn values_format_for_people() {
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!("a")), "a");
        assert_eq!(text(&json!(3)), "3");
        assert_eq!(time(&json!(null)), "-");
        assert!(time(&json!(0)).starts_with("1970-01-01T00:00:00"));
        assert_eq!(labels(&json!({"site": "a", "line": "b"})), "line=b, site=a");
        assert_eq!(labels(&json!({})), "-");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }
}
