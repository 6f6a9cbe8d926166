//! The on-disk model store.
//!
//! ```text
//! <dir>/state.json            which model is active, previous, shadow; the commit point
//! <dir>/models/<digest>/      one verified bundle: manifest.cbor + its payload files
//! <dir>/staging/<n>/          an install in progress (removed on start)
//! ```
//!
//! Install streams the bundle through the verifier into a staging directory (each payload as
//! `<name>.part`, fsynced, renamed), then renames the whole directory into `models/` and fsyncs
//! `models/`. Nothing refers to it until [`ModelStore::commit`] atomically replaces `state.json`
//! (temp file, fsync, rename, directory fsync): that rename is the commit point. On open, the
//! store removes staging leftovers and unreferenced models and re-checks what the state refers to.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use edgefleet_protocol::bundle::{Bundle, BundleError, BundleVerifier};
use edgefleet_protocol::codec::MAX_MANIFEST_BYTES;
use edgefleet_protocol::crypto::Sha256Stream;
use edgefleet_protocol::manifest::{Manifest, ManifestPolicy};
use edgefleet_protocol::messages::{FailureCode, ModelRef};
use edgefleet_protocol::trust::{ReleaseKeyring, Signed, Verified};
use edgefleet_protocol::{Sha256Digest, Timestamp, codec};
use serde::{Deserialize, Serialize};

use crate::failpoint;

const CHUNK: usize = 256 * 1024;
const MANIFEST_FILE: &str = "manifest.cbor";

/// A model in the store, as the state file names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    /// Manifest digest, 64 hex digits; also the directory name under `models/`.
    pub digest: String,
    pub name: String,
    pub version: String,
    pub release: u64,
}

impl Slot {
    fn of(bundle: &Bundle) -> Self {
        Self {
            digest: bundle.manifest_digest.to_hex(),
            name: bundle.manifest.name.to_string(),
            version: bundle.manifest.version.to_string(),
            release: bundle.manifest.release,
        }
    }

    /// The protocol's view of this model, for events and status.
    pub fn model_ref(&self) -> Option<ModelRef> {
        Some(ModelRef {
            name: self.name.parse().ok()?,
            version: self.version.parse().ok()?,
            release: self.release,
            manifest_digest: self.digest.parse().ok()?,
        })
    }
}

/// An activation under way: the new model is active on trial; `previous` is what to go back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    pub started_at: Timestamp,
}

/// The committed state of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreState {
    pub active: Option<Slot>,
    pub previous: Option<Slot>,
    pub shadow: Option<Slot>,
    pub trial: Option<Trial>,
}

impl StoreState {
    fn referenced(&self) -> impl Iterator<Item = &Slot> {
        self.active.iter().chain(&self.previous).chain(&self.shadow)
    }
}

/// Why an install failed. The store is left as it was: the old model keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("the disk is full (installing into {path}); free space and install again")]
    NoSpace { path: PathBuf },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot read the bundle: {0}")]
    Read(io::Error),
}

