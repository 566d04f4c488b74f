//! Security against the real broker: TLS and mutual TLS handshakes (good,
//! wrong, expired certificates, made here with rcgen), a certificate
//! rotated on disk and picked up without a restart, passwords, static
//! tokens and Kubernetes ServiceAccount tokens (a fake API server for
//! TokenReview and for the signing keys), RabbitMQ's operation →
//! permission table row by row, per-user limits, revocation, the
//! loopback/insecure start-up rule, and that no credential ever reaches a
//! log line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_client::proto::{self, value::Kind};
use warren_client::{Client, ConnectOptions, ExchangeKind, ExchangeOptions, Message, QueueOptions, Subscription, Value};
use warren_tests::{TestBroker, broker_bin, eventually, run_warrenctl_env};

use crate::{SETTLE, code};

// ------------------------------------------------------------ certificates

/// A certificate authority in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
    ca: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join(format!("{name}-ca.crt"));
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki { dir, params, key, ca }
    }

    /// A leaf certificate and key signed by this CA, written to files:
    /// (cert, key).
    fn issue(&self, file: &str, cn: &str, server: bool, expired: bool) -> (PathBuf, PathBuf) {
        let usage = if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth };
        self.issue_for(file, cn, server, vec![usage], expired)
    }

    /// A cluster node's certificate: for 127.0.0.1, usable as server and as
    /// client (mutual TLS between nodes). (cert, key).
    fn issue_node(&self, file: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.issue_for(file, cn, true, vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth], false)
    }

    /// A leaf certificate with subject CN `cn`, for localhost and 127.0.0.1
    /// when `server`, with `usages`, expired in 2020 when `expired`.
    fn issue_for(&self, file: &str, cn: &str, server: bool, usages: Vec<ExtendedKeyUsagePurpose>, expired: bool) -> (PathBuf, PathBuf) {
        let sans = if server { vec!["localhost".to_string(), "127.0.0.1".to_string()] } else { vec![] };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 6, 1);
        }
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (self.dir.path().join(format!("{file}.crt")), self.dir.path().join(format!("{file}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn https(b: &TestBroker) -> String {
    format!("https://{}", b.addr)
}

/// Whether a connection with `options` completes a call (connect errors
/// and call errors both count as failures).
async fn call_works(url: &str, options: &ConnectOptions) -> Result<(), String> {
    let c = Client::connect_with(url, options).await.map_err(|e| e.to_string())?;
    c.users().who_am_i(proto::WhoAmIRequest {}).await.map(|_| ()).map_err(|e| e.to_string())
}

/// The server certificate (DER) a fresh TLS handshake presents.
async fn presented_certificate(addr: &str, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

use rustls::pki_types::pem::PemObject as _;

// ----------------------------------------------------------------- helpers

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn sha256_hex(data: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(data.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

async fn as_user(b: &TestBroker, user: &str, password: &str) -> Client {
    Client::connect_with(b.url(), &ConnectOptions::default().basic(user, password)).await.unwrap()
}

/// A broker with a bootstrap administrator `admin` / `admin-secret-1`.
async fn secured(extra: &[&str], capture: bool) -> (TestBroker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(dir.path(), "admin-password", "admin-secret-1\n");
    let mut args = vec!["--admin-password-file", s(&pw)];
    args.extend_from_slice(extra);
    let b = TestBroker::start_with_options(&args, &[], capture).await.unwrap();
    (b, dir)
}

async fn add_user(admin: &Client, name: &str, password: &str, configure: &str, write: &str, read: &str) {
    let mut users = admin.users();
    users.put_user(proto::PutUserRequest { name: name.into(), password: password.into(), ..Default::default() }).await.unwrap();
    users
        .set_permissions(proto::SetPermissionsRequest {
            user: name.into(),
            permissions: Some(proto::Permissions {
                configure: configure.into(),
                write: write.into(),
                read: read.into(),
                topics: BTreeMap::new(),
            }),
        })
        .await
        .unwrap();
}

// --------------------------------------------------------------------- TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_serve_tls_and_refuse_plaintext_a_wrong_ca_and_an_expired_certificate() {
    let pki = Pki::new("warren");
    let (cert, key) = pki.issue("server", "broker", true, false);
    let b = TestBroker::start_with(&["--tls-cert", s(&cert), "--tls-key", s(&key)]).await.unwrap();
    // The right CA: works, and https:// means TLS.
    let c = Client::connect_with(https(&b), &ConnectOptions::default().ca(&pki.ca)).await.unwrap();
    c.declare_queue("over-tls", QueueOptions::default()).await.unwrap();
    assert!(c.publish(Message::new("", "over-tls", "hello")).await.unwrap().is_routed());
    // A CA given with an http:// address still means TLS.
    call_works(&b.url(), &ConnectOptions::default().ca(&pki.ca)).await.unwrap();
    // Plain text against a TLS port fails.
    assert!(call_works(&b.url(), &ConnectOptions::default()).await.is_err());
    // Another CA: the client refuses the broker's certificate.
    let other = Pki::new("other");
    let e = call_works(&https(&b), &ConnectOptions::default().ca(&other.ca)).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate") || e.contains("invalid peer"), "{e}");
    // warrenctl: --ca and https://.
    let out = run_warrenctl_env(&https(&b), &["--ca", s(&pki.ca), "queue", "list"], None, &[]).unwrap();
    assert!(out.ok() && out.stdout.contains("over-tls"), "{out:?}");
    let out = run_warrenctl_env(&https(&b), &["queue", "list"], None, &[("WARREN_CA", s(&other.ca))]).unwrap();
    assert_eq!(out.code, 3, "{out:?}");
    drop(b);

    // An expired server certificate: clients refuse it.
    let (cert, key) = pki.issue("expired-server", "broker", true, true);
    let b = TestBroker::start_with(&["--tls-cert", s(&cert), "--tls-key", s(&key)]).await.unwrap();
    let e = call_works(&https(&b), &ConnectOptions::default().ca(&pki.ca)).await.unwrap_err();
    assert!(e.to_lowercase().contains("expired"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_authenticate_clients_by_certificate_with_mutual_tls() {
    let pki = Pki::new("warren");
    let (cert, key) = pki.issue("server", "broker", true, false);
    let dir = tempfile::tempdir().unwrap();
    // The certificate's subject is the user; its permissions come from the
    // auth file.
    let auth = write(
        dir.path(),
        "auth.toml",
        "[[users]]\nname = \"app-1\"\npermissions = { configure = \"^app\", write = \"^app\", read = \"^app\" }\n",
    );
    let b = TestBroker::start_with(&[
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--tls-client-ca",
        s(&pki.ca),
        "--tls-client-auth",
        "required",
        "--auth-file",
        s(&auth),
        "--admin-password-file",
        s(&write(dir.path(), "admin-password", "admin-secret-1\n")),
    ])
    .await
    .unwrap();
    let (ccert, ckey) = pki.issue("app-1", "app-1", false, false);
    let good = ConnectOptions::default().ca(&pki.ca).identity(&ccert, &ckey);
    let c = Client::connect_with(https(&b), &good).await.unwrap();
    let me = c.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.mechanism.as_str()), ("app-1", "certificate"));
    c.declare_queue("app.jobs", QueueOptions::default()).await.unwrap();
    let (code_, msg) = code(c.declare_queue("other", QueueOptions::default()).await);
    assert_eq!(code_, tonic::Code::PermissionDenied, "{msg}");
    // warrenctl with --cert / --key.
    let out = run_warrenctl_env(&https(&b), &["--ca", s(&pki.ca), "--cert", s(&ccert), "--key", s(&ckey), "whoami"], None, &[]).unwrap();
    assert!(out.ok() && out.stdout.contains("app-1"), "{out:?}");

    // No certificate, a certificate of another CA, an expired one: refused
    // at the handshake, so a valid password does not help.
    let password_only = ConnectOptions::default().ca(&pki.ca).basic("admin", "admin-secret-1");
    let e = call_works(&https(&b), &password_only).await.expect_err("required: a password without a certificate passed");
    assert!(!e.to_lowercase().contains("authenticat"), "refused at the handshake, not by authentication: {e}");
    let rogue = Pki::new("rogue");
    let (rcert, rkey) = rogue.issue("app-1", "app-1", false, false);
    assert!(call_works(&https(&b), &ConnectOptions::default().ca(&pki.ca).identity(&rcert, &rkey)).await.is_err(), "another CA");
    let (ecert, ekey) = pki.issue("expired-client", "app-1", false, true);
    assert!(call_works(&https(&b), &ConnectOptions::default().ca(&pki.ca).identity(&ecert, &ekey)).await.is_err(), "expired");
    let metrics = b.metrics().await.unwrap();
    let failures = metrics.lines().find(|l| l.starts_with("warren_tls_handshake_failures_total{listener=\"grpc\"}")).unwrap();
    assert!(!failures.ends_with(" 0"), "{failures}");
    drop(b);

    // Optional: a certificate when presented, a password otherwise.
    let b = TestBroker::start_with(&[
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--tls-client-ca",
        s(&pki.ca),
        "--auth-file",
        s(&auth),
        "--admin-password-file",
        s(&dir.path().join("admin-password")),
    ])
    .await
    .unwrap();
    let c = Client::connect_with(https(&b), &good).await.unwrap();
    assert_eq!(c.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner().user, "app-1");
    let c = Client::connect_with(https(&b), &password_only).await.unwrap();
    let me = c.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.mechanism.as_str()), ("admin", "password"));
    let (code_, msg) = code(Client::connect_with(https(&b), &ConnectOptions::default().ca(&pki.ca)).await.unwrap().list_queues().await);
    assert_eq!(code_, tonic::Code::Unauthenticated, "neither a certificate nor a credential: {msg}");
    assert!(call_works(&https(&b), &ConnectOptions::default().ca(&pki.ca).identity(&rcert, &rkey)).await.is_err(), "another CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_pick_up_a_rotated_certificate_without_dropping_connections() {
    let pki = Pki::new("warren");
    let (cert, key) = pki.issue("server", "broker-1", true, false);
    let b = TestBroker::start_with(&["--tls-cert", s(&cert), "--tls-key", s(&key), "--tls-reload-interval", "200ms"]).await.unwrap();
    let before = presented_certificate(&b.addr, &pki.ca).await;
    let c = Client::connect_with(https(&b), &ConnectOptions::default().ca(&pki.ca)).await.unwrap();
    c.declare_queue("rotation", QueueOptions::default()).await.unwrap();
    let mut consumer = c.consume(Subscription::new("rotation")).await.unwrap();

    // cert-manager renews the Secret in place: new files, same paths.
    let (cert2, key2) = pki.issue("server-2", "broker-2", true, false);
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    let after = eventually(SETTLE, "the new certificate on new connections", || {
        let (addr, ca, before) = (b.addr.clone(), pki.ca.clone(), before.clone());
        async move {
            let now = presented_certificate(&addr, &ca).await;
            (now != before).then_some(now)
        }
    })
    .await
    .unwrap();
    assert_eq!(after, std::fs::read(&cert2).map(|pem| rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap().to_vec()).unwrap());
    // The connection made before the rotation still works, its consumer
    // too: nothing was dropped.
    assert!(c.publish(Message::new("", "rotation", "after")).await.unwrap().is_routed());
    let d = consumer.next_timeout(SETTLE).await.unwrap().unwrap();
    assert_eq!(&d.body[..], b"after");
    call_works(&https(&b), &ConnectOptions::default().ca(&pki.ca)).await.unwrap();
    let metrics = b.metrics().await.unwrap();
    assert!(metrics.contains("warren_tls_reloads_total{listener=\"grpc\",result=\"success\"} 1"), "{metrics}");

    // A broken file (half-written) keeps the current certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(presented_certificate(&b.addr, &pki.ca).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_serve_metrics_and_health_over_https_separately() {
    let pki = Pki::new("warren");
    let (cert, key) = pki.issue("http", "metrics", true, false);
    let b = TestBroker::start_with(&["--http-tls-cert", s(&cert), "--http-tls-key", s(&key)]).await.unwrap();
    // gRPC stays plain (separate settings); HTTP speaks only TLS.
    b.client().await.unwrap().status().await.unwrap();
    assert!(b.http_get("/healthz").await.is_err() || b.http_get("/healthz").await.unwrap().0 != 200);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca).unwrap().next().unwrap().unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&b.http_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(SETTLE, tls.read_to_end(&mut reply)).await.unwrap().ok();
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
}

// ---------------------------------------------------------- authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_authenticate_passwords_and_static_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let token = "ci-token-7f3a";
    let auth = write(
        dir.path(),
        "auth.toml",
        &format!(
            "[[users]]\nname = \"ci\"\npermissions = {{ configure = \"\", write = \"\", read = \".*\" }}\n\n[[tokens]]\nuser = \"ci\"\nsha256 = \"{}\"\n",
            sha256_hex(token)
        ),
    );
    let (b, _pw) = secured(&["--auth-file", s(&auth)], false).await;

    // No credentials, a wrong password, an unknown user, an unknown token.
    let anonymous = b.client().await.unwrap();
    let (c, msg) = code(anonymous.list_queues().await);
    assert_eq!(c, tonic::Code::Unauthenticated, "{msg}");
    assert!(msg.contains("authentication required"), "{msg}");
    let (c, msg) = code(as_user(&b, "admin", "wrong").await.list_queues().await);
    assert_eq!((c, msg.as_str()), (tonic::Code::Unauthenticated, "invalid username or password"));
    let (c, _) = code(as_user(&b, "nobody", "admin-secret-1").await.list_queues().await);
    assert_eq!(c, tonic::Code::Unauthenticated);
    let unknown = Client::connect_with(b.url(), &ConnectOptions::default().token("not-a-token")).await.unwrap();
    let (c, msg) = code(unknown.list_queues().await);
    assert_eq!((c, msg.as_str()), (tonic::Code::Unauthenticated, "unknown token"));

    // The administrator; a user it creates; the static token's user.
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    admin.declare_queue("reports", QueueOptions::default()).await.unwrap();
    add_user(&admin, "alice", "alice-secret-2", "^alice\\.", "^alice\\.", "^(alice\\.|reports$)").await;
    let alice = as_user(&b, "alice", "alice-secret-2").await;
    alice.declare_queue("alice.jobs", QueueOptions::default()).await.unwrap();
    assert_eq!(alice.get("reports", 1, false).await.unwrap().len(), 0);
    let ci = Client::connect_with(b.url(), &ConnectOptions::default().token(token)).await.unwrap();
    let me = ci.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.mechanism.as_str()), ("ci", "token"));
    ci.get("reports", 1, false).await.unwrap();

    // warrenctl: flags, environment, a token file.
    let out =
        run_warrenctl_env(&b.url(), &["--username", "alice", "queue", "list"], None, &[("WARREN_PASSWORD", "alice-secret-2")]).unwrap();
    assert!(out.ok() && out.stdout.contains("alice.jobs") && !out.stdout.contains("other"), "{out:?}");
    let tf = write(dir.path(), "token", &format!("{token}\n"));
    let out = run_warrenctl_env(&b.url(), &["--token-file", s(&tf), "whoami"], None, &[]).unwrap();
    assert!(out.ok() && out.stdout.contains("ci"), "{out:?}");
    let out = run_warrenctl_env(&b.url(), &["--username", "alice", "--password", "nope", "queue", "list"], None, &[]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("UNAUTHENTICATED"), "{out:?}");

    let metrics = b.metrics().await.unwrap();
    assert!(!metrics.contains("warren_auth_attempts_total{mechanism=\"password\",result=\"failure\"} 0"), "{metrics}");
    assert!(!metrics.contains("warren_auth_attempts_total{mechanism=\"token\",result=\"failure\"} 0"), "{metrics}");
}

