//! The security settings: flags, `WARREN_*` variables and keys of the TOML
//! configuration file, like every other setting (flattened into
//! [`crate::config::Config`]), plus the auth file they may name (users,
//! tokens and permissions, which do not fit in flags).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::config::{parse_duration, show_duration};
use crate::tls::{ClientAuth, TlsFiles};

/// How Kubernetes ServiceAccount tokens are validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesAuth {
    /// Not accepted.
    Off,
    /// Asked of the API server (`TokenReview`), answers cached.
    TokenReview,
    /// Checked against the cluster's signing keys (OIDC JWKS).
    Jwks,
}

impl KubernetesAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            KubernetesAuth::Off => "off",
            KubernetesAuth::TokenReview => "token-review",
            KubernetesAuth::Jwks => "jwks",
        }
    }
}

/// Security settings. See `docs/security.md`.
#[derive(Clone, Debug, Args)]
pub struct SecurityConfig {
    /// Certificate chain (PEM) of the gRPC listener: set with --tls-key, the
    /// listener speaks TLS only. Re-read when it changes.
    #[arg(long, env = "WARREN_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the gRPC listener.
    #[arg(long, env = "WARREN_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates (mutual TLS): a
    /// client presenting one it signed is authenticated as the certificate's
    /// subject common name.
    #[arg(long, env = "WARREN_TLS_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: `optional` (clients without a certificate
    /// authenticate with a password or a token) or `required`.
    #[arg(long, env = "WARREN_TLS_CLIENT_AUTH", value_enum, default_value_t = ClientAuth::Optional, value_name = "MODE")]
    pub tls_client_auth: ClientAuth,

    /// Certificate chain (PEM) of the HTTP listener (metrics, health): set
    /// with --http-tls-key, it serves HTTPS only.
    #[arg(long, env = "WARREN_HTTP_TLS_CERT", value_name = "FILE", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the HTTP listener.
    #[arg(long, env = "WARREN_HTTP_TLS_KEY", value_name = "FILE", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,

    /// Certificate chain (PEM) this node presents on the node-to-node
    /// listener and when it dials its peers (mutual TLS between the nodes
    /// of a cluster; with --cluster-tls-key and --cluster-tls-ca). It must
    /// name the address peers dial (`--peers`) and allow both server and
    /// client authentication. Re-read when it changes.
    #[arg(long, env = "WARREN_CLUSTER_TLS_CERT", value_name = "FILE", requires_all = ["cluster_tls_key", "cluster_tls_ca"])]
    pub cluster_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --cluster-tls-cert.
    #[arg(long, env = "WARREN_CLUSTER_TLS_KEY", value_name = "FILE", requires = "cluster_tls_cert")]
    pub cluster_tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign the nodes' certificates: a peer is
    /// admitted only with a certificate it signed, and a node trusts only
    /// peers whose server certificate it signed.
    #[arg(long, env = "WARREN_CLUSTER_TLS_CA", value_name = "FILE", requires = "cluster_tls_cert")]
    pub cluster_tls_ca: Option<PathBuf>,

    /// File holding the secret every node of the cluster shares (like
    /// RabbitMQ's Erlang cookie): node-to-node calls carry it and calls
    /// without it are refused. 16 to 1024 printable ASCII characters;
    /// surrounding whitespace is ignored.
    #[arg(long, env = "WARREN_CLUSTER_SECRET_FILE", value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// How often certificate and key files are checked for changes.
    #[arg(long, env = "WARREN_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub tls_reload_interval: Duration,

    /// Require authentication even when no credential source is configured
    /// (only users stored in the broker can then connect).
    #[arg(long, env = "WARREN_AUTH", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub auth: Option<bool>,

    /// Users, tokens and permissions (TOML; see docs/security.md). Setting
    /// it turns authentication on.
    #[arg(long, env = "WARREN_AUTH_FILE", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,

    /// Name of the bootstrap administrator (with --admin-password-file).
    #[arg(long, env = "WARREN_ADMIN_USER", default_value = "admin", value_name = "NAME")]
    pub admin_user: String,

    /// File holding the bootstrap administrator's password (a mounted
    /// Secret): an administrator with every permission. Turns
    /// authentication on.
    #[arg(long, env = "WARREN_ADMIN_PASSWORD_FILE", value_name = "FILE")]
    pub admin_password_file: Option<PathBuf>,

    /// Kubernetes ServiceAccount tokens: `off`, `token-review` (asks the API
    /// server, answers cached) or `jwks` (the cluster's signing keys). Not
    /// `off` turns authentication on.
    #[arg(long, env = "WARREN_KUBERNETES_AUTH", value_enum, default_value_t = KubernetesAuth::Off, value_name = "MODE")]
    pub kubernetes_auth: KubernetesAuth,

