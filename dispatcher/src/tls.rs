//! TLS: one server certificate per listening IP, reloaded without a restart, and the client
//! side of connections the dispatcher opens to phones.
//!
//! rustls with the ring provider only, TLS 1.2 and 1.3 only. The certificate is chosen by the
//! local address a connection was accepted on, not by SNI: phones rarely send SNI, and a
//! migrated phone expects the certificate of the server (the alias IP) it was configured for.
//!
//! Reload: a task polls each IP's certificate and key files (modification time and length)
//! every `tls_reload_secs`; on a change both are read again and, if they form a valid pair,
//! the IP's server configuration is swapped. Connections already open keep theirs; a bad new
//! file is logged and the previous certificate stays in use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{DispatcherConfig, StreamLimits, key_error};
use crate::error::Error;

/// TLS 1.2 and 1.3; nothing older.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The ring provider, the only one linked in.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: the current configuration of every IP that has a certificate. The set of
/// IPs changes when a SIGHUP adds or removes aliases ([`Servers::prepare`], [`Servers::install`]).
#[derive(Debug, Default)]
pub(crate) struct Servers {
    by_ip: ArcSwap<HashMap<IpAddr, Arc<Certificate>>>,
}

/// One IP's certificate: its files and the configuration built from them.
#[derive(Debug)]
struct Certificate {
    ip: IpAddr,
    /// Config key of the IP (`main`, `aliases[1]`), for log lines.
    key: String,
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<ServerConfig>,
}

/// The certificates of a configuration, read and checked, ready for [`Servers::install`].
#[derive(Debug)]
pub(crate) struct Prepared(HashMap<IpAddr, Arc<Certificate>>);

/// What a file looked like when it was last read; a change triggers a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl Servers {
    /// Reads the certificate and key of every IP that has one. Errors name the key, e.g.
    /// `dispatcher.aliases[0].tls_cert: cannot read "x.pem": No such file or directory`.
    pub(crate) fn load(config: &DispatcherConfig) -> Result<Self, Error> {
        let servers = Self::default();
        let prepared = servers.prepare(config)?;
        servers.install(prepared);
        Ok(servers)
    }

    /// Reads the certificates of `config`, changing nothing yet: an IP whose files are the
    /// ones already in use keeps its current configuration (and its reloads); every other is
    /// read now, so a bad file refuses the whole change.
    pub(crate) fn prepare(&self, config: &DispatcherConfig) -> Result<Prepared, Error> {
        let current = self.by_ip.load();
        let mut by_ip = HashMap::new();
        for (key, site) in config.sites() {
            let (Some(cert_path), Some(key_path)) = (&site.tls_cert, &site.tls_key) else {
                continue;
            };
            if let Some(cert) = current.get(&site.ip)
                && cert.cert_path == *cert_path
                && cert.key_path == *key_path
            {
                by_ip.insert(site.ip, Arc::clone(cert));
                continue;
            }
            let server = server_config(cert_path, key_path).map_err(|e| e.into_config(&key))?;
            by_ip.insert(
                site.ip,
                Arc::new(Certificate {
                    ip: site.ip,
                    key,
                    cert_path: cert_path.clone(),
                    key_path: key_path.clone(),
                    current: ArcSwap::from_pointee(server),
                }),
            );
        }
        Ok(Prepared(by_ip))
    }

    /// Makes `prepared` the certificates new connections get.
    pub(crate) fn install(&self, prepared: Prepared) {
        self.by_ip.store(Arc::new(prepared.0));
    }

    /// The configuration new connections accepted on `ip` get, if it serves TLS.
    pub(crate) fn config_for(&self, ip: IpAddr) -> Option<Arc<ServerConfig>> {
        self.by_ip.load().get(&ip).map(|c| c.current.load_full())
    }

    /// Polls the files every `interval` until `stop`, swapping in changed certificates.
    pub(crate) async fn reload_loop(&self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut seen: HashMap<IpAddr, (Stamp, Stamp)> =
            self.by_ip.load().values().map(|c| (c.ip, c.stamps())).collect();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = crate::stopped(&mut stop) => return,
                _ = ticker.tick() => {}
            }
            let current = self.by_ip.load();
            // IPs removed by a SIGHUP are forgotten; ones it added start from what was read.
            seen.retain(|ip, _| current.contains_key(ip));
            for cert in current.values() {
                let stamps = cert.stamps();
                match seen.get(&cert.ip) {
                    None => {
                        seen.insert(cert.ip, stamps);
                        continue;
                    }
                    Some(s) if *s == stamps => continue,
                    Some(_) => {}
                }
                // Remembered even when the new files are bad: they are retried when they
                // change again, not logged every interval.
                seen.insert(cert.ip, stamps);
                cert.reload();
            }
        }
    }
}

impl Certificate {
    fn stamps(&self) -> (Stamp, Stamp) {
        (stamp(&self.cert_path), stamp(&self.key_path))
    }

