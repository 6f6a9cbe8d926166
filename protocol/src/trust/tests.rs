//! The rejection checklist: each hostile input fails with its specific error, and nothing gets
//! past verification to produce a `Verified` value.

use super::*;
use crate::assignment::{AssignedModel, Assignment, DeviceTrust, Floors};
use crate::bundle::{BundleError, bundle_header, verify_bundle_bytes};
use crate::crypto::{SecretKey, Sha256Digest};
use crate::ids::{Arch, DeviceId, ModelName, ModelVersion, TensorName};
use crate::manifest::*;

pub(crate) const T0: Timestamp = Timestamp::from_secs(1_795_000_000);
pub(crate) const DAY_MS: u64 = 86_400_000;

pub(crate) fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

pub(crate) struct Fleet {
    pub root_keys: Vec<SecretKey>,
    pub release_keys: Vec<SecretKey>,
    pub controller: SecretKey,
    pub root_bytes: Vec<u8>,
    pub root: Verified<RootKeyring>,
    pub keyring_bytes: Vec<u8>,
    pub keyring: Verified<ReleaseKeyring>,
}

pub(crate) fn role(keys: &[SecretKey], threshold: u8) -> Role {
    Role {
        keys: keys.iter().map(SecretKey::public).collect(),
        threshold,
    }
}

pub(crate) fn sign_all(value: &impl Serialize, domain: Domain, keys: &[&SecretKey]) -> Vec<u8> {
    let mut signed = Signed::unsigned(value);
    for key in keys {
        signed.sign(domain, key);
    }
    signed.encode()
}

/// Root 2-of-3, release 2-of-3, one controller key.
pub(crate) fn fleet() -> Fleet {
    let root_keys: Vec<SecretKey> = (1..=3).map(key).collect();
    let release_keys: Vec<SecretKey> = (11..=13).map(key).collect();
    let controller = key(21);
    let root_doc = RootKeyring {
        version: 1,
        created_at: T0,
        root: role(&root_keys, 2),
    };
    let root_bytes = sign_all(
        &root_doc,
        Domain::RootKeyring,
        &[&root_keys[0], &root_keys[1]],
    );
    let root = RootKeyring::verify_anchor(&root_bytes).unwrap();
    let keyring_doc = ReleaseKeyring {
        version: 1,
        created_at: T0,
        expires: T0.plus_millis(365 * DAY_MS),
        release: role(&release_keys, 2),
        controller: role(std::slice::from_ref(&controller), 1),
    };
    let keyring_bytes = sign_all(
        &keyring_doc,
        Domain::ReleaseKeyring,
        &[&root_keys[0], &root_keys[2]],
    );
    let keyring = ReleaseKeyring::verify(&keyring_bytes, &root, T0, 0).unwrap();
    Fleet {
        root_keys,
        release_keys,
        controller,
        root_bytes,
        root,
        keyring_bytes,
        keyring,
    }
}

pub(crate) const PAYLOAD: &[u8] = b"not really onnx, but the bytes are what is hashed";

pub(crate) fn manifest(release: u64, arch: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: ModelName::new("vad").unwrap(),
        version: ModelVersion::new(format!("1.{release}")).unwrap(),
        release,
        description: None,
        target: Target {
            arch: Arch::new(arch).unwrap(),
            min_agent_version: Some(String::from("0.1.0")),
        },
        payloads: vec![Payload {
            name: TensorName::new("model.onnx").unwrap(),
            role: PayloadRole::Model,
            sha256: Sha256Digest::of(PAYLOAD),
            size: PAYLOAD.len() as u64,
        }],
        runtime: RuntimeSettings::default(),
        inputs: vec![TensorSpec {
            name: TensorName::new("input").unwrap(),
            dtype: DType::F32,
            shape: vec![Some(1), Some(2)],
            nan: NanPolicy::Reject,
        }],
        outputs: vec![],
        prediction: None,
        features: vec![],
        golden: vec![GoldenVector {
            inputs: vec![NamedTensor {
                name: TensorName::new("input").unwrap(),
                shape: vec![1, 2],
                data: TensorData::F32(vec![0.5, -0.5]),
            }],
            outputs: vec![],
            tolerance: 1e-4,
        }],
        reference: None,
        lineage: Lineage::default(),
        created_at: T0,
        expires: T0.plus_millis(30 * DAY_MS),
    }
}

impl Fleet {
    pub(crate) fn signed_manifest(&self, manifest: &Manifest) -> Vec<u8> {
        sign_all(
            manifest,
            Domain::Manifest,
            &[&self.release_keys[0], &self.release_keys[1]],
        )
    }

