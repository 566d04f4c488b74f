//! How a client reaches a broker: TLS (an `https://` address; a CA to
//! trust, a client certificate for mutual TLS) and credentials (a username
//! and password, a token, or a token file such as a projected Kubernetes
//! ServiceAccount token, re-read as the kubelet rotates it). Credentials go
//! in the `authorization` metadata of every call; the broker checks them
//! once per connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How often a token file is read again.
const TOKEN_FILE_REFRESH: Duration = Duration::from_secs(30);

/// Connection settings beyond the address. `Default` is plain text and no
/// credentials (a broker on loopback without authentication).
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// CA certificates (PEM) to trust for the broker's certificate; none:
    /// the system's roots. Implies TLS.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS. Imply TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it differs from
    /// the address's host.
    pub tls_server_name: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A bearer token.
    pub token: Option<String>,
    /// A file holding a bearer token, re-read while it rotates.
    pub token_file: Option<PathBuf>,
}

impl ConnectOptions {
    /// Settings from `WARREN_*` environment variables: `WARREN_CA`,
    /// `WARREN_CERT`, `WARREN_KEY`, `WARREN_USERNAME`, `WARREN_PASSWORD`,
    /// `WARREN_TOKEN`, `WARREN_TOKEN_FILE`, `WARREN_TLS_SERVER_NAME`.
    pub fn from_env() -> ConnectOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ConnectOptions {
            ca: var("WARREN_CA").map(PathBuf::from),
            cert: var("WARREN_CERT").map(PathBuf::from),
            key: var("WARREN_KEY").map(PathBuf::from),
            tls_server_name: var("WARREN_TLS_SERVER_NAME"),
            username: var("WARREN_USERNAME"),
            password: var("WARREN_PASSWORD"),
            token: var("WARREN_TOKEN"),
            token_file: var("WARREN_TOKEN_FILE").map(PathBuf::from),
        }
    }

    pub fn basic(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    pub fn ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// Whether these settings ask for TLS.
    pub fn wants_tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The credentials to send.
    pub fn credentials(&self) -> Result<Credentials, String> {
        let set = [self.password.is_some() || self.username.is_some(), self.token.is_some(), self.token_file.is_some()];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err("give one of: a username and password, a token, a token file".into());
        }
        if let Some(user) = &self.username {
            let password = self.password.as_deref().ok_or("a username needs a password")?;
            if user.contains(':') {
                return Err("a username must not contain ':'".into());
            }
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            return header(&format!("Basic {encoded}")).map(|h| Credentials(Kind::Fixed(h)));
        }
        if self.password.is_some() {
            return Err("a password needs a username".into());
        }
        if let Some(token) = &self.token {
            return header(&format!("Bearer {}", token.trim())).map(|h| Credentials(Kind::Fixed(h)));
        }
        if let Some(path) = &self.token_file {
            let file = TokenFile { path: path.clone(), current: Mutex::new(None) };
            file.value().map_err(|e| e.message().to_string())?;
            return Ok(Credentials(Kind::File(Arc::new(file))));
        }
        Ok(Credentials(Kind::None))
    }

    /// Applies TLS to `endpoint` when the address is `https://` or these
    /// settings name a CA or a client certificate.
    pub fn tls(&self, endpoint: Endpoint, https: bool) -> Result<Endpoint, String> {
        if !https && !self.wants_tls() {
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?)),
            None => tls.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert, "--cert")?, read(key, "--key")?)),
            (None, None) => {}
            _ => return Err("a client certificate needs both --cert and --key".into()),
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint.tls_config(tls).map_err(|e| format!("TLS settings: {e}"))
    }
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn header(value: &str) -> Result<AsciiMetadataValue, String> {
    MetadataValue::try_from(value).map_err(|_| "credentials must be printable ASCII".to_string())
}

/// The `authorization` metadata added to every call.
#[derive(Clone, Debug)]
pub struct Credentials(Kind);

#[derive(Clone, Debug)]
enum Kind {
    None,
    Fixed(AsciiMetadataValue),
    File(Arc<TokenFile>),
}

impl Credentials {
    /// No credentials.
    pub fn none() -> Credentials {
        Credentials(Kind::None)
    }
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    current: Mutex<Option<(Instant, AsciiMetadataValue)>>,
}

impl TokenFile {
    /// The current token, read again when the last read is older than
    /// [`TOKEN_FILE_REFRESH`] (a rotated token replaces the file).
    fn value(&self) -> Result<AsciiMetadataValue, tonic::Status> {
        let mut current = self.current.lock();
        if let Some((at, v)) = current.as_ref()
            && at.elapsed() < TOKEN_FILE_REFRESH
        {
            return Ok(v.clone());
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let v = header(&format!("Bearer {}", text.trim())).map_err(tonic::Status::unauthenticated)?;
                *current = Some((Instant::now(), v.clone()));
                Ok(v)
            }
            // A file mid-rotation: keep the last token for now.
            Err(_) if current.is_some() => {
                Ok(current.as_ref().map(|(_, v)| v.clone()).unwrap_or_else(|| AsciiMetadataValue::from_static("")))
            }
            Err(e) => Err(tonic::Status::unauthenticated(format!("cannot read the token file {}: {e}", self.path.display()))),
        }
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = match &self.0 {
            Kind::None => return Ok(req),
            Kind::Fixed(v) => v.clone(),
            Kind::File(f) => f.value()?,
        };
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// A channel that adds credentials to every call.
pub type AuthChannel = InterceptedService<NodeChannel, Credentials>;

/// The channel to the broker's node, or nodes: with several, a call that
/// could not reach its node (refused, reset) has the client check at once
/// which nodes answer, so that the next calls go to the live ones rather
/// than after the next periodic check.
#[derive(Clone, Debug)]
pub struct NodeChannel {
    inner: Channel,
    unreachable: Option<Arc<tokio::sync::Notify>>,
}

impl NodeChannel {
    pub(crate) fn watched(inner: Channel, unreachable: Arc<tokio::sync::Notify>) -> NodeChannel {
        NodeChannel { inner, unreachable: Some(unreachable) }
    }
}

impl From<Channel> for NodeChannel {
    fn from(inner: Channel) -> NodeChannel {
        NodeChannel { inner, unreachable: None }
    }
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for NodeChannel {
    type Response = HttpResponse;
    type Error = <Channel as tonic::codegen::Service<HttpRequest>>::Error;
    type Future = futures::future::BoxFuture<'static, Result<HttpResponse, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let call = tonic::codegen::Service::call(&mut self.inner, req);
        let unreachable = self.unreachable.clone();
        Box::pin(async move {
            let result = call.await;
            if result.is_err()
                && let Some(n) = unreachable
            {
                n.notify_one();
            }
            result
        })
    }
}
