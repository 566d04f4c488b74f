//! Authorization: RabbitMQ's model. Each operation needs `configure`,
//! `write` or `read` permission on named exchanges and queues (a user's
//! permissions are three regular expressions over those names), optionally
//! a routing-key pattern on topic exchanges, and a tag for node and user
//! administration. [`Operation::requirements`] is the table, the one place
//! that says what each RPC needs:
//!
//! | operation | configure | write | read |
//! |---|---|---|---|
//! | declare exchange | exchange | | |
//! | declare exchange, passive | | | |
//! | declare exchange with `alternate-exchange` | exchange | alternate exchange | exchange |
//! | delete exchange | exchange | | |
//! | declare queue | queue | | |
//! | declare queue, passive | | | |
//! | declare queue with `x-dead-letter-exchange` | queue | dead-letter exchange | queue |
//! | delete queue | queue | | |
//! | bind / unbind queue | | queue | exchange (source) |
//! | bind / unbind exchange | | exchange (destination) | exchange (source) |
//! | publish | | exchange (`amq.default` for "") | |
//! | consume, get, purge | | | queue |
//!
//! Topic permissions (per exchange name): a publish's routing key must match
//! the exchange's `write` routing-key pattern, a binding's key its `read`
//! one. Status and cluster status need the `monitoring` or `administrator`
//! tag; cluster changes and user management need `administrator`. Lists
//! show only what the user has some permission on (all of it with either
//! tag).
//!
//! The check is a thin layer at the gRPC edge: `server.rs` calls [`check`]
//! with the decoded request before it calls the broker core, which knows
//! nothing of users.

use std::sync::Arc;

use tonic::{Request, Status};

use super::{Principal, authenticated};

/// Names of every operation, as in metrics labels and audit lines.
pub const OPERATIONS: [&str; 24] = [
    "declare_exchange",
    "delete_exchange",
    "declare_queue",
    "delete_queue",
    "purge_queue",
    "bind",
    "unbind",
    "publish",
    "consume",
    "get",
    "list_exchanges",
    "list_queues",
    "list_bindings",
    "list_consumers",
    "status",
    "cluster_status",
    "quorum_critical",
    "grow_queues",
    "shrink_queues",
    "rebalance_queues",
    "manage_users",
    "list_users",
    "who_am_i",
    "reflection",
];

/// A permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    Configure,
    Write,
    Read,
}

impl Perm {
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Configure => "configure",
            Perm::Write => "write",
            Perm::Read => "read",
        }
    }
}

/// A named exchange or queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    Exchange(&'a str),
    Queue(&'a str),
}

impl Resource<'_> {
    /// The name permissions match: the default exchange is `amq.default`,
    /// as in RabbitMQ.
    pub fn name(&self) -> &str {
        match self {
            Resource::Exchange("") => "amq.default",
            Resource::Exchange(n) | Resource::Queue(n) => n,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Exchange(_) => "exchange",
            Resource::Queue(_) => "queue",
        }
    }
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} '{}'", self.kind(), self.name())
    }
}

/// A tag an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// `monitoring` or `administrator`.
    Monitoring,
    Administrator,
}

/// What an operation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement<'a> {
    Perm(Perm, Resource<'a>),
    /// A routing key against the topic pattern of an exchange.
    Topic {
        perm: Perm,
        exchange: &'a str,
        routing_key: &'a str,
    },
    Tag(Tag),
}

/// An operation on the broker, with the names it touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    DeclareExchange {
        name: &'a str,
        passive: bool,
        alternate_exchange: Option<&'a str>,
    },
    DeleteExchange {
        name: &'a str,
    },
    DeclareQueue {
        name: &'a str,
        passive: bool,
        dead_letter_exchange: Option<&'a str>,
    },
    DeleteQueue {
        name: &'a str,
    },
    PurgeQueue {
        name: &'a str,
    },
    Bind {
        source: &'a str,
        destination: &'a str,
        to_exchange: bool,
        routing_key: &'a str,
    },
    Unbind {
        source: &'a str,
        destination: &'a str,
        to_exchange: bool,
        routing_key: &'a str,
    },
    Publish {
        exchange: &'a str,
        routing_key: &'a str,
    },
    Consume {
        queue: &'a str,
    },
    Get {
        queue: &'a str,
    },
    /// Lists are filtered rather than refused ([`visible`]).
    List(&'static str),
    Status,
    /// Cluster operations (`ClusterStatus`, `QuorumCritical`: read-only;
    /// `GrowQueues`, `ShrinkQueues`, `RebalanceQueues`: changes).
    ClusterStatus,
    QuorumCritical,
    GrowQueues,
    ShrinkQueues,
    RebalanceQueues,
    /// Creating, changing and deleting users and permissions.
    ManageUsers,
    ListUsers,
    WhoAmI,
    /// Server reflection: any authenticated caller.
    Reflection,
}

/// The name a server-named queue is checked as before it exists (its real
/// name starts the same: `amq.gen-...`).
pub const SERVER_NAMED_QUEUE: &str = "amq.gen-";