    pub(crate) fn bundle(&self, manifest: &Manifest) -> Vec<u8> {
        let mut bytes = bundle_header(&self.signed_manifest(manifest)).unwrap();
        bytes.extend_from_slice(PAYLOAD);
        bytes
    }

    pub(crate) fn device(&self) -> DeviceTrust {
        DeviceTrust {
            device: DeviceId::new("dev-1").unwrap(),
            arch: Arch::new("aarch64").unwrap(),
            agent_version: String::from("0.1.0"),
            root: self.root.clone(),
            keyring: self.keyring.clone(),
            floors: Floors::default(),
        }
    }

    fn assignment(&self, device: &str, seq: u64, manifest: &Manifest, rollback: bool) -> Vec<u8> {
        let digest = Sha256Digest::of(&codec::encode(manifest));
        Assignment {
            device: DeviceId::new(device).unwrap(),
            seq,
            issued_at: T0,
            expires: T0.plus_millis(6 * 3_600_000),
            rollback,
            active: Some(AssignedModel {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                release: manifest.release,
                manifest_digest: digest,
                bundle_url: String::from("https://controller.local/bundles/x"),
                bundle_size: 1,
            }),
            shadow: None,
            rollout: None,
            capture: None,
        }
        .sign(&self.controller)
    }
}

fn policy() -> ManifestPolicy {
    ManifestPolicy {
        now: T0,
        device_arch: Some(Arch::new("aarch64").unwrap()),
        ..Default::default()
    }
}

#[test]
fn a_good_bundle_verifies_with_its_digest() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let bundle = verify_bundle_bytes(&fleet.bundle(&manifest), &fleet.keyring, policy()).unwrap();
    assert_eq!(bundle.manifest, manifest);
    assert_eq!(
        bundle.manifest_digest,
        Sha256Digest::of(&codec::encode(&manifest))
    );
}

#[test]
fn flipped_payload_byte_is_a_hash_mismatch() {
    let fleet = fleet();
    let mut bytes = fleet.bundle(&manifest(3, "aarch64"));
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let err = verify_bundle_bytes(&bytes, &fleet.keyring, policy()).unwrap_err();
    assert!(
        matches!(&err, BundleError::PayloadHash { name, .. } if name == "model.onnx"),
        "{err}"
    );
}

#[test]
fn flipped_manifest_byte_fails_the_signature() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let signed = fleet.signed_manifest(&manifest);
    let body = codec::encode(&manifest);
    // Flip a byte inside the signed body (find the body inside the signed document).
    let at = signed
        .windows(body.len())
        .position(|w| w == body.as_slice())
        .unwrap()
        + body.len() / 2;
    let mut bytes = bundle_header(&signed).unwrap();
    bytes[crate::bundle::HEADER_LEN + at] ^= 0x01;
    bytes.extend_from_slice(PAYLOAD);
    let err = verify_bundle_bytes(&bytes, &fleet.keyring, policy()).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::Trust(TrustError::BadSignature {
                role: RoleName::Release,
                ..
            })
        ),
        "{err}"
    );
}

#[test]
fn signature_by_unknown_key_is_refused() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let stranger = key(99);
    let signed = sign_all(&manifest, Domain::Manifest, &[&stranger]);
    let err = verify_manifest(&signed, &fleet.keyring, &policy()).unwrap_err();
    assert_eq!(
        err,
        TrustError::UnknownKey {
            role: RoleName::Release,
            key_id: stranger.key_id()
        }
    );
}

#[test]
fn fewer_signatures_than_the_threshold_are_refused() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let signed = sign_all(&manifest, Domain::Manifest, &[&fleet.release_keys[0]]);
    let err = verify_manifest(&signed, &fleet.keyring, &policy()).unwrap_err();
    assert_eq!(
        err,
        TrustError::ThresholdNotMet {
            role: RoleName::Release,
            valid: 1,
            threshold: 2,
            repeated: 0
        }
    );
}

#[test]
fn the_same_key_counts_once_toward_a_threshold() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let mut signed = Signed::unsigned(&manifest);
    let signature = fleet.release_keys[0].sign(Domain::Manifest, &signed.body);
    for _ in 0..2 {
        signed.signatures.push(KeySignature {
            key_id: fleet.release_keys[0].key_id(),
            signature,
        });
    }
    let err = verify_manifest(&signed.encode(), &fleet.keyring, &policy()).unwrap_err();
    assert_eq!(
        err,
        TrustError::ThresholdNotMet {
            role: RoleName::Release,
            valid: 1,
            threshold: 2,
            repeated: 1
        }
    );
    assert!(err.to_string().contains("counted once"), "{err}");
}

