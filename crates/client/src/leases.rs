//! Concurrent-use leases held by this client (its holder): [`Client::acquire`]
//! returns a [`LeaseGuard`]; one task renews all of the holder's leases in one
//! `RenewLeases` call every third of the lease length; dropping a guard
//! releases its lease. A lease the service no longer holds (expired while the
//! holder was cut off, lost with a store) is acquired again by the same task
//! while its guard lives, if the quantity allows, never above it.
//!
//! A lease is judged by the monotonic clock, never the wall clock: when the
//! service answered an acquisition or a renewal sent at instant `t`, the lease
//! holds at least until `t + length` (the service renewed it after `t`). The
//! guard counts it as lost a safety margin before that, unless a renewal
//! moved it on; so a holder cut off from every replica stops using a seat no
//! later than the service frees it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comtrexx_licensing_domain::Feature;
use comtrexx_licensing_proto::from_timestamp;
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::pb::licensing_service_client::LicensingServiceClient;
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::{Client, Shared, follow};

/// Why a lease is no longer held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The service says the holder no longer holds it (expired, released
    /// elsewhere, or gone with a store that lost it).
    NotHeld,
    /// No renewal reached the service in time: the lease counts as lost at
    /// its expiry minus the safety margin.
    Expired {
        /// Why the last renewal failed.
        why: String,
    },
}

/// What the client knows of one of its leases.
#[derive(Debug)]
struct Held {
    lease: pb::Lease,
    /// The lease's length, from the acquisition's answer.
    length: Duration,
    /// Held at least until this instant (monotonic), minus the margin.
    deadline: Instant,
    lost: Option<Lost>,
    /// Guards of this lease (a repeated acquisition returns the same lease):
    /// it is released when the last one is dropped.
    guards: usize,
}

/// The holder's leases and the channel their calls go over. A lease is
/// identified by (user, feature, holder): one per user and feature here.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<(Feature, String), Held>>,
    channel: Mutex<Option<(String, Channel)>>,
    /// Why the last renewal failed (until one succeeds).
    failing: Mutex<Option<String>>,
}

/// How long before its computed end a lease counts as lost: a tenth of its
/// length, at least a second (clock-rate differences, a slow answer).
fn margin(length: Duration) -> Duration {
    (length / 10).max(Duration::from_secs(1))
}

/// A lease the holder holds; dropping it releases the lease (in the
/// background). While [`held`](LeaseGuard::held) is true the seat is this
/// holder's.
#[derive(Debug)]
pub struct LeaseGuard {
    client: Client,
    key: (Feature, String),
    created: bool,
    version: u64,
}

impl LeaseGuard {
    /// The lease's id (another one after the lease was lost and acquired
    /// again).
    pub fn id(&self) -> String {
        self.lease().map(|l| l.lease_id).unwrap_or_default()
    }

    /// Whether the acquisition made a new lease (false: this holder already
    /// held one for the user and feature; the same lease, renewed).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The version of the store at which the acquisition is visible.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The lease as last answered by the service.
    pub fn lease(&self) -> Option<pb::Lease> {
        let leases = &self.client.shared.leases;
        leases.held.lock().get(&self.key).map(|h| h.lease.clone())
    }

    /// Whether the lease is held now: not reported lost, and within its
    /// deadline by the monotonic clock.
    pub fn held(&self) -> bool {
        self.lost().is_none()
    }

    /// Why the lease is lost, if it is.
    pub fn lost(&self) -> Option<Lost> {
        let leases = &self.client.shared.leases;
        let held = leases.held.lock();
        let h = held.get(&self.key)?;
        if let Some(lost) = &h.lost {
            return Some(lost.clone());
        }
        (Instant::now() >= h.deadline).then(|| Lost::Expired {
            why: leases
                .failing
                .lock()
                .clone()
                .unwrap_or_else(|| "no renewal answered in time".into()),
        })
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let shared = self.client.shared.clone();
        let was = {
            let mut held = shared.leases.held.lock();
            match held.get_mut(&self.key) {
                Some(h) if h.guards > 1 => {
                    h.guards -= 1;
                    return;
                }
                _ => held.remove(&self.key),
            }
        };
        // A lease already lost needs no release.
        if let Some(h) = was.filter(|h| h.lost.is_none())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let request = pb::ReleaseLeaseRequest {
                    lease_id: h.lease.lease_id,
                };
                if let Err(e) = call(
                    &shared,
                    |mut c, r| async move { c.release_lease(r).await },
                    request,
                )
                .await
                {
                    tracing::warn!("lease release failed (it frees at its expiry): {e}");
                }
            });
        }
    }
}

