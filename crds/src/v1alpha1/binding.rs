//! `Binding`: routes messages from an exchange to a queue or another
//! exchange.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::common::{BrokerRef, DeletionPolicy, TopologyStatus};
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
    #[schemars(length(min = 1, max = 255))]
    pub source: String,
    /// Name on the broker of the queue (or exchange, see `destinationKind`)
    /// messages go to. Immutable.
    #[schemars(length(min = 1, max = 255))]
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
    /// headers exchange. Immutable.
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
            &["brokerRef", "source", "destination", "destinationKind", "routingKey", "arguments"],
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
}
