//! Data capture on the device, when the controller's signed assignment turns it on: records the
//! worker samples (inputs, outputs, fed-back ground truth) are appended to an open batch
//! journal, closed into a batch file (temp file + fsync + rename) at the settings' sample count
//! or age, a size cap, or a model change, announced with a `CaptureNotice` through the report
//! spool, uploaded over HTTPS with the device's client certificate when the controller answers
//! with an upload URL, and deleted only once the upload succeeded (or the controller refused
//! the batch). Everything is bounded by `capture.max_bytes` on disk: past it, new records are
//! dropped and counted, and batches already closed wait for their upload.
//!
//! Files in the capture directory: `settings.json` (the settings in force, absent when off),
//! `next-batch` (the next batch number, persisted before a batch with that number is written, so
//! a number is never reused), `open.journal` (length-prefixed CBOR frames: the model, then one
//! record each; a torn tail from a crash is dropped on start) and `<batch>.batch.cbor`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_protocol::capture::{
    CAPTURE_FORMAT, CaptureBatch, CaptureRecord, CaptureSettings, MAX_CAPTURE_BATCH_BYTES,
};
use edgefleet_protocol::codec;
use edgefleet_protocol::messages::{CaptureNotice, ModelRef};
use edgefleet_protocol::{DeviceId, Sha256Digest, Timestamp};

/// Room left in a batch for its envelope.
const BATCH_HEADROOM: u64 = 64 * 1024;
/// Largest journal frame (one record).
const MAX_FRAME_BYTES: u64 = MAX_CAPTURE_BATCH_BYTES - BATCH_HEADROOM;

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, directory fsync.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[derive(Debug)]
struct OpenBatch {
    model: ModelRef,
    file: File,
    bytes: u64,
    samples: u32,
    opened_at: Timestamp,
    first_at: Timestamp,
    last_at: Timestamp,
}

#[derive(Debug)]
struct Sealed {
    notice: CaptureNotice,
    /// When the notice was last spooled (`None`: not yet in this run).
    noticed: Option<Instant>,
    uploading: bool,
}

/// What became of a record handed to [`CaptureStore::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// Capture is off; the record was in flight when it was turned off.
    Off,
    /// Not stored, for this reason (counted in [`CaptureStore::dropped`]).
    Dropped(String),
}

/// What to do about the controller's answer to a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Upload the file at `path` to `url`.
    Upload { path: PathBuf, url: String },
    /// The batch is gone (refused and deleted now, or uploaded before) or an upload is under way.
    Nothing,
}

/// How an upload ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Worth another try later (network, controller busy).
    #[error("{0}")]
    Retry(String),
    /// The controller refused this batch for good; it is deleted.
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug)]
pub struct CaptureStore {
    dir: PathBuf,
    device: DeviceId,
    max_bytes: u64,
    settings: Option<CaptureSettings>,
    open: Option<OpenBatch>,
    sealed: BTreeMap<u64, Sealed>,
    next_batch: u64,
    dropped: u64,
    stored: u64,
}

