//! The trust chain (a TUF/Uptane subset): root keyring (k-of-n, rotated by thresholds of the old
//! and the new root) → release keyring (release and controller keys, signed by the root) →
//! manifests (signed by release keys) and assignments (signed by the controller).
//!
//! Signatures are checked over the exact received bytes, before those bytes are parsed, and only
//! a successful check produces a [`Verified`] value.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError, MAX_MESSAGE_BYTES, byte_vec};
use crate::crypto::{Domain, KeyError, KeyId, PublicKey, SecretKey, SignatureBytes};
use crate::time::Timestamp;

/// The most root rotations a device follows in one update; more means something is wrong.
pub const MAX_ROOT_ROTATIONS: usize = 32;
/// The largest keyring document accepted.
pub const MAX_KEYRING_BYTES: usize = MAX_MESSAGE_BYTES;

/// A value whose signatures and policy checks passed. It cannot be built or deserialized outside
/// this crate, so install code that takes `Verified<Manifest>` cannot be handed unchecked data.
#[derive(Clone, PartialEq)]
pub struct Verified<T> {
    value: T,
    /// The exact signed bytes `value` was decoded from.
    body: Vec<u8>,
}

impl<T> Verified<T> {
    pub(crate) fn new(value: T, body: Vec<u8>) -> Self {
        Self { value, body }
    }

    /// The exact bytes the signatures covered.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.body
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Verified<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Verified").field(&self.value).finish()
    }
}

/// Which role a key set plays; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleName {
    Root,
    NewRoot,
    Release,
    Controller,
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleName::Root => "root",
            RoleName::NewRoot => "new root",
            RoleName::Release => "release",
            RoleName::Controller => "controller",
        })
    }
}

/// A set of keys and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keys: Vec<PublicKey>,
    pub threshold: u8,
}

impl Role {
    /// Refuses a threshold of 0 or above the key count, duplicate keys, and weak or non-canonical
    /// keys.
    pub fn validate(&self, role: RoleName) -> Result<(), TrustError> {
        let n_keys = self.keys.len();
        if self.threshold == 0 || usize::from(self.threshold) > n_keys {
            return Err(TrustError::BadThreshold {
                role,
                threshold: self.threshold,
                n_keys,
            });
        }
        let mut seen = BTreeSet::new();
        for key in &self.keys {
            key.verifying_key()
                .map_err(|source| TrustError::BadKey { role, source })?;
            if !seen.insert(key.0) {
                return Err(TrustError::DuplicateKey {
                    role,
                    key_id: key.key_id(),
                });
            }
        }
        Ok(())
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    /// Checks that at least `threshold` distinct keys of this role signed `body`. A signature from
    /// a listed key that does not verify is always an error; a key counts once however often it
    /// signed; signatures from unlisted keys are ignored unless the threshold is not met.
    pub fn check(
        &self,
        role: RoleName,
        domain: Domain,
        body: &[u8],
        signatures: &[KeySignature],
    ) -> Result<(), TrustError> {
        let mut counted: BTreeSet<[u8; 32]> = BTreeSet::new();
        let mut repeated = 0usize;
        let mut unknown = None;
        for entry in signatures {
            let Some(key) = self.keys.iter().find(|key| key.key_id() == entry.key_id) else {
                unknown.get_or_insert(entry.key_id);
                continue;
            };
            if !key.verify(domain, body, &entry.signature) {
                return Err(TrustError::BadSignature {
                    role,
                    key_id: entry.key_id,
                });
            }
            if !counted.insert(key.0) {
                repeated += 1;
            }
        }
        let valid = counted.len();
        let threshold = usize::from(self.threshold);
        if valid >= threshold {
            return Ok(());
        }
        if valid == 0
            && let Some(key_id) = unknown
        {
            return Err(TrustError::UnknownKey { role, key_id });
        }
        Err(TrustError::ThresholdNotMet {
            role,
            valid,
            threshold,
            repeated,
        })
    }
}

/// One signature inside a [`Signed`] document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct KeySignature {
    pub key_id: KeyId,
    pub signature: SignatureBytes,
}

/// A signed document on the wire: the CBOR body as opaque bytes, and signatures over them.
/// Holders of a k-of-n role sign the same body separately; their signatures merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Signed {
    #[serde(with = "byte_vec")]
    pub body: Vec<u8>,
    pub signatures: Vec<KeySignature>,
}