    fn reload(&self) {
        match server_config(&self.cert_path, &self.key_path) {
            Ok(server) => {
                self.current.store(Arc::new(server));
                info!(
                    ip = %self.ip,
                    "tls certificate for {} reloaded from {}",
                    self.ip,
                    self.cert_path.display()
                );
            }
            Err(e) => warn!(
                ip = %self.ip,
                "tls certificate for {} not reloaded, keeping the previous one: {}",
                self.ip,
                e.into_config(&self.key)
            ),
        }
    }
}

fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(md) => Stamp { modified: md.modified().ok(), len: md.len() },
        Err(_) => Stamp { modified: None, len: 0 },
    }
}

/// A certificate problem and which of the two files it is about.
#[derive(Debug)]
struct LoadError {
    /// `tls_cert` or `tls_key`.
    file: &'static str,
    why: String,
}

impl LoadError {
    /// As a configuration error naming the key: `dispatcher.<site>.<file>: <why>`.
    fn into_config(self, site: &str) -> Error {
        key_error(&format!("{site}.{}", self.file), self.why)
    }
}

/// Builds the server configuration of one IP from its PEM files.
fn server_config(cert_path: &Path, key_path: &Path) -> Result<ServerConfig, LoadError> {
    let certs = read_certificates(cert_path).map_err(|why| LoadError { file: "tls_cert", why })?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| LoadError {
        file: "tls_key",
        why: format!("cannot read a PEM private key from {:?}: {e}", key_path.display()),
    })?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| LoadError { file: "tls_cert", why: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| LoadError {
            file: "tls_key",
            why: format!(
                "{:?} does not fit the certificate in {:?}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        })
}

/// Every certificate in a PEM file (leaf first), at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates from {:?}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {:?}", path.display()));
    }
    Ok(certs)
}

/// The client configuration for connections the dispatcher opens to phones.
///
/// Without `tls_verify_peer` the phone's certificate is not checked (phones mostly present
/// self-signed ones); the handshake signatures still are, so the session is bound to the key
/// the phone presented. With it, the certificate must chain to `tls_ca_file` and name the
/// phone's IP.
pub(crate) fn client_config(limits: &StreamLimits) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::Config(format!("cannot set up TLS: {e}")))?;
    let config = match (&limits.tls_verify_peer, &limits.tls_ca_file) {
        (true, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(ca).map_err(|why| key_error("tls_ca_file", why))? {
                roots.add(cert).map_err(|e| {
                    key_error("tls_ca_file", format!("bad certificate in {:?}: {e}", ca.display()))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate::new()))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name a phone is checked against: its IP (phones are reached by address, not by name).
pub(crate) fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// Accepts any certificate, but checks the handshake signatures with it: what the dispatcher
/// uses towards phones (self-signed certificates) unless `tls_verify_peer` is set, and what test
/// clients use towards the dispatcher's test certificates.
#[derive(Debug)]
pub struct AnyCertificate(Arc<CryptoProvider>);

impl AnyCertificate {
    /// A verifier using the ring provider's signature algorithms.
    pub fn new() -> Self {
        AnyCertificate(provider())
    }
}

impl Default for AnyCertificate {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `ip`: (certificate PEM, key PEM).
    fn self_signed(ip: &str) -> (String, String) {
        let Ok(c) = rcgen::generate_simple_self_signed(vec![ip.to_owned()]) else {
            panic!("rcgen failed")
        };
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn config(dir: &Path, main_cert: &str, main_key: &str) -> DispatcherConfig {
        let toml = format!(
            "[dispatcher]\nid = \"d1\"\n[dispatcher.main]\nip = \"127.0.0.1\"\ndomain = \"d\"\n\
             tls_cert = {:?}\ntls_key = {:?}\n",
            dir.join(main_cert),
            dir.join(main_key)
        );
        match DispatcherConfig::from_toml_str(&toml) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn load_error(config: &DispatcherConfig) -> String {
        match Servers::load(config) {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn certificate_errors_name_the_key() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = self_signed("127.0.0.1");
        let (_, other_key) = self_signed("127.0.0.1");
        std::fs::write(dir.path().join("c.pem"), &cert)?;
        std::fs::write(dir.path().join("k.pem"), &key)?;
        std::fs::write(dir.path().join("other.pem"), &other_key)?;
        std::fs::write(dir.path().join("junk.pem"), "not pem")?;

        assert!(Servers::load(&config(dir.path(), "c.pem", "k.pem")).is_ok());
        let msg = load_error(&config(dir.path(), "missing.pem", "k.pem"));
        assert!(msg.starts_with("dispatcher.main.tls_cert: cannot read"), "{msg}");
        let msg = load_error(&config(dir.path(), "junk.pem", "k.pem"));
        assert!(msg.starts_with("dispatcher.main.tls_cert: no certificate"), "{msg}");
        let msg = load_error(&config(dir.path(), "c.pem", "junk.pem"));
        assert!(msg.starts_with("dispatcher.main.tls_key: cannot read a PEM private key"), "{msg}");
        let msg = load_error(&config(dir.path(), "c.pem", "other.pem"));
        assert!(msg.starts_with("dispatcher.main.tls_key: "), "{msg}");
        assert!(msg.contains("does not fit the certificate"), "{msg}");
        Ok(())
    }
}
