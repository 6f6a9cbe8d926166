//! Client for the EdgeFleet agent's local inference API, for programs on the device.
//!
//! ```no_run
//! use edgefleet_client::{Client, Tensor};
//! let mut client = Client::unix("/var/lib/edgefleet/agent.sock");
//! let reply = client.infer(&[("input", Tensor::f32(vec![1, 4], vec![0.1, 0.2, 0.3, 0.4]))]).unwrap();
//! println!("{} {}: {:?}", reply.model.name, reply.model.version, reply.outputs["y"].data);
//! ```
//!
//! Blocking, one keep-alive connection per client, over TCP (loopback) or a Unix socket; bodies
//! are CBOR by default (JSON with [`Client::json`]).

pub mod api;
mod http;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use api::{ErrorBody, InferRequest, InferResponse, ModelInfo, ModelSummary, Tensor};
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
        let response = self
            .conn
            .request("POST", "/v1/infer", Some((content_type, &body)))?;
        response.decode()
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
