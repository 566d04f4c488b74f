//! The operator's one error type.

use kube::runtime::finalizer;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    /// Adding or removing the finalizer failed, or the wrapped reconcile did.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    /// A gRPC call to the broker failed.
    #[error("broker call {call} failed: {} ({:?})", .status.message(), .status.code())]
    Broker {
        /// The RPC, such as `DeclareQueue`.
        call: &'static str,
        /// What the broker answered.
        #[source]
        status: tonic::Status,
    },

    /// The broker's endpoint is not a valid URI.
    #[error("broker endpoint {endpoint:?} is invalid: {source}")]
    Endpoint {
        /// The endpoint from the Broker status.
        endpoint: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },

    /// The Broker exists but cannot be reached yet.
    #[error("{0}")]
    BrokerNotReady(String),

    /// The spec cannot be applied; the message says which field and why.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    /// A Broker asks for a cert-manager Certificate (`spec.tls.issuerRef`)
    /// but cert-manager's CRDs are not installed.
    #[error(
        "spec.tls.issuerRef needs cert-manager, whose Certificate resource is not installed in this cluster; install cert-manager or give spec.tls.secretName"
    )]
    CertManagerMissing,

    /// Deletion waits: the queue still holds messages.
    #[error("queue {queue} still holds {messages} messages; not deleted")]
    QueueNotEmpty {
        /// The queue's name on the broker.
        queue: String,
        /// Messages in it.
        messages: u64,
    },

    /// The object lacks a namespace or name (never for namespaced objects
    /// coming from the API server).
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),

    /// The autoscaling target cannot be resolved or scaled.
    #[error("scale target {target}: {message}")]
    ScaleTarget {
        /// `Kind/name`.
        target: String,
        /// What went wrong.
        message: String,
    },

    /// A call did not finish in time (renewing the leader lease).
    #[error("{0} timed out")]
    Timeout(&'static str),

    /// Serializing an object failed.
    #[error("serializing: {0}")]
    Serialization(#[source] serde_json::Error),
}

impl Error {
    /// A stable label for the `warren_operator_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Broker { .. } => "broker",
            Error::Endpoint { .. } => "endpoint",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::CertManagerMissing => "cert_manager_missing",
            Error::BrokerNotReady(_) => "broker_not_ready",
            Error::QueueNotEmpty { .. } => "queue_not_empty",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::ScaleTarget { .. } => "scale_target",
            Error::Timeout(_) => "timeout",
            Error::Serialization(_) => "serialization",
        }
    }

    /// Wraps a failed broker call.
    pub fn broker(call: &'static str, status: tonic::Status) -> Self {
        Error::Broker { call, status }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl From<finalizer::Error<Error>> for Error {
    fn from(e: finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
