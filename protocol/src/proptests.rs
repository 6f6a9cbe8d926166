//! Property tests and a bounded fuzz smoke: every wire type round-trips through the codec, sealed
//! frames and topics round-trip, and every byte or string parser survives random and mutated
//! input without panicking, never verifying anything but the exact signed original.
//!
//! The fuzz smoke stands in for cargo-fuzz on the stable toolchain: a fixed number of cases per
//! target, so it runs in CI in seconds; raise [`FUZZ_CASES`] locally for a longer run.

use std::fmt::Debug;
use std::str::FromStr;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::assignment::{AssignedModel, Assignment, DeviceTrust, Floors};
use crate::bundle::{Bundle, BundleError, BundleVerifier, split_header};
use crate::capture::{CaptureBatch, CaptureSettings};
use crate::codec::{self, MAX_MANIFEST_BYTES};
use crate::crypto::{DeviceMacKey, Domain, SecretKey, Sha256Digest};
use crate::ids::{Arch, DeviceId, ModelName, ModelVersion, RolloutId, TensorName};
use crate::manifest::{Manifest, ManifestPolicy, manifest_digest, verify_manifest};
use crate::messages::{
    CaptureNotice, ControllerBody, ControllerMessage, DeviceBody, DeviceEvent, DeviceMessage,
    FrameError, PROTOCOL_VERSION, SealedFrame, Status, TelemetryWindow,
};
use crate::sketch::{FeatureSketch, LatencyHistogram, ReferenceFeature};
use crate::topics::{Topic, TopicKind};
use crate::trust::{ReleaseKeyring, RootKeyring, Signed, Verified};

/// Cases per fuzz target.
const FUZZ_CASES: u32 = 2000;

/// Every wire type, for the per-type round-trip and decode-fuzz tests.
macro_rules! for_each_wire_type {
    ($callback:ident) => {
        $callback! {
            device_message: DeviceMessage,
            controller_message: ControllerMessage,
            sealed_frame: SealedFrame,
            signed: Signed,
            root_keyring: RootKeyring,
            release_keyring: ReleaseKeyring,
            manifest: Manifest,
            assignment: Assignment,
            floors: Floors,
            telemetry_window: TelemetryWindow,
            status: Status,
            device_event: DeviceEvent,
            capture_notice: CaptureNotice,
            capture_settings: CaptureSettings,
            capture_batch: CaptureBatch,
            feature_sketch: FeatureSketch,
            latency_histogram: LatencyHistogram,
            reference_feature: ReferenceFeature,
        }
    };
}

