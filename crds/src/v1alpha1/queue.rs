//! `Queue`: a queue declared in a Broker, optionally driving the replicas of
//! a consumer workload from its backlog.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::common::{BROKER_CANNOT_CHANGE, BrokerRef, DeletionPolicy, NAME_PATTERN, TopologyStatus, not_reserved_name};
use crate::schema::{ArgumentValue, KnownArgument, arguments_schema_refusing, immutable_fields, push_rules, rule};

/// A queue in a Warren Broker. Its status mirrors the broker's counts, and
/// `spec.autoscaling` scales a consumer workload with the backlog.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Queue",
    namespaced,
    status = "QueueStatus",
    shortname = "wq",
    category = "warren",
    doc = "A queue in a Warren Broker. Its status mirrors the broker's message counts; spec.autoscaling scales a consumer workload with the backlog.",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name", priority = 1),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready", description = "Messages waiting to be delivered"),
    printcolumn(
        name = "Unacked",
        type_ = "integer",
        json_path = ".status.unacked",
        description = "Messages delivered and not yet acknowledged"
    ),
    printcolumn(name = "Consumers", type_ = "integer", json_path = ".status.consumers"),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.autoscaling.currentReplicas",
        description = "Replicas of the autoscaled workload"
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = queue_spec_rules)]
pub struct QueueSpec {
    /// The Broker to declare the queue in. Immutable.
    pub broker_ref: BrokerRef,
    /// The queue's name on the broker. Defaults to `metadata.name`.
    /// Immutable. Names starting with `amq.` are reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NAME_PATTERN), length(min = 1, max = 255))]
    pub name: Option<String>,
    /// The queue type (argument `x-queue-type`): `classic` (default: held
    /// by one broker pod, not replicated) or `quorum` (replicated through
    /// Raft on a Broker of more than one replica, and available while a
    /// majority of its replicas is up; it must be durable, not
    /// `autoDelete`). A Queue object always declares its
    /// type: the Broker's `defaultQueueType` applies to queues that clients
    /// declare without one. Immutable.
    #[serde(default, rename = "type")]
    pub type_: QueueType,
    /// Survives a broker restart, and so do its persistent messages.
    /// Immutable.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Deleted by the broker when its last consumer goes away (after it had
    /// one). The operator re-creates it at the next resync. Immutable.
    #[serde(default)]
    pub auto_delete: bool,
    /// How long a message may wait in the queue before it expires (and is
    /// dead-lettered, if a dead-letter exchange is set), in milliseconds
    /// (argument `x-message-ttl`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967295_i64))]
    pub message_ttl_ms: Option<i64>,
    /// Delete the queue after it has been unused (no consumers, no gets, no
    /// re-declare) for this long, in milliseconds (argument `x-expires`).
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295_i64))]
    pub expires_ms: Option<i64>,
    /// Most ready messages the queue holds; see `overflow` for what happens
    /// beyond it (argument `x-max-length`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_length: Option<i64>,
    /// Most body bytes of ready messages the queue holds (argument
    /// `x-max-length-bytes`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_length_bytes: Option<i64>,
    /// What happens to a publish beyond `maxLength` / `maxLengthBytes`
    /// (argument `x-overflow`): `drop-head` (default: the oldest message is
    /// dropped or dead-lettered), `reject-publish` (the publish is rejected),
    /// `reject-publish-dlx` (rejected, and dead-lettered). Needs `maxLength`
    /// or `maxLengthBytes`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
    /// Exchange that expired, rejected and dropped messages are republished
    /// to (argument `x-dead-letter-exchange`). The empty string is the
    /// default exchange. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NAME_PATTERN), length(max = 255))]
    pub dead_letter_exchange: Option<String>,
    /// Routing key used when dead-lettering, instead of the message's own
    /// (argument `x-dead-letter-routing-key`). Needs `deadLetterExchange`.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub dead_letter_routing_key: Option<String>,
    /// Makes this a priority queue with priorities 0 to this value (argument
    /// `x-max-priority`, 1..255). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub max_priority: Option<i32>,
    /// A message returned to the queue (rejected, nacked, or its consumer
    /// gone) after more deliveries than this is a poison message: it is
    /// dead-lettered (or dropped, without `deadLetterExchange`) instead of
    /// delivered again (argument `x-delivery-limit`). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967295_i64))]
    pub delivery_limit: Option<i64>,
    /// A message whose `message_id` was already enqueued within this many
    /// milliseconds is not enqueued again (argument `x-deduplication-window`).
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295_i64))]
    pub deduplication_window_ms: Option<i64>,
    /// Only one consumer receives messages at a time; the others take over
    /// in order when it goes away (argument `x-single-active-consumer`).
    /// Immutable.
    #[serde(default)]
    pub single_active_consumer: bool,
    /// Other queue arguments, passed to the broker as they are (any JSON
    /// value: string, integer, number, boolean, list, map). The known ones
    /// (`x-message-ttl`, `x-max-length`, ...) are refused here: set their
    /// typed fields. The broker cannot change arguments in place: a change is
    /// reported in the `Ready` condition (reason `PropertiesMismatch`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "queue_arguments_schema")]
    pub arguments: BTreeMap<String, ArgumentValue>,
    /// What happens on the broker when this object is deleted: `Delete`
    /// (default) deletes the queue, but only once it is empty unless
    /// `deleteWithMessages` is set; `Retain` leaves the queue and its
    /// messages on the broker.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// With `deletionPolicy: Delete`, delete the queue even while it holds
    /// messages (they are lost). By default a non-empty queue is kept, and the
    /// object stays Terminating with a `Ready` condition of reason
    /// `QueueNotEmpty` until the queue drains or this policy changes.
    #[serde(default)]
    pub delete_with_messages: bool,
    /// Scale a workload with this queue's backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// Queue types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Held by one broker pod, stored in its RocksDB.
    #[default]
    Classic,
    /// Replicated through Raft on several pods of a cluster Broker.
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// What happens to a publish beyond `maxLength` / `maxLengthBytes`
/// (argument `x-overflow`): `drop-head` (the oldest message is dropped or
/// dead-lettered; the broker's default), `reject-publish` (the publish is
/// rejected), `reject-publish-dlx` (rejected, and dead-lettered). Needs
/// `maxLength` or `maxLengthBytes`. Immutable.
// (This doc is the field's `kubectl explain` text: optional enums take
// their description from the type.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message.
    DropHead,
    /// Reject the publish.
    RejectPublish,
    /// Reject the publish and dead-letter the message.
    RejectPublishDlx,
}

