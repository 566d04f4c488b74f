//! Test support: a mocked Kubernetes API server (kube-rs `tower-test`
//! idiom), an in-memory fake of the broker's gRPC service, the real broker
//! binary, and fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_broker;
pub mod real_broker;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use warren_operator::context::{Context, Settings};
use warren_operator::metrics::Metrics;

/// One request the operator made to the API server.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Path without the query.
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `METHOD path` for compact sequence assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A mocked API server: answers from registered objects and records every
/// request. GET returns the object registered at the path (404 if none);
/// PATCH of an object or its status returns the registered object (with a
/// status patch merged in); PATCH of a scale subresource sets the replicas;
/// POST of an Event echoes it.
#[derive(Clone, Default)]
pub struct ApiServer {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// `METHOD path` → (code, message) answered instead of the default.
    failures: Arc<Mutex<HashMap<String, (u16, String)>>>,
}

impl ApiServer {
    /// A client wired to a new mocked API server.
    pub fn start() -> (Client, ApiServer) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = ApiServer::default();
        let s = server.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (status, body) = s.handle(request).await;
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        (Client::new(service, "default"), server)
    }

    /// Registers an object at an API path.
    pub fn put(&self, path: &str, obj: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), obj);
    }

    /// Answers `method path` with an error status from now on.
    pub fn fail(&self, method: &str, path: &str, code: u16, message: &str) {
        self.failures.lock().unwrap().insert(format!("{method} {path}"), (code, message.to_string()));
    }

    /// The object registered at a path.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// The recorded requests so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// `METHOD path` of each recorded request.
    pub fn lines(&self) -> Vec<String> {
        self.recorded().iter().map(Recorded::line).collect()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// Recorded Events as (type, reason, note).
    pub fn events(&self) -> Vec<(String, String, String)> {
        self.recorded()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
            .map(|r| {
                (
                    r.body["type"].as_str().unwrap_or_default().to_string(),
                    r.body["reason"].as_str().unwrap_or_default().to_string(),
                    r.body["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The body of the last status patch to a path ending in `suffix`.
    pub fn last_status(&self, suffix: &str) -> Value {
        self.recorded()
            .iter()
            .rev()
            .find(|r| r.method == "PATCH" && r.path.ends_with(&format!("{suffix}/status")))
            .map(|r| r.body["status"].clone())
            .unwrap_or_else(|| panic!("no status patch for {suffix}; requests: {:#?}", self.lines()))
    }

    async fn handle(&self, request: Request<Body>) -> (u16, Value) {
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let path = request.uri().path().to_string();
        let content_type = request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        self.requests.lock().unwrap().push(Recorded { method: method.clone(), uri, path: path.clone(), content_type, body: body.clone() });
        let not_found = (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
        );
        if let Some((code, message)) = self.failures.lock().unwrap().get(&format!("{method} {path}")).cloned() {
            return (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": code, "message": message}),
            );
        }
        match method.as_str() {
            "GET" => self.get(&path).map(|o| (200, o)).unwrap_or(not_found),
            "POST" if path.ends_with("/events") => (201, body),
            "POST" => {
                // Create: 409 if it exists.
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let object_path = format!("{path}/{name}");
                if self.get(&object_path).is_some() {
                    return (
                        409,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409}),
                    );
                }
                let mut obj = body.clone();
                obj["metadata"]["resourceVersion"] = "1".into();
                self.put(&object_path, obj.clone());
                (201, obj)
            }
            "PUT" => match self.get(&path) {
                // Replace with optimistic concurrency on resourceVersion.
                Some(existing) if existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] => {
                    (409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409}))
                }
                Some(existing) => {
                    let version: u64 = existing["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut obj = body.clone();
                    obj["metadata"]["resourceVersion"] = (version + 1).to_string().into();
                    self.put(&path, obj.clone());
                    (200, obj)
                }
                None => not_found,
            },
            "PATCH" if path.ends_with("/scale") => {
                let mut scale = self.get(&path).unwrap_or_else(|| json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {}}));
                if let Some(r) = body["spec"]["replicas"].as_i64() {
                    scale["spec"]["replicas"] = r.into();
                }
                self.put(&path, scale.clone());
                (200, scale)
            }
            "PATCH" if path.ends_with("/status") => {
                let object_path = path.trim_end_matches("/status");
                match self.get(object_path) {
                    Some(mut obj) => {
                        obj["status"] = body["status"].clone();
                        self.put(object_path, obj.clone());
                        (200, obj)
                    }
                    None => not_found,
                }
            }
            "PATCH" => match (self.get(&path), body.is_array()) {
                // A JSON patch (finalizers): apply the add / remove ops we use.
                (Some(mut obj), true) => {
                    for op in body.as_array().unwrap() {
                        match (op["op"].as_str(), op["path"].as_str()) {
                            (Some("add"), Some("/metadata/finalizers")) => obj["metadata"]["finalizers"] = op["value"].clone(),
                            (Some("add"), Some("/metadata/finalizers/-")) => {
                                obj["metadata"]["finalizers"].as_array_mut().unwrap().push(op["value"].clone())
                            }
                            (Some("remove"), Some(p)) if p.starts_with("/metadata/finalizers/") => {
                                let i: usize = p.rsplit('/').next().unwrap().parse().unwrap();
                                obj["metadata"]["finalizers"].as_array_mut().unwrap().remove(i);
                            }
                            _ => {}
                        }
                    }
                    self.put(&path, obj.clone());
                    (200, obj)
                }
                (_, false) => {
                    // Server-side apply: store and echo the applied object.
                    let mut obj = body.clone();
                    obj["metadata"]["resourceVersion"] = "1".into();
                    if let Some(existing) = self.get(&path)
                        && let Some(status) = existing.get("status")
                    {
                        obj["status"] = status.clone();
                    }
                    self.put(&path, obj.clone());
                    (200, obj)
                }
                (None, true) => not_found,
            },
            _ => not_found,
        }
    }
}

