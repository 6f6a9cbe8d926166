//! The signed bundle file and its streaming verifier.
//!
//! Layout: `EFBUNDLE` (8 bytes) · format (u16 BE) · signed-manifest length (u32 BE) · signed
//! manifest (CBOR [`Signed`]) · each payload's bytes, in manifest order, exactly `size` bytes each.
//! Nothing may follow the last payload.
//!
//! [`BundleVerifier`] is sans-I/O: the caller feeds bytes as they arrive (from a socket, a file,
//! a resumed download) and writes the payload ranges it is handed; the manifest is verified before
//! any payload byte is released, and each payload's SHA-256 is checked as its last byte arrives.

use std::ops::Range;

use crate::codec::MAX_MANIFEST_BYTES;
use crate::crypto::{Sha256Digest, Sha256Stream};
use crate::manifest::{Manifest, ManifestPolicy, verify_manifest};
use crate::trust::{ReleaseKeyring, Signed, TrustError, Verified};

pub const BUNDLE_MAGIC: &[u8; 8] = b"EFBUNDLE";
pub const BUNDLE_FORMAT: u16 = 1;
/// Bytes before the signed manifest.
pub const HEADER_LEN: usize = 14;

/// A bundle whose manifest signatures, policy and every payload hash were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub manifest: Manifest,
    /// SHA-256 of the signed manifest body: the id assignments refer to.
    pub manifest_digest: Sha256Digest,
    /// The signed manifest as it was in the file (body and signatures).
    pub signed_manifest: Vec<u8>,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("not an EdgeFleet bundle (bad magic bytes); build one with `edgefleet bundle build`")]
    BadMagic,
    #[error("bundle format {found} is not supported; this build reads format {BUNDLE_FORMAT}")]
    UnsupportedFormat { found: u16 },
    #[error("bundle manifest is {len} bytes; the limit is {max} bytes")]
    ManifestTooLarge { len: usize, max: usize },
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(
        "payload {name} has sha256 {got}, but the manifest says {expected}; the bundle was corrupted or tampered with"
    )]
    PayloadHash {
        name: String,
        expected: String,
        got: String,
    },
    #[error(
        "bundle has bytes beyond the {expected} the manifest accounts for; refusing the extra data"
    )]
    TrailingData { expected: u64 },
    #[error("bundle ends early: {got} of {expected} bytes (payload {name} incomplete)")]
    Truncated {
        name: String,
        got: u64,
        expected: u64,
    },
}

impl BundleError {
    /// The reason code a device reports a refused bundle with: the trust failure, a payload
    /// hash mismatch, or (a malformed or short file) a failed download.
    pub fn failure_code(&self) -> crate::messages::FailureCode {
        match self {
            BundleError::Trust(err) => err.failure_code(),
            BundleError::PayloadHash { .. } => crate::messages::FailureCode::PayloadHash,
            _ => crate::messages::FailureCode::Download,
        }
    }
}

