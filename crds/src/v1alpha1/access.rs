//! `User` and `Permission`: access to a Broker, declared as YAML (as
//! RabbitMQ's messaging-topology operator does).

use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::common::{BrokerRef, TopologyStatus};
use crate::schema::{immutable_fields, push_rules, rule};

/// A user name on the broker: printable, at most 512 bytes.
pub const USER_NAME_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F:]+$";

const CANNOT_RENAME: &str = "a user cannot be renamed or moved; create a new object (or delete and re-create this one)";

/// A user of a Warren Broker, with a password. The password comes from a
/// Secret (keys `username` and `password`) or, when none is named, the
/// operator generates one into the Secret `<metadata.name>-user-credentials`
/// (owned by this object). Deleting the User deletes it on the broker: its
/// credentials stop working and its open streams end.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "User",
    namespaced,
    status = "UserStatus",
    shortname = "wu",
    category = "warren",
    doc = "A user of a Warren Broker, with a password from a Secret (generated when none is named).",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(name = "Username", type_ = "string", json_path = ".status.username"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.credentialsSecret"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = user_spec_rules)]
pub struct UserSpec {
    /// The Broker the user belongs to, in this namespace (no
    /// `namespace`). Immutable.
    pub broker_ref: BrokerRef,
    /// The user name on the broker. Defaults to `metadata.name`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(USER_NAME_PATTERN), length(min = 1, max = 512))]
    pub name: Option<String>,
    /// A Secret in this namespace with the key `password` (and optionally
    /// `username`, which must then equal the user name). Unset: the
    /// operator generates a password into `<metadata.name>-user-credentials`.
    /// A changed password is applied on the next reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// Tags: `administrator` (user management, node and cluster operations,
    /// every list) and `monitoring` (status and every list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub tags: Vec<UserTag>,
    /// Most connections the user may have open at once (default: the
    /// broker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections: Option<i32>,
    /// Most publish and consume streams the user may have open at once
    /// (default: the broker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_streams: Option<i32>,
}

/// A user tag.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserTag {
    /// Manage users and permissions, node and cluster operations.
    Administrator,
    /// Node status and every list.
    Monitoring,
}

impl UserTag {
    /// The broker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UserTag::Administrator => "administrator",
            UserTag::Monitoring => "monitoring",
        }
    }
}

/// Why access objects live beside their Broker: whoever may create them
/// may create an administrator of that broker.
pub const SAME_NAMESPACE: &str = "Users and Permissions live in their Broker's namespace (whoever may create them there may create \
     an administrator of the broker): omit brokerRef.namespace and create this object in the Broker's namespace";

fn user_spec_rules(schema: &mut Schema) {
    let mut rules = immutable_fields(&["brokerRef", "name"], CANNOT_RENAME);
    rules.push(rule("!has(self.brokerRef.__namespace__)", SAME_NAMESPACE));
    push_rules(schema, rules);
}

/// Status of a User.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    /// Conditions and the observed generation.
    #[serde(flatten)]
    pub topology: TopologyStatus,
    /// The user name on the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The Secret holding the credentials (its name only, never its content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

impl User {
    /// The user name on the broker.
    pub fn broker_name(&self) -> String {
        self.spec.name.clone().unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// The Secret with the credentials: the given one, or the generated one.
    pub fn secret_name(&self) -> String {
        self.spec
            .credentials_secret
            .clone()
            .unwrap_or_else(|| format!("{}-user-credentials", self.metadata.name.clone().unwrap_or_default()))
    }
}

/// What a user or a Kubernetes ServiceAccount may do on a Broker:
/// RabbitMQ's `configure`, `write` and `read` regular expressions over
/// exchange and queue names. One Permission per user and Broker; deleting it
/// removes the permissions (the user stays).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Permission",
    namespaced,
    status = "PermissionStatus",
    shortname = "wperm",
    category = "warren",
    doc = "What a user or a Kubernetes ServiceAccount may configure, write and read on a Warren Broker.",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.brokerRef.name"),
    printcolumn(name = "Principal", type_ = "string", json_path = ".status.principal"),
    printcolumn(name = "Configure", type_ = "string", json_path = ".spec.configure", priority = 1),
    printcolumn(name = "Write", type_ = "string", json_path = ".spec.write", priority = 1),
    printcolumn(name = "Read", type_ = "string", json_path = ".spec.read", priority = 1),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = permission_spec_rules)]
pub struct PermissionSpec {
    /// The Broker, in this namespace (no `namespace`). Immutable.
    pub broker_ref: BrokerRef,
    /// A user name on the broker (a `User`'s name). Exactly one of `user`
    /// and `serviceAccount`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(USER_NAME_PATTERN), length(min = 1, max = 512))]
    pub user: Option<String>,
    /// A Kubernetes ServiceAccount: pods running as it present their
    /// projected token (audience `warren`) and are the broker user
    /// `system:serviceaccount:NAMESPACE:NAME`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
    /// Declare and delete: exchanges and queues whose names match. `""`
    /// matches nothing, `.*` everything; unanchored patterns match anywhere
    /// in a name.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub configure: String,
    /// Publish to matching exchanges (`amq.default` is the default
    /// exchange); bind to matching queues.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub write: String,
    /// Consume, get and purge matching queues; bind from matching
    /// exchanges.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub read: String,
    /// Routing-key patterns per exchange (RabbitMQ's topic permissions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub topics: Vec<TopicPermission>,
}

/// A ServiceAccount.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace. Defaults to this object's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// Routing keys allowed on one exchange.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicPermission {
    /// The exchange.
    #[schemars(length(min = 1, max = 255))]
    pub exchange: String,
    /// Routing keys a publish may use.
    #[serde(default)]
    pub write: String,
    /// Binding keys a binding from the exchange may use.
    #[serde(default)]
    pub read: String,
}

fn permission_spec_rules(schema: &mut Schema) {
    let mut rules = immutable_fields(&["brokerRef", "user", "serviceAccount"], "create a new Permission for another principal");
    rules.push(rule("has(self.user) != has(self.serviceAccount)", "set exactly one of user and serviceAccount"));
    rules.push(rule("!has(self.brokerRef.__namespace__)", SAME_NAMESPACE));
    push_rules(schema, rules);
}

/// Status of a Permission.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionStatus {
    /// Conditions and the observed generation.
    #[serde(flatten)]
    pub topology: TopologyStatus,
    /// The broker user the permissions are for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

impl Permission {
    /// The broker user the permissions are for; `own_namespace` is this
    /// object's namespace.
    pub fn principal(&self, own_namespace: &str) -> Option<String> {
        match (&self.spec.user, &self.spec.service_account) {
            (Some(u), None) => Some(u.clone()),
            (None, Some(sa)) => Some(format!("system:serviceaccount:{}:{}", sa.namespace.as_deref().unwrap_or(own_namespace), sa.name)),
            _ => None,
        }
    }
}
