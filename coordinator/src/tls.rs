//! The coordinator's TLS certificate: a self-signed one generated at first start and kept in the data dir (the
//! default), or the admin's own files. Either way its SHA-256 fingerprint ([`CertFingerprint::of_der`] of the leaf
//! certificate) goes into every join token, so a node pins the exact certificate and needs no CA: secure by default
//! with zero setup. The self-signed certificate is never regenerated while its files exist (a new one would change
//! the fingerprint and strand every token); its names (SANs) only matter to browsers and curl, nodes check the pin.
//!
//! With `--tls-cert`, tokens pin that certificate too (the issue asks for the fingerprint whenever TLS is served).
//! A renewed CA-issued certificate has a new fingerprint: tokens made before the renewal then fail the pin, so make
//! new tokens after renewing (nodes that already joined are the node agent's business: they may re-verify by CA).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use meshd_protocol::CertFingerprint;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::TlsMode;

/// Certificate and key files as served, with the pin.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: CertFingerprint,
}

/// Uses ring everywhere (boringtun already builds it; aws-lc would pull in cmake). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The files to serve for `mode` (generating the self-signed pair if missing), or `None` for plain HTTP.
pub fn prepare(mode: &TlsMode, data_dir: &Path, hosts: &[String]) -> anyhow::Result<Option<TlsFiles>> {
    match mode {
        TlsMode::Off => Ok(None),
        TlsMode::Files { cert, key } => {
            let fingerprint = fingerprint_of(cert)?;
            if !key.exists() {
                bail!("TLS key file {} does not exist", key.display());
            }
            Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                fingerprint,
            }))
        }
        TlsMode::SelfSigned => {
            let (cert, key) = self_signed_paths(data_dir);
            if !cert.exists() || !key.exists() {
                generate_self_signed(&cert, &key, hosts)?;
                tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate");
            }
            let fingerprint = fingerprint_of(&cert)?;
            Ok(Some(TlsFiles { cert, key, fingerprint }))
        }
    }
}

/// SHA-256 of the first certificate in a PEM file.
pub fn fingerprint_of(cert: &Path) -> anyhow::Result<CertFingerprint> {
    let first = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?
        .next()
        .with_context(|| format!("{} holds no PEM certificate", cert.display()))?
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    Ok(CertFingerprint::of_der(first.as_ref()))
}

fn generate_self_signed(cert_path: &Path, key_path: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let mut names: Vec<String> = hosts.to_vec();
    for extra in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_string());
        }
    }
    let certified = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    let dir = cert_path.parent().context("certificate path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(key_path, certified.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_kept_and_pinned() {
        install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let first = prepare(&TlsMode::SelfSigned, dir.path(), &["198.18.0.1".into()])
            .expect("ok")
            .expect("tls");
        let again = prepare(&TlsMode::SelfSigned, dir.path(), &[])
            .expect("ok")
            .expect("tls");
        assert_eq!(first.fingerprint, again.fingerprint, "kept across starts");
        let der = CertificateDer::pem_file_iter(&first.cert)
            .expect("pem")
            .next()
            .expect("one")
            .expect("cert");
        assert_eq!(CertFingerprint::of_der(der.as_ref()), first.fingerprint);
        assert!(prepare(&TlsMode::Off, dir.path(), &[]).expect("ok").is_none());
    }
}
