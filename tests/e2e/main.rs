//! End-to-end tests: each starts the real `warren-broker` on a free
//! loopback port in a temporary directory and talks to it with the real
//! client (or the real `warrenctl`).

#![allow(clippy::unwrap_used)]

mod cluster;
mod consuming;
mod docs;
mod durability;
mod flow;
mod fuzz;
mod hostile;
mod interop;
mod membership;
mod operability;
mod partition;
mod quorum;
mod routing;
mod security;
mod semantics;
mod topology;
mod warrenctl;

use std::time::Duration;

use warren_client::{Client, Delivery, Message, QueueOptions};

/// A generous bound for conditions that become true eventually.
pub const SETTLE: Duration = Duration::from_secs(20);

/// The body of a delivery as text.
pub fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.body).into_owned()
}

/// Declares a plain (non-durable) queue.
pub async fn queue(c: &Client, name: &str) {
    c.declare_queue(name, QueueOptions::default()).await.unwrap();
}

/// Publishes `body` to `queue` through the default exchange and expects it
/// routed.
pub async fn send(c: &Client, queue: &str, body: &str) {
    let confirm = c.publish(Message::new("", queue, body.to_string())).await.unwrap();
    assert!(confirm.is_routed(), "{confirm:?}");
}

/// Takes every ready message from `queue` (acknowledging them) and returns
/// their bodies.
pub async fn drain(c: &Client, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let batch = c.get(queue, 500, true).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch.iter().map(text));
    }
}

/// The gRPC code of a failed call.
pub fn code<T: std::fmt::Debug>(r: Result<T, warren_client::Error>) -> (tonic::Code, String) {
    match r {
        Err(warren_client::Error::Status(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}
