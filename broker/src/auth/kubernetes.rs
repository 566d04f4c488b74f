//! Kubernetes ServiceAccount tokens: a pod presents its projected token
//! (audience `warren` by default) and is the user
//! `system:serviceaccount:NAMESPACE:NAME`.
//!
//! Two ways to validate, per `--kubernetes-auth`:
//! * `token-review`: ask the API server (`TokenReview`, with the broker's
//!   own ServiceAccount token; it needs `tokenreviews: create`). Catches a
//!   deleted ServiceAccount or pod at once. Answers are cached by the
//!   caller ([`super::Auth`]) for `auth_cache_ttl`, never past the token's
//!   expiry.
//! * `jwks`: check the signature against the cluster's signing keys (OIDC
//!   JWKS, fetched from the API server and refreshed when a token names an
//!   unknown key), the audience, the expiry and optionally the issuer. No
//!   API call per token.
//!
//! The HTTP client is deliberately small: one request per connection,
//! HTTP/1.1, TLS with the configured CA (or plain `http://` for tests).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use parking_lot::Mutex;
use serde::Deserialize;

use super::config::{KubernetesAuth, SecurityConfig};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the signing keys are fetched again at most (a token naming an
/// unknown key triggers a fetch, no more often than this).
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// Largest response body read from the API server.
const MAX_BODY: usize = 1 << 20;
/// Most validations in flight at once: a flood of unknown tokens costs the
/// API server at most this many concurrent TokenReviews (the rest wait).
const MAX_IN_FLIGHT: usize = 16;

/// A validated ServiceAccount.
#[derive(Debug)]
pub struct ServiceAccount {
    /// `system:serviceaccount:NAMESPACE:NAME`.
    pub name: String,
    /// When the token expires, when it says.
    pub expires: Option<Instant>,
}

/// Validates ServiceAccount tokens.
pub struct Validator {
    mode: KubernetesAuth,
    audience: String,
    api: String,
    ca_file: PathBuf,
    token_file: PathBuf,
    jwks_url: String,
    issuer: Option<String>,
    jwks: Mutex<Option<(Instant, Arc<JwkSet>)>>,
    in_flight: tokio::sync::Semaphore,
}

/// Whether `token` has the shape of a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    exp: Option<u64>,
}

/// The `exp` of a JWT, read without checking anything: only to bound how
/// long a positive answer is cached.
fn unverified_expiry(token: &str) -> Option<Instant> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp = serde_json::from_slice::<UnverifiedClaims>(&bytes).ok()?.exp?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Instant::now() + Duration::from_secs(exp.saturating_sub(now)))
}

fn is_service_account(name: &str) -> bool {
    let mut parts = name.split(':');
    matches!((parts.next(), parts.next(), parts.next(), parts.next(), parts.next()), (Some("system"), Some("serviceaccount"), Some(ns), Some(n), None) if !ns.is_empty() && !n.is_empty())
}