/// Raw entropy for `arbitrary`.
fn entropy(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

/// A value built from `entropy`, or `None` if there was not enough of it.
fn build<'a, T: Arbitrary<'a>>(entropy: &'a [u8]) -> Option<T> {
    T::arbitrary(&mut Unstructured::new(entropy)).ok()
}

fn fuzz_config() -> ProptestConfig {
    ProptestConfig {
        cases: FUZZ_CASES,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures shared with `trust::tests`.

use crate::trust::tests::{Fleet, PAYLOAD, T0, fleet, key, role, sign_all};

fn sample_manifest() -> Manifest {
    crate::trust::tests::manifest(3, "aarch64")
}

/// A valid document of each signed kind, its signed body, and the state needed to verify it.
struct Fixtures {
    root_doc: RootKeyring,
    root_bytes: Vec<u8>,
    root: Verified<RootKeyring>,
    rotation_doc: RootKeyring,
    rotation_bytes: Vec<u8>,
    keyring_doc: ReleaseKeyring,
    keyring_bytes: Vec<u8>,
    keyring: Verified<ReleaseKeyring>,
    manifest: Manifest,
    signed_manifest: Vec<u8>,
    bundle: Vec<u8>,
    policy: ManifestPolicy,
    device: DeviceTrust,
    assignment: Assignment,
    assignment_bytes: Vec<u8>,
    mac_key: DeviceMacKey,
    device_message: DeviceMessage,
    device_frame: Vec<u8>,
    controller_message: ControllerMessage,
    controller_frame: Vec<u8>,
}

/// Root 2-of-3, release 2-of-3, one controller key; a bundle, an assignment and sealed frames.
static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    let Fleet {
        root_keys,
        release_keys: _,
        controller,
        root_bytes,
        root,
        keyring_bytes,
        keyring,
    } = fleet();
    let root_doc = (*root).clone();
    let keyring_doc = (*keyring).clone();
    let new_root_keys: Vec<SecretKey> = (31..=33).map(key).collect();
    let rotation_doc = RootKeyring {
        version: 2,
        created_at: T0,
        root: role(&new_root_keys, 2),
    };
    let rotation_bytes = sign_all(
        &rotation_doc,
        Domain::RootKeyring,
        &[
            &root_keys[0],
            &root_keys[1],
            &new_root_keys[0],
            &new_root_keys[1],
        ],
    );

    let manifest = sample_manifest();
    let fixture_fleet = fleet();
    let signed_manifest = fixture_fleet.signed_manifest(&manifest);
    let bundle = fixture_fleet.bundle(&manifest);
    let digest = Sha256Digest::of(&codec::encode(&manifest));
    let policy = ManifestPolicy {
        now: T0,
        device_arch: Some(Arch::new("aarch64").unwrap()),
        agent_version: Some(String::from("0.1.0")),
        release_floor: Some(2),
        allow_downgrade: false,
        expected_digest: Some(digest),
    };

    let me = DeviceId::new("dev-1").unwrap();
    let device = fixture_fleet.device();
    let assignment = Assignment {
        device: me.clone(),
        seq: 5,
        issued_at: T0,
        expires: T0.plus_millis(6 * 3_600_000),
        rollback: false,
        active: Some(AssignedModel {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            release: manifest.release,
            manifest_digest: digest,
            bundle_url: String::from("https://controller.local/bundles/x"),
            bundle_size: bundle.len() as u64,
        }),
        shadow: None,
        rollout: Some(RolloutId::new("r-1").unwrap()),
        capture: None,
    };
    let assignment_bytes = assignment.sign(&controller);

    let mac_key = DeviceMacKey([7; 32]);
    let device_message = DeviceMessage::new(
        me.clone(),
        9,
        T0,
        DeviceBody::Status(Status {
            online: true,
            agent_version: String::from("0.1.0"),
            arch: Arch::new("aarch64").unwrap(),
            active: None,
            previous: None,
            shadow: None,
            assignment_seq: 5,
            uptime_s: 60,
        }),
    );
    let device_frame = device_message.seal(&mac_key);
    let controller_message = ControllerMessage::new(
        me,
        T0,
        ControllerBody::Ack {
            seqs: vec![7, 8, 9],
        },
    );
    let controller_frame = controller_message.seal(&mac_key);

    Fixtures {
        root_doc,
        root_bytes,
        root,
        rotation_doc,
        rotation_bytes,
        keyring_doc,
        keyring_bytes,
        keyring,
        manifest,
        signed_manifest,
        bundle,
        policy,
        device,
        assignment,
        assignment_bytes,
        mac_key,
        device_message,
        device_frame,
        controller_message,
        controller_frame,
    }
});

// ---------------------------------------------------------------------------------------------
// Round trips.

/// Encodes a value built from `entropy`, decodes it, and checks the re-encoding is byte-identical
/// (floats may be NaN, so values are compared by their encoding).
fn round_trip<T>(entropy: &[u8]) -> Result<(), TestCaseError>
where
    T: for<'a> Arbitrary<'a> + Serialize + DeserializeOwned,
{
    let Some(value) = build::<T>(entropy) else {
        return Ok(());
    };
    let bytes = codec::encode(&value);
    let decoded = codec::decode::<T>("value", &bytes, MAX_MANIFEST_BYTES)
        .map_err(|err| TestCaseError::fail(format!("decoding our own encoding failed: {err}")))?;
    prop_assert_eq!(codec::encode(&decoded), bytes);
    Ok(())
}

mod round_trip {
    use super::*;

    macro_rules! round_trip_tests {
        ($($name:ident: $ty:ty),* $(,)?) => {
            proptest! {
                $(
                    #[test]
                    fn $name(entropy in entropy(4096)) {
                        round_trip::<$ty>(&entropy)?;
                    }
                )*
            }
        };
    }

    for_each_wire_type!(round_trip_tests);
}

/// A key that differs from `key` in one bit.
fn other_key(key: &DeviceMacKey) -> DeviceMacKey {
    let mut bytes = key.0;
    bytes[0] ^= 1;
    DeviceMacKey(bytes)
}

/// A valid device id different from `device`.
fn other_device(device: &DeviceId) -> DeviceId {
    let other = if device.as_str() == "other-device" {
        "another-device"
    } else {
        "other-device"
    };
    DeviceId::new(other).unwrap()
}

proptest! {
    #[test]
    fn device_messages_seal_and_open(entropy in entropy(4096), key in any::<[u8; 32]>()) {
        let Some(mut message) = build::<DeviceMessage>(&entropy) else {
            return Ok(());
        };
        message.v = PROTOCOL_VERSION;
        let key = DeviceMacKey(key);
        let frame = message.seal(&key);
        let opened = DeviceMessage::open(&key, &message.device, &frame)
            .map_err(|err| TestCaseError::fail(format!("open failed: {err}")))?;
        prop_assert_eq!(codec::encode(&opened), codec::encode(&message));
        let wrong_key = DeviceMessage::open(&other_key(&key), &message.device, &frame);
        prop_assert!(matches!(wrong_key, Err(FrameError::BadMac { .. })), "{:?}", wrong_key);
        let elsewhere = DeviceMessage::open(&key, &other_device(&message.device), &frame);
        prop_assert!(
            matches!(elsewhere, Err(FrameError::DeviceMismatch { .. })),
            "{:?}",
            elsewhere
        );
    }

    #[test]
    fn controller_messages_seal_and_open(entropy in entropy(4096), key in any::<[u8; 32]>()) {
        let Some(mut message) = build::<ControllerMessage>(&entropy) else {
            return Ok(());
        };
        message.v = PROTOCOL_VERSION;
        let key = DeviceMacKey(key);
        let frame = message.seal(&key);
        let opened = ControllerMessage::open(&key, &message.device, &frame)
            .map_err(|err| TestCaseError::fail(format!("open failed: {err}")))?;
        prop_assert_eq!(&opened, &message);
        let wrong_key = ControllerMessage::open(&other_key(&key), &message.device, &frame);
        prop_assert!(matches!(wrong_key, Err(FrameError::BadMac { .. })), "{:?}", wrong_key);
        let elsewhere = ControllerMessage::open(&key, &other_device(&message.device), &frame);
        prop_assert!(
            matches!(elsewhere, Err(FrameError::DeviceMismatch { .. })),
            "{:?}",
            elsewhere
        );
    }

    #[test]
    fn a_device_frame_is_not_a_controller_frame(entropy in entropy(4096)) {
        let Some(mut message) = build::<DeviceMessage>(&entropy) else {
            return Ok(());
        };
        message.v = PROTOCOL_VERSION;
        let key = DeviceMacKey([3; 32]);
        let frame = message.seal(&key);
        let crossed = ControllerMessage::open(&key, &message.device, &frame);
        prop_assert!(matches!(crossed, Err(FrameError::BadMac { .. })), "{:?}", crossed);
    }

    #[test]
    fn topics_build_and_parse_back(entropy in entropy(256)) {
        let mut u = Unstructured::new(&entropy);
        let (Ok(device), Ok(kind)) = (DeviceId::arbitrary(&mut u), TopicKind::arbitrary(&mut u))
        else {
            return Ok(());
        };
        let topic = Topic::new(device, kind);
        prop_assert_eq!(Topic::parse(&topic.to_string()), Ok(topic));
    }

    #[test]
    fn topics_with_long_device_ids_parse_back(
        device in "[A-Za-z0-9._-]{1,128}",
        kind in proptest::sample::select(TopicKind::ALL.to_vec()),
    ) {
        let Ok(device) = DeviceId::new(device) else {
            return Ok(()); // "." and ".."
        };
        let topic = Topic::new(device, kind);
        prop_assert_eq!(Topic::parse(&topic.to_string()), Ok(topic));
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz smoke.

/// One edit to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Cut the input at a point.
    Truncate(Index),
    /// Insert bytes at a point.
    Insert(Index, Vec<u8>),
    /// Remove up to `n` bytes from a point.
    Remove(Index, usize),
    /// Keep a prefix, then random bytes.
    ReplaceTail(Index, Vec<u8>),
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        match self {
            Mutation::Flip(at, mask) if len > 0 => bytes[at.index(len)] ^= mask,
            Mutation::Set(at, byte) if len > 0 => bytes[at.index(len)] = *byte,
            Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Mutation::Insert(at, insert) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, insert.iter().copied());
            }
            Mutation::Remove(at, n) if len > 0 => {
                let at = at.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::ReplaceTail(at, tail) => {
                bytes.truncate(at.index(len + 1));
                bytes.extend_from_slice(tail);
            }
            Mutation::Flip(..) | Mutation::Set(..) | Mutation::Remove(..) => {}
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set(at, byte)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(at, n)| Mutation::Remove(at, n)),
        1 => (any::<Index>(), vec(any::<u8>(), 0..64)).prop_map(|(at, b)| Mutation::ReplaceTail(at, b)),
    ]
}