impl Signed {
    /// An unsigned document around `value`'s CBOR encoding.
    pub fn unsigned<T: Serialize>(value: &T) -> Self {
        Self {
            body: codec::encode(value),
            signatures: Vec::new(),
        }
    }

    /// Adds `key`'s signature unless that key signed already.
    pub fn sign(&mut self, domain: Domain, key: &SecretKey) {
        let signature = key.sign(domain, &self.body);
        self.add_signature(KeySignature {
            key_id: key.key_id(),
            signature,
        });
    }

    /// Merges a signature produced elsewhere (a detached signature from another key holder).
    /// Returns false if that key id had signed already.
    pub fn add_signature(&mut self, signature: KeySignature) -> bool {
        if self.signatures.iter().any(|s| s.key_id == signature.key_id) {
            return false;
        }
        self.signatures.push(signature);
        true
    }

    pub fn decode(what: &'static str, bytes: &[u8], max: usize) -> Result<Self, TrustError> {
        Ok(codec::decode::<Signed>(what, bytes, max)?)
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
}

/// The root of trust: the offline root keys. Devices ship with one and follow rotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct RootKeyring {
    /// Starts at 1; each rotation adds exactly 1.
    pub version: u32,
    pub created_at: Timestamp,
    pub root: Role,
}

impl RootKeyring {
    /// Verifies a root keyring taken as the trust anchor (shipped with the device or the
    /// controller): it must be intact, i.e. signed by its own threshold.
    pub fn verify_anchor(bytes: &[u8]) -> Result<Verified<RootKeyring>, TrustError> {
        let signed = Signed::decode("root keyring", bytes, MAX_KEYRING_BYTES)?;
        let root = Self::decode_body(&signed.body)?;
        root.root.validate(RoleName::Root)?;
        root.root.check(
            RoleName::Root,
            Domain::RootKeyring,
            &signed.body,
            &signed.signatures,
        )?;
        Ok(Verified::new(root, signed.body))
    }

    /// Follows one rotation: `next` must be version `current + 1` and signed by the thresholds of
    /// both the current and the new root.
    pub fn verify_rotation(
        current: &Verified<RootKeyring>,
        next: &[u8],
    ) -> Result<Verified<RootKeyring>, TrustError> {
        let signed = Signed::decode("root keyring", next, MAX_KEYRING_BYTES)?;
        // Old root first: its signatures are checked before the new body is parsed.
        current.root.check(
            RoleName::Root,
            Domain::RootKeyring,
            &signed.body,
            &signed.signatures,
        )?;
        let root = Self::decode_body(&signed.body)?;
        let expected = current
            .version
            .checked_add(1)
            .ok_or(TrustError::RootVersion {
                have: current.version,
                got: root.version,
            })?;
        if root.version != expected {
            return Err(TrustError::RootVersion {
                have: current.version,
                got: root.version,
            });
        }
        root.root.validate(RoleName::NewRoot)?;
        root.root.check(
            RoleName::NewRoot,
            Domain::RootKeyring,
            &signed.body,
            &signed.signatures,
        )?;
        Ok(Verified::new(root, signed.body))
    }

    /// Follows a chain of rotations in order and returns the newest root.
    pub fn verify_chain(
        current: Verified<RootKeyring>,
        chain: &[Vec<u8>],
    ) -> Result<Verified<RootKeyring>, TrustError> {
        if chain.len() > MAX_ROOT_ROTATIONS {
            return Err(TrustError::TooManyRotations {
                got: chain.len(),
                max: MAX_ROOT_ROTATIONS,
            });
        }
        chain
            .iter()
            .try_fold(current, |root, next| Self::verify_rotation(&root, next))
    }

    fn decode_body(body: &[u8]) -> Result<RootKeyring, TrustError> {
        Ok(codec::decode("root keyring body", body, MAX_KEYRING_BYTES)?)
    }
}

/// The online keys, signed by the root: who may sign model releases, and which controller keys
/// may sign device assignments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ReleaseKeyring {
    /// Increases with each change; a device never accepts a lower one.
    pub version: u32,
    pub created_at: Timestamp,
    /// After this the keyring is refused; the root holders must re-sign it.
    pub expires: Timestamp,
    pub release: Role,
    pub controller: Role,
}

