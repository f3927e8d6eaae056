//! TLS with rustls (ring provider): reading PEM files, building the server
//! side of a TLS listener (certificates chosen by SNI, optional client
//! certificate verification) and the client side of a TLS backend, and the
//! SNI name matching that both certificate choice and backend routing use.
//!
//! Config validation calls [`load_cert_key`], [`load_ca`], [`server_config`]
//! and [`client_config`] so that `holdfast check` and a reload reject a bad
//! file before anything runs; the proxy calls the builders again for the
//! acceptor it hands to new sessions.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::Conn;

/// The crypto provider holdfast uses everywhere (ring: no cmake, no C
/// toolchain beyond cc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, as read from PEM files.
#[derive(Clone, PartialEq, Eq)]
pub struct CertKey {
    /// End-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertKey({} certificates, key)", self.chain.len())
    }
}

/// Which file of a pair a loading error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    // Read first: a missing file is an IO error, not "no PEM items".
    std::fs::metadata(path).map_err(|e| format!("cannot read {shown:?}: {}", io_msg(&e)))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_msg(path, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_msg(path, &e))?;
    if certs.is_empty() {
        return Err(format!(
            "{shown:?} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        webpki_check(c)
            .map_err(|e| format!("certificate {} in {shown:?} is not valid: {e}", i + 1))?;
    }
    Ok(certs)
}

/// Parses a certificate the way rustls will, so that garbage inside a
/// well-formed PEM block is caught at check time.
fn webpki_check(c: &CertificateDer<'_>) -> Result<(), String> {
    rustls::server::ParsedCertificate::try_from(c)
        .map(|_| ())
        .map_err(|e| lowercase(&e.to_string()))
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    std::fs::metadata(path).map_err(|e| format!("cannot read {shown:?}: {}", io_msg(&e)))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{shown:?} holds no PEM private key (\"-----BEGIN PRIVATE KEY-----\")")
        }
        e => pem_msg(path, &e),
    })
}

/// Reads a certificate and its key and checks that they belong together.
/// The error says which of the two files is at fault.
pub fn load_cert_key(cert: &Path, key: &Path) -> Result<CertKey, (Which, String)> {
    let chain = load_certs(cert).map_err(|e| (Which::Cert, e))?;
    let key_der = load_key(key).map_err(|e| (Which::Key, e))?;
    let pair = CertKey {
        chain,
        key: Arc::new(key_der),
    };
    certified_key(&pair).map_err(|e| {
        (
            Which::Key,
            format!(
                "the private key in {:?} does not fit the certificate in {:?}: {e}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok(pair)
}

/// Reads a CA bundle (one or more PEM certificates) into a root store.
pub fn load_ca(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let certs = load_certs(path)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            format!(
                "{:?}: not usable as a CA certificate: {}",
                path.display(),
                lowercase(&e.to_string())
            )
        })?;
    }
    Ok(Arc::new(roots))
}

/// The signing key of a pair, checked against its certificate.
pub fn certified_key(pair: &CertKey) -> Result<Arc<CertifiedKey>, String> {
    let provider = provider();
    let key = provider
        .key_provider
        .load_private_key(pair.key.clone_key())
        .map_err(|e| lowercase(&e.to_string()))?;
    let ck = CertifiedKey::new(pair.chain.clone(), key);
    match ck.keys_match() {
        Ok(()) => Ok(Arc::new(ck)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(ck)),
        Err(e) => Err(lowercase(&e.to_string())),
    }
}

fn io_msg(e: &io::Error) -> String {
    let s = e.to_string();
    // "No such file or directory (os error 2)" -> "no such file or directory"
    let s = s.split(" (os error").next().unwrap_or(&s);
    lowercase(s)
}

fn pem_msg(path: &Path, e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    let shown = path.display();
    match e {
        E::Io(e) => format!("cannot read {shown:?}: {}", io_msg(e)),
        E::NoItemsFound => format!("{shown:?} holds no PEM item"),
        e => format!("{shown:?} is not valid PEM: {e:?}"),
    }
}

fn lowercase(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// An SNI pattern: an exact host name or `*.suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniName {
    /// Lowercase host name.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any name that ends
    /// with it (one or more labels in front).
    Suffix(String),
}

impl SniName {
    /// Parses `host.example.com` or `*.example.com`.
    pub fn parse(s: &str) -> Result<SniName, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, host) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !ok {
            return Err(format!(
                "{s:?} is not a host name or a \"*.suffix\" pattern"
            ));
        }
        Ok(if wild {
            SniName::Suffix(format!(".{host}"))
        } else {
            SniName::Exact(host.to_owned())
        })
    }

    /// How well this pattern matches `name` (already lowercase): `None` for
    /// no match; higher is more specific (an exact match beats every suffix,
    /// a longer suffix beats a shorter one).
    pub fn score(&self, name: &str) -> Option<usize> {
        match self {
            SniName::Exact(n) => (n == name).then_some(usize::MAX),
            SniName::Suffix(s) => {
                (name.len() > s.len() && name.ends_with(s.as_str())).then_some(s.len())
            }
        }
    }
}

