//! The device's trust state on disk: the configured root anchor (plus rotations) and release
//! keyring, verified at start, and the floors, persisted atomically before any install.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use edgefleet_protocol::Timestamp;
use edgefleet_protocol::assignment::{DeviceTrust, Floors};
use edgefleet_protocol::codec::{self, MAX_MESSAGE_BYTES};
use edgefleet_protocol::trust::{ReleaseKeyring, RootKeyring};

use crate::config::AgentConfig;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Loads the trust anchor, rotation chain and keyring named in the config, and the floors.
pub fn load(config: &AgentConfig, now: Timestamp) -> Result<DeviceTrust> {
    let read =
        |path: &Path| fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let anchor = RootKeyring::verify_anchor(&read(&config.trust_root)?).with_context(|| {
        format!(
            "trust root {} is not a valid root keyring",
            config.trust_root.display()
        )
    })?;
    let chain = config
        .root_chain
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>>>()?;
    let root = RootKeyring::verify_chain(anchor, &chain)
        .context("the configured root chain does not verify")?;
    let floors = read_floors(&config.floors_path())?;
    let keyring = ReleaseKeyring::verify(
        &read(&config.keyring)?,
        &root,
        floors.effective_now(now),
        floors.keyring_version,
    )
    .with_context(|| {
        format!(
            "keyring {} does not verify against the trust root",
            config.keyring.display()
        )
    })?;
    Ok(DeviceTrust {
        device: config.device_id.clone(),
        arch: config.arch.clone(),
        agent_version: String::from(AGENT_VERSION),
        root,
        keyring,
        floors,
    })
}

fn read_floors(path: &Path) -> Result<Floors> {
    match fs::read(path) {
        Ok(bytes) => codec::decode("floors", &bytes, MAX_MESSAGE_BYTES)
            .with_context(|| format!("{} is corrupt; restore it from a backup (deleting it lowers the rollback protection)", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Floors::default()),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Persists the floors atomically (temp file, fsync, rename, directory fsync).
pub fn save_floors(path: &Path, floors: &Floors) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(&codec::encode(floors))?;
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
