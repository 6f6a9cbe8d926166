//! Client for the EdgeFleet agent's local inference API, for programs on the device.
//!
//! ```no_run
//! use edgefleet_client::{Client, Tensor};
//! let mut client = Client::unix("/var/lib/edgefleet/agent.sock");
//! let reply = client.infer(&[("input", Tensor::f32(vec![1, 4], vec![0.1, 0.2, 0.3, 0.4]))]).unwrap();
//! println!("{} {}: {:?}", reply.model.name, reply.model.version, reply.outputs["y"].data);
//! ```
//!
//! Feedback: `client.feedback(reply.id, GroundTruth::Label(1))` sends the ground truth for a
//! prediction, for the fleet's accuracy figures.
//!
//! Blocking, one keep-alive connection per client, over TCP (loopback) or a Unix socket; bodies
//! are CBOR by default (JSON with [`Client::json`]).

pub mod api;
mod http;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use api::{
    ErrorBody, FeedbackRequest, FeedbackResponse, InferRequest, InferResponse, ModelInfo,
    ModelSummary, Tensor,
};
pub use http::Endpoint;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("connection to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent sent a malformed response: {0}")]
    Protocol(String),
    /// The agent answered with an error status.
    #[error("agent answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

impl ClientError {
    /// HTTP status of an API error (503 means no model is active).
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The ground truth for a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GroundTruth {
    /// The true class index (classification).
    Label(u32),
    /// The true value (regression).
    Value(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Cbor,
}

#[derive(Debug)]
pub struct Client {
    conn: http::Connection,
    encoding: Encoding,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            conn: http::Connection::new(endpoint),
            encoding: Encoding::Cbor,
        }
    }

    /// The agent's TCP address, e.g. `127.0.0.1:8470`.
    pub fn tcp(addr: std::net::SocketAddr) -> Self {
        Self::new(Endpoint::Tcp(addr))
    }

    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    /// Use JSON bodies instead of CBOR.
    pub fn json(mut self) -> Self {
        self.encoding = Encoding::Json;
        self
    }

    /// Runs the active model on named inputs.
    pub fn infer(&mut self, inputs: &[(&str, Tensor)]) -> Result<InferResponse, ClientError> {
        let request = InferRequest {
            inputs: inputs
                .iter()
                .map(|(name, tensor)| ((*name).to_owned(), tensor.clone()))
                .collect::<BTreeMap<_, _>>(),
            outputs: None,
        };
        self.infer_request(&request)
    }

    pub fn infer_request(&mut self, request: &InferRequest) -> Result<InferResponse, ClientError> {
        self.post("/v1/infer", request)
    }

    /// Sends the ground truth for prediction `id` (the `id` of an [`InferResponse`]). The agent
    /// answers 404 for an unknown or expired id, 409 when the prediction already has its
    /// ground truth, 422 when the truth does not fit the model (a label for a regression, a
    /// class it does not have).
    pub fn feedback(
        &mut self,
        id: u64,
        truth: GroundTruth,
    ) -> Result<FeedbackResponse, ClientError> {
        let (label, value) = match truth {
            GroundTruth::Label(label) => (Some(i64::from(label)), None),
            GroundTruth::Value(value) => (None, Some(value)),
        };
        self.post("/v1/feedback", &FeedbackRequest { id, label, value })
    }

    fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        request: &T,
    ) -> Result<R, ClientError> {
        let (content_type, body) = match self.encoding {
            Encoding::Json => (
                "application/json",
                serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?,
            ),
            Encoding::Cbor => {
                let mut body = Vec::new();
                ciborium::ser::into_writer(request, &mut body)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                ("application/cbor", body)
            }
        };
        self.conn
            .request("POST", path, Some((content_type, &body)))?
            .decode()
    }

    /// The active model and its schema.
    pub fn model(&mut self) -> Result<ModelInfo, ClientError> {
        self.conn.request("GET", "/v1/model", None)?.decode()
    }

    /// Request and shadow-comparison counters of the serving worker.
    pub fn stats(&mut self) -> Result<serde_json::Value, ClientError> {
        self.conn.request("GET", "/v1/stats", None)?.decode()
    }

    /// The agent's health: whether it serves and which model.
    pub fn health(&mut self) -> Result<serde_json::Value, ClientError> {
        self.conn.request("GET", "/healthz", None)?.decode()
    }
}
