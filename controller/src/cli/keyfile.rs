//! Secret key files: a small text format, written 0600, never printed.
//!
//! ```text
//! # EdgeFleet ed25519 secret key. Keep it offline and private.
//! role: release
//! key-id: 1f2e3d4c5b6a7988
//! public: <64 hex digits>
//! secret: <64 hex digits>
//! ```

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use edgefleet_protocol::SecretKey;

use crate::fsutil;

/// Generates a fresh key from the operating system's CSPRNG.
pub fn generate() -> Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|err| anyhow::anyhow!("the OS random source failed: {err}"))?;
    Ok(SecretKey::from_seed(seed))
}

pub fn encode(key: &SecretKey, role: &str) -> String {
    let mut out = String::from("# EdgeFleet ed25519 secret key. Keep it offline and private.\n");
    let _ = writeln!(out, "role: {role}");
    let _ = writeln!(out, "key-id: {}", key.key_id());
    let _ = writeln!(out, "public: {}", hex::encode(key.public().0));
    let _ = writeln!(out, "secret: {}", hex::encode(key.seed()));
    out
}

/// Writes a new key file (0600), refusing to overwrite.
pub fn write(path: &Path, key: &SecretKey, role: &str) -> Result<()> {
    fsutil::write_new(path, encode(key, role).as_bytes(), fsutil::SECRET_MODE)
}

/// Parsed key file: the key and its role label.
#[derive(Debug)]
pub struct KeyFile {
    pub key: SecretKey,
    pub role: String,
}

pub fn read(path: &Path) -> Result<KeyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a valid EdgeFleet key file", path.display()))
}

pub fn parse(text: &str) -> Result<KeyFile> {
    let (mut role, mut public, mut secret) = (None, None, None);
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let Some((field, value)) = line.split_once(':') else {
            bail!("line {line:?} is not `field: value`");
        };
        let value = value.trim();
        match field.trim() {
            "role" => role = Some(value.to_owned()),
            "key-id" => {}
            "public" => public = Some(hex32(value).context("field `public`")?),
            "secret" => secret = Some(hex32(value).context("field `secret`")?),
            other => bail!("unknown field `{other}`"),
        }
    }
    let secret = secret.context("field `secret` is missing")?;
    let key = SecretKey::from_seed(secret);
    if let Some(public) = public
        && public != key.public().0
    {
        bail!("field `public` does not belong to the secret key; the file is corrupted");
    }
    Ok(KeyFile {
        key,
        role: role.unwrap_or_default(),
    })
}

fn hex32(value: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).map_err(|_| anyhow::anyhow!("expected 64 hex digits"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_detect_corruption() {
        let key = SecretKey::from_seed([7; 32]);
        let text = encode(&key, "release");
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.key.public(), key.public());
        assert_eq!(parsed.role, "release");
        let corrupted = text.replace(&hex::encode(key.public().0), &hex::encode([1u8; 32]));
        assert!(
            parse(&corrupted)
                .unwrap_err()
                .to_string()
                .contains("does not belong")
        );
        assert!(parse("secret: zz").is_err());
    }

    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write(&path, &generate().unwrap(), "root").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            write(&path, &generate().unwrap(), "root").is_err(),
            "never overwrites a key"
        );
    }
}