#[test]
fn a_role_listing_one_key_twice_or_a_bad_threshold_is_refused() {
    let fleet = fleet();
    let twice = Role {
        keys: vec![fleet.release_keys[0].public(); 2],
        threshold: 2,
    };
    assert!(matches!(
        twice.validate(RoleName::Release),
        Err(TrustError::DuplicateKey { .. })
    ));
    let zero = Role {
        keys: vec![fleet.release_keys[0].public()],
        threshold: 0,
    };
    assert!(matches!(
        zero.validate(RoleName::Release),
        Err(TrustError::BadThreshold { .. })
    ));
    let above = Role {
        keys: vec![fleet.release_keys[0].public()],
        threshold: 2,
    };
    assert!(matches!(
        above.validate(RoleName::Release),
        Err(TrustError::BadThreshold { .. })
    ));
}

#[test]
fn a_weak_key_in_a_role_is_refused() {
    // The identity point (small order) encoded canonically.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = Role {
        keys: vec![PublicKey(identity)],
        threshold: 1,
    };
    let err = weak.validate(RoleName::Release).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::BadKey {
                source: KeyError::Weak { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_malleated_signature_is_refused() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let mut signed = Signed::unsigned(&manifest);
    signed.sign(Domain::Manifest, &fleet.release_keys[0]);
    signed.sign(Domain::Manifest, &fleet.release_keys[1]);
    // s + ℓ: add the group order to the scalar half of the first signature.
    const ELL: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let s = &mut signed.signatures[0].signature.0[32..];
    let mut carry = 0u16;
    for (byte, ell) in s.iter_mut().zip(ELL) {
        let sum = u16::from(*byte) + u16::from(ell) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
    let err = verify_manifest(&signed.encode(), &fleet.keyring, &policy()).unwrap_err();
    assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");
}

#[test]
fn an_expired_manifest_is_refused() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let late = ManifestPolicy {
        now: manifest.expires,
        ..policy()
    };
    let err =
        verify_manifest(&fleet.signed_manifest(&manifest), &fleet.keyring, &late).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Expired {
                what: "manifest",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_release_below_the_floor_is_refused_unless_rolling_back() {
    let fleet = fleet();
    let signed = fleet.signed_manifest(&manifest(3, "aarch64"));
    let floor = ManifestPolicy {
        release_floor: Some(4),
        ..policy()
    };
    let err = verify_manifest(&signed, &fleet.keyring, &floor).unwrap_err();
    assert_eq!(
        err,
        TrustError::Downgrade {
            model: String::from("vad"),
            have: 4,
            got: 3
        }
    );
    let rollback = ManifestPolicy {
        allow_downgrade: true,
        ..floor
    };
    verify_manifest(&signed, &fleet.keyring, &rollback).unwrap();
}

#[test]
fn a_manifest_for_another_arch_is_refused() {
    let fleet = fleet();
    let signed = fleet.signed_manifest(&manifest(3, "x86_64"));
    let err = verify_manifest(&signed, &fleet.keyring, &policy()).unwrap_err();
    assert_eq!(
        err,
        TrustError::WrongArch {
            device: String::from("aarch64"),
            got: String::from("x86_64")
        }
    );
    verify_manifest(
        &fleet.signed_manifest(&manifest(3, "any")),
        &fleet.keyring,
        &policy(),
    )
    .unwrap();
}

#[test]
fn a_signature_for_another_document_kind_does_not_verify() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let signed = sign_all(
        &manifest,
        Domain::Assignment,
        &[&fleet.release_keys[0], &fleet.release_keys[1]],
    );
    let err = verify_manifest(&signed, &fleet.keyring, &policy()).unwrap_err();
    assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");
}

#[test]
fn assignments_are_checked_for_replay_device_expiry_and_freeze() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let mut device = fleet.device();

    let first = device
        .check_assignment(&fleet.assignment("dev-1", 5, &manifest, false), T0)
        .unwrap();
    device.record_assignment(&first);

    let replay = device
        .check_assignment(&fleet.assignment("dev-1", 5, &manifest, false), T0)
        .unwrap_err();
    assert_eq!(replay, TrustError::Replay { have: 5, got: 5 });
    let older = device
        .check_assignment(&fleet.assignment("dev-1", 4, &manifest, false), T0)
        .unwrap_err();
    assert_eq!(older, TrustError::Replay { have: 5, got: 4 });

    let other = device
        .check_assignment(&fleet.assignment("dev-2", 6, &manifest, false), T0)
        .unwrap_err();
    assert_eq!(
        other,
        TrustError::WrongDevice {
            expected: String::from("dev-1"),
            got: String::from("dev-2")
        }
    );

    let expired = device
        .check_assignment(
            &fleet.assignment("dev-1", 6, &manifest, false),
            T0.plus_secs(7 * 3600),
        )
        .unwrap_err();
    assert!(
        expired.to_string().contains("possible freeze attack"),
        "{expired}"
    );

    // A device clock set back before the last signed time seen does not revive an expired one.
    device.floors.seen_time = T0.plus_secs(7 * 3600);
    let frozen = device
        .check_assignment(&fleet.assignment("dev-1", 6, &manifest, false), T0)
        .unwrap_err();
    assert!(
        matches!(
            frozen,
            TrustError::Expired {
                what: "assignment",
                ..
            }
        ),
        "{frozen}"
    );
}

#[test]
fn an_assignment_not_signed_by_the_controller_is_refused() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let device = fleet.device();
    let mut signed = Signed::decode(
        "a",
        &fleet.assignment("dev-1", 1, &manifest, false),
        1 << 20,
    )
    .unwrap();
    signed.signatures.clear();
    signed.sign(Domain::Assignment, &fleet.release_keys[0]);
    let err = device.check_assignment(&signed.encode(), T0).unwrap_err();
    assert_eq!(
        err,
        TrustError::UnknownKey {
            role: RoleName::Controller,
            key_id: fleet.release_keys[0].key_id()
        }
    );
}

