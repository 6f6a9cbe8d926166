//! Silero VAD through the local agent: each call sends one 512-sample frame (32 ms at 16 kHz)
//! behind the previous frame's last 64 samples as `input f32[1,576]`, with the recurrent
//! `state f32[2,1,128]` the previous call returned as `stateN`, and reads the speech
//! probability from `output f32[1,1]`. The state belongs to one model: when the agent starts
//! answering with another model (a rollout or a rollback on the device), it starts again from
//! zeros. Calls the agent cannot answer for a moment (its model worker restarting, no model yet)
//! are retried until `retry_for` has passed.

use std::time::{Duration, Instant};

use edgefleet_client::{Client, ClientError, ModelInfo, Tensor};

/// New samples per call.
pub const FRAME: usize = 512;
/// Samples of the previous frame sent before each new one.
pub const CONTEXT: usize = 64;
/// Recurrent state: `[2, 1, 128]`.
const STATE_SHAPE: [u64; 3] = [2, 1, 128];
const STATE_LEN: usize = 256;

/// Why the detector stopped.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(
        "the agent's active model {model} is not Silero VAD 16 kHz ({why}); assign a silero_vad_openvino_16k bundle to this device"
    )]
    NotSilero { model: String, why: String },
    #[error(
        "the agent has no active model after {waited_s} s; install or assign a Silero VAD bundle, or wait longer with --retry-s"
    )]
    NoModel { waited_s: u64 },
    #[error("the agent did not answer for {waited_s} s: {source}")]
    Agent {
        waited_s: u64,
        #[source]
        source: ClientError,
    },
    #[error("the agent's answer lacks `{0}`; is this a Silero VAD 16 kHz model?")]
    MissingOutput(&'static str),
}

/// Checks that `info` describes the Silero VAD 16 kHz interface this program drives.
pub fn check_model(info: &ModelInfo) -> Result<(), DetectorError> {
    let expected: [(&str, &[Option<u64>]); 2] = [
        ("input", &[Some(1), Some((CONTEXT + FRAME) as u64)]),
        ("state", &[Some(2), Some(1), Some(128)]),
    ];
    let model = format!("{}@{}", info.model.name, info.model.version);
    for (name, shape) in expected {
        match info.inputs.iter().find(|t| t.name == name) {
            Some(tensor) if tensor.shape == shape && tensor.dtype == "f32" => {}
            Some(tensor) => {
                return Err(DetectorError::NotSilero {
                    model,
                    why: format!(
                        "input `{name}` is {} {:?}, expected f32 {shape:?}",
                        tensor.dtype, tensor.shape
                    ),
                });
            }
            None => {
                return Err(DetectorError::NotSilero {
                    model,
                    why: format!("it has no input `{name}`"),
                });
            }
        }
    }
    for name in ["output", "stateN"] {
        if !info.outputs.iter().any(|t| t.name == name) {
            return Err(DetectorError::NotSilero {
                model,
                why: format!("it has no output `{name}`"),
            });
        }
    }
    Ok(())
}

/// Whether a failed call may succeed if tried again soon.
fn transient(err: &ClientError) -> bool {
    match err {
        ClientError::Connect { .. } | ClientError::Io(_) => true,
        // 503: no model active yet, or the worker is being replaced.
        ClientError::Api { status, .. } => *status == 503,
        ClientError::Protocol(_) => false,
    }
}

/// Streams frames to the agent, carrying the context and the recurrent state.
#[derive(Debug)]
pub struct Detector {
    client: Client,
    retry_for: Duration,
    state: Vec<f32>,
    context: [f32; CONTEXT],
    /// Digest of the model the state came from.
    digest: Option<String>,
    /// Frames sent and the agent's summed inference time, for the summary.
    pub frames: u64,
    pub latency_us: u64,
    /// How often the model changed mid-stream (the state was reset).
    pub model_changes: u64,
}

impl Detector {
    /// Waits (up to `retry_for`) for the agent to serve a model, and checks it is Silero VAD.
    pub fn connect(
        mut client: Client,
        retry_for: Duration,
    ) -> Result<(Self, ModelInfo), DetectorError> {
        let started = Instant::now();
        let info = loop {
            match client.model() {
                Ok(info) => break info,
                Err(err) if transient(&err) && started.elapsed() < retry_for => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(err) if err.status() == Some(503) => {
                    return Err(DetectorError::NoModel {
                        waited_s: started.elapsed().as_secs(),
                    });
                }
                Err(source) => {
                    return Err(DetectorError::Agent {
                        waited_s: started.elapsed().as_secs(),
                        source,
                    });
                }
            }
        };
        check_model(&info)?;
        let detector = Self {
            client,
            retry_for,
            state: vec![0.0; STATE_LEN],
            context: [0.0; CONTEXT],
            digest: Some(info.model.digest.clone()),
            frames: 0,
            latency_us: 0,
            model_changes: 0,
        };
        Ok((detector, info))
    }

    /// The speech probability of `frame` (exactly `FRAME` samples; pad the last one).
    pub fn probability(&mut self, frame: &[f32; FRAME]) -> Result<f32, DetectorError> {
        let mut input = Vec::with_capacity(CONTEXT + FRAME);
        input.extend_from_slice(&self.context);
        input.extend_from_slice(frame);
        let inputs = [
            (
                "input",
                Tensor::f32(vec![1, (CONTEXT + FRAME) as u64], input),
            ),
            (
                "state",
                Tensor::f32(STATE_SHAPE.to_vec(), self.state.clone()),
            ),
        ];
        let started = Instant::now();
        let reply = loop {
            match self.client.infer(&inputs) {
                Ok(reply) => break reply,
                Err(err) if transient(&err) && started.elapsed() < self.retry_for => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(DetectorError::Agent {
                        waited_s: started.elapsed().as_secs(),
                        source,
                    });
                }
            }
        };
        let probability = reply
            .outputs
            .get("output")
            .and_then(|t| t.data.first())
            .copied()
            .ok_or(DetectorError::MissingOutput("output"))? as f32;
        let state = reply
            .outputs
            .get("stateN")
            .filter(|t| t.data.len() == STATE_LEN)
            .ok_or(DetectorError::MissingOutput("stateN"))?
            .to_f32();
        if self.digest.as_deref() == Some(reply.model.digest.as_str()) {
            self.state = state;
        } else {
            // Another model answered: its state is not this one's. Start it from zeros.
            self.model_changes += 1;
            self.digest = Some(reply.model.digest);
            self.state = vec![0.0; STATE_LEN];
        }
        self.context.copy_from_slice(&frame[FRAME - CONTEXT..]);
        self.frames += 1;
        self.latency_us += reply.latency_us;
        Ok(probability)
    }
}
