//! Hostile CBOR: every case is a typed error, fast, with bounded memory.

use serde::{Deserialize, Serialize};

use super::*;
use crate::messages::{DeviceBody, DeviceMessage, Status};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inner {
    count: u32,
    name: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outer {
    inner: Inner,
    items: Vec<Inner>,
}

fn sample() -> Outer {
    Outer {
        inner: Inner {
            count: 1,
            name: String::from("a"),
        },
        items: vec![Inner {
            count: 2,
            name: String::from("b"),
        }],
    }
}

#[test]
fn round_trip() {
    let bytes = encode(&sample());
    assert_eq!(decode::<Outer>("outer", &bytes, 1024).unwrap(), sample());
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = encode(&sample());
    bytes.extend_from_slice(&[0x00, 0x01]);
    assert_eq!(
        decode::<Outer>("outer", &bytes, 1024).unwrap_err(),
        DecodeError::TrailingBytes {
            what: "outer",
            extra: 2
        }
    );
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let bytes = vec![0u8; 2000];
    assert_eq!(
        decode::<Outer>("outer", &bytes, 1024).unwrap_err(),
        DecodeError::TooLarge {
            what: "outer",
            len: 2000,
            max: 1024
        }
    );
}

#[test]
fn truncated_input_is_refused() {
    let bytes = encode(&sample());
    for cut in 0..bytes.len() {
        let err = decode::<Outer>("outer", &bytes[..cut], 1024).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Truncated { .. } | DecodeError::Field { .. }
            ),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn deep_nesting_is_refused() {
    let mut bytes = vec![0x81u8; 100_000]; // 100k nested one-element arrays
    bytes.push(0x00);
    let err = decode::<ciborium::Value>("value", &bytes, 1 << 20).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooDeep {
            what: "value",
            max: MAX_DEPTH
        }
    );
    let mut tags = vec![0xc6u8; 100_000]; // 100k nested tags
    tags.push(0x00);
    assert!(matches!(
        decode::<ciborium::Value>("value", &tags, 1 << 20),
        Err(DecodeError::TooDeep { .. })
    ));
}

#[test]
fn huge_length_prefixes_do_not_allocate() {
    // Array of 2^64-1 items with none present; byte string of 2^63 bytes; map of 2^32 pairs.
    for bytes in [
        vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        vec![0xba, 0xff, 0xff, 0xff, 0xff],
    ] {
        let err = decode::<ciborium::Value>("value", &bytes, 1024).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    }
}

#[test]
fn duplicate_map_keys_are_refused_at_any_depth() {
    use ciborium::Value;
    let text = |s: &str| Value::Text(s.to_owned());
    let inner = |count: u64| {
        Value::Map(vec![
            (text("count"), Value::Integer(count.into())),
            (text("name"), text("a")),
        ])
    };
    // Duplicate at the top level.
    let top = Value::Map(vec![
        (text("inner"), inner(1)),
        (text("inner"), inner(2)),
        (text("items"), Value::Array(vec![])),
    ]);
    let err = decode::<Outer>("outer", &encode(&top), 1024).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { reason, .. } if reason.contains("duplicate field `inner`")),
        "{err}"
    );
    // Duplicate inside a list element.
    let dup = Value::Map(vec![
        (text("count"), Value::Integer(1.into())),
        (text("count"), Value::Integer(2.into())),
        (text("name"), text("x")),
    ]);
    let nested = Value::Map(vec![
        (text("inner"), inner(1)),
        (text("items"), Value::Array(vec![dup])),
    ]);
    let err = decode::<Outer>("outer", &encode(&nested), 1024).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, reason, .. } if field == "items[0]" && reason.contains("duplicate field `count`")),
        "{err}"
    );
}

#[test]
fn errors_name_the_bad_field() {
    use ciborium::Value;
    let text = |s: &str| Value::Text(s.to_owned());
    let wrong = Value::Map(vec![
        (
            text("inner"),
            Value::Map(vec![
                (text("count"), text("many")),
                (text("name"), text("a")),
            ]),
        ),
        (text("items"), Value::Array(vec![])),
    ]);
    let err = decode::<Outer>("outer", &encode(&wrong), 1024).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, .. } if field == "inner.count"),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("outer: field `inner.count` is invalid: invalid type: string"),
        "{err}"
    );

    let unknown = Value::Map(vec![
        (
            text("inner"),
            Value::Map(vec![
                (text("count"), Value::Integer(1.into())),
                (text("name"), text("a")),
                (text("extra"), Value::Null),
            ]),
        ),
        (text("items"), Value::Array(vec![])),
    ]);
    let err = decode::<Outer>("outer", &encode(&unknown), 1024).unwrap_err();
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");
}

#[test]
fn a_bad_device_id_inside_a_message_names_the_field() {
    let message = DeviceMessage::new(
        crate::ids::DeviceId::new("dev-1").unwrap(),
        1,
        crate::time::Timestamp(0),
        DeviceBody::Status(Status {
            online: true,
            agent_version: String::from("0.1.0"),
            arch: crate::ids::Arch::new("x86_64").unwrap(),
            active: None,
            previous: None,
            shadow: None,
            assignment_seq: 0,
            uptime_s: 1,
        }),
    );
    let bytes = encode(&message);
    let at = bytes.windows(5).position(|w| w == b"dev-1").unwrap();
    let mut hostile = bytes.clone();
    hostile[at + 3] = b'/';
    let err = decode::<DeviceMessage>("device message", &hostile, MAX_MESSAGE_BYTES).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, reason, .. } if field == "device" && reason.contains("'/'")),
        "{err}"
    );
}

#[test]
fn invalid_utf8_and_reserved_encodings_are_syntax_errors() {
    let err = decode::<String>("text", &[0x62, 0xff, 0xfe], 1024).unwrap_err();
    assert!(
        matches!(err, DecodeError::Syntax { .. } | DecodeError::Field { .. }),
        "{err}"
    );
    let err = decode::<ciborium::Value>("value", &[0x1c], 1024).unwrap_err();
    assert!(matches!(err, DecodeError::Syntax { .. }), "{err}");
}

#[test]
fn byte_arrays_are_hex_in_json_and_old_json_arrays_still_read() {
    use crate::Sha256Digest;
    let digest = Sha256Digest([0xab; 32]);
    let json = serde_json::to_string(&digest).unwrap();
    assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
    assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), digest);
    let old = serde_json::to_string(&[0xabu8; 32]).unwrap();
    assert_eq!(serde_json::from_str::<Sha256Digest>(&old).unwrap(), digest);
    for bad in ["\"abcd\"", "\"zz\"", "[1,2,3]", "7"] {
        assert!(serde_json::from_str::<Sha256Digest>(bad).is_err(), "{bad}");
    }
    // CBOR keeps byte strings.
    let cbor = encode(&digest);
    assert_eq!(cbor[0], 0x58, "a CBOR byte string of 32 bytes");
    assert_eq!(decode::<Sha256Digest>("digest", &cbor, 64).unwrap(), digest);
}