/// A context for tests: quick resync, test identity.
pub fn context(client: Client) -> Arc<Context> {
    let settings = Settings {
        broker_image: "warren/broker:test".into(),
        resync: Duration::from_secs(30),
        broker_timeout: Duration::from_secs(5),
        ..Settings::default()
    };
    Context::new(client, Arc::new(Metrics::default()), settings, Some("test".into()))
}

/// API path of a Warren object.
pub fn path(plural: &str, namespace: &str, name: &str) -> String {
    format!("/apis/warren.dev/v1alpha1/namespaces/{namespace}/{plural}/{name}")
}

/// A Broker object whose status points at `endpoint`.
pub fn broker(namespace: &str, name: &str, endpoint: &str) -> Value {
    json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": name, "namespace": namespace, "uid": "broker-uid", "generation": 1},
        // Authentication off: the topology tiers run against open brokers
        // (see `secured_broker` for one the operator reaches with its
        // administrator credential).
        "spec": {"auth": {"enabled": false}},
        "status": {"endpoint": endpoint}
    })
}

/// A Broker with authentication on (the default) whose status points at
/// `endpoint`, and the path and object of its administrator Secret.
pub fn secured_broker(namespace: &str, name: &str, endpoint: &str, admin_password: &str) -> (Value, String, Value) {
    let mut broker = broker(namespace, name, endpoint);
    broker["spec"] = json!({});
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-admin"), "namespace": namespace, "resourceVersion": "1"},
        "data": {"username": b64("admin"), "password": b64(admin_password)}
    });
    (broker, format!("/api/v1/namespaces/{namespace}/secrets/{name}-admin"), secret)
}

/// Base64 of `s`, as Secret `data` holds it.
pub fn b64(s: &str) -> String {
    use k8s_openapi::ByteString;
    serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap().as_str().unwrap().to_string()
}

/// A topology object (`kind` Queue / Exchange / Binding) with `spec`.
pub fn object(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": format!("{name}-uid"), "generation": 1, "resourceVersion": "1"},
        "spec": spec
    })
}

/// Chainable fixture tweaks, in the style of controller-rs.
pub trait Fixture {
    /// Carries the operator's finalizer.
    fn finalized(self) -> Self;
    /// Is being deleted.
    fn deleting(self) -> Self;
    /// Was Ready before (declared on the broker earlier).
    fn was_ready(self) -> Self;
}

impl Fixture for Value {
    fn finalized(mut self) -> Self {
        self["metadata"]["finalizers"] = json!([warren_operator::topology::FINALIZER]);
        self
    }
    fn deleting(mut self) -> Self {
        self["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        self
    }
    fn was_ready(mut self) -> Self {
        self["status"] = json!({"observedGeneration": 1, "conditions": [{
            "type": "Ready", "status": "True", "reason": "Declared", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1
        }]});
        self
    }
}

/// Runs a future with a timeout, so a call that never completes fails the
/// test instead of hanging it.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f).await.expect("timed out")
}
