//! Keys, signatures, digests and MACs: ed25519 with `verify_strict`, SHA-256 and HMAC-SHA-256,
//! always over a domain-separated message so a signature for one kind of document never verifies
//! as another.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::byte_array;

/// What a signature or MAC is over; each document kind has its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    RootKeyring,
    ReleaseKeyring,
    Manifest,
    Assignment,
    DeviceMessage,
    ControllerMessage,
    /// The password a device presents to the broker (a MAC over its own id).
    MqttLogin,
}

impl Domain {
    fn prefix(self) -> &'static [u8] {
        match self {
            Domain::RootKeyring => b"edgefleet/root-keyring/v1\0",
            Domain::ReleaseKeyring => b"edgefleet/release-keyring/v1\0",
            Domain::Manifest => b"edgefleet/manifest/v1\0",
            Domain::Assignment => b"edgefleet/assignment/v1\0",
            Domain::DeviceMessage => b"edgefleet/device-message/v1\0",
            Domain::ControllerMessage => b"edgefleet/controller-message/v1\0",
            Domain::MqttLogin => b"edgefleet/mqtt-login/v1\0",
        }
    }

    fn message(self, body: &[u8]) -> Vec<u8> {
        let prefix = self.prefix();
        let mut message = Vec::with_capacity(prefix.len() + body.len());
        message.extend_from_slice(prefix);
        message.extend_from_slice(body);
        message
    }
}

/// A SHA-256 digest; displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(transparent)]
pub struct Sha256Digest(#[serde(with = "byte_array")] pub [u8; 32]);

impl Sha256Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for Sha256Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| format!("{s:?} is not a sha256 digest (64 hex digits)"))?;
        Ok(Self(out))
    }
}

/// An incremental SHA-256, for hashing payloads while they stream.
#[derive(Clone, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Sha256Digest {
        Sha256Digest(self.0.finalize().into())
    }
}

impl fmt::Debug for Sha256Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Stream")
    }
}

/// The id of a public key: the first 8 bytes of the SHA-256 of its 32 canonical bytes, as hex.
/// It only finds the key to try; thresholds count distinct public keys, never ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(transparent)]
pub struct KeyId(#[serde(with = "byte_array")] pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// An ed25519 public key as 32 bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(transparent)]
pub struct PublicKey(#[serde(with = "byte_array")] pub [u8; 32]);

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        let digest = Sha256::digest(self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// Parses the key for verification, refusing non-canonical encodings and weak (small-order)
    /// keys, with which a forged signature could verify for almost any message.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::NotAPoint {
            key_id: self.key_id(),
        })?;
        if key.is_weak() {
            return Err(KeyError::Weak {
                key_id: self.key_id(),
            });
        }
        if key.to_bytes() != self.0 {
            return Err(KeyError::NotAPoint {
                key_id: self.key_id(),
            });
        }
        Ok(key)
    }

    /// Checks `signature` over `body` in `domain` with `verify_strict`, which also refuses weak
    /// (small-order) keys and small-order `R`; non-canonical keys are refused when a role loads.
    pub fn verify(&self, domain: Domain, body: &[u8], signature: &SignatureBytes) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(&domain.message(body), &signature).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// Why a public key cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("public key {key_id} is not a canonical ed25519 point; regenerate it")]
    NotAPoint { key_id: KeyId },
    #[error("public key {key_id} is a weak (small-order) ed25519 key and can never be trusted")]
    Weak { key_id: KeyId },
}

/// A 64-byte ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignatureBytes(#[serde(with = "byte_array")] pub [u8; 64]);

#[cfg(any(test, feature = "arbitrary"))]
impl<'a> arbitrary::Arbitrary<'a> for SignatureBytes {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut bytes = [0u8; 64];
        u.fill_buffer(&mut bytes)?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureBytes({}…)", hex::encode(&self.0[..8]))
    }
}

/// A private ed25519 key. Never printed: `Debug` shows only the key id.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Builds a key from 32 bytes of seed, which must come from a cryptographic RNG.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }

    pub fn sign(&self, domain: Domain, body: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(&domain.message(body)).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.key_id())
    }
}

/// A per-device symmetric key issued at enrollment; authenticates every message on the device's
/// channel in both directions, so no device can speak for another even on a broker without ACLs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceMacKey(#[serde(with = "byte_array")] pub [u8; 32]);

/// An HMAC-SHA-256 tag.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(transparent)]
pub struct MacTag(#[serde(with = "byte_array")] pub [u8; 32]);

impl fmt::Debug for MacTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacTag({}…)", hex::encode(&self.0[..4]))
    }
}

impl DeviceMacKey {
    fn mac(&self, domain: Domain) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(domain.prefix());
        mac
    }

    pub fn tag(&self, domain: Domain, body: &[u8]) -> MacTag {
        let mut mac = self.mac(domain);
        mac.update(body);
        MacTag(mac.finalize().into_bytes().into())
    }

    /// The MQTT password of `device`: brokers that cannot check client certificates against
    /// topics (the embedded one) check this instead, so a client id proves its device key.
    pub fn mqtt_password(&self, device: &str) -> String {
        hex::encode(self.tag(Domain::MqttLogin, device.as_bytes()).0)
    }

    /// Constant-time check of `tag` over `body`.
    pub fn check(&self, domain: Domain, body: &[u8], tag: &MacTag) -> bool {
        let mut mac = self.mac(domain);
        mac.update(body);
        mac.verify_slice(&tag.0).is_ok()
    }
}

impl fmt::Debug for DeviceMacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceMacKey(..)")
    }
}
