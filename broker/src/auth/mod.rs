//! Access control at the gRPC edge: who is calling (authentication), what
//! they may do (authorization, [`authz`]), and how much they may hold
//! (per-user limits).
//!
//! * Authentication happens in a tower layer ([`layer::AuthLayer`]) before
//!   any RPC runs: a username and password (`authorization: Basic ...`), a
//!   bearer token (static, or a Kubernetes ServiceAccount token), or a
//!   verified client certificate (mutual TLS, subject common name). The
//!   result is the request's [`Principal`].
//! * Once per connection: a connection remembers the principal its
//!   credential proved, so later calls with the same credential cost a hash
//!   comparison; a process-wide cache does the same across connections
//!   (argon2 and TokenReview are slow by design). A connection belongs to
//!   one user: a call with another user's credential is refused.
//! * Authorization is a hook per RPC in `server.rs` ([`authz::check`]); the
//!   broker core knows nothing of users.
//! * Open mode: when no authentication is configured (a laptop on
//!   loopback), every caller is the anonymous principal, allowed
//!   everything, and no limit applies.
//!
//! Secrets never leave this module: passwords are compared against argon2
//! hashes, tokens are keyed by their SHA-256, and nothing here logs a
//! credential.

pub mod authz;
pub mod config;
pub mod kubernetes;
pub mod layer;
pub mod metrics;
pub mod service;
pub mod users;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use self::authz::Perm;
use self::config::{AuthFile, SecurityConfig};
use self::users::{Source, User, UserRecord, UserTable};
use crate::store::Store;
use crate::tls::PeerCertificate;

/// How a principal proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Open mode: nobody is asked.
    Anonymous,
    Password,
    Token,
    ServiceAccount,
    Certificate,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Anonymous => "anonymous",
            Mechanism::Password => "password",
            Mechanism::Token => "token",
            Mechanism::ServiceAccount => "serviceaccount",
            Mechanism::Certificate => "certificate",
        }
    }
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// The user name (`system:serviceaccount:NS:NAME` for a ServiceAccount,
    /// the certificate's common name for mutual TLS).
    pub name: Arc<str>,
    pub mechanism: Mechanism,
    /// The user's record; none for an identity without one (a
    /// ServiceAccount nobody gave permissions): it may do nothing.
    pub user: Option<Arc<User>>,
    /// Open mode: allowed everything.
    pub open: bool,
    /// The user table generation this principal was resolved at.
    generation: u64,
    /// Cancelled when the user is deleted: its streams end.
    pub revoked: CancellationToken,
}

impl Principal {
    pub fn administrator(&self) -> bool {
        self.open || self.user.as_ref().is_some_and(|u| u.administrator)
    }

    pub fn monitoring(&self) -> bool {
        self.open || self.user.as_ref().is_some_and(|u| u.monitoring)
    }

    /// Whether `perm` is granted on the exchange or queue `name`.
    pub fn can(&self, perm: Perm, name: &str) -> bool {
        if self.open {
            return true;
        }
        let Some(p) = self.user.as_ref().and_then(|u| u.permissions.as_ref()) else { return false };
        match perm {
            Perm::Configure => p.configure.matches(name),
            Perm::Write => p.write.matches(name),
            Perm::Read => p.read.matches(name),
        }
    }

    /// Whether a topic permission allows `routing_key` on `exchange`
    /// (allowed when the exchange has none, as in RabbitMQ).
    pub fn can_topic(&self, perm: Perm, exchange: &str, routing_key: &str) -> bool {
        if self.open {
            return true;
        }
        let Some(p) = self.user.as_ref().and_then(|u| u.permissions.as_ref()) else { return true };
        match p.topics.get(exchange) {
            None => true,
            Some((write, read)) => match perm {
                Perm::Write => write.matches(routing_key),
                Perm::Read | Perm::Configure => read.matches(routing_key),
            },
        }
    }

    fn limits(&self) -> (Option<u32>, Option<u32>) {
        self.user.as_ref().map_or((None, None), |u| (u.record.max_connections, u.record.max_streams))
    }
}

/// A client connection's authentication state (one per TCP connection).
#[derive(Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The client certificate it presented, verified against the client CA.
    pub certificate: Option<PeerCertificate>,
    bound: Mutex<Option<Bound>>,
}

