//! Data capture, off unless the controller turns it on for a device: the settings it signs into
//! the device's [`crate::Assignment`], and the batch file the device uploads — sampled inference
//! inputs, optionally the outputs and the ground truth fed back for those predictions — for
//! retraining.
//!
//! A device collects records into a batch, announces a closed batch with a
//! [`crate::messages::CaptureNotice`] (size and SHA-256 of the encoded [`CaptureBatch`]), and
//! uploads it when the controller answers with
//! [`crate::messages::ControllerBody::CaptureUpload`].

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::ids::DeviceId;
use crate::manifest::NamedTensor;
use crate::messages::ModelRef;
use crate::time::Timestamp;

/// The batch file format this build writes and reads.
pub const CAPTURE_FORMAT: u16 = 1;
/// Upper bound on one encoded batch; a device closes a batch before it grows past this.
pub const MAX_CAPTURE_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// `rate_ppm` of a device that captures every answered request.
pub const PPM: u32 = 1_000_000;

/// What a device captures. Part of the signed assignment, so only the controller turns it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    /// The fraction of answered inference requests captured, in parts per million
    /// (1 to [`PPM`]); each request is drawn independently.
    pub rate_ppm: u32,
    /// A batch is closed when it holds this many samples…
    pub max_batch_samples: u32,
    /// …or this many seconds after its first record, whichever comes first.
    pub max_batch_age_s: u32,
    /// Capture the model's outputs beside its inputs.
    pub outputs: bool,
    /// Capture the ground truth fed back (`POST /v1/feedback`) for captured predictions.
    pub feedback: bool,
}

impl CaptureSettings {
    /// Bounds on `max_batch_samples` and `max_batch_age_s`.
    pub const MAX_BATCH_SAMPLES: u32 = 100_000;
    pub const MAX_BATCH_AGE_S: u32 = 86_400;

    /// Checks the settings are in range; the message names the field and its bounds.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=PPM).contains(&self.rate_ppm) {
            return Err(format!(
                "capture rate {} ppm must be between 1 and {PPM} (a fraction in (0, 1])",
                self.rate_ppm
            ));
        }
        if !(1..=Self::MAX_BATCH_SAMPLES).contains(&self.max_batch_samples) {
            return Err(format!(
                "max_batch_samples {} must be between 1 and {}",
                self.max_batch_samples,
                Self::MAX_BATCH_SAMPLES
            ));
        }
        if !(1..=Self::MAX_BATCH_AGE_S).contains(&self.max_batch_age_s) {
            return Err(format!(
                "max_batch_age_s {} must be between 1 and {}",
                self.max_batch_age_s,
                Self::MAX_BATCH_AGE_S
            ));
        }
        Ok(())
    }

    /// Whether a uniform draw `u` in [0, 1) selects a request.
    pub fn selects(&self, u: f64) -> bool {
        u * f64::from(PPM) < f64::from(self.rate_ppm)
    }
}

/// The ground truth for one prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// The true class index (classification).
    Label(u32),
    /// The true value (regression).
    Value(f64),
}

/// One captured inference request, as the model saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct CapturedSample {
    /// The prediction id `/v1/infer` answered with.
    pub prediction: u64,
    pub at: Timestamp,
    /// The inputs after the schema check, in the model's element types.
    pub inputs: Vec<NamedTensor>,
    /// Empty unless the settings capture outputs.
    pub outputs: Vec<NamedTensor>,
}

/// Ground truth fed back for a captured prediction (it may land in a later batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct CapturedFeedback {
    pub prediction: u64,
    pub at: Timestamp,
    pub truth: Truth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum CaptureRecord {
    Sample(CapturedSample),
    Feedback(CapturedFeedback),
}

impl CaptureRecord {
    pub fn at(&self) -> Timestamp {
        match self {
            CaptureRecord::Sample(s) => s.at,
            CaptureRecord::Feedback(f) => f.at,
        }
    }
}

/// One uploaded batch: the records of one model on one device, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct CaptureBatch {
    pub format: u16,
    pub device: DeviceId,
    /// Per device, never reused.
    pub batch: u64,
    pub model: ModelRef,
    pub records: Vec<CaptureRecord>,
}

impl CaptureBatch {
    /// Decodes an uploaded batch (at most [`MAX_CAPTURE_BATCH_BYTES`]) and checks its format.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let batch: CaptureBatch =
            codec::decode("capture batch", bytes, MAX_CAPTURE_BATCH_BYTES as usize)?;
        if batch.format != CAPTURE_FORMAT {
            return Err(DecodeError::Version {
                what: "capture batch",
                found: batch.format,
                supported: CAPTURE_FORMAT,
            });
        }
        Ok(batch)
    }

    /// Captured samples in the batch.
    pub fn samples(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r, CaptureRecord::Sample(_)))
            .count()
    }
}

#[cfg(test)]
mod tests;
