//! The domain vocabulary: names, exchange kinds, queue arguments, messages.
//! Pure data and validation; no I/O.

pub mod args;
pub mod message;

use std::time::{SystemTime, UNIX_EPOCH};

pub use args::{Overflow, QueueArgs};
pub use message::{MessageData, StoredMessage};

use crate::error::{Error, Result};

/// Longest exchange, queue, routing key or consumer tag, in bytes (AMQP's
/// short string).
pub const MAX_NAME_BYTES: usize = 255;

/// Exchange types: the client crate's, so the wire mapping exists once.
pub use warren_client::ExchangeKind;

/// Checks an object name: at most 255 bytes, no control characters, and
/// non-empty unless `allow_empty`.
pub fn validate_name(kind: &str, name: &str, allow_empty: bool) -> Result<()> {
    if name.is_empty() && !allow_empty {
        return Err(Error::InvalidArgument(format!("{kind} name must not be empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!("{kind} name is {} bytes long; the limit is {MAX_NAME_BYTES}", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!("{kind} name {name:?} contains control characters")));
    }
    Ok(())
}

/// Checks a routing key or binding key: at most 255 bytes.
pub fn validate_routing_key(key: &str) -> Result<()> {
    if key.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!("routing key is {} bytes long; the limit is {MAX_NAME_BYTES}", key.len())));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_reject_bad_names_with_a_precise_message() {
        assert!(validate_name("queue", "orders", false).is_ok());
        assert!(validate_name("queue", "", true).is_ok());
        let e = validate_name("queue", "", false).unwrap_err().to_string();
        assert!(e.contains("must not be empty"), "{e}");
        let long = "x".repeat(256);
        let e = validate_name("exchange", &long, false).unwrap_err().to_string();
        assert!(e.contains("256 bytes") && e.contains("255"), "{e}");
        assert!(validate_name("queue", &"x".repeat(255), false).is_ok());
        assert!(validate_name("queue", "a\nb", false).is_err());
        assert!(validate_routing_key(&"k".repeat(256)).is_err());
    }
}
