//! The broker's one error type. It is mapped to a gRPC status at the edge
//! (`server`), and each variant has a stable label for metrics.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input: a bad name, an invalid argument value.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{kind} '{name}' not found")]
    NotFound { kind: &'static str, name: String },
    /// The object exists but the request does not fit its state: a
    /// re-declare with other properties, if-unused / if-empty not met.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Not allowed: reserved names, publishing to an internal exchange, an
    /// exclusive queue of another connection.
    #[error("{0}")]
    AccessRefused(String),
    /// An exclusive consumer conflicts with another consumer.
    #[error("{0}")]
    AlreadyExists(String),
    /// Size limits, resource alarms.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("broker is shutting down")]
    ShuttingDown,
    /// Temporarily unable to serve (a queue reloading from storage).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> Error {
        Error::NotFound { kind, name: name.into() }
    }

    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::NotFound { .. } => "not_found",
            Error::PreconditionFailed(_) => "precondition_failed",
            Error::AccessRefused(_) => "access_refused",
            Error::AlreadyExists(_) => "already_exists",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::ShuttingDown => "shutting_down",
            Error::Unavailable(_) => "unavailable",
            Error::Store(_) => "store",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