#[test]
fn mix_and_match_manifest_is_refused_and_floors_follow_installs() {
    let fleet = fleet();
    let (m3, m4) = (manifest(3, "aarch64"), manifest(4, "aarch64"));
    let mut device = fleet.device();
    let assignment = device
        .check_assignment(&fleet.assignment("dev-1", 1, &m4, false), T0)
        .unwrap();
    let model = assignment.active.clone().unwrap();
    let policy = device.manifest_policy(&assignment, &model, T0);

    let err = verify_bundle_bytes(&fleet.bundle(&m3), &fleet.keyring, policy.clone()).unwrap_err();
    assert!(
        matches!(err, BundleError::Trust(TrustError::ManifestMismatch { .. })),
        "{err}"
    );

    let bundle = verify_bundle_bytes(&fleet.bundle(&m4), &fleet.keyring, policy).unwrap();
    device.record_assignment(&assignment);
    device.record_install(&bundle);
    assert_eq!(device.floors.release_floor(&m4.name), Some(4));

    // A rollback assignment to release 3 passes the floor; the floor itself stays at 4.
    let back = device
        .check_assignment(&fleet.assignment("dev-1", 2, &m3, true), T0)
        .unwrap();
    let policy = device.manifest_policy(&back, back.active.as_ref().unwrap(), T0);
    let bundle = verify_bundle_bytes(&fleet.bundle(&m3), &fleet.keyring, policy).unwrap();
    device.record_install(&bundle);
    assert_eq!(device.floors.release_floor(&m4.name), Some(4));
}

#[test]
fn root_rotation_needs_old_and_new_thresholds_in_sequence() {
    let fleet = fleet();
    let new_keys: Vec<SecretKey> = (31..=33).map(key).collect();
    let v2 = RootKeyring {
        version: 2,
        created_at: T0,
        root: role(&new_keys, 2),
    };

    let only_new = sign_all(&v2, Domain::RootKeyring, &[&new_keys[0], &new_keys[1]]);
    let err = RootKeyring::verify_rotation(&fleet.root, &only_new).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::UnknownKey {
                role: RoleName::Root,
                ..
            }
        ),
        "{err}"
    );

    let only_old = sign_all(
        &v2,
        Domain::RootKeyring,
        &[&fleet.root_keys[0], &fleet.root_keys[1]],
    );
    let err = RootKeyring::verify_rotation(&fleet.root, &only_old).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::UnknownKey {
                role: RoleName::NewRoot,
                ..
            }
        ),
        "{err}"
    );

    let both = |doc: &RootKeyring, old: &[SecretKey], new: &[SecretKey]| {
        sign_all(
            doc,
            Domain::RootKeyring,
            &[&old[0], &old[1], &new[0], &new[1]],
        )
    };
    let v3 = RootKeyring {
        version: 3,
        created_at: T0,
        root: role(&fleet.root_keys, 2),
    };
    let gap = both(&v3, &fleet.root_keys, &fleet.root_keys);
    assert_eq!(
        RootKeyring::verify_rotation(&fleet.root, &gap).unwrap_err(),
        TrustError::RootVersion { have: 1, got: 3 }
    );

    let v2_bytes = both(&v2, &fleet.root_keys, &new_keys);
    let v3_bytes = both(&v3, &new_keys, &fleet.root_keys);
    let newest = RootKeyring::verify_chain(fleet.root.clone(), &[v2_bytes, v3_bytes]).unwrap();
    assert_eq!(newest.version, 3);

    let too_many = vec![Vec::new(); MAX_ROOT_ROTATIONS + 1];
    assert!(matches!(
        RootKeyring::verify_chain(fleet.root.clone(), &too_many),
        Err(TrustError::TooManyRotations { .. })
    ));
}

