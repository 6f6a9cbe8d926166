//! A real Mosquitto broker for tests: a throwaway PKI (rcgen), mutual TLS on a loopback port,
//! `use_identity_as_username` and the per-device ACL patterns from the protocol crate, no
//! persistence. Killed with SIGKILL and restarted on the same port for outage tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::agent::{free_port, wait_until};

/// A certificate and key as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that issues the broker's and clients' certificates.
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// The fleet CA ("EdgeFleet test fleet CA").
    pub fn new(dir: &Path) -> Self {
        Self::named(dir, "EdgeFleet test fleet CA")
    }

    /// A CA with common name `name`: another fleet's, or an impostor's that copies the name.
    pub fn named(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write CA");
        Self {
            dir: dir.to_owned(),
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// Signs a device's CSR, which must name `cn`; returns the certificate PEM.
    pub fn sign_csr(&self, csr_pem: &str, cn: &str) -> Result<String, String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("unreadable CSR: {e}"))?;
        let named = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                rcgen::DnValue::Utf8String(s) => Some(s.clone()),
                _ => None,
            });
        if named.as_deref() != Some(cn) {
            return Err(format!("CSR names {named:?}, not {cn}"));
        }
        csr.signed_by(&self.issuer)
            .map(|c| c.pem())
            .map_err(|e| e.to_string())
    }

    /// Issues a certificate with common name `cn` (and `sans` as subject alternative names).
    pub fn issue(&self, cn: &str, sans: &[&str]) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{cn}.pem")),
            key: self.dir.join(format!("{cn}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A rustls server config (ring provider, no client authentication) for an HTTPS server on
    /// loopback: a certificate named `cn`, issued by this CA, for `127.0.0.1` and `localhost`.
    pub fn https_server_config(&self, cn: &str) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let files = self.issue(cn, &["127.0.0.1", "localhost"]);
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .expect("read the server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("a readable server certificate");
        let key = PrivateKeyDer::from_pem_file(&files.key).expect("read the server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate and key");
        Arc::new(config)
    }
}

/// The Mosquitto binary (Debian installs it in /usr/sbin, which may not be on PATH).
fn mosquitto_bin() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("mosquitto")
    }
}

/// Whether Mosquitto can run here. Tests needing it may skip locally, never in CI.
pub fn mosquitto_available() -> bool {
    let found = Command::new(mosquitto_bin())
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto must be installed in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
    }
    found
}

#[derive(Debug)]
pub struct Mosquitto {
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts Mosquitto with mTLS on a free loopback port. `controller_cn` may read and write
    /// every fleet topic; devices only their own (`%u` = certificate common name).
    pub fn start(pki: &TestPki, dir: &Path, controller_cn: &str) -> Self {
        std::fs::create_dir_all(dir).expect("broker dir");
        let server = pki.issue("broker", &["localhost", "127.0.0.1"]);
        let addr = free_port();
        let acl = dir.join("acl");
        let mut acl_text = format!("user {controller_cn}\ntopic readwrite edgefleet/#\n\n");
        for line in edgefleet_protocol::topics::mosquitto_acl_patterns() {
            acl_text.push_str(&line);
            acl_text.push('\n');
        }
        std::fs::write(&acl, acl_text).expect("write acl");
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "per_listener_settings false\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                 listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n\
                 use_identity_as_username true\nallow_anonymous false\nacl_file {acl}\nmax_packet_size 262144\n",
                port = addr.port(),
                ca = pki.ca.display(),
                cert = server.cert.display(),
                key = server.key.display(),
                acl = acl.display(),
            ),
        )
        .expect("write mosquitto.conf");
        let mut broker = Self {
            addr,
            config,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        broker.spawn();
        broker
    }

    /// Runs the configuration `edgefleet-controller mosquitto-config` wrote into `out` for a
    /// listener on `addr`. The harness adds only logging to a file and, when the tests run as
    /// root, `user root`: as root Mosquitto otherwise switches to the `mosquitto` user, which
    /// cannot read the controller's private data directory (where the CRL is).
    pub fn start_generated(out: &Path, addr: SocketAddr) -> Self {
        let mut text =
            std::fs::read_to_string(out.join("mosquitto.conf")).expect("read mosquitto.conf");
        text.push_str(
            "\n# test harness\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
        );
        if rustix::process::geteuid().is_root() {
            text.push_str("user root\n");
        }
        let config = out.join("harness.conf");
        std::fs::write(&config, text).expect("write harness.conf");
        let mut broker = Self {
            addr,
            config,
            log: out.join("mosquitto.log"),
            child: None,
        };
        broker.spawn();
        broker
    }

    /// The broker's process id (for a reload signal).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let (addr, log) = (self.addr, self.log.clone());
        let child = self.child.as_mut().expect("just spawned");
        wait_until(Duration::from_secs(10), "mosquitto to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "mosquitto exited ({status}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(addr).ok()
        });
    }

    /// SIGKILL: the broker loses every session and in-flight message.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