impl Overflow {
    /// The `x-overflow` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

const fn known(name: &'static str, field: &'static str) -> KnownArgument {
    KnownArgument { name, field, boolean: false }
}

/// Queue arguments that have a typed field and may not appear in
/// `arguments` (the API server refuses them, naming the field to use).
pub const KNOWN_QUEUE_ARGUMENTS: &[KnownArgument] = &[
    known("x-queue-type", "type"),
    known("x-message-ttl", "messageTtlMs"),
    known("x-expires", "expiresMs"),
    known("x-max-length", "maxLength"),
    known("x-max-length-bytes", "maxLengthBytes"),
    known("x-overflow", "overflow"),
    known("x-dead-letter-exchange", "deadLetterExchange"),
    known("x-dead-letter-routing-key", "deadLetterRoutingKey"),
    known("x-max-priority", "maxPriority"),
    known("x-delivery-limit", "deliveryLimit"),
    known("x-deduplication-window", "deduplicationWindowMs"),
    KnownArgument { name: "x-single-active-consumer", field: "singleActiveConsumer", boolean: true },
];

fn queue_arguments_schema(_: &mut SchemaGenerator) -> Schema {
    arguments_schema_refusing(KNOWN_QUEUE_ARGUMENTS)
}

/// Spec fields the broker cannot change on an existing queue: immutable in
/// the schema. (`arguments` cannot be: CEL does not see free-form values. A
/// change to it is refused by the broker and reported in the `Ready`
/// condition with reason `PropertiesMismatch`.)
pub const QUEUE_IMMUTABLE_FIELDS: &[&str] = &[
    "brokerRef",
    "name",
    "type",
    "durable",
    "autoDelete",
    "messageTtlMs",
    "expiresMs",
    "maxLength",
    "maxLengthBytes",
    "overflow",
    "deadLetterExchange",
    "deadLetterRoutingKey",
    "maxPriority",
    "deliveryLimit",
    "deduplicationWindowMs",
    "singleActiveConsumer",
];

fn queue_spec_rules(schema: &mut Schema) {
    let mut rules = immutable_fields(QUEUE_IMMUTABLE_FIELDS, BROKER_CANNOT_CHANGE);
    rules.push(not_reserved_name("name"));
    rules
        .push(rule("!has(self.overflow) || has(self.maxLength) || has(self.maxLengthBytes)", "overflow needs maxLength or maxLengthBytes"));
    rules.push(rule("!has(self.deadLetterRoutingKey) || has(self.deadLetterExchange)", "deadLetterRoutingKey needs deadLetterExchange"));
    // The broker's rules for quorum queues (RabbitMQ's): durable, shared
    // and long-lived.
    let quorum = "!has(self.type) || self.type != 'quorum' || ";
    rules.push(rule(format!("{quorum}!has(self.durable) || self.durable"), "a quorum queue is durable: type quorum needs durable true"));
    rules.push(rule(format!("{quorum}!has(self.autoDelete) || !self.autoDelete"), "a quorum queue cannot be autoDelete"));
    push_rules(schema, rules);
}

/// Scales a workload (anything with a `scale` subresource) with the queue's
/// backlog: `ceil(backlog / messagesPerReplica)` replicas, between
/// `minReplicas` and `maxReplicas`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = autoscaling_rules)]
pub struct Autoscaling {
    /// The workload to scale, in the Queue's namespace. One workload is
    /// driven by one Queue: when several target it, the oldest does and the
    /// others report `AutoscalingActive=False`, reason `TargetConflict`. Do
    /// not point an HPA or KEDA at it too.
    pub target: ScaleTarget,
    /// Fewest replicas. 0 lets the workload scale to zero, which happens
    /// only once the queue has been idle (nothing ready and nothing
    /// unacknowledged) for the whole stabilization window.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// Backlog one replica is expected to handle.
    #[serde(default = "default_messages_per_replica")]
    #[schemars(range(min = 1))]
    pub messages_per_replica: i64,
    /// From zero, the workload starts only when the backlog is above this.
    /// It never stops running consumers: they scale to zero only when the
    /// queue is idle.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_messages: i64,
    /// Scale down only to the highest replica count recommended during this
    /// many seconds, so that a short lull does not stop busy consumers.
    /// Scaling up is immediate.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: i32,
    /// How often the backlog is read and the decision made, in seconds.
    #[serde(default = "default_polling")]
    #[schemars(range(min = 1, max = 3600))]
    pub polling_seconds: i32,
    /// Which messages count as backlog for the replica count:
    /// `ReadyAndUnacked` (default) or `Ready`. Either way a queue with
    /// unacknowledged messages keeps at least one replica.
    #[serde(default)]
    pub backlog: Backlog,
}

fn autoscaling_rules(schema: &mut Schema) {
    push_rules(schema, [rule("self.maxReplicas >= self.minReplicas", "maxReplicas must be at least minReplicas")]);
}

/// The workload an autoscaled Queue drives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTarget {
    /// API version of the workload, such as `apps/v1`.
    #[serde(default = "default_api_version")]
    #[schemars(length(min = 1, max = 253))]
    pub api_version: String,
    /// Kind of the workload, such as `Deployment` or `StatefulSet`. It must
    /// have a `scale` subresource.
    #[serde(default = "default_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name of the workload.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which messages count as backlog for autoscaling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Backlog {
    /// Ready plus delivered-but-unacknowledged messages.
    #[default]
    ReadyAndUnacked,
    /// Ready messages only.
    Ready,
}

/// Status of a Queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Conditions and the observed generation.
    #[serde(flatten)]
    pub topology: TopologyStatus,
    /// Messages waiting to be delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<u64>,
    /// Messages delivered and not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacked: Option<u64>,
    /// Messages held back by a delay, not yet due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed: Option<u64>,
    /// Consumers subscribed to the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    /// The last autoscaling decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The last autoscaling decision of a Queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas of the target when the decision was made (after it was
    /// applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replicas the operator wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// The backlog the decision was based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u64>,
    /// Why: `ScaledUp`, `ScaledDown`, `Stable`, `StabilizingScaleDown`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the operator last changed the target's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

fn default_true() -> bool {
    true
}
fn default_messages_per_replica() -> i64 {
    10
}
fn default_stabilization() -> i32 {
    300
}
fn default_polling() -> i32 {
    5
}
fn default_api_version() -> String {
    "apps/v1".into()
}
fn default_kind() -> String {
    "Deployment".into()
}

impl Queue {
    /// The queue's name on the broker.
    pub fn broker_name(&self) -> String {
        self.spec.name.clone().or_else(|| self.metadata.name.clone()).unwrap_or_default()
    }
}