    /// Audience a ServiceAccount token must be issued for.
    #[arg(long, env = "WARREN_KUBERNETES_AUDIENCE", default_value = "warren", value_name = "AUDIENCE")]
    pub kubernetes_audience: String,

    /// The API server (default: the in-cluster address from
    /// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT).
    #[arg(long, env = "WARREN_KUBERNETES_API", value_name = "URL")]
    pub kubernetes_api: Option<String>,

    /// CA of the API server (default: the pod's ServiceAccount CA).
    #[arg(long, env = "WARREN_KUBERNETES_CA_FILE", value_name = "FILE")]
    pub kubernetes_ca_file: Option<PathBuf>,

    /// The broker's own token for the API server (default: the pod's
    /// ServiceAccount token), re-read as it rotates.
    #[arg(long, env = "WARREN_KUBERNETES_TOKEN_FILE", value_name = "FILE")]
    pub kubernetes_token_file: Option<PathBuf>,

    /// With `jwks`: where the signing keys are (default: the API server's
    /// /openid/v1/jwks).
    #[arg(long, env = "WARREN_KUBERNETES_JWKS_URL", value_name = "URL")]
    pub kubernetes_jwks_url: Option<String>,

    /// With `jwks`: the issuer tokens must name (`iss`); unchecked when
    /// unset.
    #[arg(long, env = "WARREN_KUBERNETES_ISSUER", value_name = "ISSUER")]
    pub kubernetes_issuer: Option<String>,

    /// How long a validated token (or a password) stays trusted before it is
    /// checked again (a token's own expiry comes first).
    #[arg(long, env = "WARREN_AUTH_CACHE_TTL", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub auth_cache_ttl: Duration,

    /// Most connections one user may have open at once (0: no limit); a
    /// user's own `max_connections` overrides it.
    #[arg(long, env = "WARREN_MAX_CONNECTIONS_PER_USER", default_value_t = 0, value_name = "N")]
    pub max_connections_per_user: u32,

    /// Most publish and consume streams one user may have open at once (0:
    /// no limit); a user's own `max_streams` overrides it.
    #[arg(long, env = "WARREN_MAX_STREAMS_PER_USER", default_value_t = 0, value_name = "N")]
    pub max_streams_per_user: u32,

    /// Serve gRPC on a non-loopback address without authentication. Anyone
    /// who can reach the port can then read, publish and delete anything.
    #[arg(long, env = "WARREN_INSECURE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub insecure: Option<bool>,
}

