//! TLS for any listener: a certificate chain and key (PEM files), and
//! optionally a client CA that makes it mutual TLS. One [`TlsFiles`] value
//! describes a listener's TLS; the gRPC listener and the HTTP (metrics and
//! health) listener each get their own, and the node-to-node listener can
//! take the same settings ([`ServerTls::client_config`] gives the dialing
//! side of mutual TLS from the same files).
//!
//! Invariants a reader must keep:
//! * The files are re-read on a timer ([`ServerTls::watch`]); a change is
//!   applied to new handshakes only. Established connections keep their
//!   session: rotating a certificate (cert-manager renews Secrets in place)
//!   never drops a client.
//! * A reload that fails (a half-written file, a key that does not match
//!   the certificate) keeps the previous configuration and is logged and
//!   counted; the listener never ends up without a certificate.
//! * Handshakes run on their own tasks with a deadline, never in the accept
//!   loop: a client that stalls its handshake holds up nobody else.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once on one listener.
const MAX_HANDSHAKES: usize = 512;

/// Whether a listener asks clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Verified when presented (against the client CA); clients without one
    /// authenticate otherwise (password, token).
    Optional,
    /// Every client must present a certificate the client CA signed.
    Required,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// A listener's TLS settings: files, not their content, so that they can be
/// re-read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates: set, clients may
    /// (or must, per `client_auth`) present one.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{0}")]
    Config(String),
}

/// A peer's verified client certificate, as the listener saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject's common name (CN), when it has one.
    pub common_name: Option<String>,
    /// The subject's distinguished name, RFC 4514 style (`CN=app,O=shop`).
    pub subject: String,
}

impl PeerCertificate {
    /// Reads the subject of a DER certificate (already verified by rustls).
    pub fn from_der(der: &[u8]) -> Option<PeerCertificate> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let common_name = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        Some(PeerCertificate { common_name, subject: subject.to_string() })
    }
}

struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// The bytes the configuration was built from, to notice changes.
    source: Vec<u8>,
    /// The leaf certificate's notAfter, Unix seconds.
    not_after: i64,
}

/// A listener's TLS: the current server configuration, swapped atomically
/// when the files change. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    listener: &'static str,
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: Arc<ArcSwap<Loaded>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("listener", &self.listener).field("files", &self.files).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

fn pem_error(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), detail: detail.to_string() }
}

/// Parses PEM certificates; at least one.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate (expected PEM `BEGIN CERTIFICATE` blocks)"));
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_error(path, format!("no usable private key: {e}")))
}

/// The crypto provider every TLS configuration here uses (ring, as tonic
/// and kube use).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store of the CA certificates in `path`.
pub fn root_store(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem = read(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(path, &pem)? {
        roots.add(cert).map_err(|e| pem_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn not_after(cert: &CertificateDer<'_>) -> i64 {
    x509_parser::parse_x509_certificate(cert.as_ref()).map(|(_, c)| c.validity().not_after.timestamp()).unwrap_or(0)
}

impl ServerTls {
    /// Loads the files for `listener` (a name for logs and metrics); `alpn`
    /// lists the application protocols offered (`h2` for gRPC).
    pub fn load(listener: &'static str, files: TlsFiles, alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let loaded = build(&files, &alpn)?;
        crate::auth::metrics::global().tls_loaded(listener, loaded.not_after);
        Ok(ServerTls { listener, files, alpn, current: Arc::new(ArcSwap::from_pointee(loaded)) })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients are asked for certificates.
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.load().config.clone()
    }

    /// Re-reads the files; applies them to new handshakes when they changed.
    /// Returns whether they changed. On error the previous configuration
    /// stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let source = source_bytes(&self.files)?;
        if source == self.current.load().source {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.alpn)?;
        crate::auth::metrics::global().tls_loaded(self.listener, loaded.not_after);
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Checks the files every `interval` until `stop`.
    pub fn watch(&self, interval: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let me = tls.clone();
                match tokio::task::spawn_blocking(move || me.reload()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(listener = tls.listener, cert = %tls.files.cert.display(), "TLS certificate reloaded; new connections use it");
                        crate::auth::metrics::global().tls_reload(tls.listener, true);
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(listener = tls.listener, error = %e, "TLS files changed but cannot be loaded; keeping the previous certificate");
                        crate::auth::metrics::global().tls_reload(tls.listener, false);
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
                }
            }
        })
    }

    /// The dialing side of mutual TLS with the same files: this node's
    /// certificate as its client certificate, and the client CA as the
    /// roots that peers' server certificates must chain to. For the
    /// node-to-node connections of a cluster, where every node is both a
    /// server and a client.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let ca = self.files.client_ca.as_deref().ok_or_else(|| TlsError::Config("mutual TLS between nodes needs a client CA".into()))?;
        let roots = root_store(ca)?;
        let cert_pem = read(&self.files.cert)?;
        let key_pem = read(&self.files.key)?;
        let certs = parse_certs(&self.files.cert, &cert_pem)?;
        let key = parse_key(&self.files.key, &key_pem)?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("{}: the key does not match the certificate: {e}", self.files.key.display())))?;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    /// Performs the server side of a handshake on `tcp`, bounded by
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        }
    }
}

