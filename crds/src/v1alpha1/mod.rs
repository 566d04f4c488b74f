//! Version `v1alpha1` of the `warren.dev` API.

// `#[kube(printcolumn(..), printcolumn(..))]` repeats keys by design.
#![allow(clippy::duplicated_attributes)]

mod access;
mod binding;
mod broker;
mod common;
mod exchange;
mod queue;

pub use access::*;
pub use binding::*;
pub use broker::*;
pub use common::{BrokerRef, DeletionPolicy, NAME_PATTERN, TopologyStatus};
pub use exchange::*;
pub use queue::*;
