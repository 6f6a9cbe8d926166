//! `edgefleet keys`: create the root of trust, add release keys, rotate the root, sign documents.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use edgefleet_protocol::crypto::{Domain, SecretKey};
use edgefleet_protocol::trust::{
    MAX_KEYRING_BYTES, ReleaseKeyring, Role, RoleName, RootKeyring, Signed,
};
use edgefleet_protocol::{Clock, SystemClock, Timestamp, codec};

use super::keyfile;
use super::trustdir::{self, controller_key_path, keyring_path, root_key_path, root_version_path};
use crate::fsutil;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a k-of-n root of trust: N root keys and the self-signed root keyring (version 1).
    InitRoot(InitRoot),
    /// Generate a release-signing key and issue a new release keyring that includes it.
    AddReleaseKey(AddReleaseKey),
    /// Replace the root keys: a new root version signed by thresholds of the old and new roots.
    RotateRoot(RotateRoot),
    /// Add a signature to a root or release keyring (one key holder at a time).
    Sign(SignDoc),
    /// Show a root or release keyring: version, expiry, keys, thresholds, signatures.
    Show(ShowDoc),
}

#[derive(Debug, Args)]
pub struct InitRoot {
    /// Directory for the root keyring and the root key files (created if missing).
    #[arg(long, default_value = "keys")]
    dir: PathBuf,
    /// Number of root keys (n).
    #[arg(long, default_value_t = 3)]
    keys: u8,
    /// Signatures required (k).
    #[arg(long, default_value_t = 2)]
    threshold: u8,
}

#[derive(Debug, Args)]
pub struct AddReleaseKey {
    #[arg(long, default_value = "keys")]
    dir: PathBuf,
    /// Name for the key file (`release-NAME.key`); defaults to the key id. Repeat to add
    /// several keys at once (e.g. a 2-of-3 release role).
    #[arg(long = "name")]
    names: Vec<String>,
    /// Release signatures a manifest needs; defaults to the current keyring's (1 for a new one).
    #[arg(long)]
    threshold: Option<u8>,
    /// Root key files to sign the new keyring with; defaults to every current root key in --dir.
    #[arg(long = "root-key")]
    root_keys: Vec<PathBuf>,
    /// Days until the keyring expires and must be re-issued.
    #[arg(long, default_value_t = 365)]
    expires_days: u64,
}

#[derive(Debug, Args)]
pub struct RotateRoot {
    #[arg(long, default_value = "keys")]
    dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    keys: u8,
    #[arg(long, default_value_t = 2)]
    threshold: u8,
    /// Current root key files that sign the rotation; defaults to every current root key in --dir.
    #[arg(long = "old-key")]
    old_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 365)]
    expires_days: u64,
}