impl ReleaseKeyring {
    /// Verifies a release keyring against the root: root threshold, then validity, expiry and the
    /// version floor (`min_version`, the highest version this device has accepted).
    pub fn verify(
        bytes: &[u8],
        root: &Verified<RootKeyring>,
        now: Timestamp,
        min_version: u32,
    ) -> Result<Verified<ReleaseKeyring>, TrustError> {
        let signed = Signed::decode("release keyring", bytes, MAX_KEYRING_BYTES)?;
        root.root.check(
            RoleName::Root,
            Domain::ReleaseKeyring,
            &signed.body,
            &signed.signatures,
        )?;
        let keyring: ReleaseKeyring =
            codec::decode("release keyring body", &signed.body, MAX_KEYRING_BYTES)?;
        keyring.release.validate(RoleName::Release)?;
        keyring.controller.validate(RoleName::Controller)?;
        if keyring.version < min_version {
            return Err(TrustError::KeyringRollback {
                have: min_version,
                got: keyring.version,
            });
        }
        if now >= keyring.expires {
            return Err(TrustError::Expired {
                what: "release keyring",
                expired: keyring.expires,
                now,
            });
        }
        Ok(Verified::new(keyring, signed.body))
    }
}

/// Why a signed document was refused. Nothing signed-but-refused is ever installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(
        "{role} role has threshold {threshold} with {n_keys} keys; the threshold must be between 1 and the key count"
    )]
    BadThreshold {
        role: RoleName,
        threshold: u8,
        n_keys: usize,
    },
    #[error("{role} role lists key {key_id} twice; each key may appear once")]
    DuplicateKey { role: RoleName, key_id: KeyId },
    #[error("{role} role: {source}")]
    BadKey { role: RoleName, source: KeyError },
    #[error(
        "signature by key {key_id} does not verify for the {role} role; the document was altered or signed over other bytes"
    )]
    BadSignature { role: RoleName, key_id: KeyId },
    #[error(
        "signed by key {key_id}, which is not a {role} key; sign with a key listed in the {role} role"
    )]
    UnknownKey { role: RoleName, key_id: KeyId },
    #[error("{role} role needs {threshold} distinct signatures but has {valid}{}; collect more signatures with `edgefleet bundle sign` or `edgefleet keys sign`",
        if *repeated > 0 { format!(" ({repeated} repeated signature(s) by the same key counted once)") } else { String::new() })]
    ThresholdNotMet {
        role: RoleName,
        valid: usize,
        threshold: usize,
        repeated: usize,
    },
    #[error(
        "root rotation from version {have} to {got}; a rotation must go to exactly version {have}+1"
    )]
    RootVersion { have: u32, got: u32 },
    #[error("{got} root rotations in one update; at most {max} are followed")]
    TooManyRotations { got: usize, max: usize },
    #[error(
        "release keyring version {got} is older than version {have} already accepted (rollback)"
    )]
    KeyringRollback { have: u32, got: u32 },
    #[error(
        "{what} expired at {expired} (now {now}); possible freeze attack, or the signer must re-issue it"
    )]
    Expired {
        what: &'static str,
        expired: Timestamp,
        now: Timestamp,
    },
    #[error(
        "manifest release {got} of {model} is below this device's floor {have}; only an assignment with the rollback flag may go back"
    )]
    Downgrade { model: String, have: u64, got: u64 },
    #[error(
        "assignment sequence {got} is not newer than {have} already seen (replayed or reordered)"
    )]
    Replay { have: u64, got: u64 },
    #[error("assignment is for device {got}, not this device ({expected})")]
    WrongDevice { expected: String, got: String },
    #[error("bundle targets architecture {got}, this device is {device}")]
    WrongArch { device: String, got: String },
    #[error("bundle needs agent version {needed} or newer; this agent is {have}")]
    AgentTooOld { needed: String, have: String },
    #[error("manifest digest {got} does not match the assigned {expected} (mix-and-match)")]
    ManifestMismatch { expected: String, got: String },
    #[error("manifest is invalid: {0}")]
    InvalidManifest(String),
}

impl TrustError {
    /// The reason code a device reports this refusal with.
    pub fn failure_code(&self) -> crate::messages::FailureCode {
        use crate::messages::FailureCode;
        match self {
            TrustError::Expired { .. } => FailureCode::Expired,
            TrustError::Downgrade { .. } | TrustError::KeyringRollback { .. } => {
                FailureCode::Downgrade
            }
            TrustError::Replay { .. } => FailureCode::Replay,
            TrustError::WrongDevice { .. } => FailureCode::WrongDevice,
            TrustError::WrongArch { .. } => FailureCode::WrongArch,
            TrustError::AgentTooOld { .. } => FailureCode::AgentTooOld,
            TrustError::ManifestMismatch { .. } => FailureCode::ManifestMismatch,
            _ => FailureCode::Signature,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