/// One unary call on the first endpoint that answers, reusing the channel
/// that worked last; the request with the client's token. A refusal of the
/// request itself is [`AcquireError::Refused`] (another replica would answer
/// the same); no replica answering is [`AcquireError::Unreachable`].
async fn call<Req, Resp, F, Fut>(shared: &Shared, f: F, request: Req) -> Result<Resp, AcquireError>
where
    Req: Clone,
    F: Fn(LicensingServiceClient<Channel>, tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let endpoints = &shared.config.endpoints;
    let cached = shared.leases.channel.lock().clone();
    let mut order: Vec<String> = Vec::with_capacity(endpoints.len() + 1);
    if let Some((url, _)) = &cached {
        order.push(url.clone());
    }
    order.extend(
        endpoints
            .iter()
            .filter(|e| Some(*e) != cached.as_ref().map(|c| &c.0))
            .cloned(),
    );
    let mut last = String::from("no endpoint");
    for url in order {
        let channel = match &cached {
            Some((u, c)) if *u == url => c.clone(),
            _ => match follow::connect(&shared.config, &url).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            },
        };
        let mut r = tonic::Request::new(request.clone());
        r.set_timeout(shared.config.connect_timeout.max(Duration::from_secs(2)));
        if let Some(token) = &shared.config.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            r.metadata_mut().insert("authorization", value);
        }
        match f(LicensingServiceClient::new(channel.clone()), r).await {
            Ok(resp) => {
                *shared.leases.channel.lock() = Some((url, channel));
                return Ok(resp.into_inner());
            }
            // A refusal of the request itself: another replica answers the same.
            Err(s)
                if !matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                ) =>
            {
                return Err(AcquireError::Refused(follow::describe(&s)));
            }
            Err(s) => {
                last = format!("{url}: {}", follow::describe(&s));
                *shared.leases.channel.lock() = None;
            }
        }
    }
    Err(AcquireError::Unreachable(last))
}

/// Why an acquisition failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcquireError {
    /// The service refused it (the status says why: `RESOURCE_EXHAUSTED` when
    /// the feature is at capacity, `FAILED_PRECONDITION`/`WRONG_SEAT_MODEL` on
    /// an assigned feature, `INVALID_ARGUMENT`, …).
    #[error("{0}")]
    Refused(String),
    /// No replica answered.
    #[error("no replica answered: {0}")]
    Unreachable(String),
}

impl Client {
    /// The name this client holds leases under (`Config::holder`).
    pub fn holder(&self) -> &str {
        &self.shared.holder
    }

    /// Acquires a lease of a concurrent `feature` for `user_id`, held by this
    /// client's holder; renewed in the background until the guard is dropped.
    /// Idempotent: acquiring again for the same user and feature returns the
    /// same lease (`created() == false`).
    pub async fn acquire(
        &self,
        user_id: &str,
        feature: Feature,
    ) -> Result<LeaseGuard, AcquireError> {
        let key = (feature, user_id.to_owned());
        let (created, version) = acquire_for(&self.shared, &key, true).await?;
        self.shared.renew_now.notify_one();
        Ok(LeaseGuard {
            client: self.clone(),
            key,
            created,
            version,
        })
    }

    /// The lease this holder holds for `user_id` and `feature`, if any is
    /// held now (for the local decision).
    pub(crate) fn own_lease_until(
        &self,
        user_id: &str,
        feature: Feature,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let held = self.shared.leases.held.lock();
        let h = held.get(&(feature, user_id.to_owned()))?;
        (h.lost.is_none() && Instant::now() < h.deadline)
            .then(|| h.lease.expires_at.as_ref().and_then(from_timestamp))
            .flatten()
    }
}

