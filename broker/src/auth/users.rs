//! Users and their permissions: the records, compiled for matching, and
//! their durable home (the broker's store, `meta` column family).
//!
//! Two sources, one table: users of the auth file and the bootstrap
//! administrator (read-only, from configuration) and users stored in the
//! broker (managed through the `Users` API by `warrenctl user` and the
//! operator). A name defined in configuration cannot be changed through
//! the API.
//!
//! Passwords are stored only as argon2id hashes (PHC strings); a plain
//! password never reaches a log, a metric or the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::config::{AuthFile, FilePermissions};
use crate::store::keys::meta;
use crate::store::{Cf, Op, Store, StoreError};

/// Longest user name accepted.
pub const MAX_NAME: usize = 512;

/// Where a user is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The auth file or the bootstrap administrator: read-only.
    Config,
    /// Stored in the broker: managed through the API.
    Stored,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Stored => "stored",
        }
    }
}

/// Permission patterns, as given (regular expressions; empty matches
/// nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionSpec {
    pub configure: String,
    pub write: String,
    pub read: String,
    /// Routing-key patterns per topic exchange name: (write, read).
    #[serde(default)]
    pub topics: BTreeMap<String, TopicSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub write: String,
    pub read: String,
}

impl PermissionSpec {
    /// Every permission on every resource.
    pub fn all() -> PermissionSpec {
        PermissionSpec { configure: ".*".into(), write: ".*".into(), read: ".*".into(), topics: BTreeMap::new() }
    }
}

impl From<&FilePermissions> for PermissionSpec {
    fn from(p: &FilePermissions) -> Self {
        PermissionSpec {
            configure: p.configure.clone(),
            write: p.write.clone(),
            read: p.read.clone(),
            topics: p.topics.iter().map(|(k, t)| (k.clone(), TopicSpec { write: t.write.clone(), read: t.read.clone() })).collect(),
        }
    }
}

/// A user as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    /// argon2 PHC string; none: the user cannot log in with a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<PermissionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
}

/// A permission pattern, compiled. Like RabbitMQ's, a pattern matches a
/// name when it matches anywhere in it unless anchored (`^orders$`); an
/// empty pattern matches nothing.
#[derive(Clone, Debug)]
pub struct Pattern(Option<Regex>);

impl Pattern {
    pub fn compile(what: &str, pattern: &str) -> Result<Pattern, String> {
        if pattern.is_empty() {
            return Ok(Pattern(None));
        }
        Regex::new(pattern)
            .map(|r| Pattern(Some(r)))
            .map_err(|e| format!("the {what} pattern {pattern:?} is not a valid regular expression: {e}"))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// Compiled permissions.
#[derive(Clone, Debug)]
pub struct Permissions {
    pub spec: PermissionSpec,
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
    pub topics: HashMap<String, (Pattern, Pattern)>,
}

impl Permissions {
    pub fn compile(spec: &PermissionSpec) -> Result<Permissions, String> {
        let mut topics = HashMap::new();
        for (exchange, t) in &spec.topics {
            topics.insert(exchange.clone(), (Pattern::compile("topic write", &t.write)?, Pattern::compile("topic read", &t.read)?));
        }
        Ok(Permissions {
            spec: spec.clone(),
            configure: Pattern::compile("configure", &spec.configure)?,
            write: Pattern::compile("write", &spec.write)?,
            read: Pattern::compile("read", &spec.read)?,
            topics,
        })
    }
}

/// A user ready for authentication and authorization.
#[derive(Debug)]
pub struct User {
    pub record: UserRecord,
    pub source: Source,
    pub administrator: bool,
    pub monitoring: bool,
    pub permissions: Option<Permissions>,
}

impl User {
    pub fn new(record: UserRecord, source: Source) -> Result<User, String> {
        validate_name(&record.name)?;
        if let Some(hash) = &record.password_hash {
            PasswordHash::new(hash).map_err(|e| format!("user '{}': the password hash is not an argon2 PHC string: {e}", record.name))?;
        }
        for tag in &record.tags {
            if !matches!(tag.as_str(), "administrator" | "monitoring" | "management" | "policymaker" | "impersonator") {
                return Err(format!("user '{}': unknown tag '{tag}' (administrator, monitoring)", record.name));
            }
        }
        let permissions =
            record.permissions.as_ref().map(Permissions::compile).transpose().map_err(|e| format!("user '{}': {e}", record.name))?;
        Ok(User {
            administrator: record.tags.iter().any(|t| t == "administrator"),
            monitoring: record.tags.iter().any(|t| t == "administrator" || t == "monitoring"),
            permissions,
            record,
            source,
        })
    }
}

/// Checks a user name: non-empty, bounded, printable.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a user name must not be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("a user name is at most {MAX_NAME} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("a user name must not contain control characters".into());
    }
    Ok(())
}