#[derive(Debug)]
struct Bound {
    /// SHA-256 of the credential that proved the principal.
    credential: [u8; 32],
    principal: Arc<Principal>,
    /// Until when the proof holds without asking again (the cache TTL, a
    /// token's expiry): a ServiceAccount token revoked or expired stops
    /// working on a connection that stays open too.
    until: Instant,
    _slot: Option<Slot>,
}

impl Connection {
    pub fn new(peer: SocketAddr, certificate: Option<PeerCertificate>) -> Connection {
        Connection { peer, certificate, bound: Mutex::new(None) }
    }

    /// The user this connection authenticated as, if any.
    pub fn user(&self) -> Option<Arc<str>> {
        self.bound.lock().as_ref().map(|b| b.principal.name.clone())
    }
}

/// Open (connections, streams) per user name.
type Usage = Arc<Mutex<HashMap<Arc<str>, (u32, u32)>>>;

/// One counted connection or stream of a user; released on drop.
#[derive(Debug)]
pub struct Slot {
    usage: Usage,
    user: Arc<str>,
    stream: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut usage = self.usage.lock();
        if let Some(u) = usage.get_mut(&self.user) {
            if self.stream {
                u.1 = u.1.saturating_sub(1);
            } else {
                u.0 = u.0.saturating_sub(1);
            }
            if *u == (0, 0) {
                usage.remove(&self.user);
            }
        }
    }
}

/// What a credential proved, cached by its SHA-256.
#[derive(Clone, Debug)]
struct Proven {
    name: Arc<str>,
    mechanism: Mechanism,
    /// For passwords: the hash it was checked against (a changed password
    /// invalidates the entry).
    password_hash: Option<String>,
    until: Instant,
}

/// Most cached credentials; past it the cache is emptied (a flood of bad
/// credentials is not cached, only proven ones are).
const MAX_CACHED: usize = 16_384;

/// Access control for one broker. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    /// Users and tokens from configuration.
    config: UserTable,
    /// Everything: configuration plus stored users.
    table: ArcSwap<UserTable>,
    generation: AtomicU64,
    store: Option<Store>,
    /// Serializes changes to stored users.
    changes: tokio::sync::Mutex<()>,
    cache: Mutex<HashMap<[u8; 32], Proven>>,
    cache_ttl: Duration,
    kubernetes: Option<kubernetes::Validator>,
    usage: Usage,
    max_connections: u32,
    max_streams: u32,
    revocations: Mutex<HashMap<String, CancellationToken>>,
    anonymous: Arc<Principal>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("enabled", &self.inner.enabled).finish_non_exhaustive()
    }
}

fn anonymous() -> Arc<Principal> {
    Arc::new(Principal {
        name: "anonymous".into(),
        mechanism: Mechanism::Anonymous,
        user: None,
        open: true,
        generation: 0,
        revoked: CancellationToken::new(),
    })
}

fn unauthenticated(msg: impl Into<String>) -> Status {
    Status::unauthenticated(msg)
}

impl Auth {
    /// Open mode: no authentication, everything allowed.
    pub fn open() -> Auth {
        Auth::build(false, UserTable::default(), None, None, Duration::from_secs(60), 0, 0)
    }

    fn build(
        enabled: bool,
        config: UserTable,
        store: Option<Store>,
        kubernetes: Option<kubernetes::Validator>,
        cache_ttl: Duration,
        max_connections: u32,
        max_streams: u32,
    ) -> Auth {
        let table = UserTable { users: config.users.clone(), tokens: config.tokens.clone() };
        Auth {
            inner: Arc::new(Inner {
                enabled,
                config,
                table: ArcSwap::from_pointee(table),
                generation: AtomicU64::new(1),
                store,
                changes: tokio::sync::Mutex::new(()),
                cache: Mutex::default(),
                cache_ttl,
                kubernetes,
                usage: Arc::default(),
                max_connections,
                max_streams,
                revocations: Mutex::default(),
                anonymous: anonymous(),
            }),
        }
    }

