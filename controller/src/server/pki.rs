//! The fleet CA: created on first start (rcgen), kept in `<data>/pki` (keys 0600). It issues the
//! devices' client certificates from their CSRs, the broker's and the device endpoint's server
//! certificate, and the controller's own MQTT client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::fsutil;

/// The controller's MQTT identity (certificate common name).
pub const CONTROLLER_CN: &str = "edgefleet-controller";
/// Whether `device` would name one of the controller's own certificates (`edgefleet-controller`,
/// `edgefleet-controller-server`, …). Enrollment refuses such ids: Mosquitto's ACL grants the
/// controller's name every fleet topic, and the embedded broker keeps the controller's login under
/// a client id with that prefix.
pub fn reserved_device_id(device: &str) -> bool {
    device.starts_with(CONTROLLER_CN)
}

/// How long device certificates are valid.
pub const DEVICE_CERT_DAYS: i64 = 365;

/// How long a certificate revocation list is valid. The controller re-signs it on start, on every
/// revocation and once a day, so it only lapses if the controller stays down this long; a broker
/// holding a lapsed CRL refuses every device.
pub const CRL_DAYS: i64 = 365;

/// A revoked device certificate, as the CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCert {
    /// The certificate's serial number in hex, as stored at enrollment.
    pub serial: String,
    /// When the device was revoked (UTC ms).
    pub revoked_at: i64,
}

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

    /// A certificate revocation list of `revoked`, signed by the fleet CA and issued at `now_ms`
    /// (also its CRL number, so later lists have higher numbers).
    pub fn crl_pem(&self, revoked: &[RevokedCert], now_ms: i64) -> Result<String> {
        let at = |ms: i64| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .with_context(|| format!("timestamp {ms} ms is out of range"))
        };
        let this_update = at(now_ms)?;
        let revoked_certs = revoked
            .iter()
            .map(|cert| {
                let serial = hex::decode(&cert.serial).with_context(|| {
                    format!("the stored certificate serial {:?} is not hex", cert.serial)
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: at(cert.revoked_at)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update,
            next_update: this_update + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(now_ms.max(1).unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs,
            // The authority key identifier must equal the CA certificate's own, or verifiers
            // (OpenSSL in Mosquitto) cannot match the list to the CA.
            key_identifier_method: self
                .subject_key_id()
                .map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified),
        };
        let crl = params
            .signed_by(&self.issuer)
            .context("cannot sign the certificate revocation list with the fleet CA")?;
        crl.pem()
            .context("cannot encode the certificate revocation list")
    }

    /// The CA certificate's subject key identifier.
    fn subject_key_id(&self) -> Option<Vec<u8>> {
        let der = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        cert.extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(id.0.to_vec())
                }
                _ => None,
            })
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

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateRevocationListDer, UnixTime};

    use super::*;

    fn device_cert(ca: &FleetCa, device: &str) -> DeviceCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, device);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        ca.sign_device_csr(&csr, device).unwrap()
    }

    /// What a TLS server holding the CRL decides about `cert` (rustls/webpki, as strict as
    /// OpenSSL about the issuer, the signature and the authority key identifier).
    fn verdict(ca: &FleetCa, crl_pem: &str, cert: &DeviceCert) -> Result<(), rustls::Error> {
        let crl = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(ca.roots().unwrap()),
            provider(),
        )
        .with_crls([crl])
        .build()
        .unwrap();
        let der = CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap();
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn the_crl_revokes_exactly_the_listed_device_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(dir.path()).unwrap();
        let (revoked, kept) = (device_cert(&ca, "pump-01"), device_cert(&ca, "pump-02"));
        let now_ms = OffsetDateTime::now_utc().unix_timestamp() * 1000;

        let empty = ca.crl_pem(&[], now_ms).unwrap();
        assert_eq!(verdict(&ca, &empty, &revoked), Ok(()));

        let listed = [RevokedCert {
            serial: revoked.serial.clone(),
            revoked_at: now_ms - 1000,
        }];
        // Reopened from disk, as after a restart: the list still matches the CA.
        let ca = FleetCa::open_or_create(dir.path()).unwrap();
        let crl = ca.crl_pem(&listed, now_ms).unwrap();
        assert_eq!(
            verdict(&ca, &crl, &revoked),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        );
        assert_eq!(verdict(&ca, &crl, &kept), Ok(()));
    }

    #[test]
    fn the_controllers_names_are_reserved() {
        for reserved in [
            CONTROLLER_CN,
            "edgefleet-controller-server",
            "edgefleet-controller-c_1",
        ] {
            assert!(reserved_device_id(reserved), "{reserved}");
        }
        for allowed in ["pump-01", "edgefleet-pump", "my-edgefleet-controller"] {
            assert!(!reserved_device_id(allowed), "{allowed}");
        }
    }

    #[test]
    fn a_stored_serial_that_is_not_hex_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::open_or_create(dir.path()).unwrap();
        let bad = [RevokedCert {
            serial: "zz".into(),
            revoked_at: 0,
        }];
        let err = ca.crl_pem(&bad, 1).unwrap_err();
        assert!(format!("{err:#}").contains("not hex"), "{err:#}");
    }
}
