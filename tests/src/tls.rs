//! TLS material for the cluster and the phones, made at test time (nothing is committed).
//!
//! - [`CertFiles`]: a self-signed certificate and key as PEM files, for one IP of the cluster
//!   (what the old provider's phones expect) or for a TLS phone that accepts connections.
//! - [`client_config`]: a client that accepts any server certificate, as most SIP phones with a
//!   provisioned server do; the tests check *which* certificate was presented instead.
//!
//! rustls runs with the ring provider only, like the services.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A self-signed certificate for one IP address, and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// DER of the certificate: what a TLS client should be shown.
    pub der: Vec<u8>,
}

impl CertFiles {
    /// Writes `<name>.crt` and `<name>.key` into `dir`: a certificate for `ip` (as IP subject
    /// alternative name) whose subject common name is `subject`.
    pub fn create(dir: &Path, name: &str, ip: IpAddr, subject: &str) -> Result<Self> {
        let mut params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, subject);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&files.key, key.serialize_pem())
            .with_context(|| format!("writing {}", files.key.display()))?;
        std::fs::write(&files.cert, cert.pem())
            .with_context(|| format!("writing {}", files.cert.display()))?;
        Ok(files)
    }

    /// A rustls server configuration presenting this certificate (a TLS phone's listener).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("reading {}", self.cert.display()))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading {}", self.key.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
    }
}

/// A server configuration with a fresh self-signed certificate for `ip`, kept in memory: what a
/// TLS phone presents when the cluster connects to it.
pub fn self_signed_server_config(ip: IpAddr) -> Result<Arc<rustls::ServerConfig>> {
    let params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok(Arc::new(config))
}

/// The one crypto provider of the harness: ring (aws-lc-rs is kept out of the workspace).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.2/1.3 client configuration that accepts any server certificate (signatures are
/// still checked), so tests can connect to self-signed servers and compare what they got.
pub fn client_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sipalias_dispatcher::AnyCertificate::new()))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The server name a phone presents: the server's IP (phones configured with an IP send no
/// SNI; rustls sends none for an IP address either).
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_for_two_ips_differ_and_load_as_server_configs() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let a = CertFiles::create(dir.path(), "a", "127.0.0.1".parse()?, "sip.example.net")?;
        let b = CertFiles::create(dir.path(), "b", "127.0.0.3".parse()?, "old.example")?;
        assert_ne!(a.der, b.der);
        a.server_config()?;
        b.server_config()?;
        client_config()?;
        Ok(())
    }
}
