//! Just enough HTTP/1.1 for the local API: one keep-alive connection, Content-Length bodies,
//! reconnect once if the agent closed an idle connection.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::de::DeserializeOwned;

use crate::ClientError;
use crate::api::ErrorBody;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "http://{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub(crate) struct Connection {
    endpoint: Endpoint,
    stream: Option<BufReader<Box<dyn Stream>>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

pub(crate) struct Response {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Response {
    pub(crate) fn decode<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let cbor = self.content_type.starts_with("application/cbor");
        if !(200..300).contains(&self.status) {
            let parsed: Option<ErrorBody> = if cbor {
                ciborium::de::from_reader(self.body.as_slice()).ok()
            } else {
                serde_json::from_slice(&self.body).ok()
            };
            let (code, message) = match parsed {
                Some(body) => (body.error.code, body.error.message),
                None => (
                    String::from("http"),
                    String::from_utf8_lossy(&self.body).into_owned(),
                ),
            };
            return Err(ClientError::Api {
                status: self.status,
                code,
                message,
            });
        }
        if cbor {
            ciborium::de::from_reader(self.body.as_slice())
                .map_err(|e| ClientError::Protocol(e.to_string()))
        } else {
            serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))
        }
    }
}

impl Connection {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            stream: None,
        }
    }

    fn connect(&self) -> Result<BufReader<Box<dyn Stream>>, ClientError> {
        let connect = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let stream: Box<dyn Stream> = match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr).map_err(connect)?;
                stream.set_nodelay(true).map_err(connect)?;
                Box::new(stream)
            }
            Endpoint::Unix(path) => Box::new(UnixStream::connect(path).map_err(connect)?),
        };
        Ok(BufReader::new(stream))
    }

    pub(crate) fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, ClientError> {
        let reused = self.stream.is_some();
        match self.try_request(method, path, body) {
            Ok(response) => Ok(response),
            // The agent may have closed an idle keep-alive connection: retry once on a new one.
            Err(ClientError::Io(_)) if reused => {
                self.stream = None;
                self.try_request(method, path, body)
            }
            Err(err) => {
                self.stream = None;
                Err(err)
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, ClientError> {
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: edgefleet-agent\r\naccept: application/cbor, application/json\r\n"
        );
        if let Some((content_type, bytes)) = body {
            head.push_str(&format!(
                "content-type: {content_type}\r\ncontent-length: {}\r\n",
                bytes.len()
            ));
        }
        head.push_str("\r\n");
        let writer = stream.get_mut();
        writer.write_all(head.as_bytes())?;
        if let Some((_, bytes)) = body {
            writer.write_all(bytes)?;
        }
        writer.flush()?;
        read_response(stream)
    }
}

fn read_response(stream: &mut BufReader<Box<dyn Stream>>) -> Result<Response, ClientError> {
    let mut head = Vec::with_capacity(512);
    loop {
        let before = head.len();
        let n = stream.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            )));
        }
        if head[before..] == *b"\r\n" || head.len() > 64 * 1024 {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol(String::from(
                "incomplete response head",
            )));
        }
        Err(err) => return Err(ClientError::Protocol(err.to_string())),
    }
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let content_type = header("content-type").unwrap_or_default();
    let length: usize = header("content-length")
        .ok_or_else(|| ClientError::Protocol(String::from("response without content-length")))?
        .trim()
        .parse()
        .map_err(|_| ClientError::Protocol(String::from("bad content-length")))?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(Response {
        status,
        content_type,
        body,
    })
}
