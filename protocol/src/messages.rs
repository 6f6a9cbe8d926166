//! Versioned message envelopes for every device↔controller exchange over MQTT.
//!
//! Device → controller: a [`DeviceMessage`] (status, telemetry window, event, capture notice),
//! sealed with the device's enrollment MAC key into a [`SealedFrame`]. Controller → device: acks
//! sealed the same way (other domain), and the ed25519-signed [`crate::Assignment`].
//! A receiver checks the MAC over the exact bytes before decoding them, then checks that the
//! device named inside matches the topic it arrived on.

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError, MAX_MESSAGE_BYTES, byte_vec};
use crate::crypto::{DeviceMacKey, Domain, MacTag, Sha256Digest};
use crate::ids::{Arch, DeviceId, ModelName, ModelVersion, TensorName};
use crate::sketch::{FeatureSketch, LatencyHistogram};
use crate::time::Timestamp;

/// The envelope version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// A MAC-sealed message body, as published on MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct SealedFrame {
    pub v: u16,
    #[serde(with = "byte_vec")]
    pub body: Vec<u8>,
    pub mac: MacTag,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(
        "message MAC does not verify for device {device}; it was altered or sent by someone else"
    )]
    BadMac { device: String },
    #[error("message arrived on device {topic_device}'s topic but names device {body_device}")]
    DeviceMismatch {
        topic_device: String,
        body_device: String,
    },
}

fn seal(domain: Domain, key: &DeviceMacKey, body: Vec<u8>) -> Vec<u8> {
    let mac = key.tag(domain, &body);
    codec::encode(&SealedFrame {
        v: PROTOCOL_VERSION,
        body,
        mac,
    })
}

fn open<T: serde::de::DeserializeOwned>(
    what: &'static str,
    domain: Domain,
    key: &DeviceMacKey,
    device: &DeviceId,
    bytes: &[u8],
) -> Result<T, FrameError> {
    let frame: SealedFrame = codec::decode("sealed frame", bytes, MAX_MESSAGE_BYTES)?;
    if frame.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version {
            what: "sealed frame",
            found: frame.v,
            supported: PROTOCOL_VERSION,
        }
        .into());
    }
    if !key.check(domain, &frame.body, &frame.mac) {
        return Err(FrameError::BadMac {
            device: device.to_string(),
        });
    }
    Ok(codec::decode(what, &frame.body, MAX_MESSAGE_BYTES)?)
}

/// Every device → controller report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct DeviceMessage {
    pub v: u16,
    pub device: DeviceId,
    /// Per-device, strictly increasing, persisted across restarts; the controller ingests each
    /// (device, seq) once and acks it.
    pub seq: u64,
    pub sent_at: Timestamp,
    pub body: DeviceBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum DeviceBody {
    Status(Status),
    Telemetry(TelemetryWindow),
    Event(DeviceEvent),
    Capture(CaptureNotice),
}

impl DeviceMessage {
    pub fn new(device: DeviceId, seq: u64, sent_at: Timestamp, body: DeviceBody) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            device,
            seq,
            sent_at,
            body,
        }
    }

    pub fn seal(&self, key: &DeviceMacKey) -> Vec<u8> {
        seal(Domain::DeviceMessage, key, codec::encode(self))
    }

    /// Opens a frame received on `topic_device`'s topic with that device's key.
    pub fn open(
        key: &DeviceMacKey,
        topic_device: &DeviceId,
        bytes: &[u8],
    ) -> Result<Self, FrameError> {
        let message: DeviceMessage = open(
            "device message",
            Domain::DeviceMessage,
            key,
            topic_device,
            bytes,
        )?;
        if message.v != PROTOCOL_VERSION {
            return Err(DecodeError::Version {
                what: "device message",
                found: message.v,
                supported: PROTOCOL_VERSION,
            }
            .into());
        }
        if &message.device != topic_device {
            return Err(FrameError::DeviceMismatch {
                topic_device: topic_device.to_string(),
                body_device: message.device.to_string(),
            });
        }
        Ok(message)
    }
}

/// A model as reports refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub name: ModelName,
    pub version: ModelVersion,
    pub release: u64,
    pub manifest_digest: Sha256Digest,
}

/// Hello and status: sent on connect (retained) and on every change; the last will is the same
/// message with `online: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub online: bool,
    pub agent_version: String,
    pub arch: Arch,
    pub active: Option<ModelRef>,
    pub previous: Option<ModelRef>,
    pub shadow: Option<ModelRef>,
    /// Highest assignment sequence the device accepted.
    pub assignment_seq: u64,
    pub uptime_s: u64,
}