impl fmt::Display for SniName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniName::Exact(n) => f.write_str(n),
            SniName::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// The index of the best match for `name` among `patterns`, if any.
pub fn best_match<'a>(patterns: impl Iterator<Item = &'a SniName>, name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    patterns
        .enumerate()
        .filter_map(|(i, p)| p.score(name).map(|s| (s, i)))
        // The first of equally good patterns wins.
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, i)| i)
}

/// Chooses the certificate by SNI: the best matching entry with its own
/// certificate, else the listener's default certificate.
#[derive(Debug)]
struct SniResolver {
    names: Vec<(SniName, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        match best_match(self.names.iter().map(|(n, _)| n), name) {
            Some(i) => Some(self.names[i].1.clone()),
            None => Some(self.default.clone()),
        }
    }
}

/// Everything a TLS listener is built from.
pub struct ServerSettings<'a> {
    pub default: &'a CertKey,
    /// SNI entries that bring their own certificate.
    pub sni_certs: Vec<(&'a SniName, &'a CertKey)>,
    pub client_ca: Option<Arc<RootCertStore>>,
    /// Allow TLS 1.2 (else 1.3 only).
    pub tls12: bool,
    pub alpn: &'a [String],
}

static TLS12_UP: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if tls12 {
        TLS12_UP
    } else {
        TLS13_ONLY
    }
}

/// Builds the server side of a TLS listener.
pub fn server_config(s: &ServerSettings<'_>) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(s.tls12))
        .map_err(|e| lowercase(&e.to_string()))?;
    let builder = match &s.client_ca {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| lowercase(&e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut names = Vec::new();
    for (name, pair) in &s.sni_certs {
        names.push(((*name).clone(), certified_key(pair)?));
    }
    let resolver = SniResolver {
        names,
        default: certified_key(s.default)?,
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds the client side of a TLS backend.
pub fn client_config(
    ca: Arc<RootCertStore>,
    client: Option<&CertKey>,
    alpn: &[String],
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(ca, provider.clone())
        .build()
        .map_err(|e| lowercase(&e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(true))
        .map_err(|e| lowercase(&e.to_string()))?
        .with_webpki_verifier(verifier);
    let mut config = match client {
        Some(pair) => builder
            .with_client_auth_cert(pair.chain.clone(), pair.key.clone_key())
            .map_err(|e| lowercase(&e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// Why a client's TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    Timeout,
    Failed(io::Error),
}

/// Runs the server side of a handshake on an accepted connection.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    conn: Conn,
    timeout: Duration,
) -> Result<Conn, HandshakeError> {
    match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(Err(e)) => Err(HandshakeError::Failed(e)),
        Ok(Ok(s)) => Ok(Conn::TlsIn(Box::new(s))),
    }
}

/// Runs the client side of a handshake on a server connection, within
/// `timeout`.
pub async fn connect(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    conn: Conn,
    timeout: Duration,
) -> io::Result<Conn> {
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(server_name, conn)).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "tls handshake timed out",
        )),
        Ok(r) => Ok(Conn::TlsOut(Box::new(r?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns_match_exact_before_longest_suffix() {
        let p: Vec<SniName> = ["*.example.com", "a.example.com", "*.b.example.com"]
            .iter()
            .map(|s| SniName::parse(s).unwrap())
            .collect();
        assert_eq!(best_match(p.iter(), "a.example.com"), Some(1));
        assert_eq!(best_match(p.iter(), "A.Example.COM."), Some(1));
        assert_eq!(best_match(p.iter(), "x.b.example.com"), Some(2));
        assert_eq!(best_match(p.iter(), "c.example.com"), Some(0));
        assert_eq!(best_match(p.iter(), "example.com"), None);
        assert_eq!(best_match(p.iter(), "other.org"), None);
        assert!(SniName::parse("*.").is_err());
        assert!(SniName::parse("a..b").is_err());
        assert!(SniName::parse("a.*.b").is_err());
    }
}