/// Hashes a password with argon2id (default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `password` matches `hash` (constant time in the password).
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
}

/// Every user, by name. Immutable; replaced whole on change.
#[derive(Debug, Default)]
pub struct UserTable {
    pub users: HashMap<String, Arc<User>>,
    /// SHA-256 of a static token -> user name.
    pub tokens: HashMap<[u8; 32], String>,
}

/// The users defined by configuration: the auth file and the bootstrap
/// administrator.
pub fn config_users(file: Option<&AuthFile>, admin: Option<(&str, &str)>) -> Result<UserTable, String> {
    let mut table = UserTable::default();
    if let Some((name, password)) = admin {
        let record = UserRecord {
            name: name.to_string(),
            password_hash: Some(hash_password(password)?),
            tags: vec!["administrator".into()],
            permissions: Some(PermissionSpec::all()),
            max_connections: None,
            max_streams: None,
        };
        table.users.insert(name.to_string(), Arc::new(User::new(record, Source::Config)?));
    }
    if let Some(file) = file {
        for u in &file.users {
            if table.users.contains_key(&u.name) {
                return Err(format!("user '{}' is defined twice", u.name));
            }
            let record = UserRecord {
                name: u.name.clone(),
                password_hash: u.password_hash.clone(),
                tags: u.tags.clone(),
                permissions: u.permissions.as_ref().map(PermissionSpec::from),
                max_connections: u.max_connections,
                max_streams: u.max_streams,
            };
            table.users.insert(u.name.clone(), Arc::new(User::new(record, Source::Config)?));
        }
        for t in &file.tokens {
            let digest = parse_sha256(&t.sha256).ok_or_else(|| format!("token of user '{}': sha256 must be 64 hex digits", t.user))?;
            validate_name(&t.user)?;
            table.tokens.insert(digest, t.user.clone());
        }
    }
    Ok(table)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Users stored in the broker.
pub mod stored {
    use super::*;

    fn key(name: &str) -> Vec<u8> {
        meta::user(name)
    }

    /// Every stored user.
    pub fn load(store: &Store) -> Result<Vec<UserRecord>, StoreError> {
        let (from, to) = meta::range(meta::USER);
        let mut out = Vec::new();
        for (_, v) in store.engine().scan(Cf::Meta, &from, &to, usize::MAX)? {
            let record: UserRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt { cf: "meta", detail: format!("user record: {e}") })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Writes (durably) a user.
    pub async fn put(store: &Store, record: &UserRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Io(e.to_string()))?;
        store.write(vec![Op::Put(Cf::Meta, key(&record.name), value)], true).await
    }

    /// Deletes (durably) a user.
    pub async fn delete(store: &Store, name: &str) -> Result<(), StoreError> {
        store.write(vec![Op::Delete(Cf::Meta, key(name))], true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_match_patterns_like_rabbitmq() {
        let p = Pattern::compile("read", "^orders\\.").unwrap_or_else(|e| panic!("{e}"));
        assert!(p.matches("orders.eu"));
        assert!(!p.matches("x.orders.eu"));
        let unanchored = Pattern::compile("read", "orders").unwrap_or_else(|e| panic!("{e}"));
        assert!(unanchored.matches("my-orders-queue"), "unanchored patterns match anywhere, as in RabbitMQ");
        let none = Pattern::compile("read", "").unwrap_or_else(|e| panic!("{e}"));
        assert!(!none.matches("") && !none.matches("anything"), "an empty pattern matches nothing");
        assert!(Pattern::compile("read", "(").is_err());
    }

    #[test]
    fn should_hash_and_verify_passwords() {
        let hash = hash_password("s3cret").unwrap_or_else(|e| panic!("{e}"));
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("s3cret"));
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cret "));
        assert!(!verify_password("not a hash", "s3cret"));
    }

    #[test]
    fn should_refuse_bad_users() {
        let base =
            UserRecord { name: "a".into(), password_hash: None, tags: vec![], permissions: None, max_connections: None, max_streams: None };
        assert!(User::new(UserRecord { name: String::new(), ..base.clone() }, Source::Stored).is_err());
        assert!(User::new(UserRecord { tags: vec!["root".into()], ..base.clone() }, Source::Stored).is_err());
        assert!(User::new(UserRecord { password_hash: Some("plain".into()), ..base.clone() }, Source::Stored).is_err());
        let bad = PermissionSpec { read: "[".into(), ..PermissionSpec::default() };
        assert!(User::new(UserRecord { permissions: Some(bad), ..base.clone() }, Source::Stored).is_err());
        assert!(User::new(base, Source::Stored).is_ok());
        assert_eq!(parse_sha256(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_sha256("abc"), None);
    }
}
