//! The supervisor ↔ worker control channel: JSON lines over the worker's stdin and stdout.
//! The first line the supervisor writes is the [`WorkerSpec`]; after it, [`WorkerCommand`]s.
//! The worker writes [`WorkerEvent`]s. Logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;

use edgefleet_protocol::capture::CaptureSettings;
use edgefleet_protocol::messages::{ErrorCounts, FailureCode, FeedbackStats, NamedSketch};
use edgefleet_protocol::sketch::LatencyHistogram;
use serde::{Deserialize, Serialize};

use crate::store::Slot;

/// A model the worker should load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub slot: Slot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub active: Option<ModelSpec>,
    pub shadow: Option<ModelSpec>,
    pub listen: SocketAddr,
    pub socket: PathBuf,
    pub memory_limit_bytes: u64,
    pub max_body_bytes: usize,
    pub shadow_queue: usize,
    /// Predictions kept for feedback, and for how long.
    pub feedback_max_predictions: usize,
    pub feedback_max_age_s: u64,
    /// Data capture in force when the worker starts.
    pub capture: Option<CaptureSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerCommand {
    /// Start accepting requests.
    Serve,
    /// Stop accepting, finish in-flight requests, exit.
    Drain,
    /// Send the telemetry accumulated since the last `take_window` and start a new window.
    TakeWindow,
    /// Capture with these settings from now on (`None`: stop capturing).
    Capture(Option<CaptureSettings>),
}

/// What loading a model showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Slowest golden-vector (or smoke) inference, in microseconds.
    pub latency_us: u64,
    pub golden_vectors: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEvent {
    /// Models loaded and self-tested; waiting for `serve`. A shadow that failed is reported and
    /// left out.
    Loaded {
        active: Option<LoadReport>,
        shadow: Option<Result<LoadReport, String>>,
    },
    /// The active model failed to load or failed its self-test; the worker exits.
    LoadFailed { code: FailureCode, detail: String },
    /// Listening.
    Serving,
    /// Cumulative counters since the worker started.
    Stats(WorkerStats),
    /// The telemetry window asked for with `take_window`.
    Window(Box<WindowData>),
    /// A captured record of the active model: hex of the CBOR of `(ModelRef, CaptureRecord)`
    /// (CBOR keeps NaNs and byte strings, which JSON would not).
    Captured { cbor: String },
}

/// What the worker saw since the previous window: counts, latency, and sketches of the
/// manifest's features (at its reference bin edges) and of the outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowData {
    pub inferences: u64,
    pub errors: ErrorCounts,
    pub latency: LatencyHistogram,
    pub features: Vec<NamedSketch>,
    pub outputs: Vec<NamedSketch>,
    pub shadow: ShadowCounters,
    /// Ground truth fed back over the window, scored against the active model's predictions…
    pub feedback: FeedbackStats,
    /// …and against the shadow model's.
    pub shadow_feedback: FeedbackStats,
}

/// Cumulative request counters of one worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub requests: u64,
    pub ok: u64,
    pub invalid_input: u64,
    /// The model failed or panicked.
    pub runtime_errors: u64,
    /// Refused because no model was active.
    pub unavailable: u64,
    pub latency: LatencyHistogram,
    pub shadow: ShadowCounters,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowCounters {
    pub compared: u64,
    pub dropped: u64,
    pub errors: u64,
    pub argmax_agree: u64,
    pub abs_diff_sum: f64,
    pub latency: LatencyHistogram,
}

impl ShadowCounters {
    /// What was counted since `earlier` (both cumulative).
    pub fn since(&self, earlier: &ShadowCounters) -> ShadowCounters {
        let mut latency = self.latency.clone();
        for (bucket, old) in latency.buckets.iter_mut().zip(&earlier.latency.buckets) {
            *bucket = bucket.saturating_sub(*old);
        }
        ShadowCounters {
            compared: self.compared.saturating_sub(earlier.compared),
            dropped: self.dropped.saturating_sub(earlier.dropped),
            errors: self.errors.saturating_sub(earlier.errors),
            argmax_agree: self.argmax_agree.saturating_sub(earlier.argmax_agree),
            abs_diff_sum: self.abs_diff_sum - earlier.abs_diff_sum,
            latency,
        }
    }
}

impl WorkerStats {
    /// Errors the model is responsible for (not the caller's bad input).
    pub fn model_errors(&self) -> u64 {
        self.runtime_errors
    }
}
