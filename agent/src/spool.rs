//! Store-and-forward: every outgoing report is written to disk (one fsynced file per report,
//! named by its sequence number) before it is sent, and deleted only when the controller
//! acknowledges that sequence number. The spool is bounded by size and age; the oldest reports
//! are dropped first and the drop itself becomes a report.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::messages::{DeviceBody, DeviceEvent, EventKind};
use edgefleet_protocol::{DeviceId, DeviceMessage, Timestamp, TopicKind};

/// Bounds on what the spool keeps.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub max_age_ms: u64,
}

/// One spooled report.
#[derive(Debug, Clone, PartialEq)]
pub struct Spooled {
    pub seq: u64,
    pub kind: TopicKind,
    pub message: DeviceMessage,
}

/// What `append` dropped to stay within its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    device: DeviceId,
    limits: SpoolLimits,
    /// (seq, bytes, sent_at) of each report on disk, oldest first.
    index: Vec<(u64, u64, Timestamp)>,
    next_seq: u64,
}

fn kind_tag(kind: TopicKind) -> &'static str {
    kind.as_str()
}

fn parse_name(name: &str) -> Option<(u64, TopicKind)> {
    let (seq, rest) = name.split_once('.')?;
    let (kind, ext) = rest.split_once('.')?;
    if ext != "cbor" {
        return None;
    }
    let kind = TopicKind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    Some((seq.parse().ok()?, kind))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens the spool, removing temp files a crash left and anything unreadable.
    pub fn open(dir: &Path, device: DeviceId, limits: SpoolLimits) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut index = Vec::new();
        let mut high = 0u64;
        for entry in fs::read_dir(dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "seq" {
                continue;
            }
            let parsed = parse_name(&name).and_then(|(seq, _)| {
                let bytes = fs::read(entry.path()).ok()?;
                let message: DeviceMessage =
                    codec::decode("spooled report", &bytes, MAX_MESSAGE_BYTES).ok()?;
                (message.seq == seq).then_some((seq, bytes.len() as u64, message.sent_at))
            });
            match parsed {
                Some(item) => {
                    high = high.max(item.0);
                    index.push(item);
                }
                None => fs::remove_file(entry.path())?,
            }
        }
        index.sort_by_key(|(seq, _, _)| *seq);
        let persisted = fs::read_to_string(dir.join("seq"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let next_seq = high.max(persisted) + 1;
        Ok(Self {
            dir: dir.to_owned(),
            device,
            limits,
            index,
            next_seq,
        })
    }

    fn path(&self, seq: u64, kind: TopicKind) -> PathBuf {
        self.dir.join(format!("{seq:020}.{}.cbor", kind_tag(kind)))
    }

    fn find(&self, seq: u64) -> Option<PathBuf> {
        TopicKind::ALL
            .into_iter()
            .map(|k| self.path(seq, k))
            .find(|p| p.exists())
    }

    /// Spools a report and returns its sequence number. If the spool is over its limits, the
    /// oldest reports are dropped first and a `SpoolDropped` event is spooled after this report.
    pub fn append(
        &mut self,
        kind: TopicKind,
        body: DeviceBody,
        now: Timestamp,
    ) -> io::Result<(u64, Option<Dropped>)> {
        let seq = self.write(kind, body, now)?;
        let dropped = self.enforce_limits(now)?;
        if let Some(dropped) = dropped {
            let event = DeviceEvent {
                at: now,
                kind: EventKind::SpoolDropped {
                    count: dropped.count,
                    first_seq: dropped.first_seq,
                    last_seq: dropped.last_seq,
                },
                model: None,
                assignment_seq: None,
                detail: format!(
                    "the offline spool was full or too old; dropped {} report(s)",
                    dropped.count
                ),
            };
            self.write(TopicKind::Event, DeviceBody::Event(event), now)?;
        }
        Ok((seq, dropped))
    }

    fn write(&mut self, kind: TopicKind, body: DeviceBody, now: Timestamp) -> io::Result<u64> {
        let seq = self.next_seq;
        // The sequence high-water mark is persisted first, so a seq is never reused after a crash.
        let seq_tmp = self.dir.join("seq.tmp");
        let mut file = File::create(&seq_tmp)?;
        file.write_all(seq.to_string().as_bytes())?;
        file.sync_all()?;
        fs::rename(&seq_tmp, self.dir.join("seq"))?;
        let message = DeviceMessage::new(self.device.clone(), seq, now, body);
        let bytes = codec::encode(&message);
        let path = self.path(seq, kind);
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fsync_dir(&self.dir)?;
        self.next_seq += 1;
        self.index.push((seq, bytes.len() as u64, now));
        Ok(seq)
    }

    fn enforce_limits(&mut self, now: Timestamp) -> io::Result<Option<Dropped>> {
        let mut dropped: Option<Dropped> = None;
        loop {
            let total: u64 = self.index.iter().map(|(_, bytes, _)| bytes).sum();
            let Some(&(seq, _, sent_at)) = self.index.first() else {
                break;
            };
            let too_big = total > self.limits.max_bytes && self.index.len() > 1;
            let too_old = now.millis_since(sent_at) > self.limits.max_age_ms;
            if !too_big && !too_old {
                break;
            }
            if let Some(path) = self.find(seq) {
                fs::remove_file(path)?;
            }
            self.index.remove(0);
            dropped = Some(match dropped {
                None => Dropped {
                    count: 1,
                    first_seq: seq,
                    last_seq: seq,
                },
                Some(d) => Dropped {
                    count: d.count + 1,
                    last_seq: seq,
                    ..d
                },
            });
        }
        if dropped.is_some() {
            fsync_dir(&self.dir)?;
        }
        Ok(dropped)
    }

    /// Every report not yet acknowledged, oldest first.
    pub fn pending(&self) -> io::Result<Vec<Spooled>> {
        let mut out = Vec::with_capacity(self.index.len());
        for (seq, _, _) in &self.index {
            let Some(path) = self.find(*seq) else {
                continue;
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((_, kind)) = parse_name(&name) else {
                continue;
            };
            let bytes = fs::read(&path)?;
            let message = codec::decode("spooled report", &bytes, MAX_MESSAGE_BYTES)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
            out.push(Spooled {
                seq: *seq,
                kind,
                message,
            });
        }
        Ok(out)
    }

    /// Deletes acknowledged reports. Unknown sequence numbers are ignored (acked twice).
    pub fn ack(&mut self, seqs: &[u64]) -> io::Result<usize> {
        let mut removed = 0;
        for seq in seqs {
            if let Some(pos) = self.index.iter().position(|(s, _, _)| s == seq) {
                if let Some(path) = self.find(*seq) {
                    fs::remove_file(path)?;
                }
                self.index.remove(pos);
                removed += 1;
            }
        }
        if removed > 0 {
            fsync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use edgefleet_protocol::Arch;
    use edgefleet_protocol::messages::Status;

    use super::*;

    fn status() -> DeviceBody {
        DeviceBody::Status(Status {
            online: true,
            agent_version: String::from("0.1.0"),
            arch: Arch::new("x86_64").unwrap(),
            active: None,
            previous: None,
            shadow: None,
            assignment_seq: 0,
            uptime_s: 0,
        })
    }

    fn spool(dir: &Path, max_bytes: u64) -> Spool {
        Spool::open(
            dir,
            DeviceId::new("d1").unwrap(),
            SpoolLimits {
                max_bytes,
                max_age_ms: 3_600_000,
            },
        )
        .unwrap()
    }

    #[test]
    fn reports_survive_restarts_until_acked_and_seqs_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spool(dir.path(), 1 << 20);
        for i in 0..3 {
            assert_eq!(
                s.append(TopicKind::Status, status(), Timestamp(i))
                    .unwrap()
                    .0,
                i + 1
            );
        }
        drop(s);
        let mut s = spool(dir.path(), 1 << 20);
        assert_eq!(
            s.pending()
                .unwrap()
                .iter()
                .map(|p| p.seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(s.ack(&[1, 3, 99]).unwrap(), 2);
        assert_eq!(s.ack(&[1]).unwrap(), 0, "acking twice is harmless");
        s.ack(&[2]).unwrap();
        drop(s);
        let mut s = spool(dir.path(), 1 << 20);
        assert!(s.is_empty());
        assert_eq!(
            s.append(TopicKind::Status, status(), Timestamp(9))
                .unwrap()
                .0,
            4,
            "seq continues after an empty spool"
        );
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let one = codec::encode(&DeviceMessage::new(
            DeviceId::new("d1").unwrap(),
            1,
            Timestamp(0),
            status(),
        ))
        .len() as u64;
        let mut s = spool(dir.path(), one * 3 + one / 2);
        for i in 0..3 {
            assert_eq!(
                s.append(TopicKind::Status, status(), Timestamp(i))
                    .unwrap()
                    .1,
                None
            );
        }
        let (seq, dropped) = s.append(TopicKind::Status, status(), Timestamp(5)).unwrap();
        assert_eq!(seq, 4);
        assert_eq!(
            dropped,
            Some(Dropped {
                count: 1,
                first_seq: 1,
                last_seq: 1
            })
        );
        let pending = s.pending().unwrap();
        assert_eq!(pending.first().unwrap().seq, 2);
        let last = pending.last().unwrap();
        assert_eq!(last.seq, 5);
        assert!(
            matches!(&last.message.body, DeviceBody::Event(e) if matches!(e.kind, EventKind::SpoolDropped { count: 1, first_seq: 1, last_seq: 1 }))
        );
    }

    #[test]
    fn torn_files_from_a_crash_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spool(dir.path(), 1 << 20);
        s.append(TopicKind::Status, status(), Timestamp(1)).unwrap();
        drop(s);
        fs::write(dir.path().join("00000000000000000002.status.tmp"), b"half").unwrap();
        fs::write(
            dir.path().join("00000000000000000003.status.cbor"),
            b"\xa1\x61",
        )
        .unwrap();
        let s = spool(dir.path(), 1 << 20);
        assert_eq!(s.len(), 1);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "seq + one report"
        );
    }
}
