//! Ground truth for recent predictions. The worker remembers what the model predicted for each
//! answered request — read from the output the manifest's [`PredictionSpec`] names — in a log
//! bounded by count and age; feedback (`POST /v1/feedback`) joins a prediction once, and the
//! outcome (correct or not; the error of a value) is counted into the telemetry window.
//!
//! Prediction ids are unique per worker process: a random prefix in the high bits and a counter
//! below it, so an id from before a restart or a model swap cannot match a prediction of the
//! worker serving now (it gets "unknown"). They stay below 2^53, exact in JSON.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use edgefleet_protocol::capture::Truth;
use edgefleet_protocol::manifest::{NamedTensor, PredictionKind, PredictionSpec};
use edgefleet_protocol::messages::FeedbackStats;

/// Bits of a prediction id below its per-worker prefix.
const COUNTER_BITS: u32 = 32;
/// Bits of the random per-worker prefix (ids stay below 2^53).
const PREFIX_BITS: u32 = 21;

/// How many predictions the log keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackLimits {
    pub max_predictions: usize,
    pub max_age: Duration,
}

/// What the model predicted for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// A class index among `classes` (2 for a single score read at a threshold).
    Class {
        class: u32,
        classes: u32,
    },
    Value(f64),
    /// The request cannot be scored (several rows, or an output that does not fit the kind);
    /// the reason is what a feedback caller is told.
    Unscorable(String),
}

impl Prediction {
    /// Reads the prediction `spec` names from a request's outputs.
    pub fn read(spec: &PredictionSpec, outputs: &[NamedTensor]) -> Prediction {
        let Some(output) = outputs.iter().find(|o| o.name == spec.output) else {
            return Prediction::Unscorable(format!(
                "the model answered without its prediction output {}",
                spec.output
            ));
        };
        let values = output.data.to_f64_vec();
        let width = output.shape.last().copied().unwrap_or(1).max(1) as usize;
        let rows = values.len() / width;
        if rows != 1 || values.len() % width != 0 {
            return Prediction::Unscorable(format!(
                "the request covered {rows} rows of output {}; feedback scores requests of one row",
                spec.output
            ));
        }
        match spec.kind {
            PredictionKind::Classification { threshold } if width == 1 => Prediction::Class {
                class: u32::from(values[0] >= f64::from(threshold)),
                classes: 2,
            },
            PredictionKind::Classification { .. } => {
                let class = values
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                Prediction::Class {
                    class: u32::try_from(class).unwrap_or(u32::MAX),
                    classes: u32::try_from(width).unwrap_or(u32::MAX),
                }
            }
            PredictionKind::Regression if width != 1 => Prediction::Unscorable(format!(
                "output {} has {width} values per row; a regression prediction is one value",
                spec.output
            )),
            PredictionKind::Regression if !values[0].is_finite() => Prediction::Unscorable(
                format!("the model predicted {} (not a finite number)", values[0]),
            ),
            PredictionKind::Regression => Prediction::Value(values[0]),
        }
    }
}

/// How ground truth compared with a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Classification: whether the predicted class was the label.
    pub correct: Option<bool>,
    /// Regression: prediction minus truth.
    pub error: Option<f64>,
}

impl Outcome {
    /// Scores `truth` against `prediction`, or says why it does not fit.
    pub fn score(prediction: &Prediction, truth: Truth) -> Result<Outcome, String> {
        match (prediction, truth) {
            (Prediction::Unscorable(reason), _) => Err(reason.clone()),
            (Prediction::Class { class, classes }, Truth::Label(label)) => {
                if label >= *classes {
                    return Err(format!(
                        "label {label} does not fit: the model predicts classes 0 to {}",
                        classes - 1
                    ));
                }
                Ok(Outcome {
                    correct: Some(label == *class),
                    error: None,
                })
            }
            (Prediction::Class { .. }, Truth::Value(_)) => Err(String::from(
                "the model predicts a class: send `label` (the true class index), not `value`",
            )),
            (Prediction::Value(_), Truth::Label(_)) => Err(String::from(
                "the model predicts a value (regression): send `value`, not `label`",
            )),
            (Prediction::Value(predicted), Truth::Value(value)) => {
                let error = predicted - value;
                if !value.is_finite() || !(error * error).is_finite() {
                    return Err(format!(
                        "value {value} cannot be scored against the prediction {predicted}; send a finite number near the model's range"
                    ));
                }
                Ok(Outcome {
                    correct: None,
                    error: Some(error),
                })
            }
        }
    }

