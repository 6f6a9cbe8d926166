//! Harness for EdgeFleet's end-to-end tests: finds the workspace binaries, fetches the real ONNX
//! models the tests run (cached, sha256-checked), and runs commands with useful failure output.

pub mod agent;
pub mod broker;
pub mod bundle_server;
pub mod controller;
pub mod enroll_server;
pub mod fleet;
pub mod models;
pub mod peer;
pub mod postgres;
pub mod probe;

/// A rustls client config (ring provider) trusting `ca` and presenting `identity`.
pub fn mqtt_tls(ca: &Path, identity: &broker::CertFiles) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&identity.cert)
        .expect("read cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&identity.key).expect("read key");
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth")
}

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cargo target profile directory the test binary runs from (`target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    // target/debug/deps/e2e-<hash> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary. `cargo test` does not build other crates' binaries for this
/// crate, so `.ci/run` runs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// Runs a command and returns its output, with stdout and stderr as text.
#[derive(Debug)]
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

pub fn run(command: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs a command with `input` on its standard input (written from another thread, so a
/// command that answers while it reads cannot block on a full pipe).
pub fn run_with_input(command: &mut Command, input: &[u8]) -> Run {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    // A command that exits early closes the pipe; its output says why.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait for the command");
    let _ = writer.join();
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run_ok(command: &mut Command) -> Run {
    let description = format!("{command:?}");
    let out = run(command);
    assert!(
        out.success(),
        "{description} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// Runs a command that must fail; panics if it succeeds.
pub fn run_err(command: &mut Command) -> Run {
    let description = format!("{command:?}");
    let out = run(command);
    assert!(
        !out.success(),
        "{description} should have failed:\nstdout:\n{}",
        out.stdout
    );
    out
}
