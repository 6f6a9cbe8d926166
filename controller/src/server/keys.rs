//! The keys the controller holds: the verified root (anchor + rotation chain), the release
//! keyring, the controller key that signs assignments, and any release keys an operator chose to
//! keep online. The layout is the one `edgefleet keys` writes (see `cli::trustdir`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefleet_protocol::crypto::{Domain, SecretKey};
use edgefleet_protocol::trust::{ReleaseKeyring, RootKeyring, Signed, Verified};
use edgefleet_protocol::{Clock, SystemClock};

use crate::cli::{self, keyfile, trustdir};

#[derive(Debug)]
pub struct ControllerKeys {
    pub dir: PathBuf,
    pub root: Verified<RootKeyring>,
    /// Later root versions after `root-v1.cbor`, in order.
    pub root_chain: Vec<Vec<u8>>,
    pub keyring_bytes: Vec<u8>,
    pub keyring: Verified<ReleaseKeyring>,
    controller: SecretKey,
    /// Release keys held online, with their file names (keys outside the keyring are ignored).
    release: Vec<(String, SecretKey)>,
}

impl ControllerKeys {
    /// Loads the trust directory. When `create` is set and `dir` has no root yet, sets up a
    /// single-machine trust root there (1-of-1 root, one online release key): convenient, and
    /// only as strong as this machine. Production keeps the root offline (`edgefleet keys`).
    pub fn open(dir: &Path, create: bool) -> Result<Self> {
        if !trustdir::root_version_path(dir, 1).exists() {
            if !create {
                bail!(
                    "{} has no root keyring (root-v1.cbor); create one offline with `edgefleet keys init-root --dir {}` and `edgefleet keys add-release-key`",
                    dir.display(),
                    dir.display()
                );
            }
            crate::fsutil::create_private_dir(dir)?;
            let dir_arg = dir.display().to_string();
            for args in [
                vec![
                    "edgefleet",
                    "keys",
                    "init-root",
                    "--dir",
                    &dir_arg,
                    "--keys",
                    "1",
                    "--threshold",
                    "1",
                ],
                vec![
                    "edgefleet",
                    "keys",
                    "add-release-key",
                    "--dir",
                    &dir_arg,
                    "--name",
                    "online",
                ],
            ] {
                cli::run(cli::Cli::try_parse_from(args)?)?;
            }
            tracing::warn!(
                dir = %dir.display(),
                "created a single-machine trust root with its root and release keys online; \
                 for production create the root offline with `edgefleet keys init-root` and pass --keys-dir"
            );
        }
        let now = SystemClock.now();
        let (root, root_chain) = trustdir::load_root(dir)?;
        let keyring_path = trustdir::keyring_path(dir);
        let keyring_bytes = crate::fsutil::read(&keyring_path)?;
        let keyring = trustdir::load_keyring(&keyring_path, &root, now)?;
        let controller_path = trustdir::controller_key_path(dir);
        let controller = keyfile::read(&controller_path)
            .with_context(|| {
                format!(
                    "the controller signs assignments with {}",
                    controller_path.display()
                )
            })?
            .key;
        if !keyring.controller.contains(&controller.public()) {
            bail!(
                "{} is not a controller key of the release keyring {}; re-issue the keyring with `edgefleet keys add-release-key`",
                controller_path.display(),
                keyring_path.display()
            );
        }
        let mut release = Vec::new();
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(stem) = name
                .strip_prefix("release-")
                .and_then(|n| n.strip_suffix(".key"))
            {
                let key = keyfile::read(&path)?.key;
                if keyring.release.contains(&key.public()) {
                    release.push((stem.to_owned(), key));
                } else {
                    tracing::warn!(file = %path.display(), "release key is not in the keyring; ignored");
                }
            }
        }
        release.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            dir: dir.to_owned(),
            root,
            root_chain,
            keyring_bytes,
            keyring,
            controller,
            release,
        })
    }

    pub fn controller_key(&self) -> &SecretKey {
        &self.controller
    }

    /// How many release signatures a manifest needs.
    pub fn release_threshold(&self) -> usize {
        usize::from(self.keyring.release.threshold)
    }

    /// Names of the release keys held online.
    pub fn online_release_keys(&self) -> Vec<String> {
        self.release.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Signs a manifest with every release key held online (at most the threshold).
    pub fn sign_manifest(&self, signed: &mut Signed) {
        for (_, key) in self.release.iter().take(self.release_threshold()) {
            signed.sign(Domain::Manifest, key);
        }
    }

    pub fn root_anchor_path(&self) -> PathBuf {
        trustdir::root_version_path(&self.dir, 1)
    }

    pub fn keyring_path(&self) -> PathBuf {
        trustdir::keyring_path(&self.dir)
    }
}
