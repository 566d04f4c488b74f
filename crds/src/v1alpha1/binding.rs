//! `Binding`: routes messages from an exchange to a queue or another
//! exchange.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::common::{BrokerRef, DeletionPolicy, NAME_PATTERN, TopologyStatus};
use crate::schema::{ArgumentValue, arguments_schema, immutable_fields, push_rules};

/// A binding in a Warren Broker: routes messages from an exchange to a queue
/// or to another exchange. Waits (condition `Ready`, reason
/// `WaitingForSource` / `WaitingForDestination`) until both exist.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Binding",
    namespaced,
    status = "BindingStatus",
    shortname = "wbd",
    category = "warren",
    doc = "A binding in a Warren Broker: routes messages from an exchange to a queue or to another exchange.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Destination", type_ = "string", json_path = ".spec.destination"),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.routingKey"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = binding_spec_rules)]
pub struct BindingSpec {
    /// The Broker to bind in. Immutable.
    pub broker_ref: BrokerRef,
    /// Name on the broker of the exchange messages come from (not the
    /// Exchange object's name, when `spec.name` differs). Immutable.
    #[schemars(pattern(NAME_PATTERN), length(min = 1, max = 255))]
    pub source: String,
    /// Name on the broker of the queue (or exchange, see `destinationKind`)
    /// messages go to. Immutable.
    #[schemars(pattern(NAME_PATTERN), length(min = 1, max = 255))]
    pub destination: String,
    /// Whether `destination` is a `Queue` (default) or an `Exchange`.
    /// Immutable.
    #[serde(default)]
    pub destination_kind: DestinationKind,
    /// The binding key: for direct exchanges the routing key to match, for
    /// topic exchanges a pattern (`*` one word, `#` zero or more). Immutable.
    #[serde(default)]
    #[schemars(length(max = 255))]
    pub routing_key: String,
    /// Binding arguments, such as the headers to match and `x-match` for a
    /// headers exchange (any JSON value). Changing them re-binds: the
    /// operator removes the binding it made and adds the new one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "arguments_schema")]
    pub arguments: BTreeMap<String, ArgumentValue>,
    /// What happens on the broker when this object is deleted: `Delete`
    /// (default) unbinds, `Retain` leaves the binding in place.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What a binding's destination is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DestinationKind {
    /// A queue.
    #[default]
    Queue,
    /// An exchange (exchange-to-exchange binding).
    Exchange,
}

fn binding_spec_rules(schema: &mut Schema) {
    push_rules(
        schema,
        immutable_fields(
            // Not `arguments`: CEL cannot see free-form values (see
            // crate::schema); the operator re-binds when they change.
            &["brokerRef", "source", "destination", "destinationKind", "routingKey"],
            "a binding is identified by these fields; create a new Binding (or delete and re-create this one)",
        ),
    );
}

/// Status of a Binding.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BindingStatus {
    /// Conditions and the observed generation.
    #[serde(flatten)]
    pub topology: TopologyStatus,
    /// The binding the operator made on the broker. When the spec changes
    /// (its `arguments`), this one is removed before the new one is made;
    /// deleting the Binding removes this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<BoundBinding>,
}

/// A binding as made on the broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BoundBinding {
    /// The source exchange.
    pub source: String,
    /// The destination queue or exchange.
    pub destination: String,
    /// Whether the destination is a `Queue` or an `Exchange`.
    #[serde(default)]
    pub destination_kind: DestinationKind,
    /// The binding key.
    #[serde(default)]
    pub routing_key: String,
    /// The binding arguments.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "arguments_schema")]
    pub arguments: BTreeMap<String, ArgumentValue>,
}

impl BoundBinding {
    /// The binding a spec asks for.
    pub fn from_spec(spec: &BindingSpec) -> Self {
        Self {
            source: spec.source.clone(),
            destination: spec.destination.clone(),
            destination_kind: spec.destination_kind,
            routing_key: spec.routing_key.clone(),
            arguments: spec.arguments.clone(),
        }
    }
}