impl CaptureStore {
    /// Opens the capture directory: reads the settings, closes a batch a crash left open (its
    /// torn last frame dropped), and lists the batches waiting for upload.
    pub fn open(dir: &Path, device: DeviceId, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let settings = match fs::read(dir.join("settings.json")) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(invalid)?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        let next_batch = fs::read_to_string(dir.join("next-batch"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1);
        let mut store = Self {
            dir: dir.to_owned(),
            device,
            max_bytes,
            settings,
            open: None,
            sealed: BTreeMap::new(),
            next_batch,
            dropped: 0,
            stored: 0,
        };
        for entry in fs::read_dir(dir)?.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(&path)?;
                continue;
            }
            let Some(batch) = name
                .strip_suffix(".batch.cbor")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = fs::read(&path)?;
            match CaptureBatch::decode(&bytes) {
                Ok(decoded) if decoded.batch == batch => {
                    store.next_batch = store.next_batch.max(batch + 1);
                    store.sealed.insert(batch, Sealed::of(&decoded, &bytes));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "removing an unreadable capture batch");
                    fs::remove_file(&path)?;
                }
            }
        }
        store.recover_journal()?;
        Ok(store)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("open.journal")
    }

    fn batch_path(&self, batch: u64) -> PathBuf {
        self.dir.join(format!("{batch:020}.batch.cbor"))
    }

    /// Reads the journal's frames up to the first torn or unreadable one.
    fn read_journal(path: &Path) -> io::Result<(Option<ModelRef>, Vec<CaptureRecord>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok((None, Vec::new())),
            Err(err) => return Err(err),
        };
        let mut frames = Vec::new();
        let mut rest = bytes.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            if len > tail.len() {
                break;
            }
            let (frame, tail) = tail.split_at(len);
            frames.push(frame);
            rest = tail;
        }
        let Some((first, records)) = frames.split_first() else {
            return Ok((None, Vec::new()));
        };
        let limit = MAX_CAPTURE_BATCH_BYTES as usize;
        let Ok(model) = codec::decode::<ModelRef>("capture journal model", first, limit) else {
            return Ok((None, Vec::new()));
        };
        let records = records
            .iter()
            .map_while(|frame| codec::decode("capture journal record", frame, limit).ok())
            .collect();
        Ok((Some(model), records))
    }

    fn recover_journal(&mut self) -> io::Result<()> {
        let path = self.journal_path();
        let (model, records) = Self::read_journal(&path)?;
        if let Some(model) = model
            && !records.is_empty()
        {
            self.write_batch(model, records)?;
        }
        match fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The settings in force (`None`: capture is off).
    pub fn settings(&self) -> Option<&CaptureSettings> {
        self.settings.as_ref()
    }

    /// Records dropped since the agent started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records stored since the agent started.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Batches waiting for upload.
    pub fn pending(&self) -> usize {
        self.sealed.len()
    }

    /// Bytes on disk: closed batches and the open journal.
    pub fn bytes(&self) -> u64 {
        self.sealed.values().map(|s| s.notice.bytes).sum::<u64>()
            + self.open.as_ref().map_or(0, |o| o.bytes)
    }

    /// Applies the settings of a newly accepted assignment; returns whether they changed. A
    /// batch open under the old settings is closed first.
    pub fn set_settings(&mut self, settings: Option<CaptureSettings>) -> io::Result<bool> {
        if settings == self.settings {
            return Ok(false);
        }
        self.seal()?;
        let path = self.dir.join("settings.json");
        match &settings {
            Some(settings) => write_atomic(&path, &serde_json::to_vec(settings).map_err(invalid)?)?,
            None => match fs::remove_file(&path) {
                Ok(()) => fsync_dir(&self.dir)?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            },
        }
        self.settings = settings;
        Ok(true)
    }

    fn drop_record(&mut self, reason: String) -> Appended {
        self.dropped += 1;
        if self.dropped.is_power_of_two() {
            tracing::warn!(dropped = self.dropped, %reason, "capture records dropped");
        }
        Appended::Dropped(reason)
    }

    /// Appends one record of `model`'s worker.
    pub fn append(
        &mut self,
        model: &ModelRef,
        record: &CaptureRecord,
        now: Timestamp,
    ) -> io::Result<Appended> {
        let Some(settings) = self.settings.clone() else {
            return Ok(Appended::Off);
        };
        let frame = codec::encode(record);
        let frame_bytes = frame.len() as u64 + 4;
        if frame_bytes > MAX_FRAME_BYTES {
            return Ok(self.drop_record(format!(
                "a record of {frame_bytes} bytes exceeds the capture batch limit"
            )));
        }
        let open_elsewhere = self.open.as_ref().is_some_and(|o| {
            o.model.manifest_digest != model.manifest_digest
                || o.bytes + frame_bytes > MAX_FRAME_BYTES
        });
        if open_elsewhere {
            self.seal()?;
        }
        let header = if self.open.is_none() {
            let header = codec::encode(model);
            header.len() as u64 + 4
        } else {
            0
        };
        if self.bytes() + header + frame_bytes > self.max_bytes {
            return Ok(self.drop_record(format!(
                "captured data on this device is at capture.max_bytes ({} bytes); batches wait for upload",
                self.max_bytes
            )));
        }
        if self.open.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(self.journal_path())?;
            write_frame(&mut file, &codec::encode(model))?;
            self.open = Some(OpenBatch {
                model: model.clone(),
                file,
                bytes: header,
                samples: 0,
                opened_at: now,
                first_at: record.at(),
                last_at: record.at(),
            });
        }
        let open = self.open.as_mut().expect("opened above");
        write_frame(&mut open.file, &frame)?;
        open.bytes += frame_bytes;
        open.first_at = open.first_at.min(record.at());
        open.last_at = open.last_at.max(record.at());
        if matches!(record, CaptureRecord::Sample(_)) {
            open.samples += 1;
        }
        let full = open.samples >= settings.max_batch_samples;
        self.stored += 1;
        if full {
            self.seal()?;
        }
        Ok(Appended::Stored)
    }

    /// Closes the open batch once it is older than the settings allow.
    pub fn tick(&mut self, now: Timestamp) -> io::Result<()> {
        let max_age_ms = self
            .settings
            .as_ref()
            .map_or(0, |s| u64::from(s.max_batch_age_s) * 1000);
        if self
            .open
            .as_ref()
            .is_some_and(|o| now.millis_since(o.opened_at) >= max_age_ms)
        {
            self.seal()?;
        }
        Ok(())
    }

    /// Closes the open batch (if any) into a batch file.
    pub fn seal(&mut self) -> io::Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        open.file.sync_all()?;
        drop(open.file);
        let path = self.journal_path();
        let (_, records) = Self::read_journal(&path)?;
        if !records.is_empty() {
            self.write_batch(open.model, records)?;
        }
        fs::remove_file(&path)?;
        fsync_dir(&self.dir)
    }

    fn write_batch(&mut self, model: ModelRef, records: Vec<CaptureRecord>) -> io::Result<()> {
        let batch = self.next_batch;
        // The counter moves first: a number is never given to two batches.
        write_atomic(
            &self.dir.join("next-batch"),
            (batch + 1).to_string().as_bytes(),
        )?;
        self.next_batch = batch + 1;
        let batch_file = CaptureBatch {
            format: CAPTURE_FORMAT,
            device: self.device.clone(),
            batch,
            model,
            records,
        };
        let bytes = codec::encode(&batch_file);
        write_atomic(&self.batch_path(batch), &bytes)?;
        tracing::info!(
            batch,
            samples = batch_file.samples(),
            bytes = bytes.len(),
            "capture batch closed"
        );
        self.sealed.insert(batch, Sealed::of(&batch_file, &bytes));
        Ok(())
    }

    /// Notices to spool now: batches not announced in this run, and those announced longer
    /// than `again` ago without an upload.
    pub fn due_notices(&mut self, now: Instant, again: Duration) -> Vec<CaptureNotice> {
        self.sealed
            .values_mut()
            .filter(|s| !s.uploading && s.noticed.is_none_or(|at| now.duration_since(at) >= again))
            .map(|s| {
                s.noticed = Some(now);
                s.notice.clone()
            })
            .collect()
    }

    /// The controller's answer to a notice: upload to `url`, or (`None`) the batch is refused.
    pub fn offer(&mut self, batch: u64, url: Option<String>) -> io::Result<Offer> {
        let Some(sealed) = self.sealed.get_mut(&batch) else {
            return Ok(Offer::Nothing);
        };
        match url {
            None => {
                tracing::info!(batch, "the controller refused a capture batch; deleting it");
                self.remove(batch)?;
                Ok(Offer::Nothing)
            }
            Some(_) if sealed.uploading => Ok(Offer::Nothing),
            Some(url) => {
                sealed.uploading = true;
                Ok(Offer::Upload {
                    path: self.batch_path(batch),
                    url,
                })
            }
        }
    }

    /// Records how an upload ended; an uploaded or refused batch is deleted.
    pub fn uploaded(
        &mut self,
        batch: u64,
        result: Result<(), UploadError>,
        now: Instant,
    ) -> io::Result<()> {
        match result {
            Ok(()) => {
                tracing::info!(batch, "capture batch uploaded");
                self.remove(batch)
            }
            Err(UploadError::Refused(reason)) => {
                tracing::warn!(batch, %reason, "the controller refused a capture upload; deleting the batch");
                self.remove(batch)
            }
            Err(UploadError::Retry(reason)) => {
                tracing::info!(batch, %reason, "capture upload failed; it is offered again later");
                if let Some(sealed) = self.sealed.get_mut(&batch) {
                    sealed.uploading = false;
                    sealed.noticed = Some(now);
                }
                Ok(())
            }
        }
    }

    fn remove(&mut self, batch: u64) -> io::Result<()> {
        self.sealed.remove(&batch);
        match fs::remove_file(self.batch_path(batch)) {
            Ok(()) => fsync_dir(&self.dir),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }
}