impl<'a> Operation<'a> {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::DeclareExchange { .. } => "declare_exchange",
            Operation::DeleteExchange { .. } => "delete_exchange",
            Operation::DeclareQueue { .. } => "declare_queue",
            Operation::DeleteQueue { .. } => "delete_queue",
            Operation::PurgeQueue { .. } => "purge_queue",
            Operation::Bind { .. } => "bind",
            Operation::Unbind { .. } => "unbind",
            Operation::Publish { .. } => "publish",
            Operation::Consume { .. } => "consume",
            Operation::Get { .. } => "get",
            Operation::List(what) => what,
            Operation::Status => "status",
            Operation::ClusterStatus => "cluster_status",
            Operation::QuorumCritical => "quorum_critical",
            Operation::GrowQueues => "grow_queues",
            Operation::ShrinkQueues => "shrink_queues",
            Operation::RebalanceQueues => "rebalance_queues",
            Operation::ManageUsers => "manage_users",
            Operation::ListUsers => "list_users",
            Operation::WhoAmI => "who_am_i",
            Operation::Reflection => "reflection",
        }
    }

    /// What the operation needs: RabbitMQ's table.
    pub fn requirements(&self) -> Vec<Requirement<'a>> {
        use Perm::*;
        use Requirement as R;
        use Resource::*;
        match *self {
            Operation::DeclareExchange { passive: true, .. } | Operation::DeclareQueue { passive: true, .. } => vec![],
            Operation::DeclareExchange { name, alternate_exchange, .. } => {
                let mut r = vec![R::Perm(Configure, Exchange(name))];
                if let Some(ae) = alternate_exchange {
                    r.push(R::Perm(Write, Exchange(ae)));
                    r.push(R::Perm(Read, Exchange(name)));
                }
                r
            }
            Operation::DeleteExchange { name } => vec![R::Perm(Configure, Exchange(name))],
            Operation::DeclareQueue { name, dead_letter_exchange, .. } => {
                let name = if name.is_empty() { SERVER_NAMED_QUEUE } else { name };
                let mut r = vec![R::Perm(Configure, Queue(name))];
                if let Some(dlx) = dead_letter_exchange {
                    r.push(R::Perm(Write, Exchange(dlx)));
                    r.push(R::Perm(Read, Queue(name)));
                }
                r
            }
            Operation::DeleteQueue { name } => vec![R::Perm(Configure, Queue(name))],
            Operation::PurgeQueue { name } | Operation::Consume { queue: name } | Operation::Get { queue: name } => {
                vec![R::Perm(Read, Queue(name))]
            }
            Operation::Bind { source, destination, to_exchange, routing_key }
            | Operation::Unbind { source, destination, to_exchange, routing_key } => {
                let dest = if to_exchange { Exchange(destination) } else { Queue(destination) };
                vec![R::Perm(Write, dest), R::Perm(Read, Exchange(source)), R::Topic { perm: Read, exchange: source, routing_key }]
            }
            Operation::Publish { exchange, routing_key } => {
                vec![R::Perm(Write, Exchange(exchange)), R::Topic { perm: Write, exchange, routing_key }]
            }
            Operation::List(_) | Operation::WhoAmI | Operation::Reflection => vec![],
            Operation::Status | Operation::ClusterStatus | Operation::QuorumCritical => vec![R::Tag(Tag::Monitoring)],
            Operation::GrowQueues
            | Operation::ShrinkQueues
            | Operation::RebalanceQueues
            | Operation::ManageUsers
            | Operation::ListUsers => {
                vec![R::Tag(Tag::Administrator)]
            }
        }
    }
}

/// Why a requirement is not met, for the denial message.
fn unmet(p: &Principal, r: &Requirement<'_>) -> Option<String> {
    if p.open {
        return None;
    }
    match r {
        Requirement::Tag(Tag::Administrator) => (!p.administrator()).then(|| "the administrator tag is required".to_string()),
        Requirement::Tag(Tag::Monitoring) => (!p.monitoring()).then(|| "the monitoring or administrator tag is required".to_string()),
        Requirement::Perm(perm, resource) => {
            (!p.can(*perm, resource.name())).then(|| format!("{} permission on {resource} is required", perm.as_str()))
        }
        Requirement::Topic { perm, exchange, routing_key } => (!p.can_topic(*perm, exchange, routing_key))
            .then(|| format!("topic {} permission on exchange '{exchange}' does not allow routing key '{routing_key}'", perm.as_str())),
    }
}

