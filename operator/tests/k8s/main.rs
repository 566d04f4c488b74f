//! The operator, the CRDs and the chart against a real Kubernetes control
//! plane on 127.0.0.1: etcd, kube-apiserver (RBAC, OwnerReferences-
//! PermissionEnforcement), kube-controller-manager, kube-scheduler and kwok
//! simulating a node, built from source by `operator/k8s/control-plane.sh`
//! and cached. Real `helm` and `kubectl`, the real operator as a local
//! process with the chart's ServiceAccount token, and the real broker on
//! loopback for topology.
//!
//! `cargo test -p warren-operator --test k8s -- --nocapture` starts (and
//! stops) its own control plane; `./dev k8s-up` starts one to reuse
//! (`WARREN_K8S_DIR`). The figures the suite measures are printed as
//! `k8s-figure:` lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/fake_broker.rs"]
#[allow(dead_code)]
mod fake_broker;
mod harness;
#[path = "../support/real_broker.rs"]
#[allow(dead_code)]
mod real_broker;

mod autoscale;
mod broker;
mod chart;
mod cluster;
mod control_plane;
mod crds;
mod leader;
mod load;
mod security;
mod topology;