/// Builds the bytes that precede the payloads in a bundle file.
pub fn bundle_header(signed_manifest: &[u8]) -> Result<Vec<u8>, BundleError> {
    if signed_manifest.len() > MAX_MANIFEST_BYTES {
        return Err(BundleError::ManifestTooLarge {
            len: signed_manifest.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    let len = u32::try_from(signed_manifest.len()).expect("bounded by MAX_MANIFEST_BYTES");
    let mut header = Vec::with_capacity(HEADER_LEN + signed_manifest.len());
    header.extend_from_slice(BUNDLE_MAGIC);
    header.extend_from_slice(&BUNDLE_FORMAT.to_be_bytes());
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(signed_manifest);
    Ok(header)
}

/// Reads the signed manifest out of the start of a bundle (for tools that re-sign a bundle).
/// Returns the signed manifest and the offset where payloads start. Verifies nothing.
pub fn split_header(prefix: &[u8]) -> Result<Option<(Signed, usize)>, BundleError> {
    let Some(len) = parse_fixed_header(prefix)? else {
        return Ok(None);
    };
    let end = HEADER_LEN + len;
    if prefix.len() < end {
        return Ok(None);
    }
    let signed = Signed::decode(
        "signed manifest",
        &prefix[HEADER_LEN..end],
        MAX_MANIFEST_BYTES,
    )
    .map_err(BundleError::Trust)?;
    Ok(Some((signed, end)))
}

fn parse_fixed_header(prefix: &[u8]) -> Result<Option<usize>, BundleError> {
    let magic_len = prefix.len().min(BUNDLE_MAGIC.len());
    if prefix[..magic_len] != BUNDLE_MAGIC[..magic_len] {
        return Err(BundleError::BadMagic);
    }
    if prefix.len() < HEADER_LEN {
        return Ok(None);
    }
    let format = u16::from_be_bytes([prefix[8], prefix[9]]);
    if format != BUNDLE_FORMAT {
        return Err(BundleError::UnsupportedFormat { found: format });
    }
    let len = u32::from_be_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]) as usize;
    if len > MAX_MANIFEST_BYTES {
        return Err(BundleError::ManifestTooLarge {
            len,
            max: MAX_MANIFEST_BYTES,
        });
    }
    Ok(Some(len))
}

/// A range of the chunk just fed that belongs to payload `payload` (index into
/// `manifest.payloads`). Its hash is only known good once [`BundleVerifier::finish`] succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadChunk {
    pub payload: usize,
    pub range: Range<usize>,
}

#[derive(Debug)]
enum Stage {
    Header,
    Payloads,
}

/// Incremental bundle verification; see the module docs.
#[derive(Debug)]
pub struct BundleVerifier<'a> {
    keyring: &'a Verified<ReleaseKeyring>,
    policy: ManifestPolicy,
    stage: Stage,
    header: Vec<u8>,
    manifest: Option<Verified<Manifest>>,
    signed_manifest: Vec<u8>,
    payload: usize,
    payload_seen: u64,
    hasher: Sha256Stream,
    total: u64,
    expected_total: u64,
}

impl<'a> BundleVerifier<'a> {
    pub fn new(keyring: &'a Verified<ReleaseKeyring>, policy: ManifestPolicy) -> Self {
        Self {
            keyring,
            policy,
            stage: Stage::Header,
            header: Vec::new(),
            manifest: None,
            signed_manifest: Vec::new(),
            payload: 0,
            payload_seen: 0,
            hasher: Sha256Stream::new(),
            total: 0,
            expected_total: 0,
        }
    }

    /// The verified manifest, once the header has been read.
    pub fn manifest(&self) -> Option<&Verified<Manifest>> {
        self.manifest.as_ref()
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.total
    }