fn source_bytes(files: &TlsFiles) -> Result<Vec<u8>, TlsError> {
    let mut source = read(&files.cert)?;
    source.push(0);
    source.extend(read(&files.key)?);
    if let Some(ca) = &files.client_ca {
        source.push(0);
        source.extend(read(ca)?);
    }
    Ok(source)
}

fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<Loaded, TlsError> {
    let source = source_bytes(files)?;
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs = parse_certs(&files.cert, &cert_pem)?;
    let key = parse_key(&files.key, &key_pem)?;
    let not_after = not_after(&certs[0]);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = match files.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("{}: the key does not match the certificate: {e}", files.key.display())))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Loaded { config: Arc::new(config), source, not_after })
}

/// A connection, in clear or under TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// The verified client certificate, if the peer presented one.
    pub fn peer_certificate(&self) -> Option<PeerCertificate> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| PeerCertificate::from_der(c.as_ref())),
        }
    }
}

impl tonic::transport::server::Connected for Stream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Stream::Plain(s) => s.connect_info(),
            Stream::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An accepted connection, its handshake done.
pub struct Accepted {
    pub stream: Stream,
    pub peer: SocketAddr,
}

/// Accepts connections on `listener` (a name for logs and metrics), each
/// through its TLS handshake when `tls` is set, on a task of its own. The
/// task ends when the receiver is dropped. Accept errors (a full file
/// table) are logged and retried; failed handshakes are logged at debug
/// level and counted.
pub fn accept_loop(listener_name: &'static str, listener: TcpListener, tls: Option<ServerTls>) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel::<Accepted>(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = listener_name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                if tx.send(Accepted { stream: Stream::Plain(tcp), peer }).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls.accept(tcp).await {
                    Ok(s) => {
                        let _ = tx.send(Accepted { stream: Stream::Tls(Box::new(s)), peer }).await;
                    }
                    Err(e) => {
                        crate::auth::metrics::global().tls_handshake_failed(listener_name);
                        tracing::debug!(listener = listener_name, %peer, error = %e, "TLS handshake failed");
                    }
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_read_the_subject_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(rcgen::DnType::CommonName, "checkout");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "shop");
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let peer = PeerCertificate::from_der(cert.der()).unwrap_or_else(|| panic!("unparsable"));
        assert_eq!(peer.common_name.as_deref(), Some("checkout"));
        assert!(peer.subject.contains("CN=checkout"), "{}", peer.subject);
    }

    #[test]
    fn should_keep_the_previous_certificate_when_a_reload_fails() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).and_then(|p| p.self_signed(&key)).unwrap_or_else(|e| panic!("{e}"));
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: None,
            client_auth: ClientAuth::Optional,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&files.key, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        let tls = ServerTls::load("test", files.clone(), &[b"h2"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!tls.reload().unwrap_or_else(|e| panic!("{e}")), "unchanged files are not a change");
        let before = tls.config();
        std::fs::write(&files.cert, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.config()), "a failed reload keeps the configuration");
        let key2 = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert2 =
            rcgen::CertificateParams::new(vec!["localhost".into()]).and_then(|p| p.self_signed(&key2)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&files.cert, cert2.pem()).unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.reload().is_err(), "a certificate that does not match the key is refused");
        std::fs::write(&files.key, key2.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.reload().unwrap_or_else(|e| panic!("{e}")));
        assert!(!Arc::ptr_eq(&before, &tls.config()));
    }
}