/// A hostile input: random bytes, or a valid encoding with a few edits (sometimes none, so the
/// accepting path runs too).
#[derive(Debug, Clone)]
enum Hostile {
    Random(Vec<u8>),
    Mutated(Vec<Mutation>),
}

impl Hostile {
    fn apply(&self, valid: &[u8]) -> Vec<u8> {
        match self {
            Hostile::Random(bytes) => bytes.clone(),
            Hostile::Mutated(mutations) => {
                let mut bytes = valid.to_vec();
                for mutation in mutations {
                    mutation.apply(&mut bytes);
                }
                bytes
            }
        }
    }
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        2 => vec(any::<u8>(), 0..1024).prop_map(Hostile::Random),
        7 => vec(mutation(), 1..4).prop_map(Hostile::Mutated),
        1 => Just(Hostile::Mutated(Vec::new())),
    ]
}

/// If a verifier accepted the input, it must have handed back exactly the signed original.
fn accepted_only_original<T, E>(
    result: Result<Verified<T>, E>,
    original: &T,
    body: &[u8],
) -> Result<(), TestCaseError>
where
    T: PartialEq + Debug,
    E: std::fmt::Display,
{
    match result {
        Ok(verified) => {
            prop_assert_eq!(verified.signed_bytes(), body, "accepted a different body");
            prop_assert_eq!(&*verified, original, "accepted a different value");
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
    Ok(())
}

/// The device's manifest policy; `pinned` adds the digest an assignment names, which is checked
/// before the signatures (unpinned, every body edit reaches the signature check).
fn policy(pinned: bool) -> ManifestPolicy {
    let policy = FIXTURES.policy.clone();
    if pinned {
        policy
    } else {
        ManifestPolicy {
            expected_digest: None,
            ..policy
        }
    }
}

/// The signed body inside a valid `Signed` document.
fn body_of(signed: &[u8]) -> Vec<u8> {
    Signed::decode("fixture", signed, MAX_MANIFEST_BYTES)
        .unwrap()
        .body
}

/// Feeds `bytes` to a streaming verifier in the given chunk sizes (0 feeds an empty chunk, then
/// one byte), stopping at the first error; returns the result and the payload bytes released.
fn stream(
    bytes: &[u8],
    chunk_sizes: &[usize],
    keyring: &Verified<ReleaseKeyring>,
    policy: ManifestPolicy,
) -> (Result<Verified<Bundle>, BundleError>, Vec<u8>) {
    let mut verifier = BundleVerifier::new(keyring, policy);
    let mut payload = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(1);
        if size == 0
            && let Err(err) = verifier.feed(&[])
        {
            return (Err(err), payload);
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, rest.len()));
        match verifier.feed(chunk) {
            Ok(parts) => {
                for part in parts {
                    assert_eq!(part.payload, 0, "the fixture has one payload");
                    payload.extend_from_slice(&chunk[part.range]);
                }
            }
            Err(err) => return (Err(err), payload),
        }
        rest = tail;
    }
    (verifier.finish(), payload)
}

