//! A small HTTPS (HTTP/1.1 over rustls) server for bundles on a loopback port, with `Range`
//! support and faults on demand: cut the next response after N body bytes (the TCP connection is
//! closed without a TLS close_notify, as when a link breaks), corrupt a byte, or trickle slowly.
//! Its certificate is issued by a [`TestPki`]: the fleet's, or another CA to test refusals.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::TestPki;

/// How long a connection may sit idle before the server drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Faults {
    /// Close the next response after this many body bytes.
    pub cut_next_after: Option<u64>,
    /// Flip the bit 0x01 of this absolute byte offset of `path` in every response.
    pub corrupt: Option<(String, u64)>,
    /// Pause after each 16 KiB of body.
    pub trickle: Option<Duration>,
}

#[derive(Debug)]
pub struct BundleServer {
    pub addr: SocketAddr,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub faults: Arc<Mutex<Faults>>,
    /// Each request as `"<path> <range header or ->"`.
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl BundleServer {
    /// Starts the server with a certificate for `127.0.0.1` issued by `pki`.
    pub fn start(pki: &TestPki) -> Self {
        let tls = pki.https_server_config("bundle-server");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind bundle server");
        let addr = listener.local_addr().expect("addr");
        let server = Self {
            addr,
            files: Arc::default(),
            faults: Arc::default(),
            requests: Arc::default(),
            stop: Arc::default(),
        };
        let (files, faults, requests, stop) = (
            server.files.clone(),
            server.faults.clone(),
            server.requests.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (files, faults, requests, tls) =
                    (files.clone(), faults.clone(), requests.clone(), tls.clone());
                std::thread::spawn(move || serve(stream, tls, &files, &faults, &requests));
            }
        });
        server
    }

    /// Serves `bytes` at `/bundles/<name>` and returns its URL.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> String {
        let path = format!("/bundles/{name}");
        self.files
            .lock()
            .expect("files")
            .insert(path.clone(), bytes);
        format!("https://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    faults: &Mutex<Faults>,
    requests: &Mutex<Vec<String>>,
) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(connection) = rustls::ServerConnection::new(tls) else {
        return;
    };
    // The handshake happens on the first read; a client that refuses the certificate ends it.
    let mut reader = BufReader::new(rustls::StreamOwned::new(connection, stream));
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_owned();
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                range = Some(value.trim().to_owned());
            }
        }
        requests
            .lock()
            .expect("requests")
            .push(format!("{path} {}", range.as_deref().unwrap_or("-")));
        let writer = reader.get_mut();
        let Some(mut body) = files.lock().expect("files").get(&path).cloned() else {
            let _ = write!(
                writer,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
            );
            let _ = writer.flush();
            continue;
        };
        let (cut, trickle) = {
            let mut faults = faults.lock().expect("faults");
            if let Some((corrupt_path, offset)) = &faults.corrupt
                && *corrupt_path == path
                && let Some(byte) = body.get_mut(*offset as usize)
            {
                *byte ^= 0x01;
            }
            (faults.cut_next_after.take(), faults.trickle)
        };
        let total = body.len() as u64;
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if start >= total && total > 0 {
            let _ = write!(
                writer,
                "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{total}\r\ncontent-length: 0\r\n\r\n"
            );
            let _ = writer.flush();
            continue;
        }
        let slice = &body[start as usize..];
        let head = if range.is_some() {
            format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {start}-{}/{total}\r\ncontent-length: {}\r\n\r\n",
                total - 1,
                slice.len()
            )
        } else {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", slice.len())
        };
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        let limit = cut.map_or(slice.len(), |cut| (cut as usize).min(slice.len()));
        for chunk in slice[..limit].chunks(16 * 1024) {
            if writer
                .write_all(chunk)
                .and_then(|()| writer.flush())
                .is_err()
            {
                return;
            }
            if let Some(pause) = trickle {
                std::thread::sleep(pause);
            }
        }
        if cut.is_some() {
            // Everything written so far goes out, then the connection breaks: no close_notify.
            let _ = writer.flush();
            let _ = writer.sock.shutdown(Shutdown::Both);
            return;
        }
    }
}