/// `AcquireLease` for `key` (feature, user); the answer recorded in the
/// holder's leases, with one more guard when `new_guard`. Created, and the
/// version.
async fn acquire_for(
    shared: &Shared,
    key: &(Feature, String),
    new_guard: bool,
) -> Result<(bool, u64), AcquireError> {
    let request = pb::AcquireLeaseRequest {
        user_id: key.1.clone(),
        feature: key.0.as_str().to_owned(),
        holder: shared.holder.clone(),
    };
    let sent = Instant::now();
    let answer = call(
        shared,
        |mut c, r| async move { c.acquire_lease(r).await },
        request,
    )
    .await?;
    let lease = answer
        .lease
        .ok_or_else(|| AcquireError::Refused("an answer without a lease".into()))?;
    let length = match (
        lease.acquired_at.as_ref().and_then(from_timestamp),
        lease.expires_at.as_ref().and_then(from_timestamp),
    ) {
        (Some(from), Some(to)) => (to - from).to_std().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    // Recorded under the lock; a lease whose guards were all dropped meanwhile
    // (a re-acquisition racing a drop) is given back after it.
    let unwanted = {
        let mut held = shared.leases.held.lock();
        let guards = held.get(key).map_or(0, |h| h.guards);
        if !new_guard && guards == 0 {
            Some(lease.lease_id)
        } else {
            held.insert(
                key.clone(),
                Held {
                    deadline: sent + length.saturating_sub(margin(length)),
                    length,
                    lease,
                    lost: None,
                    guards: guards + usize::from(new_guard),
                },
            );
            None
        }
    };
    if let Some(lease_id) = unwanted {
        let request = pb::ReleaseLeaseRequest { lease_id };
        call(
            shared,
            |mut c, r| async move { c.release_lease(r).await },
            request,
        )
        .await?;
    }
    Ok((answer.created, answer.version))
}

/// Renews every held lease in one call every third of the shortest lease
/// length (at least every second), or at once after an acquisition; on the
/// same beat, acquires the lost ones again.
pub(crate) async fn renew(shared: Arc<Shared>) {
    loop {
        let every = {
            // Lost leases too: they are acquired again on the same beat.
            let held = shared.leases.held.lock();
            held.values().map(|h| h.length / 3).min()
        };
        match every {
            None => shared.renew_now.notified().await,
            Some(every) => {
                let _ = tokio::time::timeout(
                    every.max(Duration::from_secs(1)),
                    shared.renew_now.notified(),
                )
                .await;
            }
        }
        renew_once(&shared).await;
    }
}

async fn renew_once(shared: &Shared) {
    let (ids, lost): (Vec<String>, Vec<(Feature, String)>) = {
        let held = shared.leases.held.lock();
        (
            held.values()
                .filter(|h| h.lost.is_none())
                .map(|h| h.lease.lease_id.clone())
                .collect(),
            held.iter()
                .filter(|(_, h)| h.lost.is_some())
                .map(|(k, _)| k.clone())
                .collect(),
        )
    };
    if !ids.is_empty() {
        let sent = Instant::now();
        let request = pb::RenewLeasesRequest {
            holder: shared.holder.clone(),
            lease_ids: ids,
        };
        match call(
            shared,
            |mut c, r| async move { c.renew_leases(r).await },
            request,
        )
        .await
        {
            Ok(answer) => {
                *shared.leases.failing.lock() = None;
                let mut held = shared.leases.held.lock();
                for lease in answer.leases {
                    if let Some(h) = held
                        .values_mut()
                        .find(|h| h.lease.lease_id == lease.lease_id)
                    {
                        h.deadline = sent + h.length.saturating_sub(margin(h.length));
                        h.lease = lease;
                    }
                }
                for id in answer.lost {
                    if let Some(h) = held.values_mut().find(|h| h.lease.lease_id == id) {
                        tracing::warn!(lease_id = %id, user = %h.lease.user_id, "lease lost: the service no longer holds it; acquiring it again");
                        h.lost = Some(Lost::NotHeld);
                    }
                }
            }
            Err(why) => {
                tracing::warn!("lease renewal failed: {why}");
                *shared.leases.failing.lock() = Some(why.to_string());
                return;
            }
        }
    }
    // Lost leases whose guards live: acquire them again (within the quantity).
    for key in lost {
        match acquire_for(shared, &key, false).await {
            Ok(_) => tracing::info!(user = %key.1, feature = %key.0, "lost lease acquired again"),
            Err(e) => {
                tracing::debug!(user = %key.1, feature = %key.0, "lost lease not acquired again: {e}")
            }
        }
    }
}
