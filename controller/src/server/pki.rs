//! The fleet CA: created on first start (rcgen), kept in `<data>/pki` (keys 0600). It issues the
//! devices' client certificates from their CSRs, the broker's and the device endpoint's server
//! certificate, and the controller's own MQTT client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::fsutil;

/// The controller's MQTT identity (certificate common name).
pub const CONTROLLER_CN: &str = "edgefleet-controller";
/// How long device certificates are valid.
pub const DEVICE_CERT_DAYS: i64 = 365;

/// PEM files of one certificate and its key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
pub struct FleetCa {
    pub dir: PathBuf,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A signed device certificate.
#[derive(Debug, Clone)]
pub struct DeviceCert {
    pub pem: String,
    pub serial: String,
}

impl FleetCa {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        fsutil::create_private_dir(dir)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let ca_pem = std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("cannot read {}", cert_path.display()))?;
                let key_pem = std::fs::read_to_string(&key_path)
                    .with_context(|| format!("cannot read {}", key_path.display()))?;
                let key = KeyPair::from_pem(&key_pem)
                    .with_context(|| format!("{} is not a readable key", key_path.display()))?;
                let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).with_context(|| {
                    format!("{} is not a readable CA certificate", cert_path.display())
                })?;
                Ok(Self {
                    dir: dir.to_owned(),
                    ca_pem,
                    issuer,
                })
            }
            (false, false) => {
                let key = KeyPair::generate().context("cannot generate the fleet CA key")?;
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params
                    .distinguished_name
                    .push(DnType::CommonName, "EdgeFleet fleet CA");
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                let now = OffsetDateTime::now_utc();
                params.not_before = now - Duration::days(1);
                params.not_after = now + Duration::days(365 * 20);
                let cert = params.self_signed(&key)?;
                fsutil::write_atomic(
                    &key_path,
                    key.serialize_pem().as_bytes(),
                    fsutil::SECRET_MODE,
                )?;
                fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), fsutil::PUBLIC_MODE)?;
                tracing::info!(dir = %dir.display(), "created the fleet CA");
                Ok(Self {
                    dir: dir.to_owned(),
                    ca_pem: cert.pem(),
                    issuer: Issuer::new(params, key),
                })
            }
            _ => bail!(
                "{} holds only half of the fleet CA (ca.pem and ca.key must both exist); restore the missing file from a backup",
                dir.display()
            ),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Signs a device CSR whose common name must be `device`; a client certificate only.
    pub fn sign_device_csr(&self, csr_pem: &str, device: &str) -> Result<DeviceCert, String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the CSR is unreadable: {e}"))?;
        let named = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                DnValue::Utf8String(s) => Some(s.clone()),
                _ => None,
            });
        if named.as_deref() != Some(device) {
            return Err(format!(
                "the CSR's common name is {named:?}, but the device enrolls as {device:?}; they must match"
            ));
        }
        let serial = random_serial();
        let now = OffsetDateTime::now_utc();
        let params = &mut csr.params;
        params.subject_alt_names.clear();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(DEVICE_CERT_DAYS);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| format!("cannot sign the CSR: {e}"))?;
        Ok(DeviceCert {
            pem: cert.pem(),
            serial: hex::encode(serial),
        })
    }

    /// The certificate named `name` in the PKI directory, issued on first use: a server
    /// certificate for `hosts` or a client certificate.
    pub fn identity(
        &self,
        name: &str,
        cn: &str,
        hosts: &[String],
        server: bool,
    ) -> Result<Identity> {
        let id = Identity {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        let hosts_file = self.dir.join(format!("{name}.hosts"));
        let wanted = hosts.join(",");
        let current = std::fs::read_to_string(&hosts_file).unwrap_or_default();
        if id.cert.exists() && id.key.exists() && current == wanted {
            return Ok(id);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())
            .with_context(|| format!("invalid host names for the {name} certificate: {hosts:?}"))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(825);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        fsutil::write_atomic(&id.key, key.serialize_pem().as_bytes(), fsutil::SECRET_MODE)?;
        fsutil::write_atomic(&id.cert, cert.pem().as_bytes(), fsutil::PUBLIC_MODE)?;
        fsutil::write_atomic(&hosts_file, wanted.as_bytes(), fsutil::PUBLIC_MODE)?;
        Ok(id)
    }

    pub fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(cert.context("the fleet CA certificate is unreadable")?)
                .context("the fleet CA certificate is not a usable trust anchor")?;
        }
        Ok(roots)
    }
}

fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).expect("the OS random number generator works");
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x01; // and never a leading zero byte
    serial
}

/// Reads a certificate chain and key as rustls wants them.
pub fn load_identity(
    id: &Identity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(&id.cert)
        .with_context(|| format!("cannot read {}", id.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate", id.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&id.key)
        .with_context(|| format!("{} is not a PEM private key", id.key.display()))?;
    Ok((chain, key))
}

/// The ring crypto provider, passed explicitly everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting only the fleet CA and presenting `id`.
pub fn client_config(ca: &FleetCa, id: &Identity) -> Result<rustls::ClientConfig> {
    let (chain, key) = load_identity(id)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(ca.roots()?)
        .with_client_auth_cert(chain, key)?)
}

/// The device endpoint's server config: a client certificate from the fleet CA is checked when
/// offered (bundle downloads require one; enrollment cannot have one yet).
pub fn device_server_config(ca: &FleetCa, id: &Identity) -> Result<rustls::ServerConfig> {
    let (chain, key) = load_identity(id)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(ca.roots()?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .context("cannot build the client-certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The common name of a DER certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