    /// Counts this outcome into a window's feedback.
    pub fn count(&self, stats: &mut FeedbackStats) {
        stats.count += 1;
        if self.correct == Some(true) {
            stats.correct += 1;
        }
        if let Some(error) = self.error {
            stats.abs_error_sum += error.abs();
            stats.sq_error_sum += error * error;
        }
    }
}

/// Why feedback was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    #[error(
        "prediction {id} is unknown here: it was not made by the model serving now (predictions made before the agent restarted or the model changed cannot get feedback)"
    )]
    Unknown { id: u64 },
    #[error(
        "prediction {id} has expired: the agent keeps the {max_predictions} most recent predictions for {max_age_s} s (feedback.max_predictions, feedback.max_age_s)"
    )]
    Expired {
        id: u64,
        max_predictions: usize,
        max_age_s: u64,
    },
    #[error("prediction {id} already has its ground truth; feedback counts once per prediction")]
    Twice { id: u64 },
    #[error("{0}")]
    Unfit(String),
}

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    at: Instant,
    prediction: Prediction,
    shadow: Option<Prediction>,
    answered: bool,
    captured: bool,
}

/// What accepted feedback joined.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    pub prediction: Prediction,
    pub outcome: Outcome,
    /// The shadow model's outcome, if it had predicted by then and its prediction fits.
    pub shadow: Option<Outcome>,
    /// Whether the request was captured (so its feedback is captured too).
    pub captured: bool,
}

/// Recent predictions of one worker, oldest first (ids increase).
#[derive(Debug)]
pub struct PredictionLog {
    limits: FeedbackLimits,
    entries: VecDeque<Entry>,
    /// The first id this worker hands out; ids below it are another worker's.
    first_id: u64,
    next_id: u64,
}

impl PredictionLog {
    /// A log whose ids start above `prefix << 32` (`prefix` is reduced to 21 bits, never 0).
    pub fn new(limits: FeedbackLimits, prefix: u64) -> Self {
        let prefix = (prefix % ((1 << PREFIX_BITS) - 1)) + 1;
        let first_id = (prefix << COUNTER_BITS) + 1;
        Self {
            limits,
            entries: VecDeque::new(),
            first_id,
            next_id: first_id,
        }
    }

    /// A log with a random id prefix.
    pub fn with_random_prefix(limits: FeedbackLimits) -> Self {
        Self::new(limits, fastrand::u64(..))
    }

    fn expire(&mut self, now: Instant) {
        while self.entries.len() > self.limits.max_predictions
            || self
                .entries
                .front()
                .is_some_and(|e| now.saturating_duration_since(e.at) > self.limits.max_age)
        {
            self.entries.pop_front();
        }
    }

    /// Remembers a prediction made at `now` and returns its id.
    pub fn record(&mut self, now: Instant, prediction: Prediction, captured: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if self.limits.max_predictions > 0 {
            self.entries.push_back(Entry {
                id,
                at: now,
                prediction,
                shadow: None,
                answered: false,
                captured,
            });
        }
        self.expire(now);
        id
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&id, |e| e.id).ok()
    }

    /// Adds the shadow model's prediction for `id` (if the log still holds it).
    pub fn record_shadow(&mut self, id: u64, prediction: Prediction) {
        if let Some(i) = self.position(id) {
            self.entries[i].shadow = Some(prediction);
        }
    }

    /// Joins ground truth to prediction `id` at `now`, once.
    pub fn feedback(
        &mut self,
        now: Instant,
        id: u64,
        truth: Truth,
    ) -> Result<Joined, FeedbackError> {
        self.expire(now);
        let Some(i) = self.position(id) else {
            return Err(if (self.first_id..self.next_id).contains(&id) {
                FeedbackError::Expired {
                    id,
                    max_predictions: self.limits.max_predictions,
                    max_age_s: self.limits.max_age.as_secs(),
                }
            } else {
                FeedbackError::Unknown { id }
            });
        };
        let entry = &mut self.entries[i];
        if entry.answered {
            return Err(FeedbackError::Twice { id });
        }
        let outcome = Outcome::score(&entry.prediction, truth).map_err(FeedbackError::Unfit)?;
        entry.answered = true;
        Ok(Joined {
            prediction: entry.prediction.clone(),
            outcome,
            shadow: entry
                .shadow
                .as_ref()
                .and_then(|p| Outcome::score(p, truth).ok()),
            captured: entry.captured,
        })
    }

    /// Predictions held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests;
