//! TLS for simulated devices (rustls, `ring`): the fleet CA as the only root, verified once and
//! shared by every device; each device presents its own certificate and key.

use std::sync::Arc;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::SimError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, SimError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert =
            cert.map_err(|err| SimError::Config(format!("the fleet CA is unreadable: {err}")))?;
        roots.add(cert).map_err(|err| {
            SimError::Config(format!("the fleet CA is not a usable certificate: {err}"))
        })?;
    }
    Ok(roots)
}

/// A client config that trusts the certificates in `ca_pem` (none for plain HTTP) and presents
/// none of its own: for enrollment and the admin API.
pub fn server_only(ca_pem: &[u8]) -> Result<rustls::ClientConfig, SimError> {
    let roots = roots(ca_pem)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| SimError::Config(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The fleet CA, checked once, for every device's connections.
#[derive(Debug, Clone)]
pub struct FleetTrust {
    verifier: Arc<WebPkiServerVerifier>,
}

impl FleetTrust {
    pub fn new(ca_pem: &[u8]) -> Result<Self, SimError> {
        let roots = roots(ca_pem)?;
        if roots.is_empty() {
            return Err(SimError::Config(String::from(
                "the fleet CA file holds no certificate; pass the controller's pki/ca.pem with --ca",
            )));
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|err| {
                SimError::Config(format!("the fleet CA cannot verify servers: {err}"))
            })?;
        Ok(Self { verifier })
    }

    /// The config one device connects with: the fleet CA, its certificate and key.
    pub fn device(&self, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig, String> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("unreadable device certificate: {err}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| format!("unreadable device key: {err}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_webpki_verifier(self.verifier.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|err| format!("the device certificate and key do not match: {err}"))?;
        // One broker and one device endpoint: a few cached sessions are enough.
        config.resumption = Resumption::in_memory_sessions(4);
        Ok(config)
    }
}
