//! Arguments and headers as a client sends them: arbitrary bytes decoded as
//! a protobuf table of values (any nesting), then every parser the broker
//! runs on such a table. Each must return a value or a precise
//! INVALID_ARGUMENT, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use warren_client::proto::ValueMap;

// The broker's own modules, compiled here without its storage.
#[allow(dead_code)]
#[path = "../../broker/src/error.rs"]
mod error;
#[allow(dead_code, unused_imports)]
#[path = "../../broker/src/model/mod.rs"]
mod model;
#[allow(dead_code)]
#[path = "../../broker/src/routing/mod.rs"]
mod routing;

/// Stand-in for the broker's storage error (the modules above name it).
#[allow(dead_code)]
mod store {
    #[derive(Debug, thiserror::Error)]
    pub enum StoreError {
        #[error("corrupt {cf}: {detail}")]
        Corrupt { cf: &'static str, detail: String },
        #[error("{0}")]
        Io(String),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(table) = ValueMap::decode(data) else { return };
    let args = table.fields;
    for result in [
        model::QueueArgs::parse(&args).map(|_| ()),
        model::args::ExchangeArgs::parse(&args).map(|_| ()),
        model::args::validate_binding_args(&args),
    ] {
        match result {
            Ok(()) | Err(error::Error::InvalidArgument(_)) => {}
            Err(e) => panic!("not INVALID_ARGUMENT: {e:?}"),
        }
    }
    // The same table as a headers-exchange binding and as message headers.
    let m = routing::HeadersMatch::new(&args);
    let _ = m.matches(&args);
});