impl InstallError {
    pub fn failure_code(&self) -> FailureCode {
        match self {
            InstallError::Bundle(err) => err.failure_code(),
            InstallError::Read(_) => FailureCode::Download,
            InstallError::NoSpace { .. } => FailureCode::NoSpace,
            InstallError::Io { .. } => FailureCode::Io,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            InstallError::NoSpace {
                path: path.to_owned(),
            }
        } else {
            InstallError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        }
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// What opening the store found and fixed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Leftovers removed (staging directories, temp files, unreferenced models).
    pub removed: Vec<String>,
    /// An activation was interrupted by a restart and rolled back to `to`.
    pub interrupted_trial: Option<(Slot, Option<Slot>)>,
    /// Models the state named that failed their on-disk check, with the reason.
    pub invalid: Vec<(Slot, String)>,
}

#[derive(Debug)]
pub struct ModelStore {
    dir: PathBuf,
    state: StoreState,
    staging_counter: u64,
}

impl ModelStore {
    /// Opens (creating if needed) and repairs the store at `dir`.
    pub fn open(dir: &Path, now: Timestamp) -> anyhow::Result<(Self, Repair)> {
        use anyhow::Context;
        for sub in ["models", "staging"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let mut repair = Repair::default();
        // Unfinished installs and state writes never became visible: remove them.
        for entry in fs::read_dir(dir.join("staging"))?.filter_map(Result::ok) {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            repair
                .removed
                .push(format!("staging/{}", entry.file_name().to_string_lossy()));
        }
        let tmp = dir.join("state.json.tmp");
        if tmp.exists() {
            fs::remove_file(&tmp)?;
            repair.removed.push(String::from("state.json.tmp"));
        }
        let path = dir.join("state.json");
        let loaded = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<StoreState>(&bytes).with_context(|| {
                format!(
                    "{} is not a valid store state; move it away to start with no model",
                    path.display()
                )
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => StoreState::default(),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut store = Self {
            dir: dir.to_owned(),
            state: loaded.clone(),
            staging_counter: 0,
        };
        let mut state = loaded.clone();
        if state.trial.is_some() {
            // The agent stopped while a new model was on trial: it never passed its health check.
            let failed = state
                .active
                .take()
                .expect("a trial always has an active model");
            state.active = state.previous.take();
            state.trial = None;
            repair.interrupted_trial = Some((failed, state.active.clone()));
        }
        for slot_field in [&mut state.active, &mut state.previous, &mut state.shadow] {
            if let Some(slot) = slot_field.clone()
                && let Err(reason) = store.check_slot(&slot)
            {
                repair.invalid.push((slot, reason));
                *slot_field = None;
            }
        }
        if state.active.is_none() && state.previous.is_some() {
            state.active = state.previous.take();
        }
        if state != loaded {
            store.commit(state, now)?;
        }
        let keep: Vec<String> = store.state.referenced().map(|s| s.digest.clone()).collect();
        for entry in fs::read_dir(dir.join("models"))?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
                repair.removed.push(format!("models/{name}"));
            }
        }
        fsync_dir(&dir.join("models"))?;
        Ok((store, repair))
    }

    pub fn state(&self) -> &StoreState {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model_dir(&self, slot: &Slot) -> PathBuf {
        self.dir.join("models").join(&slot.digest)
    }

    /// The manifest of an installed model (verified at install; re-read from the store).
    pub fn manifest(&self, slot: &Slot) -> anyhow::Result<Manifest> {
        read_manifest(&self.model_dir(slot))
    }

    /// Checks an installed model's files against its manifest (sizes and SHA-256).
    fn check_slot(&self, slot: &Slot) -> Result<(), String> {
        check_model_dir(&self.model_dir(slot), slot)
    }

    /// Atomically replaces the state: the commit point of every install, activation and revert.
    pub fn commit(&mut self, state: StoreState, _now: Timestamp) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(&state)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        // An fsync failure is fatal for this commit: the old state stays in force.
        file.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        drop(file);
        failpoint::hit("commit.before_rename");
        fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        failpoint::hit("commit.after_rename");
        fsync_dir(&self.dir).with_context(|| format!("cannot fsync {}", self.dir.display()))?;
        self.state = state;
        Ok(())
    }

    /// Verifies and unpacks a bundle into `models/<digest>/`. Does not change the state.
    pub fn install(
        &mut self,
        reader: impl Read,
        keyring: &Verified<ReleaseKeyring>,
        policy: ManifestPolicy,
    ) -> Result<(Verified<Bundle>, Slot), InstallError> {
        self.staging_counter += 1;
        let staging = self.dir.join("staging").join(format!(
            "{}-{}",
            std::process::id(),
            self.staging_counter
        ));
        let res = self.install_into(&staging, reader, keyring, policy);
        if res.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        res
    }

    fn install_into(
        &mut self,
        staging: &Path,
        mut reader: impl Read,
        keyring: &Verified<ReleaseKeyring>,
        policy: ManifestPolicy,
    ) -> Result<(Verified<Bundle>, Slot), InstallError> {
        fs::create_dir(staging).map_err(io_err("create", staging))?;
        let mut verifier = BundleVerifier::new(keyring, policy);
        let mut buf = vec![0u8; CHUNK];
        let mut current: Option<(usize, File, PathBuf)> = None;
        let mut done = 0usize;
        loop {
            let n = reader.read(&mut buf).map_err(InstallError::Read)?;
            if n == 0 {
                break;
            }
            for part in verifier.feed(&buf[..n])? {
                if current
                    .as_ref()
                    .is_none_or(|(ix, _, _)| *ix != part.payload)
                {
                    if let Some(open) = current.take() {
                        finish_payload(staging, open)?;
                        done += 1;
                    }
                    let manifest = verifier
                        .manifest()
                        .expect("payload bytes follow a verified manifest");
                    let name = manifest.payloads[part.payload].name.as_str();
                    let path = staging.join(format!("{name}.part"));
                    let file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(io_err("create", &path))?;
                    current = Some((part.payload, file, path));
                }
                let (_, file, path) = current.as_mut().expect("opened above");
                file.write_all(&buf[part.range])
                    .map_err(io_err("write", path))?;
                if done == 0 {
                    failpoint::hit("install.mid_payload");
                }
            }
        }
        let bundle = verifier.finish()?;
        if let Some(open) = current.take() {
            finish_payload(staging, open)?;
        }
        // Payloads of size 0 never received a byte: create them now.
        for payload in &bundle.manifest.payloads {
            let path = staging.join(payload.name.as_str());
            if !path.exists() {
                File::create(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("create", &path))?;
            }
        }
        failpoint::hit("install.after_payloads");
        let manifest_path = staging.join(MANIFEST_FILE);
        let mut file = File::create(&manifest_path).map_err(io_err("create", &manifest_path))?;
        file.write_all(&bundle.signed_manifest)
            .map_err(io_err("write", &manifest_path))?;
        file.sync_all().map_err(io_err("fsync", &manifest_path))?;
        fsync_dir(staging).map_err(io_err("fsync", staging))?;
        let slot = Slot::of(&bundle);
        let target = self.dir.join("models").join(&slot.digest);
        failpoint::hit("install.before_dir_rename");
        if target.exists() {
            // Already installed (a re-install of the same bundle): keep the existing copy.
            fs::remove_dir_all(staging).map_err(io_err("remove", staging))?;
        } else {
            fs::rename(staging, &target).map_err(io_err("move into place", &target))?;
            failpoint::hit("install.after_dir_rename");
            fsync_dir(&self.dir.join("models")).map_err(io_err("fsync", &target))?;
        }
        Ok((bundle, slot))
    }

    /// Removes an installed model that no state refers to (a failed activation).
    pub fn remove_unreferenced(&self, slot: &Slot) -> io::Result<()> {
        if self.state.referenced().any(|s| s.digest == slot.digest) {
            return Ok(());
        }
        let dir = self.model_dir(slot);
        match fs::remove_dir_all(&dir) {
            Ok(()) => fsync_dir(&self.dir.join("models")),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }
}

fn finish_payload(
    staging: &Path,
    (_, file, part_path): (usize, File, PathBuf),
) -> Result<(), InstallError> {
    // An fsync error is fatal for this install; it is never retried as if it had worked.
    file.sync_all().map_err(io_err("fsync", &part_path))?;
    drop(file);
    failpoint::hit("install.after_payload_fsync");
    let name = part_path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".part"))
        .expect("named <payload>.part");
    let path = staging.join(name);
    fs::rename(&part_path, &path).map_err(io_err("rename", &path))
}

/// Reads the manifest stored with an installed model.
pub fn read_manifest(model_dir: &Path) -> anyhow::Result<Manifest> {
    use anyhow::Context;
    let path = model_dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let signed = Signed::decode("stored manifest", &bytes, MAX_MANIFEST_BYTES)?;
    Ok(codec::decode(
        "stored manifest",
        &signed.body,
        MAX_MANIFEST_BYTES,
    )?)
}

/// Checks an installed model directory: its manifest digest matches the slot and every payload
/// file has the manifest's size and SHA-256.
pub fn check_model_dir(dir: &Path, slot: &Slot) -> Result<(), String> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let signed = Signed::decode("stored manifest", &bytes, MAX_MANIFEST_BYTES)
        .map_err(|err| err.to_string())?;
    let digest = Sha256Digest::of(&signed.body).to_hex();
    if digest != slot.digest {
        return Err(format!(
            "stored manifest has digest {digest}, expected {}",
            slot.digest
        ));
    }
    let manifest: Manifest = codec::decode("stored manifest", &signed.body, MAX_MANIFEST_BYTES)
        .map_err(|err| err.to_string())?;
    for payload in &manifest.payloads {
        let path = dir.join(payload.name.as_str());
        let mut file =
            File::open(&path).map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        let mut hasher = Sha256Stream::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        if size != payload.size || hasher.finish() != payload.sha256 {
            return Err(format!(
                "{} does not match its manifest (size or sha256)",
                path.display()
            ));
        }
    }
    Ok(())
}
