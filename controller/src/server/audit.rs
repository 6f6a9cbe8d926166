//! The audit log's hash chain (pure): each row's hash covers its own fields and the previous
//! row's hash, so an edited, deleted or reordered row breaks the chain at a place we can name.
//! Rows are written by the store in the same transaction as the change they record.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit row as stored and exported (one JSON line each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// Who: `token:<name>`, `device:<id>`, `controller`.
    pub actor: String,
    /// What, e.g. `device.enroll`, `model.register`, `device.assign`.
    pub action: String,
    /// The object acted on, e.g. `device:pump-1`, `model:<digest>`.
    pub object: String,
    /// JSON object with the details of the change.
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// What an audit entry says before it is chained.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub actor: String,
    pub action: String,
    pub object: String,
    pub details: serde_json::Value,
}

impl AuditEntry {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        object: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            object: object.into(),
            details,
        }
    }

    /// Chains the entry after `prev` (`None` for the first row).
    pub fn chain(&self, prev: Option<(i64, &str)>, at: i64) -> AuditRecord {
        let (seq, prev_hash) = match prev {
            Some((seq, hash)) => (seq + 1, hash.to_owned()),
            None => (1, GENESIS.to_owned()),
        };
        let details = self.details.to_string();
        let hash = row_hash(
            seq,
            at,
            &self.actor,
            &self.action,
            &self.object,
            &details,
            &prev_hash,
        );
        AuditRecord {
            seq,
            at,
            actor: self.actor.clone(),
            action: self.action.clone(),
            object: self.object.clone(),
            details,
            prev_hash,
            hash,
        }
    }
}

/// SHA-256 over a domain tag and every field, each length-prefixed, as lowercase hex.
pub fn row_hash(
    seq: i64,
    at: i64,
    actor: &str,
    action: &str,
    object: &str,
    details: &str,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(b"edgefleet-audit-v1\0");
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    for field in [actor, action, object, details, prev_hash] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

impl AuditRecord {
    fn recomputed(&self) -> String {
        row_hash(
            self.seq,
            self.at,
            &self.actor,
            &self.action,
            &self.object,
            &self.details,
            &self.prev_hash,
        )
    }
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditBreak {
    #[error(
        "audit row {seq} was edited: its fields no longer match its hash ({action} on {object})"
    )]
    Edited {
        seq: i64,
        action: String,
        object: String,
    },
    #[error("audit rows {first}..={last} were deleted: row {next} follows row {previous}")]
    Deleted {
        previous: i64,
        next: i64,
        first: i64,
        last: i64,
    },
    #[error(
        "audit row {seq} is out of place: it does not follow row {previous} (rows were reordered or re-chained)"
    )]
    Reordered { seq: i64, previous: i64 },
    #[error("audit row {seq} appears more than once or out of order")]
    Duplicate { seq: i64 },
}

/// The result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    pub rows: u64,
    pub last_seq: i64,
    pub head_hash: String,
}

/// Verifies rows in `seq` order (as the store returns them). A chain may start after row 1 only
/// when `anchor` (the previous row's seq and hash, from an earlier verified export) is given.
pub fn verify(
    rows: impl IntoIterator<Item = AuditRecord>,
    anchor: Option<(i64, String)>,
) -> Result<ChainHead, AuditBreak> {
    let (mut prev_seq, mut prev_hash) = anchor.unwrap_or((0, GENESIS.to_owned()));
    let mut count = 0u64;
    for row in rows {
        if row.seq <= prev_seq {
            return Err(AuditBreak::Duplicate { seq: row.seq });
        }
        if row.recomputed() != row.hash {
            return Err(AuditBreak::Edited {
                seq: row.seq,
                action: row.action,
                object: row.object,
            });
        }
        if row.seq != prev_seq + 1 {
            return Err(AuditBreak::Deleted {
                previous: prev_seq,
                next: row.seq,
                first: prev_seq + 1,
                last: row.seq - 1,
            });
        }
        if row.prev_hash != prev_hash {
            return Err(AuditBreak::Reordered {
                seq: row.seq,
                previous: prev_seq,
            });
        }
        prev_seq = row.seq;
        prev_hash = row.hash;
        count += 1;
    }
    Ok(ChainHead {
        rows: count,
        last_seq: prev_seq,
        head_hash: prev_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut rows: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let entry = AuditEntry::new(
                "token:admin",
                "device.label",
                format!("device:d{i}"),
                json!({"i": i}),
            );
            let prev = rows.last().map(|r| (r.seq, r.hash.as_str()));
            let row = entry.chain(prev, 1_000 + i);
            rows.push(row);
        }
        rows
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let rows = chain(5);
        let head = verify(rows.clone(), None).unwrap();
        assert_eq!(head.rows, 5);
        assert_eq!(head.last_seq, 5);
        assert_eq!(head.head_hash, rows[4].hash);
        // A suffix verifies against an anchor from an earlier export.
        let anchor = Some((rows[1].seq, rows[1].hash.clone()));
        assert_eq!(verify(rows[2..].to_vec(), anchor).unwrap().rows, 3);
    }

    #[test]
    fn an_edited_row_is_named() {
        let mut rows = chain(5);
        rows[2].details = json!({"i": 99}).to_string();
        assert_eq!(
            verify(rows, None).unwrap_err(),
            AuditBreak::Edited {
                seq: 3,
                action: "device.label".into(),
                object: "device:d2".into()
            }
        );
    }

    #[test]
    fn a_deleted_row_is_named() {
        let mut rows = chain(5);
        rows.remove(3);
        let err = verify(rows, None).unwrap_err();
        assert_eq!(
            err,
            AuditBreak::Deleted {
                previous: 3,
                next: 5,
                first: 4,
                last: 4
            }
        );
        assert!(err.to_string().contains("4..=4"));
        // Deleting the last row leaves a valid shorter chain: the head hash is what an exported
        // copy anchors against.
        let mut rows = chain(3);
        rows.pop();
        assert_eq!(verify(rows, None).unwrap().last_seq, 2);
    }

    #[test]
    fn reordered_rows_are_named_even_when_renumbered_and_rehashed() {
        // Swap rows 2 and 3 and give them consistent numbers and hashes again: each row is
        // self-consistent, but row 2 no longer follows row 1.
        let rows = chain(4);
        let mut swapped = vec![
            rows[0].clone(),
            rows[2].clone(),
            rows[1].clone(),
            rows[3].clone(),
        ];
        for (i, row) in swapped.iter_mut().enumerate() {
            row.seq = i as i64 + 1;
            row.hash = row.recomputed();
        }
        assert_eq!(
            verify(swapped, None).unwrap_err(),
            AuditBreak::Reordered {
                seq: 2,
                previous: 1
            }
        );
        // Swapped without renumbering: out of order.
        let rows = chain(3);
        let swapped = vec![rows[0].clone(), rows[2].clone(), rows[1].clone()];
        assert!(matches!(
            verify(swapped, None).unwrap_err(),
            AuditBreak::Deleted { .. } | AuditBreak::Duplicate { .. }
        ));
    }
}