#[test]
fn keyring_rollback_and_expiry_are_refused() {
    let fleet = fleet();
    let err = ReleaseKeyring::verify(&fleet.keyring_bytes, &fleet.root, T0, 2).unwrap_err();
    assert_eq!(err, TrustError::KeyringRollback { have: 2, got: 1 });
    let late = T0.plus_millis(366 * DAY_MS);
    let err = ReleaseKeyring::verify(&fleet.keyring_bytes, &fleet.root, late, 0).unwrap_err();
    assert!(
        matches!(
            err,
            TrustError::Expired {
                what: "release keyring",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_and_oversized_bundles_are_refused() {
    let fleet = fleet();
    let bytes = fleet.bundle(&manifest(3, "aarch64"));
    for cut in [0, 5, 13, 20, bytes.len() - 1] {
        let err = verify_bundle_bytes(&bytes[..cut], &fleet.keyring, policy()).unwrap_err();
        assert!(
            matches!(err, BundleError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let err = verify_bundle_bytes(&longer, &fleet.keyring, policy()).unwrap_err();
    assert!(matches!(err, BundleError::TrailingData { .. }), "{err}");

    let mut huge_header = bytes[..crate::bundle::HEADER_LEN].to_vec();
    huge_header[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = verify_bundle_bytes(&huge_header, &fleet.keyring, policy()).unwrap_err();
    assert!(matches!(err, BundleError::ManifestTooLarge { .. }), "{err}");

    let err = verify_bundle_bytes(b"PK\x03\x04 a zip file", &fleet.keyring, policy()).unwrap_err();
    assert_eq!(err, BundleError::BadMagic);
}

#[test]
fn streaming_in_any_chunking_gives_the_same_result() {
    let fleet = fleet();
    let bytes = fleet.bundle(&manifest(3, "aarch64"));
    for chunk in [1, 2, 7, 64, 4096] {
        let mut verifier = crate::bundle::BundleVerifier::new(&fleet.keyring, policy());
        let mut payload = Vec::new();
        for piece in bytes.chunks(chunk) {
            for part in verifier.feed(piece).unwrap() {
                assert_eq!(part.payload, 0);
                payload.extend_from_slice(&piece[part.range]);
            }
        }
        verifier.finish().unwrap();
        assert_eq!(payload, PAYLOAD, "chunk size {chunk}");
    }
}

#[test]
fn detached_signatures_merge_into_a_threshold() {
    let fleet = fleet();
    let manifest = manifest(3, "aarch64");
    let mut alice = Signed::unsigned(&manifest);
    alice.sign(Domain::Manifest, &fleet.release_keys[0]);
    let mut bob = Signed::unsigned(&manifest);
    bob.sign(Domain::Manifest, &fleet.release_keys[2]);
    assert!(alice.add_signature(bob.signatures[0].clone()));
    assert!(
        !alice.add_signature(bob.signatures[0].clone()),
        "a key signs once"
    );
    verify_manifest(&alice.encode(), &fleet.keyring, &policy()).unwrap();
}

#[test]
fn an_empty_payload_after_a_full_one_completes() {
    let fleet = fleet();
    let mut manifest = manifest(3, "aarch64");
    manifest.payloads.push(Payload {
        name: TensorName::new("labels.txt").unwrap(),
        role: PayloadRole::Data,
        sha256: Sha256Digest::of(b""),
        size: 0,
    });
    let bytes = fleet.bundle(&manifest);
    for chunk in [1, bytes.len()] {
        let mut verifier = crate::bundle::BundleVerifier::new(&fleet.keyring, policy());
        for piece in bytes.chunks(chunk) {
            verifier.feed(piece).unwrap();
        }
        assert_eq!(
            verifier.finish().unwrap().manifest.payloads.len(),
            2,
            "chunk size {chunk}"
        );
    }
}
