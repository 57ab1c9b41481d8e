//! TLS to the coordinator: certificate pinning by SHA-256 fingerprint, or the system's CA roots.
//!
//! Owns building the rustls [`ClientConfig`] that [`crate::control`] hands to reqwest. A join token carries the
//! SHA-256 of the coordinator's certificate, so a self-signed certificate is as safe as a CA-issued one: the
//! [`PinnedCertVerifier`] accepts the server iff the end-entity certificate's DER hashes to the pinned value, and
//! still checks the handshake signatures (so the server must hold that certificate's private key). Names and expiry
//! are deliberately not checked: the pin is the whole trust decision. A token without a fingerprint but with an
//! https URL (a coordinator behind a TLS-terminating proxy) is verified the usual way against CA roots
//! ([`ca_roots_config`]). Uses the ring provider (no aws-lc).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meshd_protocol::CertFingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where Debian (and most Linux distributions) keep the CA bundle, used only for tokens without a fingerprint.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The conventional variable (OpenSSL, rustls-native-certs) naming another CA bundle file.
pub const CA_BUNDLE_VAR: &str = "SSL_CERT_FILE";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS: {0}")]
    Config(#[from] rustls::Error),
    #[error(
        "the coordinator uses https without a pinned certificate and no CA roots could be loaded from {0} (install ca-certificates, or name a bundle with SSL_CERT_FILE)"
    )]
    NoRoots(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the certificate whose SHA-256 is pinned. Remembers the last mismatching fingerprint so the
/// caller can tell the user which certificate it met (rustls errors travel through reqwest as opaque IO errors).
#[derive(Debug)]
pub struct PinnedCertVerifier {
    pinned: CertFingerprint,
    algorithms: WebPkiSupportedAlgorithms,
    last_mismatch: Mutex<Option<CertFingerprint>>,
}

impl PinnedCertVerifier {
    pub fn new(pinned: CertFingerprint) -> Self {
        Self {
            pinned,
            algorithms: provider().signature_verification_algorithms,
            last_mismatch: Mutex::new(None),
        }
    }

    pub fn pinned(&self) -> CertFingerprint {
        self.pinned
    }

    /// The fingerprint of the last certificate rejected for not matching the pin, if any.
    pub fn last_mismatch(&self) -> Option<CertFingerprint> {
        *self
            .last_mismatch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The fingerprint is public: a constant-time comparison would protect nothing.
        let seen = CertFingerprint::of_der(end_entity.as_ref());
        if seen == self.pinned {
            return Ok(ServerCertVerified::assertion());
        }
        *self
            .last_mismatch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(seen);
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client config that trusts only the pinned certificate.
pub fn pinned_config(verifier: Arc<PinnedCertVerifier>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CA bundle for https coordinators without a pinned certificate: `$SSL_CERT_FILE`, else the system's.
pub fn ca_bundle_path() -> PathBuf {
    std::env::var_os(CA_BUNDLE_VAR).map_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE), PathBuf::from)
}

/// A client config that trusts the CA certificates in the PEM file `bundle` (an https coordinator URL without a
/// fingerprint, e.g. behind a TLS-terminating proxy with a CA-issued certificate). Names and expiry are checked
/// as in any browser.
pub fn ca_roots_config(bundle: &Path) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if let Ok(certs) = CertificateDer::pem_file_iter(bundle) {
        let (added, _ignored) = roots.add_parsable_certificates(certs.filter_map(Result::ok));
        tracing::debug!(added, bundle = %bundle.display(), "loaded CA roots");
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(bundle.display().to_string()));
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(verifier: &PinnedCertVerifier, der: &[u8]) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("198.18.0.1").expect("ip name");
        verifier.verify_server_cert(&CertificateDer::from(der.to_vec()), &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn accepts_the_pinned_certificate_only() {
        let cert = b"pretend this is a DER certificate";
        let verifier = PinnedCertVerifier::new(CertFingerprint::of_der(cert));
        assert!(check(&verifier, cert).is_ok());
        assert_eq!(verifier.last_mismatch(), None);

        let other = b"another certificate";
        assert!(check(&verifier, other).is_err());
        assert_eq!(verifier.last_mismatch(), Some(CertFingerprint::of_der(other)));
        assert!(!verifier.supported_verify_schemes().is_empty());
    }

    #[test]
    fn builds_a_pinned_client_config() {
        let verifier = Arc::new(PinnedCertVerifier::new(CertFingerprint([1; 32])));
        assert!(pinned_config(verifier).is_ok());
    }
}
