//! A test enrollment endpoint (the controller's `/api/v1/enroll`) over HTTP on loopback:
//! one-time tokens, CSRs signed by the test PKI.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use edgefleet_protocol::enroll::{
    ENROLL_VERSION, EnrollError, EnrollErrorDetail, EnrollRequest, EnrollResponse,
};

use crate::broker::TestPki;

#[derive(Debug)]
pub struct EnrollServer {
    pub addr: SocketAddr,
    pub tokens: Arc<Mutex<BTreeSet<String>>>,
}

impl EnrollServer {
    pub fn start(pki: Arc<TestPki>, mac_key_hex: String, mqtt_url: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tokens: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let shared = tokens.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let (status, answer) = match serde_json::from_slice::<EnrollRequest>(&body) {
                    Err(err) => (400, refusal("bad_request", &err.to_string())),
                    Ok(request) if !shared.lock().expect("tokens").remove(&request.token) => (
                        403,
                        refusal(
                            "bad_token",
                            "the enrollment token is unknown or was used already",
                        ),
                    ),
                    Ok(request) => match pki.sign_csr(&request.csr_pem, request.device.as_str()) {
                        Err(err) => (400, refusal("bad_csr", &err)),
                        Ok(certificate_pem) => (
                            200,
                            serde_json::to_string(&EnrollResponse {
                                v: ENROLL_VERSION,
                                device: request.device,
                                certificate_pem,
                                ca_pem: std::fs::read_to_string(&pki.ca).expect("ca"),
                                mac_key_hex: mac_key_hex.clone(),
                                mqtt_url: mqtt_url.clone(),
                            })
                            .expect("json"),
                        ),
                    },
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Self { addr, tokens }
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
