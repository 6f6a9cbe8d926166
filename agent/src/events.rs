//! The local event journal: activations, rollbacks and install failures, appended (fsynced) as
//! length-prefixed CBOR `DeviceEvent`s. A torn record at the end (power cut mid-append) is ignored
//! on read and overwritten by the next append.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::messages::{DeviceEvent, EventKind};

/// Keeps the journal from growing without bound: older events are dropped past this many.
const MAX_EVENTS: usize = 10_000;

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// Reads every complete event.
    pub fn read(&self) -> io::Result<Vec<DeviceEvent>> {
        Ok(self.read_with_end()?.0)
    }

    fn read_with_end(&self) -> io::Result<(Vec<DeviceEvent>, u64)> {
        let mut bytes = Vec::new();
        match File::open(&self.path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(err) => return Err(err),
        }
        let mut events = Vec::new();
        let mut at = 0usize;
        while bytes.len() >= at + 4 {
            let len = u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            let Some(record) = bytes.get(at + 4..at + 4 + len) else {
                break;
            };
            match codec::decode::<DeviceEvent>("journal event", record, MAX_MESSAGE_BYTES) {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
            at += 4 + len;
        }
        Ok((events, at as u64))
    }

    /// Appends one event and fsyncs it.
    pub fn append(&self, event: &DeviceEvent) -> io::Result<()> {
        let (events, end) = self.read_with_end()?;
        if events.len() >= MAX_EVENTS {
            return self.rewrite(&events[events.len() - MAX_EVENTS / 2..], event);
        }
        let body = codec::encode(event);
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)?;
        file.seek(SeekFrom::Start(end))?;
        file.write_all(&(body.len() as u32).to_be_bytes())?;
        file.write_all(&body)?;
        file.set_len(end + 4 + body.len() as u64)?;
        file.sync_all()
    }

    fn rewrite(&self, keep: &[DeviceEvent], event: &DeviceEvent) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = File::create(&tmp)?;
        for event in keep.iter().chain(std::iter::once(event)) {
            let body = codec::encode(event);
            file.write_all(&(body.len() as u32).to_be_bytes())?;
            file.write_all(&body)?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// A human/JSON view of an event.
pub fn event_json(event: &DeviceEvent) -> serde_json::Value {
    let (kind, reason, to) = match &event.kind {
        EventKind::RolledBack { reason, to } => (
            "rolled_back",
            Some(*reason),
            to.as_ref().map(|m| format!("{}@{}", m.name, m.version)),
        ),
        EventKind::InstallFailed { reason } => ("install_failed", Some(*reason), None),
        EventKind::Downloading => ("downloading", None, None),
        EventKind::Installed => ("installed", None, None),
        EventKind::Activated => ("activated", None, None),
        EventKind::ShadowStarted => ("shadow_started", None, None),
        EventKind::ShadowStopped => ("shadow_stopped", None, None),
        EventKind::SpoolDropped { .. } => ("spool_dropped", None, None),
    };
    serde_json::json!({
        "at": event.at.to_rfc3339(),
        "kind": kind,
        "reason": reason.map(|r| serde_json::to_value(r).unwrap_or_default()),
        "model": event.model.as_ref().map(|m| format!("{}@{}", m.name, m.version)),
        "digest": event.model.as_ref().map(|m| m.manifest_digest.to_hex()),
        "to": to,
        "detail": event.detail,
    })
}

#[cfg(test)]
mod tests {
    use edgefleet_protocol::Timestamp;
    use edgefleet_protocol::messages::FailureCode;

    use super::*;

    fn event(n: u64) -> DeviceEvent {
        DeviceEvent {
            at: Timestamp(n),
            kind: EventKind::InstallFailed {
                reason: FailureCode::NoSpace,
            },
            model: None,
            assignment_seq: None,
            detail: format!("event {n}"),
        }
    }

    #[test]
    fn a_torn_tail_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(&dir.path().join("events.log"));
        journal.append(&event(1)).unwrap();
        journal.append(&event(2)).unwrap();
        // A power cut in the middle of a third append.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join("events.log"))
            .unwrap();
        file.write_all(&[0, 0, 0, 40, 0xa5, 0x01]).unwrap();
        assert_eq!(journal.read().unwrap().len(), 2);
        journal.append(&event(3)).unwrap();
        let events = journal.read().unwrap();
        assert_eq!(
            events.iter().map(|e| e.at.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }
}
