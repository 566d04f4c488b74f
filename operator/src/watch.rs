//! Watches that survive bad objects, and the record of every watch's health.
//!
//! - [`lenient`] watches a kind as raw JSON and decodes each object on its
//!   own. An object the Rust types cannot read (one the API server accepted
//!   under an older or looser schema) is logged, counted, reported once per
//!   generation on its own status (`Ready=False`, reason `Undecodable`) and
//!   left out of the cache; it never fails the list of the others, which a
//!   typed watch would (no object of that kind anywhere would be
//!   reconciled).
//! - [`Watches`] records, per watch, since when it has failed without a
//!   success in between; `/healthz` fails once a watch has been failing
//!   longer than `stuck_after`, so a stuck operator is restarted instead of
//!   looking healthy while it reconciles nothing.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_fn};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::FIELD_MANAGER;

/// Health of every watch of the operator.
pub struct Watches {
    stuck_after: Duration,
    state: Mutex<BTreeMap<&'static str, State>>,
    /// Objects whose decoding failed: counted in `/metrics`.
    undecodable: Mutex<HashSet<(String, Option<i64>)>>,
}

#[derive(Default)]
struct State {
    failing_since: Option<Instant>,
    last_error: String,
}

impl Watches {
    /// A registry whose watches count as stuck after `stuck_after` of
    /// failures with no success in between.
    pub fn new(stuck_after: Duration) -> Arc<Self> {
        Arc::new(Self { stuck_after, state: Mutex::default(), undecodable: Mutex::default() })
    }

    /// Makes `name` known (healthy until it fails).
    pub fn register(&self, name: &'static str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).entry(name).or_default();
    }

    /// Records one item of the watch `name`: a success, or an error.
    pub fn record(&self, name: &'static str, error: Option<&watcher::Error>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = state.entry(name).or_default();
        match error {
            None => entry.failing_since = None,
            Some(e) => {
                entry.failing_since.get_or_insert_with(Instant::now);
                entry.last_error = e.to_string();
            }
        }
    }

    /// `Err` naming every watch that has failed for longer than
    /// `stuck_after`, with its last error.
    pub fn check(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stuck: Vec<String> = state
            .iter()
            .filter(|(_, s)| s.failing_since.is_some_and(|t| t.elapsed() >= self.stuck_after))
            .map(|(name, s)| format!("the {name} watch has failed for more than {:?}: {}", self.stuck_after, s.last_error))
            .collect();
        if stuck.is_empty() { Ok(()) } else { Err(stuck.join("\n")) }
    }

    /// How many distinct object generations could not be decoded.
    pub fn undecodable(&self) -> usize {
        self.undecodable.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether this generation of an object is newly undecodable.
    fn first_failure(&self, uid: String, generation: Option<i64>) -> bool {
        self.undecodable.lock().unwrap_or_else(|p| p.into_inner()).insert((uid, generation))
    }
}

/// Watches `K` (in `namespace`, or everywhere) and yields typed events,
/// decoding each object on its own (see the module docs). The watch's
/// health is recorded in `watches` as `name`.
pub fn lenient<K>(
    client: Client,
    namespace: Option<&str>,
    watches: Arc<Watches>,
    name: &'static str,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    watches.register(name);
    watch_fn(api, watcher::Config::default().any_semantic()).default_backoff().filter_map(move |item| {
        watches.record(name, item.as_ref().err());
        let out = match item {
            Err(e) => Some(Err(e)),
            Ok(Event::Init) => Some(Ok(Event::Init)),
            Ok(Event::InitDone) => Some(Ok(Event::InitDone)),
            // A bad object is left out of the initial list.
            Ok(Event::InitApply(obj)) => decode::<K>(&client, &ar, &watches, obj).map(|k| Ok(Event::InitApply(k))),
            // A bad update evicts the last good copy from the cache: the
            // operator must not keep acting on a spec that is gone.
            Ok(Event::Apply(obj)) => Some(Ok(match decode::<K>(&client, &ar, &watches, obj.clone()) {
                Some(k) => Event::Apply(k),
                None => return std::future::ready(stand_in::<K>(&obj).map(|k| Ok(Event::Delete(k)))),
            })),
            Ok(Event::Delete(obj)) => {
                let k = serde_json::to_value(&obj).ok().and_then(|v| serde_json::from_value::<K>(v).ok()).or_else(|| stand_in::<K>(&obj));
                k.map(|k| Ok(Event::Delete(k)))
            }
        };
        std::future::ready(out)
    })
}

/// A `K` with `obj`'s metadata and an empty spec: enough to evict `obj`
/// from a cache (which keys by namespace and name).
fn stand_in<K: Resource<DynamicType = ()> + DeserializeOwned>(obj: &DynamicObject) -> Option<K> {
    let value = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": obj.metadata,
        "spec": {"brokerRef": {"name": ""}, "source": "", "destination": ""},
    });
    serde_json::from_value(value).ok()
}

fn decode<K>(client: &Client, ar: &ApiResource, watches: &Arc<Watches>, obj: DynamicObject) -> Option<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let value = match serde_json::to_value(&obj) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "re-encoding a watched object failed");
            return None;
        }
    };
    match serde_json::from_value::<K>(value) {
        Ok(k) => Some(k),
        Err(e) => {
            let who = format!("{} {}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any());
            let generation = obj.metadata.generation;
            if watches.first_failure(obj.uid().unwrap_or_default(), generation) {
                tracing::error!(object = %who, error = %e, "cannot read this object; it is skipped, the others are reconciled");
                let message = format!(
                    "the operator cannot read this object ({e}); fix the spec (see `kubectl explain {}.spec`)",
                    K::plural(&()).trim_end_matches('s')
                );
                report(client.clone(), ar.clone(), obj, message, generation);
            }
            None
        }
    }
}

/// Writes `Ready=False, reason Undecodable` on an object the operator
/// cannot read, in the background (best effort: the log has it too).
fn report(client: Client, ar: ApiResource, obj: DynamicObject, message: String, generation: Option<i64>) {
    let Some(namespace) = obj.namespace() else { return };
    let name = obj.name_any();
    tokio::spawn(async move {
        let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &ar);
        let condition = crate::conditions::new(crate::conditions::READY, false, "Undecodable", message, generation);
        let patch = serde_json::json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "status": {"conditions": [condition]},
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) = api.patch_status(&name, &params, &Patch::Apply(&patch)).await {
            tracing::warn!(object = %name, error = %e, "reporting an undecodable object on its status failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_report_a_watch_failing_longer_than_the_limit() {
        let w = Watches::new(Duration::ZERO);
        w.register("queue");
        assert!(w.check().is_ok());
        let error = watcher::Error::NoResourceVersion;
        w.record("queue", Some(&error));
        let message = w.check().expect_err("stuck");
        assert!(message.contains("queue watch"), "{message}");
        w.record("queue", None);
        assert!(w.check().is_ok(), "a success clears it");
    }

    #[test]
    fn should_not_report_a_watch_failing_for_less_than_the_limit() {
        let w = Watches::new(Duration::from_secs(3600));
        w.record("broker", Some(&watcher::Error::NoResourceVersion));
        assert!(w.check().is_ok());
    }
}
