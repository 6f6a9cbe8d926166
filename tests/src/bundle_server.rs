//! A small HTTP/1.1 server for bundles on a loopback port, with `Range` support and faults on
//! demand: cut the next response after N body bytes, corrupt a byte, or trickle slowly.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    pub fn start() -> Self {
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
                let (files, faults, requests) = (files.clone(), faults.clone(), requests.clone());
                std::thread::spawn(move || serve(stream, &files, &faults, &requests));
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
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn serve(
    stream: std::net::TcpStream,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    faults: &Mutex<Faults>,
    requests: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
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
        let Some(mut body) = files.lock().expect("files").get(&path).cloned() else {
            let _ = write!(
                writer,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
            );
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
            if writer.write_all(chunk).is_err() {
                return;
            }
            if let Some(pause) = trickle {
                std::thread::sleep(pause);
            }
        }
        if cut.is_some() {
            let _ = writer.flush();
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}