    /// Access control from the settings, with users stored in `store`.
    pub async fn from_config(settings: &SecurityConfig, store: Option<Store>) -> anyhow::Result<Auth> {
        let file = settings.auth_file.as_deref().map(AuthFile::load).transpose().map_err(anyhow::Error::msg)?;
        let admin_password = match &settings.admin_password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read admin_password_file {}: {e}", path.display()))?;
                let password = text.trim_end_matches(['\r', '\n']).to_string();
                if password.is_empty() {
                    anyhow::bail!("admin_password_file {} is empty", path.display());
                }
                Some(password)
            }
            None => None,
        };
        let admin = admin_password.as_deref().map(|p| (settings.admin_user.as_str(), p));
        let config = tokio::task::spawn_blocking({
            let file = file.clone();
            let admin = admin.map(|(u, p)| (u.to_string(), p.to_string()));
            move || users::config_users(file.as_ref(), admin.as_ref().map(|(u, p)| (u.as_str(), p.as_str())))
        })
        .await?
        .map_err(|e| anyhow::anyhow!("invalid users: {e}"))?;
        let kubernetes = match settings.kubernetes_auth {
            config::KubernetesAuth::Off => None,
            mode => Some(kubernetes::Validator::new(settings, mode).map_err(anyhow::Error::msg)?),
        };
        let auth = Auth::build(
            settings.auth_enabled(),
            config,
            store.clone(),
            kubernetes,
            settings.auth_cache_ttl,
            settings.max_connections_per_user,
            settings.max_streams_per_user,
        );
        if let Some(store) = &store {
            let records = users::stored::load(store)?;
            for record in records {
                let name = record.name.clone();
                match User::new(record, Source::Stored) {
                    Ok(u) => auth.put_in_table(Arc::new(u)),
                    Err(e) => tracing::warn!(user = %name, error = %e, "ignoring a stored user that is no longer valid"),
                }
            }
        }
        Ok(auth)
    }

    /// Whether clients must authenticate.
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// The users, for listing.
    pub fn table(&self) -> Arc<UserTable> {
        self.inner.table.load_full()
    }

    fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn put_in_table(&self, user: Arc<User>) {
        let current = self.inner.table.load();
        let mut users = current.users.clone();
        // Configuration wins over a stored user of the same name.
        if self.inner.config.users.contains_key(&user.record.name) {
            return;
        }
        users.insert(user.record.name.clone(), user);
        self.inner.table.store(Arc::new(UserTable { users, tokens: current.tokens.clone() }));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn remove_from_table(&self, name: &str) {
        let current = self.inner.table.load();
        let mut users = current.users.clone();
        users.remove(name);
        self.inner.table.store(Arc::new(UserTable { users, tokens: current.tokens.clone() }));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        // Cached proofs of the user's credentials go with it.
        self.inner.cache.lock().retain(|_, p| &*p.name != name);
        if let Some(token) = self.inner.revocations.lock().remove(name) {
            token.cancel();
        }
    }

    fn revocation(&self, name: &str) -> CancellationToken {
        self.inner.revocations.lock().entry(name.to_string()).or_default().clone()
    }

    fn resolve(&self, name: Arc<str>, mechanism: Mechanism) -> Arc<Principal> {
        let generation = self.generation();
        let user = self.inner.table.load().users.get(&*name).cloned();
        let revoked = self.revocation(&name);
        Arc::new(Principal { name, mechanism, user, open: false, generation, revoked })
    }

    /// Authenticates a call on `conn` from its `authorization` metadata or
    /// the connection's client certificate.
    pub async fn authenticate(&self, conn: &Connection, headers: &http::HeaderMap) -> Result<Arc<Principal>, Status> {
        if !self.inner.enabled {
            return Ok(self.inner.anonymous.clone());
        }
        let header = headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        let (credential, cert_name) = match (header, &conn.certificate) {
            (Some(h), _) => (users::sha256(h), None),
            (None, Some(cert)) => {
                let Some(cn) = cert.common_name.clone() else {
                    return Err(self.failed(conn, Mechanism::Certificate, "", "the client certificate has no common name (CN)"));
                };
                (users::sha256(format!("\0certificate\0{}", cert.subject).as_bytes()), Some(cn))
            }
            (None, None) => {
                return Err(unauthenticated(
                    "authentication required: send a username and password, a bearer token, or a client certificate",
                ));
            }
        };
        // The connection's own memory: the same credential as before.
        {
            let bound = conn.bound.lock();
            if let Some(b) = bound.as_ref()
                && b.credential == credential
                && b.principal.generation == self.generation()
                && !b.principal.revoked.is_cancelled()
                && b.until > Instant::now()
            {
                return Ok(b.principal.clone());
            }
        }
        let proven = match cert_name {
            Some(cn) => {
                metrics::global().attempt(Mechanism::Certificate.as_str(), true);
                Proven {
                    name: cn.into(),
                    mechanism: Mechanism::Certificate,
                    password_hash: None,
                    until: Instant::now() + self.inner.cache_ttl,
                }
            }
            None => self.prove(conn, credential, header.unwrap_or_default()).await?,
        };
        let principal = self.resolve(proven.name.clone(), proven.mechanism);
        self.bind(conn, credential, principal, proven.until)
    }

    /// Checks a credential (cached).
    async fn prove(&self, conn: &Connection, key: [u8; 32], header: &[u8]) -> Result<Proven, Status> {
        let table = self.inner.table.load_full();
        if let Some(p) = self.inner.cache.lock().get(&key).cloned()
            && p.until > Instant::now()
        {
            let still = match &p.password_hash {
                Some(h) => table.users.get(&*p.name).and_then(|u| u.record.password_hash.as_ref()) == Some(h),
                None => true,
            };
            if still {
                return Ok(p);
            }
        }
        let text = std::str::from_utf8(header).map_err(|_| unauthenticated("the authorization header is not text"))?;
        let (scheme, value) = text.split_once(' ').unwrap_or((text, ""));
        let value = value.trim();
        let proven = if scheme.eq_ignore_ascii_case("basic") {
            self.prove_password(conn, &table, value).await?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.prove_token(conn, &table, value).await?
        } else {
            return Err(unauthenticated("unsupported authorization scheme: use Basic (username and password) or Bearer (a token)"));
        };
        let mut cache = self.inner.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, proven.clone());
        Ok(proven)
    }

    async fn prove_password(&self, conn: &Connection, table: &UserTable, value: &str) -> Result<Proven, Status> {
        let mechanism = Mechanism::Password;
        let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok().and_then(|b| String::from_utf8(b).ok());
        let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Err(self.failed(conn, mechanism, "", "malformed basic credentials"));
        };
        let hash = table.users.get(name).and_then(|u| u.record.password_hash.clone());
        let ok = match hash.clone() {
            Some(hash) => {
                let password = password.to_string();
                tokio::task::spawn_blocking(move || users::verify_password(&hash, &password)).await.unwrap_or(false)
            }
            None => false,
        };
        if !ok {
            return Err(self.failed(conn, mechanism, name, "invalid username or password"));
        }
        metrics::global().attempt(mechanism.as_str(), true);
        Ok(Proven { name: name.into(), mechanism, password_hash: hash, until: Instant::now() + self.inner.cache_ttl })
    }

    async fn prove_token(&self, conn: &Connection, table: &UserTable, token: &str) -> Result<Proven, Status> {
        if let Some(name) = table.tokens.get(&users::sha256(token.as_bytes())) {
            metrics::global().attempt(Mechanism::Token.as_str(), true);
            return Ok(Proven {
                name: name.as_str().into(),
                mechanism: Mechanism::Token,
                password_hash: None,
                until: Instant::now() + self.inner.cache_ttl,
            });
        }
        let Some(kube) = &self.inner.kubernetes else {
            return Err(self.failed(conn, Mechanism::Token, "", "unknown token"));
        };
        if !kubernetes::looks_like_jwt(token) {
            return Err(self.failed(conn, Mechanism::Token, "", "unknown token"));
        }
        match kube.validate(token).await {
            Ok(sa) => {
                metrics::global().attempt(Mechanism::ServiceAccount.as_str(), true);
                let ttl = Instant::now() + self.inner.cache_ttl;
                let until = sa.expires.map_or(ttl, |e| ttl.min(e));
                Ok(Proven { name: sa.name.into(), mechanism: Mechanism::ServiceAccount, password_hash: None, until })
            }
            Err(why) => Err(self.failed(conn, Mechanism::ServiceAccount, "", &format!("invalid ServiceAccount token: {why}"))),
        }
    }

    /// Counts, logs (an audit line, never the credential) and answers a
    /// failed authentication.
    fn failed(&self, conn: &Connection, mechanism: Mechanism, user: &str, why: &str) -> Status {
        metrics::global().attempt(mechanism.as_str(), false);
        tracing::warn!(target: "warren::audit", peer = %conn.peer, mechanism = mechanism.as_str(), user, "authentication failed: {why}");
        unauthenticated(why.to_string())
    }

    /// Binds the connection to `principal` (its first user), counting it
    /// against the user's connection limit.
    fn bind(&self, conn: &Connection, credential: [u8; 32], principal: Arc<Principal>, until: Instant) -> Result<Arc<Principal>, Status> {
        let mut bound = conn.bound.lock();
        let slot = match bound.take() {
            Some(b) if b.principal.name != principal.name => {
                let name = b.principal.name.clone();
                *bound = Some(b);
                return Err(unauthenticated(format!(
                    "this connection is authenticated as '{name}'; open another connection for '{}'",
                    principal.name
                )));
            }
            Some(b) => b._slot,
            None => Some(self.take_slot(&principal, false)?),
        };
        *bound = Some(Bound { credential, principal: principal.clone(), until, _slot: slot });
        Ok(principal)
    }

    fn take_slot(&self, principal: &Principal, stream: bool) -> Result<Slot, Status> {
        let (user_conns, user_streams) = principal.limits();
        let limit = if stream { user_streams.unwrap_or(self.inner.max_streams) } else { user_conns.unwrap_or(self.inner.max_connections) };
        let mut usage = self.inner.usage.lock();
        let u = usage.entry(principal.name.clone()).or_default();
        let count = if stream { &mut u.1 } else { &mut u.0 };
        if limit > 0 && *count >= limit {
            let what = if stream { "streams (publish and consume)" } else { "connections" };
            if *u == (0, 0) {
                usage.remove(&principal.name);
            }
            metrics::global().limit_reached(stream);
            tracing::warn!(target: "warren::audit", user = %principal.name, limit, "user limit reached: {what}");
            return Err(Status::resource_exhausted(format!("user '{}' has {limit} {what} open, its limit", principal.name)));
        }
        *count += 1;
        Ok(Slot { usage: self.inner.usage.clone(), user: principal.name.clone(), stream })
    }

    /// Counts a publish or consume stream of `principal` against its limit;
    /// released when the returned slot drops (the stream ended). None in
    /// open mode.
    pub fn open_stream(&self, principal: &Principal) -> Result<Option<Slot>, Status> {
        if principal.open {
            return Ok(None);
        }
        self.take_slot(principal, true).map(Some)
    }

    /// Open connections and streams of `user`.
    pub fn usage(&self, user: &str) -> (u32, u32) {
        self.inner.usage.lock().get(user).copied().unwrap_or_default()
    }

    // ------------------------------------------------------------ changes

    /// Creates or replaces a stored user.
    pub async fn put_user(&self, record: UserRecord) -> Result<(), Status> {
        if self.inner.config.users.contains_key(&record.name) {
            return Err(Status::failed_precondition(format!(
                "user '{}' is defined in the broker's configuration and cannot be changed through the API",
                record.name
            )));
        }
        let user = User::new(record, Source::Stored).map_err(Status::invalid_argument)?;
        let _guard = self.inner.changes.lock().await;
        if let Some(store) = &self.inner.store {
            users::stored::put(store, &user.record).await.map_err(|e| Status::internal(e.to_string()))?;
        }
        self.put_in_table(Arc::new(user));
        Ok(())
    }

    /// Deletes a stored user: its credentials stop working at once, its
    /// open streams end.
    pub async fn delete_user(&self, name: &str) -> Result<bool, Status> {
        if self.inner.config.users.contains_key(name) {
            return Err(Status::failed_precondition(format!(
                "user '{name}' is defined in the broker's configuration and cannot be deleted through the API"
            )));
        }
        let _guard = self.inner.changes.lock().await;
        let existed = self.inner.table.load().users.contains_key(name);
        if existed {
            if let Some(store) = &self.inner.store {
                users::stored::delete(store, name).await.map_err(|e| Status::internal(e.to_string()))?;
            }
            self.remove_from_table(name);
        }
        Ok(existed)
    }

    /// A stored user's record (for read-modify-write).
    pub fn record(&self, name: &str) -> Option<(UserRecord, Source)> {
        self.inner.table.load().users.get(name).map(|u| (u.record.clone(), u.source))
    }
}

