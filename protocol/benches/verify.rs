//! Bundle verification against raw SHA-256 on the same bytes, in the same run.
//!
//! For each payload size, `sha256` hashes the payload in one call and `verify` streams a bundle
//! whose single payload is those bytes through [`BundleVerifier`] in 256 KiB chunks, the way a
//! downloader feeds it: header buffering, CBOR decode of the signed manifest, two ed25519
//! `verify_strict` checks (release role 2-of-3), policy checks, then the payload hash. Both
//! report throughput in payload bytes, so their ratio is the cost of verification over hashing.
//! `fixed_cost` times the size-independent part on its own: `verify_manifest` of the signed
//! manifest, and the two `verify_strict` signature checks inside it.
//!
//! Run: `cargo bench -p edgefleet-protocol --bench verify -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edgefleet_protocol::bundle::bundle_header;
use edgefleet_protocol::manifest::{
    Lineage, MANIFEST_FORMAT, Manifest, ManifestPolicy, Payload, PayloadRole, RuntimeSettings,
    Target, verify_manifest,
};
use edgefleet_protocol::{
    Arch, BundleVerifier, Domain, ModelName, ModelVersion, ReleaseKeyring, Role, RootKeyring,
    SecretKey, Sha256Digest, Signed, TensorName, Timestamp, Verified,
};
use sha2::{Digest, Sha256};

/// How a downloader hands bytes to the verifier.
const CHUNK: usize = 256 * 1024;
const NOW: Timestamp = Timestamp::from_secs(1_795_000_000);
const DAY_MS: u64 = 86_400_000;

/// (label, payload bytes): the size of the Silero VAD ONNX model, and a larger model.
const SIZES: [(&str, usize); 2] = [("1.3MB", 1_300_000), ("16MiB", 16 * 1024 * 1024)];

/// Deterministic pseudo-random bytes (SplitMix64), so every run hashes the same input.
fn payload(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn role(keys: &[SecretKey], threshold: u8) -> Role {
    Role {
        keys: keys.iter().map(SecretKey::public).collect(),
        threshold,
    }
}

fn sign(value: &impl serde::Serialize, domain: Domain, keys: &[&SecretKey]) -> Vec<u8> {
    let mut signed = Signed::unsigned(value);
    for key in keys {
        signed.sign(domain, key);
    }
    signed.encode()
}

/// Root 2-of-3 → release keyring (release 2-of-3, one controller key), verified as a device would.
fn release_keyring(release_keys: &[SecretKey]) -> Verified<ReleaseKeyring> {
    let root_keys: Vec<SecretKey> = (1..=3).map(key).collect();
    let root_doc = RootKeyring {
        version: 1,
        created_at: NOW,
        root: role(&root_keys, 2),
    };
    let root_bytes = sign(
        &root_doc,
        Domain::RootKeyring,
        &[&root_keys[0], &root_keys[1]],
    );
    let root = RootKeyring::verify_anchor(&root_bytes).expect("root keyring verifies");
    let keyring_doc = ReleaseKeyring {
        version: 1,
        created_at: NOW,
        expires: NOW.plus_millis(365 * DAY_MS),
        release: role(release_keys, 2),
        controller: role(&[key(21)], 1),
    };
    let keyring_bytes = sign(
        &keyring_doc,
        Domain::ReleaseKeyring,
        &[&root_keys[0], &root_keys[2]],
    );
    ReleaseKeyring::verify(&keyring_bytes, &root, NOW, 0).expect("release keyring verifies")
}

/// A signed manifest for a single model payload `payload`, signed by two of the three release
/// keys, and the bundle file holding it.
fn bundle(payload: &[u8], release_keys: &[SecretKey]) -> (Vec<u8>, Vec<u8>) {
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: ModelName::new("silero-vad").expect("valid name"),
        version: ModelVersion::new("5.1.2").expect("valid version"),
        release: 7,
        description: Some(String::from("voice activity detection")),
        target: Target {
            arch: Arch::any(),
            min_agent_version: Some(String::from("0.1.0")),
        },
        payloads: vec![Payload {
            name: TensorName::new("model.onnx").expect("valid name"),
            role: PayloadRole::Model,
            sha256: Sha256Digest::of(payload),
            size: payload.len() as u64,
        }],
        runtime: RuntimeSettings::default(),
        inputs: vec![],
        outputs: vec![],
        prediction: None,
        features: vec![],
        golden: vec![],
        reference: None,
        lineage: Lineage::default(),
        created_at: NOW,
        expires: NOW.plus_millis(30 * DAY_MS),
    };
    let signed = sign(
        &manifest,
        Domain::Manifest,
        &[&release_keys[0], &release_keys[1]],
    );
    let mut bytes = bundle_header(&signed).expect("manifest fits the header");
    bytes.extend_from_slice(payload);
    (signed, bytes)
}

fn policy() -> ManifestPolicy {
    ManifestPolicy {
        now: NOW,
        device_arch: Some(Arch::new("aarch64").expect("valid arch")),
        agent_version: Some(String::from("0.1.0")),
        ..ManifestPolicy::default()
    }
}

/// Streams `bundle` through a fresh verifier in `CHUNK`-sized pieces, as a downloader would.
fn verify_streaming(bundle: &[u8], keyring: &Verified<ReleaseKeyring>) -> usize {
    let mut verifier = BundleVerifier::new(keyring, policy());
    let mut released = 0;
    for chunk in bundle.chunks(CHUNK) {
        for part in verifier.feed(chunk).expect("bundle verifies") {
            released += part.range.len();
        }
    }
    let verified = verifier.finish().expect("bundle is complete");
    black_box(&verified);
    released
}

fn bench(c: &mut Criterion) {
    let release_keys: Vec<SecretKey> = (11..=13).map(key).collect();
    let keyring = release_keyring(&release_keys);
    for (label, len) in SIZES {
        let payload = payload(len);
        let (_, bundle) = bundle(&payload, &release_keys);
        assert_eq!(verify_streaming(&bundle, &keyring), len);

        let mut group = c.benchmark_group(format!("bundle_verify/{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function("sha256", |b| {
            b.iter(|| Sha256::digest(black_box(payload.as_slice())))
        });
        group.bench_function("verify", |b| {
            b.iter(|| verify_streaming(black_box(bundle.as_slice()), &keyring))
        });
        group.finish();
    }

    // The size-independent part, on the 1.3 MB bundle's signed manifest.
    let (signed_bytes, _) = bundle(&payload(SIZES[0].1), &release_keys);
    let signed = Signed::decode("signed manifest", &signed_bytes, usize::MAX).expect("decodes");
    let signers: Vec<_> = signed
        .signatures
        .iter()
        .map(|entry| {
            let key = release_keys
                .iter()
                .map(SecretKey::public)
                .find(|key| key.key_id() == entry.key_id)
                .expect("signed by a release key");
            (key, entry.signature)
        })
        .collect();
    let mut group = c.benchmark_group("bundle_verify/fixed_cost");
    group.bench_function("verify_manifest", |b| {
        b.iter(|| verify_manifest(black_box(&signed_bytes), &keyring, &policy()).expect("verifies"))
    });
    group.bench_function("ed25519_verify_strict_x2", |b| {
        b.iter(|| {
            for (key, signature) in &signers {
                assert!(key.verify(Domain::Manifest, black_box(&signed.body), signature));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