impl SecurityConfig {
    /// TLS of the gRPC listener.
    pub fn grpc_tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            client_auth: self.tls_client_auth,
        })
    }

    /// TLS of the HTTP listener.
    pub fn http_tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.http_tls_cert.clone()?,
            key: self.http_tls_key.clone()?,
            client_ca: None,
            client_auth: ClientAuth::Optional,
        })
    }

    /// Mutual TLS of the node-to-node listener and connections.
    pub fn cluster_tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cluster_tls_cert.clone()?,
            key: self.cluster_tls_key.clone()?,
            client_ca: Some(self.cluster_tls_ca.clone()?),
            client_auth: ClientAuth::Required,
        })
    }

    /// Whether the nodes of a cluster authenticate each other (mutual TLS
    /// or the shared secret).
    pub fn cluster_authenticated(&self) -> bool {
        self.cluster_tls().is_some() || self.cluster_secret_file.is_some()
    }

    /// The default posture of the node-to-node listener: beyond loopback
    /// it needs mutual TLS or the shared secret, unless `--insecure`. Whoever
    /// reaches it unauthenticated could read and change every replicated
    /// queue without any permission check.
    pub fn check_cluster_posture(&self, cluster_addr: SocketAddr) -> Result<(), String> {
        if self.cluster_authenticated() || cluster_addr.ip().is_loopback() || self.insecure() {
            return Ok(());
        }
        Err(format!(
            "refusing to serve the node-to-node listener on {cluster_addr} without authentication: anyone who can reach it \
             could read and change every replicated queue. Configure --cluster-secret-file (a secret all nodes share) or \
             mutual TLS (--cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca), listen on loopback, or pass --insecure"
        ))
    }

    /// Whether clients must authenticate: any credential source configured,
    /// or `--auth`.
    pub fn auth_enabled(&self) -> bool {
        self.auth == Some(true)
            || self.auth_file.is_some()
            || self.admin_password_file.is_some()
            || self.kubernetes_auth != KubernetesAuth::Off
            || self.tls_client_ca.is_some()
    }

    pub fn insecure(&self) -> bool {
        self.insecure == Some(true)
    }

    /// The default posture: a broker that serves gRPC beyond loopback
    /// without authentication refuses to start unless `--insecure`.
    pub fn check_posture(&self, grpc_addr: SocketAddr) -> Result<(), String> {
        if self.auth_enabled() || grpc_addr.ip().is_loopback() || self.insecure() {
            return Ok(());
        }
        Err(format!(
            "refusing to serve gRPC on {grpc_addr} without authentication: anyone who can reach it could read, publish and delete \
             every message. Configure authentication (--admin-password-file, --auth-file, --kubernetes-auth or --tls-client-ca), \
             listen on loopback (127.0.0.1), or pass --insecure to run open anyway"
        ))
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_client_auth == ClientAuth::Required && self.tls_client_ca.is_none() {
            return Err("tls_client_auth = required needs tls_client_ca".into());
        }
        if self.tls_reload_interval < Duration::from_millis(100) || self.tls_reload_interval > Duration::from_secs(3600) {
            return Err(format!("tls_reload_interval is {}; it must be between 100ms and 1h", show_duration(self.tls_reload_interval)));
        }
        if self.auth_cache_ttl > Duration::from_secs(3600) {
            return Err(format!("auth_cache_ttl is {}; the most allowed is 1h", show_duration(self.auth_cache_ttl)));
        }
        if self.admin_user.is_empty() {
            return Err("admin_user must not be empty".into());
        }
        if self.kubernetes_audience.is_empty() {
            return Err("kubernetes_audience must not be empty".into());
        }
        Ok(())
    }

    /// `key = value` rows for the configuration printed at start: paths and
    /// modes, never a secret.
    pub fn render_rows(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map_or_else(|| "(none)".to_string(), |p| p.display().to_string());
        vec![
            ("tls_cert", path(&self.tls_cert)),
            ("tls_key", path(&self.tls_key)),
            ("tls_client_ca", path(&self.tls_client_ca)),
            ("tls_client_auth", self.tls_client_auth.as_str().to_string()),
            ("http_tls_cert", path(&self.http_tls_cert)),
            ("http_tls_key", path(&self.http_tls_key)),
            ("cluster_tls_cert", path(&self.cluster_tls_cert)),
            ("cluster_tls_key", path(&self.cluster_tls_key)),
            ("cluster_tls_ca", path(&self.cluster_tls_ca)),
            ("cluster_secret_file", path(&self.cluster_secret_file)),
            ("tls_reload_interval", show_duration(self.tls_reload_interval)),
            ("auth", self.auth_enabled().to_string()),
            ("auth_file", path(&self.auth_file)),
            ("admin_user", self.admin_user.clone()),
            ("admin_password_file", path(&self.admin_password_file)),
            ("kubernetes_auth", self.kubernetes_auth.as_str().to_string()),
            ("kubernetes_audience", self.kubernetes_audience.clone()),
            ("kubernetes_api", self.kubernetes_api.clone().unwrap_or_else(|| "(in-cluster)".into())),
            ("kubernetes_jwks_url", self.kubernetes_jwks_url.clone().unwrap_or_else(|| "(from the API server)".into())),
            ("kubernetes_issuer", self.kubernetes_issuer.clone().unwrap_or_else(|| "(unchecked)".into())),
            ("auth_cache_ttl", show_duration(self.auth_cache_ttl)),
            ("max_connections_per_user", self.max_connections_per_user.to_string()),
            ("max_streams_per_user", self.max_streams_per_user.to_string()),
            ("insecure", self.insecure().to_string()),
        ]
    }
}

/// The auth file (`--auth-file`).
///
/// ```toml
/// [[users]]
/// name = "checkout"
/// password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # warrenctl user hash-password
/// tags = []
/// permissions = { configure = "^checkout\\.", write = "^orders$", read = "^checkout\\." }
///
/// [[users]]                       # an identity without a password: a
/// name = "system:serviceaccount:shop:worker"   # ServiceAccount, a certificate subject
/// permissions = { configure = "", write = "", read = "^orders\\." }
///
/// [[tokens]]
/// user = "ci"
/// sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub users: Vec<FileUser>,
    #[serde(default)]
    pub tokens: Vec<FileToken>,
}

/// A user of the auth file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUser {
    pub name: String,
    /// An argon2 hash in PHC format; none: no password login.
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub permissions: Option<FilePermissions>,
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_streams: Option<u32>,
}

/// Permissions in the auth file: regular expressions over exchange and
/// queue names.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePermissions {
    #[serde(default)]
    pub configure: String,
    #[serde(default)]
    pub write: String,
    #[serde(default)]
    pub read: String,
    /// Routing-key patterns per topic exchange.
    #[serde(default)]
    pub topics: BTreeMap<String, FileTopic>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTopic {
    #[serde(default)]
    pub write: String,
    #[serde(default)]
    pub read: String,
}

/// A static bearer token: its SHA-256 (hex), never the token itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    pub user: String,
    pub sha256: String,
}

impl AuthFile {
    pub fn load(path: &Path) -> Result<AuthFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the auth file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }
}
