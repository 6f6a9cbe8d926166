//! The simulator's state directory: every device's identity from enrollment (certificate, key,
//! MAC key, broker), reused by later runs, and a snapshot of what the devices run (floors,
//! models, and the sequence numbers reserved for their reports). Files are replaced atomically
//! (temp file, fsync, rename, directory fsync); the directory is locked while a simulator uses it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use edgefleet_protocol::codec;
use edgefleet_protocol::{AssignedModel, Floors};
use serde::{Deserialize, Serialize};

/// The largest device-record snapshot read back (about 1 KiB per device).
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// A state directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt ({message}); remove the state directory to start over with new devices"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "the state directory {path} is in use by another simulator; give each running simulator its own --state-dir"
    )]
    Locked { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a device got at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub device: String,
    pub certificate_pem: String,
    pub key_pem: String,
    pub mac_key_hex: String,
    /// The broker, `mqtts://host:port`, as the enrollment answer named it.
    pub mqtt_url: String,
    pub labels: BTreeMap<String, String>,
}

/// What a device runs and how far it got, as the last snapshot recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Sequence numbers below this may have been used: the next run starts here.
    pub seq_limit: u64,
    pub floors: Floors,
    pub active: Option<AssignedModel>,
    pub previous: Option<AssignedModel>,
    pub shadow: Option<AssignedModel>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub devices: BTreeMap<String, DeviceRecord>,
}

#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    /// Held (locked) while the simulator runs.
    _lock: File,
}

/// Writes `bytes` to `path` atomically with `mode`; the caller fsyncs the directory.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl StateDir {
    /// Opens (creating) the state directory and locks it.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(root.join("identities")).map_err(io(root))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: root.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(StateError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(Self {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    fn identity_path(&self, device: &str) -> PathBuf {
        self.root.join("identities").join(format!("{device}.json"))
    }

    /// The identity of `device` from an earlier enrollment, if there is one.
    pub fn load_identity(&self, device: &str) -> Result<Option<Identity>, StateError> {
        let path = self.identity_path(device);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let identity: Identity =
            serde_json::from_slice(&bytes).map_err(|err| StateError::Corrupt {
                path: path.clone(),
                message: err.to_string(),
            })?;
        if identity.device != device {
            return Err(StateError::Corrupt {
                path,
                message: format!("it holds device {}", identity.device),
            });
        }
        Ok(Some(identity))
    }

    /// Stores an identity (0600, it holds the device's keys). Call [`StateDir::sync`] after a
    /// batch.
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(identity).map_err(|err| StateError::Corrupt {
            path: self.identity_path(&identity.device),
            message: err.to_string(),
        })?;
        write_file(&self.identity_path(&identity.device), &bytes, 0o600)
    }

    /// Makes the identities saved so far durable.
    pub fn sync(&self) -> Result<(), StateError> {
        sync_dir(&self.root.join("identities"))
    }

    fn snapshot_path(&self) -> PathBuf {
        self.root.join("devices.cbor")
    }

    pub fn load_snapshot(&self) -> Result<Snapshot, StateError> {
        let path = self.snapshot_path();
        match fs::read(&path) {
            Ok(bytes) => {
                codec::decode("device records", &bytes, MAX_SNAPSHOT_BYTES).map_err(|err| {
                    StateError::Corrupt {
                        path,
                        message: err.to_string(),
                    }
                })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Replaces the snapshot atomically and durably.
    pub fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StateError> {
        let path = self.snapshot_path();
        write_file(&path, &codec::encode(snapshot), 0o600)?;
        sync_dir(&self.root)
    }
}

#[cfg(test)]
mod tests;