/// The principal and peer of a request: set by [`layer::AuthLayer`]. A
/// request that did not pass the layer (a service used directly, in
/// tests) counts as open.
pub fn authenticated<T>(req: &Request<T>) -> (Arc<Principal>, String) {
    let principal = req.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(anonymous);
    let peer = req.extensions().get::<Arc<Connection>>().map(|c| c.peer.to_string()).unwrap_or_default();
    (principal, peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::PermissionSpec;

    fn basic(user: &str, password: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap_or_else(|e| panic!("{e}")));
        h
    }

    fn conn() -> Connection {
        Connection::new("127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")), None)
    }

    async fn auth_with(records: Vec<UserRecord>, max_conns: u32) -> Auth {
        let auth = Auth::build(true, UserTable::default(), None, None, Duration::from_secs(60), max_conns, 1);
        for r in records {
            auth.put_user(r).await.unwrap_or_else(|e| panic!("{e}"));
        }
        auth
    }

    fn alice() -> UserRecord {
        UserRecord {
            name: "alice".into(),
            password_hash: Some(users::hash_password("pw").unwrap_or_else(|e| panic!("{e}"))),
            tags: vec![],
            permissions: Some(PermissionSpec { configure: "^a".into(), write: "".into(), read: ".*".into(), ..Default::default() }),
            max_connections: None,
            max_streams: None,
        }
    }

    #[tokio::test]
    async fn should_authenticate_once_per_connection_and_refuse_a_second_user() {
        let mut bob = alice();
        bob.name = "bob".into();
        let auth = auth_with(vec![alice(), bob], 0).await;
        let c = conn();
        let p = auth.authenticate(&c, &basic("alice", "pw")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&*p.name, "alice");
        assert!(p.can(Perm::Configure, "abc") && !p.can(Perm::Configure, "b") && !p.can(Perm::Write, "a"));
        let again = auth.authenticate(&c, &basic("alice", "pw")).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&p, &again), "the connection remembers the principal");
        let e = auth.authenticate(&c, &basic("bob", "pw")).await.err().unwrap_or_else(|| panic!("a second user on one connection"));
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth.authenticate(&conn(), &basic("alice", "nope")).await.err().unwrap_or_else(|| panic!("a wrong password passed"));
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("nope"));
        let e = auth.authenticate(&conn(), &http::HeaderMap::new()).await.err().unwrap_or_else(|| panic!("no credential passed"));
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn should_enforce_per_user_limits_and_release_them() {
        let auth = auth_with(vec![alice()], 1).await;
        let first = conn();
        let p = auth.authenticate(&first, &basic("alice", "pw")).await.unwrap_or_else(|e| panic!("{e}"));
        let second = conn();
        let e = auth.authenticate(&second, &basic("alice", "pw")).await.err().unwrap_or_else(|| panic!("over the limit"));
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let s = auth.open_stream(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(auth.open_stream(&p).err().map(|e| e.code()), Some(tonic::Code::ResourceExhausted));
        drop(s);
        assert!(auth.open_stream(&p).is_ok());
        drop(first);
        assert!(auth.authenticate(&second, &basic("alice", "pw")).await.is_ok(), "a closed connection frees its slot");
    }

    #[tokio::test]
    async fn should_revoke_a_deleted_user() {
        let auth = auth_with(vec![alice()], 0).await;
        let c = conn();
        let p = auth.authenticate(&c, &basic("alice", "pw")).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(auth.delete_user("alice").await.unwrap_or_else(|e| panic!("{e}")));
        assert!(p.revoked.is_cancelled());
        let e = auth.authenticate(&c, &basic("alice", "pw")).await.err().unwrap_or_else(|| panic!("a deleted user passed"));
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn should_let_everyone_in_when_open() {
        let auth = Auth::open();
        let p = auth.authenticate(&conn(), &http::HeaderMap::new()).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(p.open && p.administrator() && p.can(Perm::Configure, "anything"));
        assert!(auth.open_stream(&p).unwrap_or_else(|e| panic!("{e}")).is_none());
    }
}