/// A fake Kubernetes API server on loopback: `handler(path, body)` gives
/// (status, JSON). Counts requests.
async fn fake_api(handler: impl Fn(&str, &str) -> (u16, String) + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (handler, counter) = (handler.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk)).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break (head, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
                        }
                    }
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, json) = handler(&path, &body);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), count)
}

fn jwt_shaped(label: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.{}", b64("{\"alg\":\"RS256\"}"), b64(&format!("{{\"label\":\"{label}\",\"exp\":4102444800}}")), b64("sig"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_authenticate_service_account_tokens_with_token_review() {
    let good = jwt_shaped("good");
    let wrong_aud = jwt_shaped("wrong-audience");
    let expired = jwt_shaped("expired");
    let (g, w, e) = (good.clone(), wrong_aud.clone(), expired.clone());
    // Set: the API server no longer accepts `good` (its pod was deleted).
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_revoked = revoked.clone();
    let (api, requests) = fake_api(move |path, body| {
        assert_eq!(path, "/apis/authentication.k8s.io/v1/tokenreviews");
        let review: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(review["spec"]["audiences"][0], "warren");
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let status = if token == g && is_revoked.load(Ordering::SeqCst) {
            serde_json::json!({"authenticated": false, "error": "[invalid bearer token, pod \"worker-1\" not found]"})
        } else if token == g {
            serde_json::json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:worker"}, "audiences": ["warren"]})
        } else if token == w {
            serde_json::json!({"authenticated": false, "error": "[invalid bearer token, token audiences [\"api\"] is invalid for the target audiences [\"warren\"]]"})
        } else if token == e {
            serde_json::json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
        } else {
            serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
        };
        (201, serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}).to_string())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let own = write(dir.path(), "broker-token", "the-brokers-own-token");
    let auth = write(
        dir.path(),
        "auth.toml",
        "[[users]]\nname = \"system:serviceaccount:shop:worker\"\npermissions = { configure = \"^shop\\\\.\", write = \"^shop\\\\.\", read = \"^shop\\\\.\" }\n",
    );
    let b = TestBroker::start_with(&[
        "--kubernetes-auth",
        "token-review",
        "--kubernetes-api",
        &api,
        "--kubernetes-token-file",
        s(&own),
        "--auth-file",
        s(&auth),
    ])
    .await
    .unwrap();
    let c = Client::connect_with(b.url(), &ConnectOptions::default().token(&good)).await.unwrap();
    let me = c.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.mechanism.as_str()), ("system:serviceaccount:shop:worker", "serviceaccount"));
    c.declare_queue("shop.orders", QueueOptions::default()).await.unwrap();
    assert_eq!(code(c.declare_queue("billing", QueueOptions::default()).await).0, tonic::Code::PermissionDenied);
    // Cached: another connection with the same token asks nobody.
    let asked = requests.load(Ordering::SeqCst);
    let c2 = Client::connect_with(b.url(), &ConnectOptions::default().token(&good)).await.unwrap();
    c2.list_queues().await.unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), asked, "a second connection used the cached review");

    for (token, why) in [(&wrong_aud, "audiences"), (&expired, "expired"), (&jwt_shaped("unknown"), "invalid bearer token")] {
        let c = Client::connect_with(b.url(), &ConnectOptions::default().token(token)).await.unwrap();
        let (c, msg) = code(c.list_queues().await);
        assert_eq!(c, tonic::Code::Unauthenticated, "{msg}");
        assert!(msg.contains(why), "{msg}");
    }
    // A projected token file, as a pod mounts it.
    let tf = write(dir.path(), "token", &good);
    let c = Client::connect_with(b.url(), &ConnectOptions::default().token_file(&tf)).await.unwrap();
    c.list_queues().await.unwrap();
    drop(b);

    // A token the API server stops accepting stops working within the
    // cache TTL, on a connection that stays open too.
    let b = TestBroker::start_with(&[
        "--kubernetes-auth",
        "token-review",
        "--kubernetes-api",
        &api,
        "--kubernetes-token-file",
        s(&own),
        "--auth-file",
        s(&auth),
        "--auth-cache-ttl",
        "1s",
    ])
    .await
    .unwrap();
    let c = Client::connect_with(b.url(), &ConnectOptions::default().token(&good)).await.unwrap();
    c.list_queues().await.unwrap();
    revoked.store(true, Ordering::SeqCst);
    let refused = eventually(SETTLE, "the revoked token refused on its open connection", || {
        let c = c.clone();
        async move {
            match c.list_queues().await {
                Err(warren_client::Error::Status(s)) if s.code() == tonic::Code::Unauthenticated => Some(s.message().to_string()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();
    assert!(refused.contains("not found"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_authenticate_service_account_tokens_against_the_signing_keys() {
    let key = KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]}).to_string();
    let (api, _) = fake_api(move |path, _| {
        assert_eq!(path, "/openid/v1/jwks");
        (200, jwks.clone())
    })
    .await;
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let sign = |aud: &str, exp: u64, sub: &str| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({"aud": [aud], "exp": exp, "iat": now, "iss": "https://kubernetes.default.svc", "sub": sub}),
            &encoding,
        )
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let own = write(dir.path(), "broker-token", "own");
    let b = TestBroker::start_with(&[
        "--kubernetes-auth",
        "jwks",
        "--kubernetes-api",
        &api,
        "--kubernetes-token-file",
        s(&own),
        "--kubernetes-issuer",
        "https://kubernetes.default.svc",
    ])
    .await
    .unwrap();
    let good = sign("warren", now + 600, "system:serviceaccount:shop:worker");
    let c = Client::connect_with(b.url(), &ConnectOptions::default().token(&good)).await.unwrap();
    let me = c.users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.user, "system:serviceaccount:shop:worker");
    // Authenticated but given no permissions: may do nothing.
    assert_eq!(code(c.declare_queue("q", QueueOptions::default()).await).0, tonic::Code::PermissionDenied);

    for (token, why) in [
        (sign("api", now + 600, "system:serviceaccount:shop:worker"), "audience"),
        (sign("warren", now - 600, "system:serviceaccount:shop:worker"), "expired"),
        (sign("warren", now + 600, "alice"), "not a ServiceAccount"),
        (tampered(&good), "signature"),
        (hmac_signed(now + 600, "system:serviceaccount:shop:worker"), "symmetric"),
    ] {
        let c = Client::connect_with(b.url(), &ConnectOptions::default().token(&token)).await.unwrap();
        let (c, msg) = code(c.list_queues().await);
        assert_eq!(c, tonic::Code::Unauthenticated, "{msg}");
        assert!(msg.contains(why), "{why}: {msg}");
    }
}

/// A token signed with HMAC (a key anyone could choose), naming the
/// cluster's key id: the algorithm-confusion attempt.
fn hmac_signed(exp: u64, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({"aud": ["warren"], "exp": exp, "iss": "https://kubernetes.default.svc", "sub": sub});
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(b"public knowledge")).unwrap()
}

/// `token` with one character of its signature changed.
fn tampered(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let i = chars.len() - 10;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

// ----------------------------------------------------------- authorization

/// One row of RabbitMQ's table: an operation, and the (permission,
/// resource) pairs it needs.
struct Row {
    name: &'static str,
    needs: &'static [(&'static str, &'static str)],
}

/// Every resource name the matrix uses.
const NAMES: [&str; 7] = ["mx", "mx2", "mae", "mq", "mdlx", "amq.default", "amq.gen-"];

fn pattern_without(perm: &str, needs: &[(&str, &str)], missing: Option<(&str, &str)>) -> String {
    let names: Vec<String> = NAMES
        .iter()
        .filter(|n| needs.iter().any(|(p, r)| *p == perm && r == *n) && missing != Some((perm, n)))
        .map(|n| format!("^{}$", n.replace('.', "\\.")))
        .collect();
    if names.is_empty() { String::new() } else { names.join("|") }
}

async fn run_row(admin: &Client, user: &Client, name: &str) -> Result<(), (tonic::Code, String)> {
    let as_err = |r: Result<(), warren_client::Error>| {
        r.map_err(|e| match e {
            warren_client::Error::Status(s) => (s.code(), s.message().to_string()),
            other => (tonic::Code::Unknown, other.to_string()),
        })
    };
    let fanout = ExchangeOptions::default();
    let dlx: BTreeMap<String, Value> = [("x-dead-letter-exchange".to_string(), Value { kind: Some(Kind::String("mdlx".into())) })].into();
    match name {
        "declare exchange" => as_err(user.declare_exchange("mx", ExchangeKind::Fanout, fanout).await.map(drop)),
        "declare exchange with alternate-exchange" => as_err(
            user.declare_exchange("mx", ExchangeKind::Fanout, ExchangeOptions::default().arg("alternate-exchange", "mae")).await.map(drop),
        ),
        "delete exchange" => {
            admin.declare_exchange("mx", ExchangeKind::Fanout, fanout).await.unwrap();
            as_err(user.delete_exchange("mx", false).await)
        }
        "declare queue" => as_err(user.declare_queue("mq", QueueOptions::default()).await.map(drop)),
        "declare queue with x-dead-letter-exchange" => {
            as_err(user.declare_queue("mq", QueueOptions { arguments: dlx, ..Default::default() }).await.map(drop))
        }
        "declare server-named queue" => as_err(user.declare_queue("", QueueOptions::default().exclusive()).await.map(drop)),
        "delete queue" => {
            admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
            as_err(user.delete_queue("mq", false, false).await.map(drop))
        }
        "bind queue" | "unbind queue" => {
            admin.declare_exchange("mx", ExchangeKind::Fanout, fanout).await.unwrap();
            admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
            if name == "bind queue" {
                as_err(user.bind_queue("mx", "mq", "").await)
            } else {
                admin.bind_queue("mx", "mq", "").await.unwrap();
                as_err(user.unbind("mx", "mq", false, "", BTreeMap::new()).await)
            }
        }
        "bind exchange" | "unbind exchange" => {
            admin.declare_exchange("mx", ExchangeKind::Fanout, fanout.clone()).await.unwrap();
            admin.declare_exchange("mx2", ExchangeKind::Fanout, fanout).await.unwrap();
            if name == "bind exchange" {
                as_err(user.bind_exchange("mx", "mx2", "").await)
            } else {
                admin.bind_exchange("mx", "mx2", "").await.unwrap();
                as_err(user.unbind("mx", "mx2", true, "", BTreeMap::new()).await)
            }
        }
        "publish" => {
            admin.declare_exchange("mx", ExchangeKind::Fanout, fanout).await.unwrap();
            as_err(user.publish(Message::new("mx", "", "m")).await.map(drop))
        }
        "publish to the default exchange" => as_err(user.publish(Message::new("", "mq", "m")).await.map(drop)),
        "publish on a stream" => {
            admin.declare_exchange("mx", ExchangeKind::Fanout, fanout).await.unwrap();
            let publisher = user.publisher().await.map_err(|e| (tonic::Code::Unknown, e.to_string()))?;
            let r = publisher.publish(Message::new("mx", "", "m")).await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("PERMISSION_DENIED") => Err((tonic::Code::PermissionDenied, e.to_string())),
                Err(e) => Err((tonic::Code::Unknown, e.to_string())),
            }
        }
        "consume" => {
            admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
            as_err(user.consume(Subscription::new("mq")).await.map(drop))
        }
        "get" => {
            admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
            as_err(user.get("mq", 1, false).await.map(drop))
        }
        "purge" => {
            admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
            as_err(user.purge_queue("mq").await.map(drop))
        }
        other => panic!("no such row {other}"),
    }
}

async fn clean(admin: &Client) {
    for q in ["mq"] {
        let _ = admin.delete_queue(q, false, false).await;
    }
    for x in ["mx", "mx2", "mae", "mdlx"] {
        let _ = admin.delete_exchange(x, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_deny_each_operation_without_each_permission_it_needs() {
    // RabbitMQ's table (docs: access control, "How permissions work").
    let rows = [
        Row { name: "declare exchange", needs: &[("configure", "mx")] },
        Row { name: "declare exchange with alternate-exchange", needs: &[("configure", "mx"), ("write", "mae"), ("read", "mx")] },
        Row { name: "delete exchange", needs: &[("configure", "mx")] },
        Row { name: "declare queue", needs: &[("configure", "mq")] },
        Row { name: "declare queue with x-dead-letter-exchange", needs: &[("configure", "mq"), ("write", "mdlx"), ("read", "mq")] },
        Row { name: "declare server-named queue", needs: &[("configure", "amq.gen-")] },
        Row { name: "delete queue", needs: &[("configure", "mq")] },
        Row { name: "bind queue", needs: &[("write", "mq"), ("read", "mx")] },
        Row { name: "unbind queue", needs: &[("write", "mq"), ("read", "mx")] },
        Row { name: "bind exchange", needs: &[("write", "mx2"), ("read", "mx")] },
        Row { name: "unbind exchange", needs: &[("write", "mx2"), ("read", "mx")] },
        Row { name: "publish", needs: &[("write", "mx")] },
        Row { name: "publish on a stream", needs: &[("write", "mx")] },
        Row { name: "publish to the default exchange", needs: &[("write", "amq.default")] },
        Row { name: "consume", needs: &[("read", "mq")] },
        Row { name: "get", needs: &[("read", "mq")] },
        Row { name: "purge", needs: &[("read", "mq")] },
    ];
    let (b, _pw) = secured(&[], true).await;
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    admin.users().put_user(proto::PutUserRequest { name: "m".into(), password: "m-secret".into(), ..Default::default() }).await.unwrap();
    let user = as_user(&b, "m", "m-secret").await;
    let set = |missing: Option<(&'static str, &'static str)>, needs: &'static [(&'static str, &'static str)]| {
        let admin = admin.clone();
        async move {
            let p = proto::Permissions {
                configure: pattern_without("configure", needs, missing),
                write: pattern_without("write", needs, missing),
                read: pattern_without("read", needs, missing),
                topics: BTreeMap::new(),
            };
            admin.users().set_permissions(proto::SetPermissionsRequest { user: "m".into(), permissions: Some(p) }).await.unwrap();
        }
    };
    let mut denials = 0;
    for row in &rows {
        // Exactly what the row needs: allowed.
        clean(&admin).await;
        set(None, row.needs).await;
        run_row(&admin, &user, row.name).await.unwrap_or_else(|e| panic!("{}: with every permission it needs: {e:?}", row.name));
        // Each needed permission missing in turn: PERMISSION_DENIED naming
        // the user, the operation and the resource.
        for missing in row.needs {
            clean(&admin).await;
            set(Some(*missing), row.needs).await;
            let (code_, msg) = run_row(&admin, &user, row.name).await.expect_err(&format!("{} without {missing:?} passed", row.name));
            assert_eq!(code_, tonic::Code::PermissionDenied, "{}: {msg}", row.name);
            let (perm, resource) = missing;
            assert!(
                msg.contains("user 'm'") && msg.contains(&format!("{perm} permission")) && msg.contains(&format!("'{resource}'")),
                "{}: {msg}",
                row.name
            );
            denials += 1;
        }
    }
    // Topic permissions: routing keys on a named exchange.
    clean(&admin).await;
    admin.declare_exchange("mx", ExchangeKind::Topic, ExchangeOptions::default()).await.unwrap();
    admin.declare_queue("mq", QueueOptions::default()).await.unwrap();
    let topics: BTreeMap<String, proto::TopicPermission> =
        [("mx".to_string(), proto::TopicPermission { write: "^orders\\.".into(), read: "^orders\\.eu\\.".into() })].into();
    admin
        .users()
        .set_permissions(proto::SetPermissionsRequest {
            user: "m".into(),
            permissions: Some(proto::Permissions { configure: "".into(), write: ".*".into(), read: ".*".into(), topics }),
        })
        .await
        .unwrap();
    user.publish(Message::new("mx", "orders.eu.new", "ok")).await.unwrap();
    let (c, msg) = code(user.publish(Message::new("mx", "payments.new", "no")).await);
    assert!(c == tonic::Code::PermissionDenied && msg.contains("routing key 'payments.new'"), "{msg}");
    user.bind_queue("mx", "mq", "orders.eu.#").await.unwrap();
    assert_eq!(code(user.bind_queue("mx", "mq", "orders.#").await).0, tonic::Code::PermissionDenied);

    // Counted in metrics and written as audit lines (who, what, from where).
    let metrics = b.metrics().await.unwrap();
    let total: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("warren_authorization_denied_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(total >= f64::from(denials + 2), "{total} < {denials}: {metrics}");
    let log = b.stderr();
    let line = log
        .lines()
        .find(|l| {
            l.contains("permission denied") && l.contains("operation=\"publish\"")
                || l.contains("permission denied") && l.contains("operation=publish")
        })
        .unwrap_or_else(|| panic!("no audit line: {log}"));
    assert!(line.contains("user=m") && line.contains("127.0.0.1"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_filter_lists_and_keep_node_and_user_operations_for_tags() {
    let (b, _pw) = secured(&[], false).await;
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    for q in ["team-a.jobs", "team-b.jobs"] {
        admin.declare_queue(q, QueueOptions::default()).await.unwrap();
    }
    add_user(&admin, "a", "a-secret", "^team-a\\.", "^team-a\\.", "^team-a\\.").await;
    let a = as_user(&b, "a", "a-secret").await;
    let names: Vec<String> = a.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["team-a.jobs"]);
    let (c, msg) = code(a.status().await);
    assert!(c == tonic::Code::PermissionDenied && msg.contains("monitoring or administrator tag"), "{msg}");
    let (c, _) = code(a.users().list_users(proto::ListUsersRequest {}).await.map_err(warren_client::Error::from));
    assert_eq!(c, tonic::Code::PermissionDenied);
    let (c, _) = code(
        a.users()
            .put_user(proto::PutUserRequest {
                name: "x".into(),
                password: "y".into(),
                tags: vec!["administrator".into()],
                ..Default::default()
            })
            .await
            .map_err(warren_client::Error::from),
    );
    assert_eq!(c, tonic::Code::PermissionDenied, "a user cannot make itself an administrator");
    // The monitoring tag: status and every list, no resources.
    admin
        .users()
        .put_user(proto::PutUserRequest {
            name: "mon".into(),
            password: "mon-secret".into(),
            tags: vec!["monitoring".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mon = as_user(&b, "mon", "mon-secret").await;
    mon.status().await.unwrap();
    // Cluster operations: reading needs a tag, changing needs administrator.
    fn denied<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
        r.err().map(|s| s.code())
    }
    assert_eq!(denied(a.raw().cluster_status(proto::ClusterStatusRequest {}).await), Some(tonic::Code::PermissionDenied));
    assert_eq!(denied(a.raw().quorum_critical(proto::QuorumCriticalRequest { node: 1 }).await), Some(tonic::Code::PermissionDenied));
    mon.raw().cluster_status(proto::ClusterStatusRequest {}).await.unwrap();
    mon.raw().quorum_critical(proto::QuorumCriticalRequest { node: 1 }).await.unwrap();
    let grow = || proto::GrowQueuesRequest { node: 2, queue_pattern: String::new(), below: 0 };
    assert_eq!(denied(mon.raw().grow_queues(grow()).await), Some(tonic::Code::PermissionDenied));
    assert_eq!(
        denied(admin.raw().grow_queues(grow()).await),
        Some(tonic::Code::FailedPrecondition),
        "allowed; a single node has no replicas"
    );
    assert_eq!(mon.list_queues().await.unwrap().len(), 2);
    assert_eq!(code(mon.purge_queue("team-a.jobs").await).0, tonic::Code::PermissionDenied);
    // The configuration's administrator cannot be changed through the API.
    let (c, _) =
        code(admin.users().delete_user(proto::DeleteUserRequest { name: "admin".into() }).await.map_err(warren_client::Error::from));
    assert_eq!(c, tonic::Code::FailedPrecondition);
    // warrenctl user list shows them, never a password.
    let out =
        run_warrenctl_env(&b.url(), &["--username", "admin", "user", "list"], None, &[("WARREN_PASSWORD", "admin-secret-1")]).unwrap();
    assert!(out.ok() && out.stdout.contains("mon") && out.stdout.contains("config"), "{out:?}");
    assert!(!out.stdout.contains("argon2") && !out.stdout.contains("secret"), "{out:?}");
    // Health checks need no credentials (probes carry none).
    let channel = tonic::transport::Channel::from_shared(b.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
}

// ---------------------------------------------------- limits and revocation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_limit_connections_and_streams_per_user() {
    let (b, _pw) = secured(&["--max-connections-per-user", "2"], false).await;
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    admin.declare_queue("limits", QueueOptions::default()).await.unwrap();
    add_user(&admin, "l", "l-secret", "", "", "^limits$").await;
    admin
        .users()
        .put_user(proto::PutUserRequest { name: "l".into(), max_streams: Some(1), keep_password: true, ..Default::default() })
        .await
        .unwrap();
    let one = as_user(&b, "l", "l-secret").await;
    one.get("limits", 1, false).await.unwrap();
    let two = as_user(&b, "l", "l-secret").await;
    two.get("limits", 1, false).await.unwrap();
    let three = as_user(&b, "l", "l-secret").await;
    let (c, msg) = code(three.get("limits", 1, false).await);
    assert!(c == tonic::Code::ResourceExhausted && msg.contains("user 'l'") && msg.contains("connections"), "{msg}");
    // Streams: one consumer at a time.
    let consumer = one.consume(Subscription::new("limits")).await.unwrap();
    let (c, msg) = code(two.consume(Subscription::new("limits")).await.map(drop));
    assert!(c == tonic::Code::ResourceExhausted && msg.contains("streams"), "{msg}");
    drop(consumer);
    eventually(SETTLE, "the stream slot freed", || {
        let two = two.clone();
        async move { two.consume(Subscription::new("limits")).await.ok().map(drop) }
    })
    .await
    .unwrap();
    // A closed connection frees its slot.
    drop(one);
    eventually(SETTLE, "the connection slot freed", || {
        let b_url = b.url();
        async move {
            let c = Client::connect_with(b_url, &ConnectOptions::default().basic("l", "l-secret")).await.ok()?;
            c.get("limits", 1, false).await.ok().map(drop)
        }
    })
    .await
    .unwrap();
    let metrics = b.metrics().await.unwrap();
    assert!(!metrics.contains("warren_user_limit_rejections_total{limit=\"connections\"} 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_revoke_a_deleted_user_and_keep_users_across_a_restart() {
    let (mut b, _pw) = secured(&[], false).await;
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    admin.declare_queue("work", QueueOptions::durable()).await.unwrap();
    // warrenctl user add / set-permissions, the password on stdin.
    let env = [("WARREN_PASSWORD", "admin-secret-1"), ("WARREN_USERNAME", "admin")];
    let out = run_warrenctl_env(&b.url(), &["user", "add", "bob", "--password-stdin"], Some(b"bob-secret-3\n"), &env).unwrap();
    assert!(out.ok(), "{out:?}");
    let out = run_warrenctl_env(&b.url(), &["user", "set-permissions", "bob", "--read", "^work$"], None, &env).unwrap();
    assert!(out.ok(), "{out:?}");
    let bob = as_user(&b, "bob", "bob-secret-3").await;
    let mut consumer = bob.consume(Subscription::new("work")).await.unwrap();

    // Kept across a restart (stored durably).
    b.restart().await.unwrap();
    drop(consumer);
    let admin = as_user(&b, "admin", "admin-secret-1").await;
    let bob = as_user(&b, "bob", "bob-secret-3").await;
    consumer = bob.consume(Subscription::new("work")).await.unwrap();

    // Deleting bob ends his stream and refuses his next call.
    let out = run_warrenctl_env(&b.url(), &["user", "delete", "bob"], None, &env).unwrap();
    assert!(out.ok(), "{out:?}");
    let ended = tokio::time::timeout(SETTLE, consumer.next()).await.unwrap();
    assert!(
        matches!(&ended, Err(e) if e.to_string().contains("UNAUTHENTICATED") || e.to_string().contains("deleted"))
            || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    assert_eq!(code(bob.get("work", 1, false).await).0, tonic::Code::Unauthenticated);
    let names: Vec<String> =
        admin.users().list_users(proto::ListUsersRequest {}).await.unwrap().into_inner().users.into_iter().map(|u| u.name).collect();
    assert_eq!(names, ["admin"]);
}

// ------------------------------------------------------------------ posture

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_refuse_to_serve_beyond_loopback_without_authentication() {
    // Refused before anything listens. The address is a documentation one
    // (TEST-NET-1) that no interface here has: a broker that did not refuse
    // would fail to bind it rather than listen beyond loopback.
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        SETTLE,
        tokio::process::Command::new(broker_bin().unwrap())
            .args(["--grpc-addr", "192.0.2.1:5680", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the broker neither refused nor failed")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("without authentication") && stderr.contains("--insecure"), "{stderr}");
    // Loopback without configuration stays open (what ./dev run does).
    let b = TestBroker::start().await.unwrap();
    let me = b.client().await.unwrap().users().who_am_i(proto::WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.user.as_str(), me.authentication_enabled), ("anonymous", false));
}

// ------------------------------------------------------------ secret hygiene

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_never_write_a_password_or_token_to_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let token = "static-token-never-logged-5d1";
    let auth = write(dir.path(), "auth.toml", &format!("[[tokens]]\nuser = \"ci\"\nsha256 = \"{}\"\n", sha256_hex(token)));
    let pw = write(dir.path(), "admin-password", "admin-pw-never-logged-9c2\n");
    let b = TestBroker::start_with_options(
        &["--admin-password-file", s(&pw), "--auth-file", s(&auth), "--log-format", "json"],
        &[("RUST_LOG", "debug")],
        true,
    )
    .await
    .unwrap();
    let admin = as_user(&b, "admin", "admin-pw-never-logged-9c2").await;
    admin.declare_queue("q", QueueOptions::default()).await.unwrap();
    let env = [("WARREN_USERNAME", "admin"), ("WARREN_PASSWORD", "admin-pw-never-logged-9c2")];
    run_warrenctl_env(&b.url(), &["user", "add", "carol", "--new-password", "carol-pw-never-logged-4e7"], None, &env).unwrap();
    run_warrenctl_env(&b.url(), &["user", "set-permissions", "carol", "--read", ".*"], None, &env).unwrap();
    let carol = as_user(&b, "carol", "carol-pw-never-logged-4e7").await;
    carol.get("q", 1, false).await.unwrap();
    // Failures are logged (audit lines): still without the secret tried.
    let _ = as_user(&b, "carol", "wrong-pw-never-logged-0a8").await.get("q", 1, false).await;
    let _ = Client::connect_with(b.url(), &ConnectOptions::default().token(token)).await.unwrap().list_queues().await;
    let _ =
        Client::connect_with(b.url(), &ConnectOptions::default().token("bad-token-never-logged-3b3")).await.unwrap().list_queues().await;
    b.client().await.unwrap().list_queues().await.ok();

    let log = format!("{}\n{}", b.stdout.join("\n"), b.stderr());
    assert!(log.contains("authentication failed"), "the failures were logged: {log}");
    for secret in
        ["admin-pw-never-logged-9c2", "carol-pw-never-logged-4e7", "wrong-pw-never-logged-0a8", token, "bad-token-never-logged-3b3"]
    {
        assert!(!log.contains(secret), "{secret} appears in the log");
        for user in ["admin", "carol"] {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
            assert!(!log.contains(&basic), "basic credentials of {user} appear in the log");
        }
    }
}

// ------------------------------------------------- node-to-node listener

/// The value of an unlabelled or labelled counter line in a scrape.
fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Waits until node 1's scrape shows the counter on the line starting with
/// `line_start` above zero: it refused node 3.
async fn refused_by_node_1(c: &warren_tests::TestCluster, line_start: &str) {
    let refused = eventually(SETTLE, &format!("node 1 refusing node 3 ({line_start})"), || async {
        let m = c.node(1).metrics().await.ok()?;
        (counter(&m, line_start) > 0).then_some(())
    })
    .await;
    assert!(refused.is_ok(), "{refused:?}");
}

/// A quorum queue made through node 1 takes a confirmed publish and is
/// read back through node 2: the two nodes that trust each other replicate.
async fn replicates(c: &warren_tests::TestCluster, queue: &str) {
    let one = c.node(1).client().await.unwrap();
    one.declare_queue(queue, QueueOptions::durable().arg("x-queue-type", "quorum")).await.unwrap();
    let confirmed = eventually(SETTLE, "a confirmed publish to the quorum queue", || {
        let one = one.clone();
        async move {
            let c = one.publish(Message::new("", queue, "replicated").persistent()).await.ok()?;
            (c.status == proto::ConfirmStatus::Routed as i32).then_some(())
        }
    })
    .await;
    assert!(confirmed.is_ok(), "{confirmed:?}");
    let two = c.node(2).client().await.unwrap();
    let got = eventually(SETTLE, "the message read through node 2", || {
        let two = two.clone();
        async move { two.get(queue, 1, true).await.ok().filter(|m| !m.is_empty()) }
    })
    .await
    .unwrap();
    assert_eq!(&got[0].body[..], b"replicated");
}

#[tokio::test]
async fn should_admit_only_nodes_that_share_the_cluster_secret() {
    const LIVENESS: Duration = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("secret"), dir.path().join("other-secret"));
    std::fs::write(&good, "correct-horse-battery-staple-0123\n").unwrap();
    std::fs::write(&bad, "a-different-cluster-secret-4567").unwrap();
    // Node 3 has another cluster's secret.
    let c = warren_tests::TestCluster::start_each(3, |id| {
        vec!["--cluster-secret-file".to_string(), s(if id == 3 { &bad } else { &good }).to_string()]
    })
    .await
    .unwrap();
    // Node 3's heartbeats reach node 1 and are refused, counted and logged.
    refused_by_node_1(&c, "warren_cluster_auth_failures_total").await;
    c.wait_for_peers(1, &[1, 2], LIVENESS).await.unwrap();
    c.wait_for_peers(3, &[3], LIVENESS).await.unwrap();
    for l in c.node(1).stdout.iter().chain(c.node(3).stdout.iter()) {
        assert!(!l.contains("correct-horse") && !l.contains("a-different-cluster"), "a secret in a log line: {l}");
    }
    replicates(&c, "secret.q").await;
    let up = c.peers_up(1).await.unwrap();
    assert_eq!(up.get(&3), Some(&false), "node 3 never got in: {up:?}");
}

#[tokio::test]
async fn should_speak_mutual_tls_between_nodes_and_refuse_a_certificate_from_another_ca() {
    const LIVENESS: Duration = Duration::from_secs(30);
    let (ours, theirs) = (Pki::new("cluster"), Pki::new("intruder"));
    let files: Vec<(PathBuf, PathBuf, PathBuf)> = (1..=3u64)
        .map(|id| {
            let pki = if id == 3 { &theirs } else { &ours };
            let (cert, key) = pki.issue_node(&format!("node-{id}"), &format!("node-{id}"));
            (cert, key, pki.ca.clone())
        })
        .collect();
    let c = warren_tests::TestCluster::start_each(3, |id| {
        let (cert, key, ca) = &files[id as usize - 1];
        ["--cluster-tls-cert", s(cert), "--cluster-tls-key", s(key), "--cluster-tls-ca", s(ca)].iter().map(|a| a.to_string()).collect()
    })
    .await
    .unwrap();
    refused_by_node_1(&c, "warren_tls_handshake_failures_total{listener=\"cluster\"}").await;
    c.wait_for_peers(1, &[1, 2], LIVENESS).await.unwrap();
    c.wait_for_peers(2, &[1, 2], LIVENESS).await.unwrap();
    c.wait_for_peers(3, &[3], LIVENESS).await.unwrap();
    replicates(&c, "mtls.q").await;
}