    /// Consumes the next bytes of the bundle and returns the payload ranges within `chunk`.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<PayloadChunk>, BundleError> {
        let mut offset = 0;
        if let Stage::Header = self.stage {
            offset = self.feed_header(chunk)?;
            if let Stage::Header = self.stage {
                self.total += chunk.len() as u64;
                return Ok(Vec::new());
            }
        }
        let mut out = Vec::new();
        while offset < chunk.len() {
            let manifest = self
                .manifest
                .as_ref()
                .expect("manifest is set once the header is read");
            let Some(payload) = manifest.payloads.get(self.payload) else {
                return Err(BundleError::TrailingData {
                    expected: self.expected_total,
                });
            };
            let left = payload.size - self.payload_seen;
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(chunk.len() - offset);
            let range = offset..offset + take;
            self.hasher.update(&chunk[range.clone()]);
            if take > 0 {
                out.push(PayloadChunk {
                    payload: self.payload,
                    range,
                });
            }
            self.payload_seen += take as u64;
            offset += take;
            if self.payload_seen == payload.size {
                let got = std::mem::take(&mut self.hasher).finish();
                if got != payload.sha256 {
                    return Err(BundleError::PayloadHash {
                        name: payload.name.to_string(),
                        expected: payload.sha256.to_hex(),
                        got: got.to_hex(),
                    });
                }
                self.payload += 1;
                self.payload_seen = 0;
                // An empty payload after this one is complete without any byte of its own.
                self.skip_empty_payloads()?;
            }
        }
        self.total += chunk.len() as u64;
        Ok(out)
    }

    /// Buffers header bytes; once the signed manifest is complete, verifies it. Returns how many
    /// bytes of `chunk` were used.
    fn feed_header(&mut self, chunk: &[u8]) -> Result<usize, BundleError> {
        let before = self.header.len();
        let want = match parse_fixed_header(&self.header)? {
            Some(len) => HEADER_LEN + len,
            None => HEADER_LEN,
        };
        let take = (want - before).min(chunk.len());
        self.header.extend_from_slice(&chunk[..take]);
        let Some(len) = parse_fixed_header(&self.header)? else {
            return Ok(take);
        };
        let need = HEADER_LEN + len;
        if self.header.len() < need {
            let more = (need - self.header.len()).min(chunk.len() - take);
            self.header.extend_from_slice(&chunk[take..take + more]);
            if self.header.len() < need {
                return Ok(take + more);
            }
            return self.finish_header(take + more);
        }
        self.finish_header(take)
    }

    fn finish_header(&mut self, used: usize) -> Result<usize, BundleError> {
        let signed_manifest = self.header.split_off(HEADER_LEN);
        let manifest = verify_manifest(&signed_manifest, self.keyring, &self.policy)?;
        self.expected_total =
            (HEADER_LEN + signed_manifest.len()) as u64 + manifest.payload_bytes();
        self.signed_manifest = signed_manifest;
        self.manifest = Some(manifest);
        self.stage = Stage::Payloads;
        // Zero-length payloads are complete before any byte arrives.
        self.skip_empty_payloads()?;
        Ok(used)
    }

    fn skip_empty_payloads(&mut self) -> Result<(), BundleError> {
        let manifest = self.manifest.as_ref().expect("set before");
        while let Some(payload) = manifest.payloads.get(self.payload) {
            if payload.size != 0 {
                break;
            }
            let got = std::mem::take(&mut self.hasher).finish();
            if got != payload.sha256 {
                return Err(BundleError::PayloadHash {
                    name: payload.name.to_string(),
                    expected: payload.sha256.to_hex(),
                    got: got.to_hex(),
                });
            }
            self.payload += 1;
        }
        Ok(())
    }

    /// Ends the stream: every payload must be complete.
    pub fn finish(mut self) -> Result<Verified<Bundle>, BundleError> {
        let Some(manifest) = self.manifest.take() else {
            return Err(BundleError::Truncated {
                name: String::from("(manifest)"),
                got: self.total,
                expected: self.total.max(HEADER_LEN as u64) + 1,
            });
        };
        if let Some(payload) = manifest.payloads.get(self.payload) {
            return Err(BundleError::Truncated {
                name: payload.name.to_string(),
                got: self.total,
                expected: self.expected_total,
            });
        }
        let body = manifest.signed_bytes().to_vec();
        let manifest_digest = Sha256Digest::of(&body);
        let bundle = Bundle {
            manifest: manifest.into_inner(),
            manifest_digest,
            signed_manifest: self.signed_manifest,
        };
        Ok(Verified::new(bundle, body))
    }
}

/// Verifies a whole bundle held in memory.
pub fn verify_bundle_bytes(
    bytes: &[u8],
    keyring: &Verified<ReleaseKeyring>,
    policy: ManifestPolicy,
) -> Result<Verified<Bundle>, BundleError> {
    let mut verifier = BundleVerifier::new(keyring, policy);
    verifier.feed(bytes)?;
    verifier.finish()
}

/// One key holder's signature over a manifest, exchanged as a file when k-of-n holders sign
/// separately (`edgefleet bundle sign --detached`), then merged into the bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct DetachedSignature {
    /// The manifest the signature is for (SHA-256 of the signed body).
    pub manifest_digest: Sha256Digest,
    pub signature: crate::trust::KeySignature,
}
