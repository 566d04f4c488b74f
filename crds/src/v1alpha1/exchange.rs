//! `Exchange`: an exchange declared in a Broker.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::common::{BROKER_CANNOT_CHANGE, BrokerRef, DeletionPolicy, NAME_PATTERN, TopologyStatus, not_reserved_name};
use crate::schema::{ArgumentValue, KnownArgument, arguments_schema_refusing, immutable_fields, push_rules};

/// An exchange in a Warren Broker: where publishers send messages and where
/// bindings route them from.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Exchange",
    namespaced,
    status = "ExchangeStatus",
    shortname = "wx",
    category = "warren",
    doc = "An exchange in a Warren Broker: where publishers send messages and where bindings route them from.",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = exchange_spec_rules)]
pub struct ExchangeSpec {
    /// The Broker to declare the exchange in. Immutable.
    pub broker_ref: BrokerRef,
    /// The exchange's name on the broker. Defaults to `metadata.name`.
    /// Immutable. Names starting with `amq.` are reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NAME_PATTERN), length(min = 1, max = 255))]
    pub name: Option<String>,
    /// How the exchange routes: `direct` (routing key equals binding key),
    /// `fanout` (every binding), `topic` (dot-separated words; `*` matches one
    /// word, `#` zero or more) or `headers` (message headers against binding
    /// arguments). Immutable.
    #[serde(default, rename = "type")]
    pub type_: ExchangeType,
    /// Survives a broker restart. Immutable.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Deleted by the broker when its last binding (as a source) is removed.
    /// Immutable.
    #[serde(default)]
    pub auto_delete: bool,
    /// Cannot be published to directly; only reachable through
    /// exchange-to-exchange bindings. Immutable.
    #[serde(default)]
    pub internal: bool,
    /// Where messages that route to no queue go (argument
    /// `alternate-exchange`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NAME_PATTERN), length(min = 1, max = 255))]
    pub alternate_exchange: Option<String>,
    /// Other exchange arguments, passed to the broker as they are (any JSON
    /// value). `alternate-exchange` is refused here: set `alternateExchange`.
    /// The broker cannot change arguments in place: a change is reported in
    /// the `Ready` condition (reason `PropertiesMismatch`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "exchange_arguments_schema")]
    pub arguments: BTreeMap<String, ArgumentValue>,
    /// What happens on the broker when this object is deleted: `Delete`
    /// (default) deletes the exchange and its bindings, `Retain` leaves it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Exchange routing types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Routes to bindings whose key equals the routing key.
    #[default]
    Direct,
    /// Routes to every binding.
    Fanout,
    /// Routes by pattern over dot-separated words.
    Topic,
    /// Routes by message headers.
    Headers,
}

/// Known exchange arguments, set through typed fields only (the API server
/// refuses them in `arguments`).
pub const KNOWN_EXCHANGE_ARGUMENTS: &[KnownArgument] =
    &[KnownArgument { name: "alternate-exchange", field: "alternateExchange", boolean: false }];

fn exchange_arguments_schema(_: &mut SchemaGenerator) -> Schema {
    arguments_schema_refusing(KNOWN_EXCHANGE_ARGUMENTS)
}

fn exchange_spec_rules(schema: &mut Schema) {
    // Not `arguments`: CEL cannot see free-form values (see crate::schema).
    let mut rules =
        immutable_fields(&["brokerRef", "name", "type", "durable", "autoDelete", "internal", "alternateExchange"], BROKER_CANNOT_CHANGE);
    rules.push(not_reserved_name("name"));
    push_rules(schema, rules);
}

/// Status of an Exchange.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeStatus {
    /// Conditions and the observed generation.
    #[serde(flatten)]
    pub topology: TopologyStatus,
}

fn default_true() -> bool {
    true
}

impl Exchange {
    /// The exchange's name on the broker.
    pub fn broker_name(&self) -> String {
        self.spec.name.clone().or_else(|| self.metadata.name.clone()).unwrap_or_default()
    }
}