mod fuzz {
    use super::*;

    /// `codec::decode` of each wire type, fed random bytes and mutated valid encodings.
    macro_rules! decode_fuzz_tests {
        ($($name:ident: $ty:ty),* $(,)?) => {
            proptest! {
                #![proptest_config(fuzz_config())]
                $(
                    #[test]
                    fn $name(entropy in entropy(1024), input in hostile()) {
                        let valid = build::<$ty>(&entropy)
                            .map(|value| codec::encode(&value))
                            .unwrap_or_default();
                        let bytes = input.apply(&valid);
                        if let Err(err) = codec::decode::<$ty>("fuzz", &bytes, MAX_MANIFEST_BYTES) {
                            let _ = err.to_string();
                        }
                    }
                )*
            }
        };
    }

    mod decode {
        use super::*;
        for_each_wire_type!(decode_fuzz_tests);
    }

    fn topic_piece() -> BoxedStrategy<String> {
        let kinds: Vec<&'static str> = TopicKind::ALL.iter().map(|k| k.as_str()).collect();
        prop_oneof![
            proptest::sample::select(vec![
                "edgefleet",
                "v1",
                "v2",
                "/",
                "+",
                "#",
                "$share",
                ".",
                "..",
                "\0",
                "é",
                " "
            ])
            .prop_map(String::from),
            proptest::sample::select(kinds).prop_map(String::from),
            "[A-Za-z0-9._-]{1,12}",
            any::<char>().prop_map(String::from),
        ]
        .boxed()
    }

