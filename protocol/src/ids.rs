//! Validated identifier newtypes: every id that reaches a topic, a path or a database passes here first.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty; give a non-empty name")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "{kind} {value:?} contains {found:?} at byte {at}; allowed are letters, digits and {allowed}"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
        at: usize,
        allowed: &'static str,
    },
}

/// Checks `value` against the rules shared by all ids: non-empty, at most `max` bytes, and every
/// character ASCII alphanumeric or one of `extra`. This excludes MQTT wildcards (`+`, `#`), the
/// topic separator `/`, NUL, control characters and anything that could escape a file path.
fn validate(
    kind: &'static str,
    value: &str,
    max: usize,
    extra: &'static str,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some((at, found)) = value
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || extra.contains(*c)))
    {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found,
            at,
            allowed: extra,
        });
    }
    if value == "." || value == ".." {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found: '.',
            at: 0,
            allowed: extra,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:expr, $extra:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The longest accepted id, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value, $max, $extra)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }

        #[cfg(any(test, feature = "arbitrary"))]
        impl<'a> arbitrary::Arbitrary<'a> for $name {
            fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                const ALPHABET: &[u8] = concat!("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", $extra).as_bytes();
                let len = u.int_in_range(1..=($max).min(24))?;
                let mut value = String::with_capacity(len);
                for _ in 0..len {
                    value.push(char::from(*u.choose(ALPHABET)?));
                }
                Self::new(value).or_else(|_| Ok(Self(String::from("x"))))
            }
        }
    };
}

string_id!(
    /// A device id: 1–128 bytes of `[A-Za-z0-9._-]`. It is the MQTT client id and a topic level, so
    /// `+`, `#`, `/`, NUL and control characters are refused (CVE-2017-7650 class).
    DeviceId, "device id", 128, "._-"
);
string_id!(
    /// A model name such as `silero-vad`: 1–64 bytes of `[A-Za-z0-9._-]`.
    ModelName, "model name", 64, "._-"
);
string_id!(
    /// A model version such as `6.2.3` or `2026-11-01.1+cpu`: 1–64 bytes of `[A-Za-z0-9._+-]`.
    ModelVersion, "model version", 64, "._+-"
);
string_id!(
    /// A rollout id: 1–64 bytes of `[A-Za-z0-9._-]`.
    RolloutId, "rollout id", 64, "._-"
);
string_id!(
    /// A tensor, feature or payload name inside a bundle: 1–128 bytes of `[A-Za-z0-9._:/-]`
    /// (ONNX tensor names such as `save_infer_model/scale_0.tmp_1` contain `/`). Payload names
    /// are file names on the device and must also pass [`is_file_name`].
    TensorName, "name", 128, "._:/-"
);
string_id!(
    /// A target architecture as Rust spells it (`x86_64`, `aarch64`, `arm`), or `any`.
    Arch, "architecture", 32, "_"
);

/// Whether `name` can be a file name inside a model directory: no `/`, not `.` or `..`.
pub fn is_file_name(name: &str) -> bool {
    !name.contains('/') && name != "." && name != ".." && !name.is_empty()
}

impl Arch {
    /// The wildcard a bundle uses when it runs on every architecture.
    pub fn any() -> Self {
        Self(String::from("any"))
    }

    /// Whether a bundle built for `self` may run on a device of architecture `device`.
    pub fn accepts(&self, device: &Arch) -> bool {
        self.0 == "any" || self == device
    }
}

#[cfg(test)]
mod tests;