/// One telemetry window of the active model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct TelemetryWindow {
    pub model: ModelRef,
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    pub inferences: u64,
    pub errors: ErrorCounts,
    pub latency: LatencyHistogram,
    /// One sketch per manifest feature, in manifest order.
    pub features: Vec<NamedSketch>,
    /// Output distribution, one sketch per tracked output element.
    pub outputs: Vec<NamedSketch>,
    pub shadow: Option<ShadowStats>,
    pub feedback: Option<FeedbackStats>,
    pub resources: ResourceUsage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct NamedSketch {
    pub name: TensorName,
    pub sketch: FeatureSketch,
}

/// Inference errors by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ErrorCounts {
    /// Requests refused for shape, dtype or NaN policy.
    pub invalid_input: u64,
    /// The model failed while running.
    pub runtime: u64,
    /// The model exceeded its time limit.
    pub timeout: u64,
    /// Refused because no model was active.
    pub unavailable: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.invalid_input
            .saturating_add(self.runtime)
            .saturating_add(self.timeout)
            .saturating_add(self.unavailable)
    }
}

/// How the shadow model compared with the active one over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ShadowStats {
    pub model: ModelRef,
    pub compared: u64,
    /// Requests dropped because the shadow queue was full.
    pub dropped: u64,
    pub errors: u64,
    pub argmax_agree: u64,
    /// Sum over compared requests of the mean absolute output difference.
    pub abs_diff_sum: f64,
    pub latency: LatencyHistogram,
    /// Ground truth fed back over the window, scored against the shadow's own predictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackStats>,
}

/// Ground-truth feedback received through the local API over the window, scored against the
/// model's prediction (see [`crate::manifest::PredictionSpec`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct FeedbackStats {
    /// Predictions given their ground truth.
    pub count: u64,
    /// Classification: predictions that matched the label.
    pub correct: u64,
    /// Regression: sum of absolute and squared errors.
    pub abs_error_sum: f64,
    pub sq_error_sum: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ResourceUsage {
    /// Agent CPU over the window, in percent of one core.
    pub cpu_percent: f32,
    pub rss_bytes: u64,
}

/// A lifecycle event on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct DeviceEvent {
    pub at: Timestamp,
    pub kind: EventKind,
    /// The model the event is about.
    pub model: Option<ModelRef>,
    /// The assignment being carried out, if any.
    pub assignment_seq: Option<u64>,
    /// Human-readable detail (the error message, for failures).
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An assignment was accepted and the bundle download started.
    Downloading,
    /// The bundle verified and was installed (not yet active).
    Installed,
    /// The model passed its health check and serves.
    Activated,
    /// The model was replaced by `to` (the previous model) because of `reason`.
    RolledBack {
        reason: FailureCode,
        to: Option<ModelRef>,
    },
    /// The assignment could not be carried out; the old model keeps serving.
    InstallFailed {
        reason: FailureCode,
    },
    /// The shadow model started or stopped.
    ShadowStarted,
    ShadowStopped,
    /// The on-disk spool was full or too old and dropped reports.
    SpoolDropped {
        count: u64,
        first_seq: u64,
        last_seq: u64,
    },
}

/// Machine-readable failure reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    Signature,
    Expired,
    Downgrade,
    Replay,
    WrongDevice,
    WrongArch,
    AgentTooOld,
    ManifestMismatch,
    PayloadHash,
    Download,
    DownloadStalled,
    NoSpace,
    Io,
    ModelLoad,
    UnsupportedOp,
    GoldenMismatch,
    LatencyBudget,
    ErrorRate,
    Crash,
    Operator,
}

/// A batch of captured samples ready on the device for upload (data capture is opt-in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct CaptureNotice {
    pub model: ModelRef,
    pub batch: u64,
    pub samples: u32,
    pub bytes: u64,
    pub sha256: Sha256Digest,
    pub first_at: Timestamp,
    pub last_at: Timestamp,
}

/// Controller → device message on the ack topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ControllerMessage {
    pub v: u16,
    pub device: DeviceId,
    pub sent_at: Timestamp,
    pub body: ControllerBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum ControllerBody {
    /// These report sequence numbers are committed; the device may delete them from its spool.
    Ack { seqs: Vec<u64> },
    /// A capture batch may be uploaded to this URL (or was refused).
    CaptureUpload { batch: u64, url: Option<String> },
}

