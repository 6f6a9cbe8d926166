//! A test enrollment endpoint (the controller's `/api/v1/enroll`) over HTTPS on loopback:
//! one-time tokens, CSRs signed by the test PKI. Its server certificate is issued by the test PKI
//! too, for `127.0.0.1` and `localhost`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_protocol::enroll::{
    ENROLL_VERSION, EnrollError, EnrollErrorDetail, EnrollRequest, EnrollResponse,
};

use crate::broker::TestPki;

/// Largest request body the endpoint reads.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub struct EnrollServer {
    pub addr: SocketAddr,
    pub tokens: Arc<Mutex<BTreeSet<String>>>,
}

/// What answering one enrollment needs.
struct Endpoint {
    pki: Arc<TestPki>,
    tokens: Arc<Mutex<BTreeSet<String>>>,
    mac_key_hex: String,
    mqtt_url: String,
}

impl EnrollServer {
    pub fn start(pki: Arc<TestPki>, mac_key_hex: String, mqtt_url: String) -> Self {
        let tls = pki.https_server_config("enroll-server");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tokens: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let endpoint = Arc::new(Endpoint {
            pki,
            tokens: tokens.clone(),
            mac_key_hex,
            mqtt_url,
        });
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (tls, endpoint) = (tls.clone(), endpoint.clone());
                std::thread::spawn(move || endpoint.serve(stream, tls));
            }
        });
        Self { addr, tokens }
    }

    /// The URL the agent enrolls with (`enroll.url`).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Endpoint {
    /// Answers one request on one connection, then closes it.
    fn serve(&self, stream: TcpStream, tls: Arc<rustls::ServerConfig>) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        let Ok(connection) = rustls::ServerConnection::new(tls) else {
            return;
        };
        let mut reader = BufReader::new(rustls::StreamOwned::new(connection, stream));
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                // A client that refuses the certificate, or goes away, ends the handshake here.
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length.min(MAX_BODY)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, answer) = self.answer(&body);
        let stream = reader.get_mut();
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
            answer.len()
        );
        stream.conn.send_close_notify();
        let _ = stream.flush();
    }

    fn answer(&self, body: &[u8]) -> (u16, String) {
        match serde_json::from_slice::<EnrollRequest>(body) {
            Err(err) => (400, refusal("bad_request", &err.to_string())),
            Ok(request) if !self.tokens.lock().expect("tokens").remove(&request.token) => (
                403,
                refusal(
                    "bad_token",
                    "the enrollment token is unknown or was used already",
                ),
            ),
            Ok(request) => match self.pki.sign_csr(&request.csr_pem, request.device.as_str()) {
                Err(err) => (400, refusal("bad_csr", &err)),
                Ok(certificate_pem) => (
                    200,
                    serde_json::to_string(&EnrollResponse {
                        v: ENROLL_VERSION,
                        device: request.device,
                        certificate_pem,
                        ca_pem: std::fs::read_to_string(&self.pki.ca).expect("ca"),
                        mac_key_hex: self.mac_key_hex.clone(),
                        mqtt_url: self.mqtt_url.clone(),
                    })
                    .expect("json"),
                ),
            },
        }
    }
}

fn refusal(code: &str, message: &str) -> String {
    serde_json::to_string(&EnrollError {
        error: EnrollErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
        },
    })
    .expect("json")
}