    /// Strings shaped like topics (and ids), plus arbitrary ones.
    fn topic_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            vec(topic_piece(), 0..8).prop_map(|pieces| pieces.concat()),
            (vec(topic_piece(), 0..3), vec(topic_piece(), 0..3)).prop_map(|(device, kind)| {
                format!("edgefleet/v1/{}/{}", device.concat(), kind.concat())
            }),
            "[A-Za-z0-9._-]{120,140}",
        ]
    }

    /// An accepted id is the input unchanged, made only of ASCII letters, digits and `extra`.
    fn parse_id<T, E>(
        input: &str,
        extra: &str,
        new: impl Fn(String) -> Result<T, E>,
    ) -> Result<(), TestCaseError>
    where
        T: AsRef<str>,
        E: std::fmt::Display,
    {
        match new(input.to_owned()) {
            Ok(id) => {
                prop_assert_eq!(id.as_ref(), input);
                prop_assert!(
                    input
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
                        && input != "."
                        && input != "..",
                    "accepted {:?}",
                    input
                );
            }
            Err(err) => {
                let _ = err.to_string();
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        #[test]
        fn signed_decode(which in 0usize..4, input in hostile()) {
            let f = &*FIXTURES;
            let valid = [&f.root_bytes, &f.keyring_bytes, &f.signed_manifest, &f.assignment_bytes][which];
            let bytes = input.apply(valid);
            if let Err(err) = Signed::decode("fuzz", &bytes, MAX_MANIFEST_BYTES) {
                let _ = err.to_string();
            }
            if let Err(err) = manifest_digest(&bytes) {
                let _ = err.to_string();
            }
        }

        #[test]
        fn root_keyring_anchor(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.root_bytes);
            accepted_only_original(
                RootKeyring::verify_anchor(&bytes),
                &f.root_doc,
                &body_of(&f.root_bytes),
            )?;
        }

        #[test]
        fn root_keyring_rotation(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.rotation_bytes);
            accepted_only_original(
                RootKeyring::verify_rotation(&f.root, &bytes),
                &f.rotation_doc,
                &body_of(&f.rotation_bytes),
            )?;
        }

        #[test]
        fn release_keyring(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.keyring_bytes);
            accepted_only_original(
                ReleaseKeyring::verify(&bytes, &f.root, T0, 0),
                &f.keyring_doc,
                &body_of(&f.keyring_bytes),
            )?;
        }

        #[test]
        fn manifest(input in hostile(), pinned in any::<bool>()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.signed_manifest);
            accepted_only_original(
                verify_manifest(&bytes, &f.keyring, &policy(pinned)),
                &f.manifest,
                &body_of(&f.signed_manifest),
            )?;
        }

        #[test]
        fn bundle_bytes(input in hostile(), pinned in any::<bool>()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.bundle);
            if let Err(err) = split_header(&bytes) {
                let _ = err.to_string();
            }
            let result = crate::bundle::verify_bundle_bytes(&bytes, &f.keyring, policy(pinned));
            if result.is_ok() {
                prop_assert!(bytes.ends_with(PAYLOAD), "accepted a different payload");
            }
            let result = result.map(|bundle| {
                let body = bundle.signed_bytes().to_vec();
                Verified::new(bundle.into_inner().manifest, body)
            });
            accepted_only_original(result, &f.manifest, &body_of(&f.signed_manifest))?;
        }

        #[test]
        fn bundle_streaming(
            input in hostile(),
            chunk_sizes in vec(0usize..700, 1..16),
            pinned in any::<bool>(),
        ) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.bundle);
            let (result, payload) = stream(&bytes, &chunk_sizes, &f.keyring, policy(pinned));
            if result.is_ok() {
                prop_assert_eq!(payload.as_slice(), PAYLOAD, "released a different payload");
            }
            let result = result.map(|bundle| {
                let body = bundle.signed_bytes().to_vec();
                Verified::new(bundle.into_inner().manifest, body)
            });
            accepted_only_original(result, &f.manifest, &body_of(&f.signed_manifest))?;
        }

        #[test]
        fn assignment(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.assignment_bytes);
            accepted_only_original(
                f.device.check_assignment(&bytes, T0),
                &f.assignment,
                &body_of(&f.assignment_bytes),
            )?;
        }

        #[test]
        fn device_message_open(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.device_frame);
            match DeviceMessage::open(&f.mac_key, &f.device.device, &bytes) {
                Ok(message) => prop_assert_eq!(&message, &f.device_message),
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }

        #[test]
        fn controller_message_open(input in hostile()) {
            let f = &*FIXTURES;
            let bytes = input.apply(&f.controller_frame);
            match ControllerMessage::open(&f.mac_key, &f.device.device, &bytes) {
                Ok(message) => prop_assert_eq!(&message, &f.controller_message),
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }

        #[test]
        fn topic_parse(input in topic_like()) {
            match Topic::parse(&input) {
                Ok(topic) => prop_assert_eq!(topic.to_string(), input),
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }

        #[test]
        fn id_parsers(input in topic_like()) {
            parse_id(&input, "._-", DeviceId::new)?;
            parse_id(&input, "._-", ModelName::new)?;
            parse_id(&input, "._+-", ModelVersion::new)?;
            parse_id(&input, "._-", RolloutId::new)?;
            parse_id(&input, "._:/-", TensorName::new)?;
            parse_id(&input, "_", Arch::new)?;
            let _ = Sha256Digest::from_str(&input);
        }
    }
}
