//! The per-device assignment the controller signs ("device D runs manifest M, shadows S"), and the
//! device's trust state: the root and keyring it trusts and the floors that stop replays,
//! rollbacks and freezes.

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::capture::CaptureSettings;
use crate::codec::{self, MAX_MESSAGE_BYTES};
use crate::crypto::{Domain, Sha256Digest};
use crate::ids::{Arch, DeviceId, ModelName, ModelVersion, RolloutId};
use crate::manifest::ManifestPolicy;
use crate::time::Timestamp;
use crate::trust::{ReleaseKeyring, RoleName, RootKeyring, Signed, TrustError, Verified};

/// A model the device is told to run or shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct AssignedModel {
    pub name: ModelName,
    pub version: ModelVersion,
    pub release: u64,
    /// SHA-256 of the signed manifest body; the bundle's manifest must match it.
    pub manifest_digest: Sha256Digest,
    /// Where the bundle is served (HTTPS, with Range support).
    pub bundle_url: String,
    pub bundle_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub device: DeviceId,
    /// Strictly increasing per device; a device refuses anything not newer than what it saw.
    pub seq: u64,
    pub issued_at: Timestamp,
    /// Short-lived (hours): an old assignment cannot be replayed to freeze a device.
    pub expires: Timestamp,
    /// Set for an explicit rollback: the device may install a lower release than its floor.
    pub rollback: bool,
    /// `None` means: run no model.
    pub active: Option<AssignedModel>,
    pub shadow: Option<AssignedModel>,
    pub rollout: Option<RolloutId>,
    /// Data capture on this device (off when absent; an assignment without it encodes as
    /// before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSettings>,
}

impl Assignment {
    /// Encodes and signs with the controller's key.
    pub fn sign(&self, key: &crate::crypto::SecretKey) -> Vec<u8> {
        let mut signed = Signed::unsigned(self);
        signed.sign(Domain::Assignment, key);
        signed.encode()
    }
}

/// The floors a device persists (atomically, before installing) across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Floors {
    /// Highest assignment sequence accepted.
    pub assignment_seq: u64,
    /// Latest signed time seen (`issued_at`); the device clock may not go back behind it.
    pub seen_time: Timestamp,
    /// Highest release keyring version accepted.
    pub keyring_version: u32,
    /// Highest release installed, per model name.
    pub releases: Vec<ReleaseFloor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ReleaseFloor {
    pub model: ModelName,
    pub release: u64,
}

impl Floors {
    pub fn release_floor(&self, model: &ModelName) -> Option<u64> {
        self.releases
            .iter()
            .find(|f| &f.model == model)
            .map(|f| f.release)
    }

    /// Raises `model`'s release floor to `release` (never lowers it).
    pub fn raise_release(&mut self, model: &ModelName, release: u64) {
        match self.releases.iter_mut().find(|f| &f.model == model) {
            Some(floor) => floor.release = floor.release.max(release),
            None => self.releases.push(ReleaseFloor {
                model: model.clone(),
                release,
            }),
        }
    }

    /// "Now" for expiry checks: the device clock, but never behind the latest signed time seen.
    pub fn effective_now(&self, now: Timestamp) -> Timestamp {
        now.max(self.seen_time)
    }
}

/// What a device trusts, and its floors. Pure: the agent persists it.
#[derive(Debug, Clone)]
pub struct DeviceTrust {
    pub device: DeviceId,
    pub arch: Arch,
    pub agent_version: String,
    pub root: Verified<RootKeyring>,
    pub keyring: Verified<ReleaseKeyring>,
    pub floors: Floors,
}

impl DeviceTrust {
    /// Verifies an assignment: controller signature over the exact bytes, then the device id,
    /// the sequence floor and expiry against the freeze-proof clock.
    pub fn check_assignment(
        &self,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<Verified<Assignment>, TrustError> {
        let signed = Signed::decode("signed assignment", bytes, MAX_MESSAGE_BYTES)?;
        self.keyring.controller.check(
            RoleName::Controller,
            Domain::Assignment,
            &signed.body,
            &signed.signatures,
        )?;
        let assignment: Assignment = codec::decode("assignment", &signed.body, MAX_MESSAGE_BYTES)?;
        if assignment.device != self.device {
            return Err(TrustError::WrongDevice {
                expected: self.device.to_string(),
                got: assignment.device.to_string(),
            });
        }
        if assignment.seq <= self.floors.assignment_seq {
            return Err(TrustError::Replay {
                have: self.floors.assignment_seq,
                got: assignment.seq,
            });
        }
        let now = self.floors.effective_now(now);
        if now >= assignment.expires {
            return Err(TrustError::Expired {
                what: "assignment",
                expired: assignment.expires,
                now,
            });
        }
        Ok(Verified::new(assignment, signed.body))
    }

    /// Raises the sequence and time floors after an assignment was accepted.
    pub fn record_assignment(&mut self, assignment: &Verified<Assignment>) {
        self.floors.assignment_seq = self.floors.assignment_seq.max(assignment.seq);
        self.floors.seen_time = self.floors.seen_time.max(assignment.issued_at);
    }

    /// The policy a bundle for `model` of `assignment` must satisfy on this device.
    pub fn manifest_policy(
        &self,
        assignment: &Verified<Assignment>,
        model: &AssignedModel,
        now: Timestamp,
    ) -> ManifestPolicy {
        ManifestPolicy {
            now: self.floors.effective_now(now),
            device_arch: Some(self.arch.clone()),
            agent_version: Some(self.agent_version.clone()),
            release_floor: self.floors.release_floor(&model.name),
            allow_downgrade: assignment.rollback,
            expected_digest: Some(model.manifest_digest),
        }
    }

    /// Raises the release floor once a bundle is installed. A rollback never lowers it.
    pub fn record_install(&mut self, bundle: &Verified<Bundle>) {
        self.floors
            .raise_release(&bundle.manifest.name, bundle.manifest.release);
    }

    /// Accepts a newer release keyring (and root rotations before it).
    pub fn update_keyring(
        &mut self,
        root_chain: &[Vec<u8>],
        keyring: &[u8],
        now: Timestamp,
    ) -> Result<(), TrustError> {
        let root = RootKeyring::verify_chain(self.root.clone(), root_chain)?;
        let keyring = ReleaseKeyring::verify(
            keyring,
            &root,
            self.floors.effective_now(now),
            self.floors.keyring_version,
        )?;
        self.floors.keyring_version = keyring.version;
        self.root = root;
        self.keyring = keyring;
        Ok(())
    }
}