impl Sealed {
    fn of(batch: &CaptureBatch, bytes: &[u8]) -> Self {
        let at = |f: fn(&CaptureRecord) -> Timestamp| batch.records.iter().map(f);
        Sealed {
            notice: CaptureNotice {
                model: batch.model.clone(),
                batch: batch.batch,
                samples: u32::try_from(batch.samples()).unwrap_or(u32::MAX),
                bytes: bytes.len() as u64,
                sha256: Sha256Digest::of(bytes),
                first_at: at(CaptureRecord::at).min().unwrap_or_default(),
                last_at: at(CaptureRecord::at).max().unwrap_or_default(),
            },
            noticed: None,
            uploading: false,
        }
    }
}

fn write_frame(file: &mut File, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| invalid("capture record too large"))?;
    let mut bytes = Vec::with_capacity(frame.len() + 4);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(frame);
    file.write_all(&bytes)
}

/// Uploads closed batches to the controller's device endpoint (fleet CA, client certificate).
#[derive(Debug, Clone)]
pub struct Uploader {
    client: reqwest::Client,
}

impl Uploader {
    pub fn new(tls: rustls::ClientConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(300))
            .build()?;
        Ok(Self { client })
    }

    /// PUTs the batch file at `path` to `url`.
    pub async fn upload(&self, path: &Path, url: &str) -> Result<(), UploadError> {
        if !url.starts_with("https://") {
            return Err(UploadError::Refused(format!(
                "capture upload URL {url:?} is not HTTPS"
            )));
        }
        let body = tokio::fs::read(path)
            .await
            .map_err(|err| UploadError::Retry(format!("cannot read {}: {err}", path.display())))?;
        let response = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "application/cbor")
            .body(body)
            .send()
            .await
            .map_err(|err| UploadError::Retry(format!("{url}: {err}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let message = format!("{url} answered {status}: {}", text.trim());
        if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            Err(UploadError::Refused(message))
        } else {
            Err(UploadError::Retry(message))
        }
    }
}

#[cfg(test)]
mod tests;
