//! Types shared by the topology resources (`Exchange`, `Queue`, `Binding`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Broker a topology object is declared in.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerRef {
    /// Name of the Broker object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Broker object. Defaults to the namespace of the object
    /// that refers to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

impl BrokerRef {
    /// The Broker's namespace, given the namespace of the referring object.
    pub fn namespace_or<'a>(&'a self, own: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(own)
    }
}

/// What happens on the broker when the Kubernetes object is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the object on the broker too (a Queue only while it is empty,
    /// unless `deleteWithMessages` is set).
    #[default]
    Delete,
    /// Leave the object on the broker; only the Kubernetes object goes away.
    Retain,
}

/// Status fields every topology object has.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Latest observations: `Ready` says whether the object exists on the
    /// broker as declared; its reason says why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Pattern of a broker-side name (queue, exchange): no control characters,
/// which the broker refuses.
pub const NAME_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";

/// Message explaining why a broker-side property is immutable.
pub(crate) const BROKER_CANNOT_CHANGE: &str =
    "the broker cannot change it in place; create a new object (or delete and re-create this one)";

/// CEL rule on a broker-side name: not reserved.
pub(crate) fn not_reserved_name(field: &str) -> serde_json::Value {
    crate::schema::rule(
        format!("!has(self.{field}) || !self.{field}.startsWith('amq.')"),
        format!("{field} must not start with 'amq.': that prefix is reserved for the broker"),
    )
}
