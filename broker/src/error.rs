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

/// An error as it crosses between nodes: its metric label and its text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        WireError { code: e.metric_label().to_string(), message: e.to_string() }
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Error {
        let m = w.message;
        match w.code.as_str() {
            "invalid_argument" => Error::InvalidArgument(m),
            "not_found" => {
                let kind = ["queue", "exchange", "consumer", "binding"].into_iter().find(|k| m.starts_with(k)).unwrap_or("object");
                let name = m.split('\'').nth(1).unwrap_or_default().to_string();
                Error::NotFound { kind, name }
            }
            "precondition_failed" => Error::PreconditionFailed(m),
            "access_refused" => Error::AccessRefused(m),
            "already_exists" => Error::AlreadyExists(m),
            "resource_exhausted" => Error::ResourceExhausted(m),
            "shutting_down" => Error::ShuttingDown,
            _ => Error::Unavailable(m),
        }
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn errors_keep_their_kind_across_nodes() {
        for e in [
            Error::InvalidArgument("bad".into()),
            Error::not_found("queue", "q1"),
            Error::PreconditionFailed("no".into()),
            Error::AccessRefused("mine".into()),
            Error::AlreadyExists("taken".into()),
            Error::ResourceExhausted("full".into()),
            Error::ShuttingDown,
            Error::Unavailable("later".into()),
        ] {
            let back = Error::from(WireError::from(&e));
            assert_eq!((back.metric_label(), back.to_string()), (e.metric_label(), e.to_string()));
        }
    }
}