/// The resource an operation is about, for messages.
fn subject(op: &Operation<'_>) -> String {
    match op {
        Operation::DeclareExchange { name, .. } | Operation::DeleteExchange { name } => Resource::Exchange(name).to_string(),
        Operation::DeclareQueue { name, .. } => Resource::Queue(if name.is_empty() { SERVER_NAMED_QUEUE } else { name }).to_string(),
        Operation::DeleteQueue { name } | Operation::PurgeQueue { name } => Resource::Queue(name).to_string(),
        Operation::Consume { queue } | Operation::Get { queue } => Resource::Queue(queue).to_string(),
        Operation::Bind { source, destination, to_exchange, .. } | Operation::Unbind { source, destination, to_exchange, .. } => {
            let dest = if *to_exchange { Resource::Exchange(destination) } else { Resource::Queue(destination) };
            format!("{dest} to exchange '{source}'")
        }
        Operation::Publish { exchange, .. } => Resource::Exchange(exchange).to_string(),
        _ => "the broker".to_string(),
    }
}

/// Checks `op` for `principal`; `peer` is where the call came from (for
/// the audit line). A denial is counted, logged and answered with
/// `PERMISSION_DENIED` naming the user, the operation and the resource.
pub fn authorize(principal: &Principal, peer: &str, op: &Operation<'_>) -> Result<(), Status> {
    if principal.open {
        return Ok(());
    }
    for r in op.requirements() {
        if let Some(why) = unmet(principal, &r) {
            let operation = op.name();
            let resource = subject(op);
            super::metrics::global().denied(operation);
            tracing::warn!(
                target: "warren::audit",
                user = %principal.name,
                mechanism = principal.mechanism.as_str(),
                peer,
                operation,
                resource = %resource,
                "permission denied: {why}"
            );
            return Err(Status::permission_denied(format!(
                "user '{}' may not {} {resource}: {why}",
                principal.name,
                operation.replace('_', " ")
            )));
        }
    }
    Ok(())
}

/// Checks `op` for the caller of `req` (see [`authorize`]).
pub fn check<T>(req: &Request<T>, op: Operation<'_>) -> Result<(), Status> {
    let (principal, peer) = authenticated(req);
    authorize(&principal, &peer, &op)
}

/// Whether the caller may see `resource` in a list: any permission on it,
/// or the monitoring or administrator tag.
pub fn visible(principal: &Principal, resource: Resource<'_>) -> bool {
    principal.open
        || principal.monitoring()
        || [Perm::Configure, Perm::Write, Perm::Read].into_iter().any(|p| principal.can(p, resource.name()))
}

/// The caller of a request, for list filtering.
pub fn caller<T>(req: &Request<T>) -> Arc<Principal> {
    authenticated(req).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_name_every_operation_in_the_metrics_list() {
        let ops = [
            Operation::DeclareExchange { name: "x", passive: false, alternate_exchange: None },
            Operation::DeleteExchange { name: "x" },
            Operation::DeclareQueue { name: "q", passive: false, dead_letter_exchange: None },
            Operation::DeleteQueue { name: "q" },
            Operation::PurgeQueue { name: "q" },
            Operation::Bind { source: "x", destination: "q", to_exchange: false, routing_key: "" },
            Operation::Unbind { source: "x", destination: "q", to_exchange: false, routing_key: "" },
            Operation::Publish { exchange: "x", routing_key: "" },
            Operation::Consume { queue: "q" },
            Operation::Get { queue: "q" },
            Operation::List("list_queues"),
            Operation::Status,
            Operation::ClusterStatus,
            Operation::QuorumCritical,
            Operation::GrowQueues,
            Operation::ShrinkQueues,
            Operation::RebalanceQueues,
            Operation::ManageUsers,
            Operation::ListUsers,
            Operation::WhoAmI,
            Operation::Reflection,
        ];
        for op in ops {
            assert!(OPERATIONS.contains(&op.name()), "{} is not in OPERATIONS", op.name());
        }
    }

    #[test]
    fn should_follow_rabbitmqs_table() {
        use Perm::*;
        use Requirement as R;
        use Resource::*;
        let op = Operation::DeclareExchange { name: "x", passive: false, alternate_exchange: Some("ae") };
        assert_eq!(
            op.requirements(),
            vec![R::Perm(Configure, Exchange("x")), R::Perm(Write, Exchange("ae")), R::Perm(Read, Exchange("x"))]
        );
        let op = Operation::DeclareQueue { name: "q", passive: false, dead_letter_exchange: Some("dlx") };
        assert_eq!(op.requirements(), vec![R::Perm(Configure, Queue("q")), R::Perm(Write, Exchange("dlx")), R::Perm(Read, Queue("q"))]);
        assert!(Operation::DeclareQueue { name: "q", passive: true, dead_letter_exchange: None }.requirements().is_empty());
        let op = Operation::Bind { source: "x", destination: "y", to_exchange: true, routing_key: "k" };
        assert_eq!(op.requirements()[..2], [R::Perm(Write, Exchange("y")), R::Perm(Read, Exchange("x"))]);
        assert_eq!(Resource::Exchange("").name(), "amq.default");
        assert_eq!(Operation::RebalanceQueues.requirements(), vec![R::Tag(Tag::Administrator)]);
        assert_eq!(Operation::ClusterStatus.requirements(), vec![R::Tag(Tag::Monitoring)]);
    }
}
