//! CBOR encoding and bounded, strict decoding (ciborium): size limit before parsing, a recursion
//! limit, no trailing bytes, no duplicate or unknown fields, and errors that name the bad field.

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// The largest MQTT message body (device reports, acks, assignments) accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// The largest signed bundle manifest accepted, in bytes (it carries golden vectors and reference
/// statistics, so it is larger than a message).
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// The deepest CBOR nesting accepted. Our own types nest fewer than 16 levels.
pub const MAX_DEPTH: usize = 64;

/// Why bytes could not be decoded. `what` names the kind of document (e.g. `"manifest"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is {len} bytes; the limit is {max} bytes")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is truncated: the input ended inside a CBOR item")]
    Truncated { what: &'static str },
    #[error("{what} is not well-formed CBOR (byte {offset})")]
    Syntax { what: &'static str, offset: usize },
    #[error("{what} nests deeper than {max} levels; refusing to parse it")]
    TooDeep { what: &'static str, max: usize },
    #[error("{what}: field `{field}` is invalid: {reason}")]
    Field {
        what: &'static str,
        field: String,
        reason: String,
    },
    #[error("{what} has {extra} trailing bytes after its CBOR item")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} has protocol version {found}; this build understands version {supported}")]
    Version {
        what: &'static str,
        found: u16,
        supported: u16,
    },
}

/// Encodes `value` as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    ciborium::ser::into_writer(value, &mut out)
        .expect("CBOR encoding into a Vec cannot fail for protocol types");
    out
}

thread_local! {
    /// The serde path of the last field that failed to decode on this thread.
    static FAILED_PATH: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `serde_path_to_error` over whichever deserializer ciborium hands us (its own type is
/// private), and leaves the failing field's path for `decode` to report.
struct Tracked<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tracked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_path_to_error::deserialize(deserializer)
            .map(Tracked)
            .map_err(|err| {
                let path = err.path().to_string();
                FAILED_PATH.with(|slot| *slot.borrow_mut() = Some(path));
                err.into_inner()
            })
    }
}

/// Decodes exactly one CBOR item of type `T` from `bytes`, which must be at most `max` bytes.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    FAILED_PATH.with(|slot| slot.borrow_mut().take());
    let mut reader = bytes;
    let res =
        ciborium::de::from_reader_with_recursion_limit::<Tracked<T>, _>(&mut reader, MAX_DEPTH);
    let path = FAILED_PATH.with(|slot| slot.borrow_mut().take());
    match res {
        Ok(Tracked(value)) if reader.is_empty() => Ok(value),
        Ok(_) => Err(DecodeError::TrailingBytes {
            what,
            extra: reader.len(),
        }),
        Err(ciborium::de::Error::Io(_)) => Err(DecodeError::Truncated { what }),
        Err(ciborium::de::Error::Syntax(offset)) => Err(DecodeError::Syntax { what, offset }),
        Err(ciborium::de::Error::RecursionLimitExceeded) => Err(DecodeError::TooDeep {
            what,
            max: MAX_DEPTH,
        }),
        Err(ciborium::de::Error::Semantic(_, reason)) => {
            let field = match path.as_deref() {
                None | Some(".") | Some("") => String::from("(top level)"),
                Some(path) => path.to_owned(),
            };
            Err(DecodeError::Field {
                what,
                field,
                reason,
            })
        }
    }
}

/// Fixed-size byte strings (keys, signatures, digests) encoded as CBOR byte strings, not arrays.
/// Human-readable formats (JSON: the controller's stored reports and rollout state, the agent's
/// state file) get lowercase hex; arrays of numbers, which older JSON files hold, are read too.
pub(crate) mod byte_array {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for V<N> {
            type Value = [u8; N];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of exactly {N} bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<[u8; N], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<[u8; N], E> {
                self.visit_bytes(&v)
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<[u8; N], E> {
                let bytes = hex::decode(v)
                    .map_err(|_| E::custom(format!("expected {N} bytes in hex, found {v:?}")))?;
                self.visit_bytes(&bytes)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; N], A::Error> {
                let mut out = [0u8; N];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(A::Error::invalid_length(N + 1, &self));
                }
                Ok(out)
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(V::<N>)
        } else {
            d.deserialize_bytes(V::<N>)
        }
    }
}

/// Variable-length byte strings encoded as CBOR byte strings.
pub(crate) mod byte_vec {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Vec<u8>, A::Error> {
                Err(A::Error::custom("expected a byte string, found an array"))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests;
