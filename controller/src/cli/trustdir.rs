//! The key directory an operator keeps offline, by convention:
//!
//! | file | what |
//! |---|---|
//! | `root-v1.cbor` | the first root keyring: the trust anchor devices and controllers ship with |
//! | `root-vN.cbor` | each later root, signed by the old and the new root thresholds |
//! | `root.cbor` | a copy of the newest root |
//! | `root-vN-I.key` | secret key I of root version N (hand each to its holder) |
//! | `keyring.cbor` | the release keyring: release and controller public keys, signed by root |
//! | `release-NAME.key`, `controller.key` | secret release and controller keys |

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use edgefleet_protocol::trust::{ReleaseKeyring, RootKeyring, Signed, Verified};
use edgefleet_protocol::{Timestamp, codec};

use crate::fsutil;

pub fn root_version_path(dir: &Path, version: u32) -> PathBuf {
    dir.join(format!("root-v{version}.cbor"))
}

pub fn root_key_path(dir: &Path, version: u32, index: usize) -> PathBuf {
    dir.join(format!("root-v{version}-{index}.key"))
}

pub fn keyring_path(dir: &Path) -> PathBuf {
    dir.join("keyring.cbor")
}

pub fn controller_key_path(dir: &Path) -> PathBuf {
    dir.join("controller.key")
}

/// The verified newest root: `root-v1.cbor` as the anchor, then each `root-vN.cbor` in turn.
pub fn load_root(dir: &Path) -> Result<(Verified<RootKeyring>, Vec<Vec<u8>>)> {
    let anchor_path = root_version_path(dir, 1);
    if !anchor_path.exists() {
        bail!(
            "{} not found; create a root with `edgefleet keys init-root --dir {}`",
            anchor_path.display(),
            dir.display()
        );
    }
    let anchor = fsutil::read(&anchor_path)?;
    let mut root = RootKeyring::verify_anchor(&anchor)
        .with_context(|| format!("{} is not a valid root keyring", anchor_path.display()))?;
    let mut chain = Vec::new();
    loop {
        let next = root_version_path(dir, root.version + 1);
        if !next.exists() {
            break;
        }
        let bytes = fsutil::read(&next)?;
        root = RootKeyring::verify_rotation(&root, &bytes).with_context(|| {
            format!(
                "{} does not follow from version {}",
                next.display(),
                root.version
            )
        })?;
        chain.push(bytes);
    }
    Ok((root, chain))
}

/// Loads an explicitly named trust anchor and rotation chain.
pub fn load_root_files(anchor: &Path, chain: &[PathBuf]) -> Result<Verified<RootKeyring>> {
    let root = RootKeyring::verify_anchor(&fsutil::read(anchor)?)
        .with_context(|| format!("{} is not a valid root keyring", anchor.display()))?;
    let chain = chain
        .iter()
        .map(|p| fsutil::read(p))
        .collect::<Result<Vec<_>>>()?;
    RootKeyring::verify_chain(root, &chain).context("the root rotation chain does not verify")
}

/// The keyring document as stored, decoded without policy checks (for re-issuing it).
pub fn read_keyring_unchecked(path: &Path) -> Result<Option<ReleaseKeyring>> {
    if !path.exists() {
        return Ok(None);
    }
    let signed = Signed::decode(
        "release keyring",
        &fsutil::read(path)?,
        edgefleet_protocol::trust::MAX_KEYRING_BYTES,
    )?;
    let keyring = codec::decode(
        "release keyring body",
        &signed.body,
        edgefleet_protocol::trust::MAX_KEYRING_BYTES,
    )
    .with_context(|| format!("{} is not a release keyring", path.display()))?;
    Ok(Some(keyring))
}

pub fn load_keyring(
    path: &Path,
    root: &Verified<RootKeyring>,
    now: Timestamp,
) -> Result<Verified<ReleaseKeyring>> {
    ReleaseKeyring::verify(&fsutil::read(path)?, root, now, 0)
        .with_context(|| format!("{} does not verify against the root", path.display()))
}

/// Root key files of `version` present in `dir`, in index order.
pub fn root_key_files(dir: &Path, version: u32) -> Vec<PathBuf> {
    (1..=255)
        .map(|i| root_key_path(dir, version, i))
        .take_while(|p| p.exists())
        .collect()
}