#[derive(Debug, Args)]
pub struct SignDoc {
    /// The root or release keyring file to sign (rewritten in place, atomically).
    file: PathBuf,
    /// Secret key file of the signer.
    #[arg(long)]
    key: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShowDoc {
    file: PathBuf,
}

pub fn run(command: KeysCommand) -> Result<()> {
    let now = SystemClock.now();
    match command {
        KeysCommand::InitRoot(args) => init_root(&args, now),
        KeysCommand::AddReleaseKey(args) => add_release_key(&args, now),
        KeysCommand::RotateRoot(args) => rotate_root(&args, now),
        KeysCommand::Sign(args) => sign_doc(&args),
        KeysCommand::Show(args) => show_doc(&args),
    }
}

fn check_k_of_n(keys: u8, threshold: u8) -> Result<()> {
    if keys == 0 || threshold == 0 || threshold > keys {
        bail!("--threshold {threshold} with --keys {keys}: need 1 ≤ threshold ≤ keys");
    }
    Ok(())
}

/// Generates `n` root keys for `version` and writes their files.
fn new_root_keys(dir: &Path, version: u32, n: u8) -> Result<Vec<SecretKey>> {
    (1..=usize::from(n))
        .map(|i| {
            let key = keyfile::generate()?;
            keyfile::write(&root_key_path(dir, version, i), &key, "root")?;
            Ok(key)
        })
        .collect()
}

fn init_root(args: &InitRoot, now: Timestamp) -> Result<()> {
    check_k_of_n(args.keys, args.threshold)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let anchor = root_version_path(&args.dir, 1);
    if anchor.exists() {
        bail!(
            "{} already exists; use `edgefleet keys rotate-root` to replace root keys",
            anchor.display()
        );
    }
    let keys = new_root_keys(&args.dir, 1, args.keys)?;
    let root = RootKeyring {
        version: 1,
        created_at: now,
        root: Role {
            keys: keys.iter().map(SecretKey::public).collect(),
            threshold: args.threshold,
        },
    };
    let mut signed = Signed::unsigned(&root);
    keys.iter()
        .for_each(|key| signed.sign(Domain::RootKeyring, key));
    let bytes = signed.encode();
    RootKeyring::verify_anchor(&bytes).context("the new root does not verify")?;
    fsutil::write_atomic(&anchor, &bytes, fsutil::PUBLIC_MODE)?;
    fsutil::write_atomic(&args.dir.join("root.cbor"), &bytes, fsutil::PUBLIC_MODE)?;
    println!(
        "created root keyring v1 ({}-of-{}) in {}",
        args.threshold,
        args.keys,
        anchor.display()
    );
    for (i, key) in keys.iter().enumerate() {
        println!(
            "  root key {}: {}  ({})",
            i + 1,
            key.key_id(),
            root_key_path(&args.dir, 1, i + 1).display()
        );
    }
    println!(
        "hand each root key file to its holder and keep them offline; ship {} to devices",
        anchor.display()
    );
    Ok(())
}

/// Reads the given key files, or the current root keys found in `dir`.
fn signing_keys(dir: &Path, version: u32, given: &[PathBuf]) -> Result<Vec<SecretKey>> {
    let files = if given.is_empty() {
        trustdir::root_key_files(dir, version)
    } else {
        given.to_vec()
    };
    files
        .iter()
        .map(|path| keyfile::read(path).map(|file| file.key))
        .collect()
}

/// Signs a keyring body with `keys` (only those in the root role count), writes it, and reports
/// how many more root signatures it needs.
fn issue_keyring(
    dir: &Path,
    keyring: &ReleaseKeyring,
    root_role: &Role,
    keys: &[SecretKey],
) -> Result<()> {
    let mut signed = Signed::unsigned(keyring);
    for key in keys.iter().filter(|key| root_role.contains(&key.public())) {
        signed.sign(Domain::ReleaseKeyring, key);
    }
    let path = keyring_path(dir);
    fsutil::write_atomic(&path, &signed.encode(), fsutil::PUBLIC_MODE)?;
    let have = signed.signatures.len();
    let need = usize::from(root_role.threshold);
    println!(
        "issued release keyring v{} ({} release key(s), threshold {}) in {}",
        keyring.version,
        keyring.release.keys.len(),
        keyring.release.threshold,
        path.display()
    );
    if have < need {
        println!(
            "it has {have} of the {need} root signatures it needs: each further root key holder runs `edgefleet keys sign {} --key ROOT.key`",
            path.display()
        );
    }
    Ok(())
}

fn add_release_key(args: &AddReleaseKey, now: Timestamp) -> Result<()> {
    let (root, _) = trustdir::load_root(&args.dir)?;
    let signers = signing_keys(&args.dir, root.version, &args.root_keys)?;
    let existing = trustdir::read_keyring_unchecked(&keyring_path(&args.dir))?;
    // Everything is generated and checked first; files are written only once it all holds.
    let mut new_keys = Vec::new();
    for name in if args.names.is_empty() {
        vec![None]
    } else {
        args.names.iter().map(Some).collect()
    } {
        let key = keyfile::generate()?;
        let name = name.cloned().unwrap_or_else(|| key.key_id().to_string());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("--name {name:?} must be letters, digits, '-', '_' or '.'");
        }
        let path = args.dir.join(format!("release-{name}.key"));
        if path.exists() {
            bail!("{} already exists; choose another --name", path.display());
        }
        new_keys.push((key, path));
    }
    let controller_path = controller_key_path(&args.dir);
    let (mut release_keys, controller, version, old_threshold, new_controller) = match existing {
        Some(keyring) => (
            keyring.release.keys,
            keyring.controller,
            keyring.version + 1,
            keyring.release.threshold,
            None,
        ),
        None => {
            let controller = if controller_path.exists() {
                keyfile::read(&controller_path)?.key
            } else {
                keyfile::generate()?
            };
            let role = Role {
                keys: vec![controller.public()],
                threshold: 1,
            };
            let fresh = (!controller_path.exists()).then_some(controller);
            (Vec::new(), role, 1, 1, fresh)
        }
    };
    release_keys.extend(new_keys.iter().map(|(key, _)| key.public()));
    let threshold = args.threshold.unwrap_or(old_threshold);
    let release = Role {
        keys: release_keys,
        threshold,
    };
    release
        .validate(RoleName::Release)
        .context("the new release role is invalid")?;
    if let Some(controller) = &new_controller {
        keyfile::write(&controller_path, controller, "controller")?;
        println!(
            "created controller key {} ({})",
            controller.key_id(),
            controller_path.display()
        );
    }
    for (key, path) in &new_keys {
        keyfile::write(path, key, "release")?;
        println!("created release key {} ({})", key.key_id(), path.display());
    }
    let keyring = ReleaseKeyring {
        version,
        created_at: now,
        expires: now.plus_secs(args.expires_days.saturating_mul(86_400)),
        release,
        controller,
    };
    issue_keyring(&args.dir, &keyring, &root.root, &signers)
}