impl ControllerMessage {
    pub fn new(device: DeviceId, sent_at: Timestamp, body: ControllerBody) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            device,
            sent_at,
            body,
        }
    }

    pub fn seal(&self, key: &DeviceMacKey) -> Vec<u8> {
        seal(Domain::ControllerMessage, key, codec::encode(self))
    }

    /// Opens a frame the device received on its own topic (`me`).
    pub fn open(key: &DeviceMacKey, me: &DeviceId, bytes: &[u8]) -> Result<Self, FrameError> {
        let message: ControllerMessage = open(
            "controller message",
            Domain::ControllerMessage,
            key,
            me,
            bytes,
        )?;
        if message.v != PROTOCOL_VERSION {
            return Err(DecodeError::Version {
                what: "controller message",
                found: message.v,
                supported: PROTOCOL_VERSION,
            }
            .into());
        }
        if &message.device != me {
            return Err(FrameError::DeviceMismatch {
                topic_device: me.to_string(),
                body_device: message.device.to_string(),
            });
        }
        Ok(message)
    }
}

/// The receiver's replay guard for one device's reports: each sequence number is accepted once,
/// in any order. Everything below `below` has been seen; `seen` holds the accepted numbers above
/// it (gaps are reports still in flight or lost).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqWindow {
    pub below: u64,
    pub seen: Vec<u64>,
}

impl SeqWindow {
    /// Gaps older than this many accepted reports are given up on (the device's spool dropped or
    /// will never resend them), so the window stays bounded.
    pub const MAX_TRACKED: usize = 4096;

    /// Whether `seq` is new; if so it is recorded.
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq < self.below {
            return false;
        }
        let Err(at) = self.seen.binary_search(&seq) else {
            return false;
        };
        self.seen.insert(at, seq);
        while self.seen.first() == Some(&self.below) {
            self.seen.remove(0);
            self.below += 1;
        }
        if self.seen.len() > Self::MAX_TRACKED {
            let oldest = self.seen.remove(0);
            self.below = oldest + 1;
            while self.seen.first() == Some(&self.below) {
                self.seen.remove(0);
                self.below += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ControllerBody, DeviceBody, Status};

    fn status(device: &str, seq: u64) -> DeviceMessage {
        DeviceMessage::new(
            DeviceId::new(device).unwrap(),
            seq,
            Timestamp(1),
            DeviceBody::Status(Status {
                online: true,
                agent_version: String::from("0.1.0"),
                arch: Arch::new("x86_64").unwrap(),
                active: None,
                previous: None,
                shadow: None,
                assignment_seq: 0,
                uptime_s: 0,
            }),
        )
    }

    #[test]
    fn device_a_cannot_speak_for_device_b() {
        let (key_a, key_b) = (DeviceMacKey([1; 32]), DeviceMacKey([2; 32]));
        let b = DeviceId::new("b").unwrap();
        // A's frame replayed on B's topic: the controller checks it with B's key.
        let frame = status("a", 1).seal(&key_a);
        assert_eq!(
            DeviceMessage::open(&key_b, &b, &frame).unwrap_err(),
            FrameError::BadMac {
                device: String::from("b")
            }
        );
        // A forges a body naming B and MACs it with its own key, on its own topic.
        let forged = status("b", 1).seal(&key_a);
        let err = DeviceMessage::open(&key_a, &DeviceId::new("a").unwrap(), &forged).unwrap_err();
        assert_eq!(
            err,
            FrameError::DeviceMismatch {
                topic_device: String::from("a"),
                body_device: String::from("b")
            }
        );
        // A device frame is not a controller frame, even with the right key.
        assert!(matches!(
            ControllerMessage::open(&key_b, &b, &status("b", 1).seal(&key_b)),
            Err(FrameError::BadMac { .. })
        ));
        let ack = ControllerMessage::new(
            b.clone(),
            Timestamp(0),
            ControllerBody::Ack { seqs: vec![1] },
        )
        .seal(&key_b);
        assert!(matches!(
            DeviceMessage::open(&key_b, &b, &ack),
            Err(FrameError::BadMac { .. })
        ));
    }

    #[test]
    fn replayed_reports_are_refused_and_out_of_order_ones_accepted_once() {
        let mut window = SeqWindow {
            below: 1,
            seen: Vec::new(),
        };
        for seq in [1, 2, 5, 3] {
            assert!(window.accept(seq), "{seq}");
        }
        for replay in [1, 2, 3, 5] {
            assert!(!window.accept(replay), "{replay} replayed");
        }
        assert_eq!((window.below, window.seen.clone()), (4, vec![5]));
        assert!(window.accept(4));
        assert_eq!((window.below, window.seen.len()), (6, 0));
    }

    #[test]
    fn the_replay_window_stays_bounded() {
        let mut window = SeqWindow {
            below: 1,
            seen: Vec::new(),
        };
        // Seq 1 never arrives; thousands after it do.
        for seq in 2..(SeqWindow::MAX_TRACKED as u64 + 10) {
            assert!(window.accept(seq));
        }
        assert!(window.seen.len() <= SeqWindow::MAX_TRACKED);
        assert!(!window.accept(1), "a gap given up on stays closed");
    }
}