impl Validator {
    pub fn new(settings: &SecurityConfig, mode: KubernetesAuth) -> Result<Validator, String> {
        let api = match &settings.kubernetes_api {
            Some(a) => a.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "kubernetes_auth needs the API server: set kubernetes_api, or run in a pod (KUBERNETES_SERVICE_HOST)".to_string()
                })?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("https://{host}:{port}")
            }
        };
        Ok(Validator {
            mode,
            audience: settings.kubernetes_audience.clone(),
            jwks_url: settings.kubernetes_jwks_url.clone().unwrap_or_else(|| format!("{api}/openid/v1/jwks")),
            api,
            ca_file: settings.kubernetes_ca_file.clone().unwrap_or_else(|| PathBuf::from(SA_DIR).join("ca.crt")),
            token_file: settings.kubernetes_token_file.clone().unwrap_or_else(|| PathBuf::from(SA_DIR).join("token")),
            issuer: settings.kubernetes_issuer.clone(),
            jwks: Mutex::new(None),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// Validates a token; the error says why it was refused.
    pub async fn validate(&self, token: &str) -> Result<ServiceAccount, String> {
        let _permit = self.in_flight.acquire().await.map_err(|e| e.to_string())?;
        match self.mode {
            KubernetesAuth::TokenReview => self.token_review(token).await,
            KubernetesAuth::Jwks => self.jwks(token).await,
            KubernetesAuth::Off => Err("ServiceAccount tokens are not accepted".into()),
        }
    }

    fn own_token(&self) -> Result<String, String> {
        // Re-read every time: the kubelet rotates it.
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("cannot read the broker's own token {}: {e}", self.token_file.display()))
    }

    async fn token_review(&self, token: &str) -> Result<ServiceAccount, String> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [self.audience] },
        });
        let url = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", self.api);
        let own = self.own_token()?;
        let (status, reply) = self.request("POST", &url, &own, Some(serde_json::to_vec(&body).map_err(|e| e.to_string())?)).await?;
        if !(200..300).contains(&status) {
            tracing::warn!(status, "TokenReview failed: the broker's ServiceAccount may lack `tokenreviews: create`");
            return Err(format!("the API server answered {status} to the TokenReview"));
        }
        #[derive(Deserialize, Default)]
        struct Review {
            #[serde(default)]
            status: ReviewStatus,
        }
        #[derive(Deserialize, Default)]
        struct ReviewStatus {
            #[serde(default)]
            authenticated: bool,
            #[serde(default)]
            user: ReviewUser,
            #[serde(default)]
            audiences: Option<Vec<String>>,
            #[serde(default)]
            error: String,
        }
        #[derive(Deserialize, Default)]
        struct ReviewUser {
            #[serde(default)]
            username: String,
        }
        let review: Review = serde_json::from_slice(&reply).map_err(|e| format!("unreadable TokenReview answer: {e}"))?;
        let s = review.status;
        if !s.authenticated {
            return Err(if s.error.is_empty() { "the API server did not authenticate it".into() } else { s.error });
        }
        if let Some(aud) = &s.audiences
            && !aud.iter().any(|a| a == &self.audience)
        {
            return Err(format!("its audiences {aud:?} do not include '{}'", self.audience));
        }
        if !is_service_account(&s.user.username) {
            return Err(format!("'{}' is not a ServiceAccount", s.user.username));
        }
        Ok(ServiceAccount { name: s.user.username, expires: unverified_expiry(token) })
    }

    async fn keys(&self, refresh: bool) -> Result<Arc<JwkSet>, String> {
        if let Some((at, set)) = self.jwks.lock().clone() {
            let age = at.elapsed();
            if age < JWKS_MAX_AGE && !(refresh && age > JWKS_MIN_REFRESH) {
                return Ok(set);
            }
        }
        let own = self.own_token().unwrap_or_default();
        let (status, body) = self.request("GET", &self.jwks_url, &own, None).await?;
        if status != 200 {
            return Err(format!("fetching the signing keys from {} answered {status}", self.jwks_url));
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("unreadable signing keys: {e}"))?;
        let set = Arc::new(set);
        *self.jwks.lock() = Some((Instant::now(), set.clone()));
        Ok(set)
    }

    async fn jwks(&self, token: &str) -> Result<ServiceAccount, String> {
        let header = decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        // Kubernetes signs with an asymmetric key; an HMAC algorithm would
        // make the public key a shared secret.
        if matches!(header.alg, jsonwebtoken::Algorithm::HS256 | jsonwebtoken::Algorithm::HS384 | jsonwebtoken::Algorithm::HS512) {
            return Err(format!("the token is signed with {:?}, a symmetric algorithm, which is not accepted", header.alg));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let mut set = self.keys(false).await?;
        if set.find(&kid).is_none() {
            set = self.keys(true).await?;
        }
        let jwk = set.find(&kid).ok_or_else(|| "signed with an unknown key".to_string())?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable signing key: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 5;
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        #[derive(Deserialize)]
        struct Claims {
            sub: String,
            exp: u64,
        }
        let data = decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired".to_string(),
            jsonwebtoken::errors::ErrorKind::InvalidAudience => format!("the token's audience is not '{}'", self.audience),
            jsonwebtoken::errors::ErrorKind::InvalidIssuer => "the token's issuer is not the expected one".to_string(),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "the token's signature does not verify".to_string(),
            _ => format!("the token is invalid: {e}"),
        })?;
        if !is_service_account(&data.claims.sub) {
            return Err(format!("'{}' is not a ServiceAccount", data.claims.sub));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        Ok(ServiceAccount {
            name: data.claims.sub,
            expires: Some(Instant::now() + Duration::from_secs(data.claims.exp.saturating_sub(now))),
        })
    }

    /// One HTTP/1.1 request: (status, body).
    async fn request(&self, method: &str, url: &str, bearer: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, url, bearer, body))
            .await
            .map_err(|_| format!("{url} did not answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn request_inner(&self, method: &str, url: &str, bearer: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url}: expected an http:// or https:// URL")),
        };
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_matches(['[', ']']).to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let mut builder = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, uri.authority().map_or(host.as_str(), |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json");
        if !bearer.is_empty() {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {bearer}"));
        }
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = builder.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        if tls {
            let roots = crate::tls::root_store(&self.ca_file).map_err(|e| format!("the API server's CA: {e}"))?;
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {url} failed: {e}"))?;
            send(hyper_util::rt::TokioIo::new(stream), req).await
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), req).await
        }
    }
}

async fn send<IO>(io: IO, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let out = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
            let body = limited.collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
            Ok((status, body))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_recognise_service_accounts_and_jwts() {
        assert!(is_service_account("system:serviceaccount:shop:worker"));
        assert!(!is_service_account("system:serviceaccount:shop"));
        assert!(!is_service_account("system:serviceaccount::worker"));
        assert!(!is_service_account("alice"));
        assert!(!is_service_account("system:serviceaccount:a:b:c"));
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("static-token"));
        assert!(!looks_like_jwt("a.b.c d"));
    }
}