fn rotate_root(args: &RotateRoot, now: Timestamp) -> Result<()> {
    check_k_of_n(args.keys, args.threshold)?;
    let (current, _) = trustdir::load_root(&args.dir)?;
    let old_signers = signing_keys(&args.dir, current.version, &args.old_keys)?;
    let version = current.version + 1;
    let new_keys = new_root_keys(&args.dir, version, args.keys)?;
    let next = RootKeyring {
        version,
        created_at: now,
        root: Role {
            keys: new_keys.iter().map(SecretKey::public).collect(),
            threshold: args.threshold,
        },
    };
    let mut signed = Signed::unsigned(&next);
    for key in old_signers
        .iter()
        .filter(|key| current.root.contains(&key.public()))
    {
        signed.sign(Domain::RootKeyring, key);
    }
    new_keys
        .iter()
        .for_each(|key| signed.sign(Domain::RootKeyring, key));
    let bytes = signed.encode();
    RootKeyring::verify_rotation(&current, &bytes)
        .context("the rotation does not verify; pass enough current root keys with --old-key")?;
    fsutil::write_atomic(
        &root_version_path(&args.dir, version),
        &bytes,
        fsutil::PUBLIC_MODE,
    )?;
    fsutil::write_atomic(&args.dir.join("root.cbor"), &bytes, fsutil::PUBLIC_MODE)?;
    println!(
        "rotated root to v{version} ({}-of-{}); devices follow root-v1 → … → root-v{version}",
        args.threshold, args.keys
    );
    // The release keyring must now carry the new root's signatures.
    if let Some(keyring) = trustdir::read_keyring_unchecked(&keyring_path(&args.dir))? {
        let reissued = ReleaseKeyring {
            version: keyring.version + 1,
            created_at: now,
            expires: now.plus_secs(args.expires_days.saturating_mul(86_400)),
            ..keyring
        };
        issue_keyring(&args.dir, &reissued, &next.root, &new_keys)?;
    }
    Ok(())
}

/// Which trust document a signed file holds, by trying to decode its body.
enum DocKind {
    Root(RootKeyring),
    Keyring(ReleaseKeyring),
}

fn read_doc(path: &Path) -> Result<(Signed, DocKind)> {
    let signed = Signed::decode("signed document", &fsutil::read(path)?, MAX_KEYRING_BYTES)
        .with_context(|| format!("{} is not a signed EdgeFleet document", path.display()))?;
    if let Ok(root) = codec::decode::<RootKeyring>("root keyring", &signed.body, MAX_KEYRING_BYTES)
    {
        return Ok((signed, DocKind::Root(root)));
    }
    match codec::decode::<ReleaseKeyring>("release keyring", &signed.body, MAX_KEYRING_BYTES) {
        Ok(keyring) => Ok((signed, DocKind::Keyring(keyring))),
        Err(err) => Err(err).with_context(|| {
            format!("{} is neither a root nor a release keyring (for bundles use `edgefleet bundle sign`)", path.display())
        }),
    }
}

fn sign_doc(args: &SignDoc) -> Result<()> {
    let (mut signed, kind) = read_doc(&args.file)?;
    let key = keyfile::read(&args.key)?.key;
    let domain = match kind {
        DocKind::Root(_) => Domain::RootKeyring,
        DocKind::Keyring(_) => Domain::ReleaseKeyring,
    };
    if signed.signatures.iter().any(|s| s.key_id == key.key_id()) {
        println!(
            "{} is already signed by key {}",
            args.file.display(),
            key.key_id()
        );
        return Ok(());
    }
    signed.sign(domain, &key);
    fsutil::write_atomic(&args.file, &signed.encode(), fsutil::PUBLIC_MODE)?;
    println!(
        "signed {} with key {} ({} signature(s) now)",
        args.file.display(),
        key.key_id(),
        signed.signatures.len()
    );
    Ok(())
}

fn role_line(name: &str, role: &Role) -> String {
    let ids: Vec<String> = role.keys.iter().map(|k| k.key_id().to_string()).collect();
    format!(
        "{name:<11} {}-of-{}: {}",
        role.threshold,
        role.keys.len(),
        ids.join(", ")
    )
}

fn show_doc(args: &ShowDoc) -> Result<()> {
    let (signed, kind) = read_doc(&args.file)?;
    match kind {
        DocKind::Root(root) => {
            println!(
                "root keyring v{} (created {})",
                root.version, root.created_at
            );
            println!("{}", role_line("root", &root.root));
        }
        DocKind::Keyring(keyring) => {
            println!(
                "release keyring v{} (created {}, expires {})",
                keyring.version, keyring.created_at, keyring.expires
            );
            println!("{}", role_line("release", &keyring.release));
            println!("{}", role_line("controller", &keyring.controller));
        }
    }
    let ids: Vec<String> = signed
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    println!("{:<11} {}", "signed by", ids.join(", "));
    Ok(())
}
