//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas can run and only one reconciles.
//!
//! The holder renews the lease every `lease_duration / 3`. A candidate takes
//! it over once it has seen the same lease record (holder and renew time)
//! unchanged for `leaseDurationSeconds` of its *own* clock, as client-go
//! does: the holder's `renewTime` is never compared with the candidate's
//! clock, so clock skew between nodes cannot hand the lease over early.
//! Updates use the lease's `resourceVersion` (optimistic concurrency), so
//! two candidates can never both win the same round.
//!
//! A leader that cannot renew within the renew deadline (two thirds of the
//! lease duration, every call bounded by it) stops acting — the process
//! exits and restarts as a candidate — strictly before a candidate can take
//! over, so two replicas never reconcile at once. On a clean shutdown the
//! leader releases the lease so that a standby takes over at once.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// A Lease-based lock.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's record as last seen, and when (our clock) it last
    /// changed.
    observed: Mutex<Option<(Observed, Instant)>>,
}

/// What identifies one renewal of a lease by its holder.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew: Option<String>,
    duration: Option<i32>,
}

impl LeaseLock {
    /// A lock on Lease `name` held as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration, observed: Mutex::new(None) }
    }

    /// How often the holder renews.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// How long the holder keeps acting without a successful renewal: less
    /// than the lease duration, so it stops before anyone can take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Whether another holder's lease has expired by our own clock: its
    /// record has not changed for its lease duration since we first saw it.
    fn expired_by_observation(&self, spec: &LeaseSpec) -> bool {
        if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
            return true;
        }
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            duration: spec.lease_duration_seconds,
        };
        let now = Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let since = match observed.as_ref() {
            Some((prev, at)) if *prev == seen => *at,
            _ => {
                *observed = Some((seen, now));
                now
            }
        };
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
        now.duration_since(since) >= duration
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Acquires the lease if it is free or expired, or renews it if held;
    /// `Ok(true)` when this replica holds it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_us = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !held_by_us && !self.expired_by_observation(&spec) {
            return Ok(false);
        }
        let mut next = lease.clone();
        let mut new_spec = spec.clone();
        if !held_by_us {
            new_spec.holder_identity = Some(self.identity.clone());
            new_spec.acquire_time = Some(now.clone());
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.lease_duration_seconds = Some(self.duration_secs());
        new_spec.renew_time = Some(now);
        next.spec = Some(new_spec);
        // replace() sends metadata.resourceVersion: a concurrent writer wins
        // and we get 409.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the lease"),
            }
            tokio::time::sleep(self.renew_interval()).await;
        }
    }

    /// Renews the lease until it cannot be renewed within the renew deadline
    /// (or another replica took it); then returns, and the caller must stop
    /// acting as leader at once.
    pub async fn hold(&self) {
        let mut last_success = Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            // Bound the call itself: a hung request must not keep us acting
            // past the deadline.
            let left = self.renew_deadline().saturating_sub(last_success.elapsed());
            let outcome = match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout("renewing the lease")),
            };
            match outcome {
                Ok(true) => last_success = Instant::now(),
                Ok(false) => {
                    tracing::error!("leader election: another replica holds the lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewing the lease failed");
                    if last_success.elapsed() >= self.renew_deadline() {
                        tracing::error!("leader election: could not renew within the renew deadline");
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on a clean shutdown), so that a standby takes
    /// over without waiting for it to expire. Only while we hold it.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api.replace(&self.name, &PostParams::default(), &lease).await?;
        Ok(())
    }
}
