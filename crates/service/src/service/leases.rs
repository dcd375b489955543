//! Concurrent-use seats in the service: `AcquireLease`, `RenewLeases`,
//! `ReleaseLease`, `ListLeases`, and the concurrent features' use in the
//! overview and the metrics. The decision (which feature may lease, against
//! which quantity) is the domain's `Licenses::plan_lease`; the count and the
//! write are one atomic step of the store.

use chrono::{DateTime, Utc};

use super::{Attempt, Licensing, MirrorState, Versioned, store_error};
use crate::domain::leases::new_lease_id;
use crate::domain::{Feature, Holder, InvalidInput, Lease, LicensingError, SeatModel, UserId};
use crate::store::{AcquireOutcome, ChangeKind, LeaseAcquire, LeaseReleaseOutcome, LeaseUsage};

/// What `AcquireLease` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub lease: Lease,
    /// False when the holder already held a live lease of the user and
    /// feature: the same lease, renewed.
    pub created: bool,
    pub version: u64,
    /// The feature's live leases after this one, and its quantity.
    pub in_use: u32,
    pub capacity: u32,
}

/// What `RenewLeases` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub leases: Vec<Lease>,
    pub lost: Vec<String>,
    pub version: u64,
}

/// One page of leases.
#[derive(Debug, Clone)]
pub struct LeasePage {
    pub leases: Vec<Lease>,
    pub next_page_token: String,
    pub version: u64,
}

/// A concurrent feature's use, for the overview and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrentUse {
    pub feature: Feature,
    pub capacity: u32,
    /// Live leases now, on this replica's copy.
    pub in_use: u32,
    /// Today's peak and refusals (UTC day), from the store's usage record.
    pub peak_today: u32,
    pub busy_today: u64,
}

/// At most this many ids in one `RenewLeases` call.
pub const MAX_RENEW_IDS: usize = 100_000;

/// Days since 1970 of a time.
pub fn day_of(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis().div_euclid(86_400_000)
}

/// A day since 1970 as `YYYY-MM-DD`.
pub fn day_name(day: i64) -> String {
    DateTime::from_timestamp(day * 86_400, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

impl Licensing {
    /// Takes a lease of a concurrent feature for `user`, held by `holder`.
    pub async fn acquire_lease(
        &self,
        user: &UserId,
        feature: Feature,
        holder: &Holder,
    ) -> Result<Acquired, LicensingError> {
        let duration = self.settings.lease_duration;
        // One id per call: a retry after an unknown outcome finds its lease by
        // (user, feature, holder) anyway.
        let new_id = new_lease_id();
        let new_id = &new_id;
        let result = self
            .with_retries("the licenses", move |attempt| async move {
                let (now, floor) = (self.now(), self.mirror.floor());
                let plan = self.mirror.read(|state| {
                    let now_ms = now.timestamp_millis();
                    self.licenses(state, now)
                        .plan_lease(feature, now, |f| state.live_leases(f, now_ms))
                });
                let plan = match plan {
                    Ok(plan) => plan,
                    // The copy may be a moment behind a license applied
                    // elsewhere: look once more before refusing.
                    Err(e) if attempt == 0 && !matches!(e, LicensingError::InvalidInput(_)) => {
                        return Ok(Attempt::Stale);
                    }
                    Err(e) => return Err(e),
                };
                let request = LeaseAcquire {
                    user,
                    feature,
                    holder,
                    plan: &plan,
                    new_id,
                    duration,
                };
                let outcome = match self.store.acquire_seat_lease(floor.as_ref(), request).await {
                    Err(e) => return Ok(Attempt::Refused(e)),
                    Ok(outcome) => outcome,
                };
                match outcome {
                    AcquireOutcome::Acquired {
                        change,
                        created,
                        in_use,
                    } => {
                        if let Err(e) = self.mirror.apply_local(&change).await {
                            return Ok(Attempt::Refused(e));
                        }
                        let version = change.version;
                        let ChangeKind::LeaseAcquired { lease, .. } = change.kind else {
                            return Err(LicensingError::Internal(
                                "lease acquisition reported another change".into(),
                            ));
                        };
                        Ok(Attempt::Done(Acquired {
                            lease,
                            created,
                            version,
                            in_use,
                            capacity: plan.capacity,
                        }))
                    }
                    AcquireOutcome::Exhausted { capacity, in_use } => {
                        Err(LicensingError::NoFreeSeat {
                            feature,
                            capacity,
                            in_use,
                        })
                    }
                    AcquireOutcome::LicenseChanged => Ok(Attempt::Stale),
                }
            })
            .await;
        match &result {
            Ok(a) => {
                self.note_usage(feature, a.in_use, 0);
                if a.created && a.in_use >= a.capacity {
                    self.log_at_capacity(feature, a.capacity, a.in_use);
                }
            }
            Err(LicensingError::NoFreeSeat { .. }) => {
                crate::metrics::metrics().lease_busy(feature);
                self.note_usage(feature, 0, 1);
            }
            Err(_) => {}
        }
        result
    }

    /// Renews `holder`'s leases in one store step; the others are `lost`.
    pub async fn renew_leases(
        &self,
        holder: &Holder,
        lease_ids: &[String],
    ) -> Result<Renewed, LicensingError> {
        if lease_ids.len() > MAX_RENEW_IDS {
            return Err(InvalidInput::new(
                "lease_ids",
                format!(
                    "at most {MAX_RENEW_IDS} ids in one call, got {}",
                    lease_ids.len()
                ),
            )
            .into());
        }
        if lease_ids.is_empty() {
            return Ok(Renewed {
                leases: Vec::new(),
                lost: Vec::new(),
                version: self.visible_version().await?,
            });
        }
        let duration = self.settings.lease_duration;
        let outcome = self
            .write(|| async {
                let floor = self.mirror.floor();
                let outcome = self
                    .store
                    .renew_seat_leases(floor.as_ref(), holder, lease_ids, duration)
                    .await?;
                for change in &outcome.changes {
                    self.mirror.apply_local(change).await?;
                }
                Ok(outcome)
            })
            .await?;
        Ok(Renewed {
            leases: outcome.leases,
            lost: outcome.lost,
            version: outcome.version,
        })
    }

    /// Gives a lease back; `false` when there was none.
    pub async fn release_lease(&self, lease_id: &str) -> Result<Versioned<bool>, LicensingError> {
        let outcome = self
            .write(|| async {
                let floor = self.mirror.floor();
                let outcome = self
                    .store
                    .release_seat_lease(floor.as_ref(), lease_id)
                    .await?;
                if let LeaseReleaseOutcome::Released(change) = &outcome {
                    self.mirror.apply_local(change).await?;
                }
                Ok(outcome)
            })
            .await?;
        Ok(match outcome {
            LeaseReleaseOutcome::Released(change) => Versioned {
                value: true,
                version: change.version,
            },
            LeaseReleaseOutcome::NotHeld { version } => Versioned {
                value: false,
                version,
            },
        })
    }

    /// One page of live leases, ordered by (feature, user, holder).
    pub async fn list_leases(
        &self,
        feature: &str,
        page_size: i32,
        page_token: &str,
        min_version: u64,
    ) -> Result<LeasePage, LicensingError> {
        let (filter, size, after) =
            super::page_request(feature, page_size, page_token, decode_lease_token)?;
        let version = self.read_version(min_version).await?;
        // Few (the concurrent quantities): read whole, paged here.
        let leases = self
            .store
            .list_seat_leases(filter)
            .await
            .map_err(store_error)?;
        let mut page: Vec<Lease> = leases
            .into_iter()
            .filter(|l| {
                after.as_ref().is_none_or(|(f, u, h)| {
                    (l.feature, l.user_id.as_str(), l.holder.as_str())
                        > (*f, u.as_str(), h.as_str())
                })
            })
            .take(size + 1)
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            let last = page.last().expect("a full page has a last lease");
            encode_lease_token(filter, last)
        } else {
            String::new()
        };
        Ok(LeasePage {
            leases: page,
            next_page_token,
            version,
        })
    }

    /// The concurrent features of the applied license with their use now
    /// (this copy) and today's peak and refusals (the last usage read).
    pub fn concurrent_use(&self, state: &MirrorState, now: DateTime<Utc>) -> Vec<ConcurrentUse> {
        let Some(license) = state.license.as_ref() else {
            return Vec::new();
        };
        let today = day_of(now);
        let usage = self.usage.lock();
        license
            .payload
            .entitlements
            .iter()
            .filter(|e| e.seat_model == SeatModel::Concurrent)
            .map(|e| {
                let in_use = state.live_leases(e.feature, now.timestamp_millis());
                let (peak, busy) = usage
                    .iter()
                    .find(|u| u.feature == e.feature && u.day == today)
                    .map_or((0, 0), |u| (u.peak, u.busy));
                ConcurrentUse {
                    feature: e.feature,
                    capacity: if e.is_current(now) { e.quantity } else { 0 },
                    in_use,
                    peak_today: peak.max(in_use),
                    busy_today: busy,
                }
            })
            .collect()
    }

    /// Reads the lease usage of the last `days` days from the store into the
    /// cache the overview and the metrics read; the store's record wins.
    pub async fn refresh_usage(&self, days: i64) -> Result<Vec<LeaseUsage>, LicensingError> {
        let since = day_of(self.now()) - days + 1;
        let usage = self.store.lease_usage(since).await.map_err(store_error)?;
        let today = day_of(self.now());
        *self.usage.lock() = usage.iter().filter(|u| u.day == today).cloned().collect();
        Ok(usage)
    }

    /// The usage to report with a reconcile: each concurrent feature's daily
    /// peak of the last 7 days, with its quantity now. Best effort: a store
    /// that cannot be read reports nothing (the reconcile goes on).
    pub(super) async fn usage_report(&self) -> Vec<crate::upstream::UsagePeak> {
        let usage = match self.refresh_usage(7).await {
            Ok(u) => u,
            Err(error) => {
                tracing::warn!(%error, "lease usage not read; the reconcile reports none");
                return Vec::new();
            }
        };
        let now = self.now();
        let capacity = |feature: Feature| {
            self.mirror.read(|s| {
                s.license
                    .as_ref()
                    .and_then(|l| l.payload.entitlement(feature))
                    .filter(|e| e.is_current(now))
                    .map_or(0, |e| e.quantity)
            })
        };
        usage
            .into_iter()
            .map(|u| crate::upstream::UsagePeak {
                feature: u.feature.as_str().to_owned(),
                day: day_name(u.day),
                peak_in_use: u.peak,
                capacity: capacity(u.feature),
                busy: u.busy,
            })
            .collect()
    }

    /// Notes this replica's own acquisition outcome in the usage cache until
    /// the next read of the store's record.
    fn note_usage(&self, feature: Feature, in_use: u32, busy: u64) {
        let today = day_of(self.now());
        let mut usage = self.usage.lock();
        usage.retain(|u| u.day == today);
        match usage.iter_mut().find(|u| u.feature == feature) {
            Some(u) => {
                u.peak = u.peak.max(in_use);
                u.busy += busy;
            }
            None => usage.push(LeaseUsage {
                feature,
                day: today,
                peak: in_use,
                busy,
            }),
        }
    }

    fn log_at_capacity(&self, feature: Feature, capacity: u32, in_use: u32) {
        // The event comes from the copy (`mirror::at_capacity`), on every
        // replica; the log line only from the replica that filled it.
        tracing::warn!(
            %feature,
            capacity,
            in_use,
            "concurrent feature at capacity: further acquisitions are refused until a lease ends"
        );
    }
}

/// The page token of a lease listing: base64 of JSON with the filter and the
/// last (feature, user, holder) returned.
fn encode_lease_token(filter: Option<Feature>, last: &Lease) -> String {
    use base64::Engine as _;
    let json = serde_json::json!({
        "f": filter.map(|f| f.as_str()),
        "k": [last.feature.as_str(), last.user_id.as_str(), last.holder.as_str()],
    });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

fn decode_lease_token(
    raw: &str,
    filter: Option<Feature>,
) -> Result<(Feature, UserId, Holder), InvalidInput> {
    use base64::Engine as _;
    let bad = || InvalidInput::new("page_token", "not a page token of this listing");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let token_filter = json.get("f").and_then(|f| f.as_str());
    if token_filter != filter.map(|f| f.as_str()) {
        return Err(InvalidInput::new(
            "page_token",
            "was issued for another feature filter",
        ));
    }
    let key = json.get("k").and_then(|k| k.as_array()).ok_or_else(bad)?;
    let part = |i: usize| key.get(i).and_then(|v| v.as_str()).ok_or_else(bad);
    Ok((
        part(0)?.parse().map_err(|_| bad())?,
        UserId::parse(part(1)?).map_err(|_| bad())?,
        Holder::parse(part(2)?).map_err(|_| bad())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_page_tokens_round_trip_and_keep_their_filter() {
        let lease = Lease {
            lease_id: "ab".into(),
            user_id: UserId::parse("alice").unwrap(),
            feature: Feature::User,
            holder: Holder::parse("pod-1").unwrap(),
            acquired_at: DateTime::UNIX_EPOCH,
            expires_at: DateTime::UNIX_EPOCH,
        };
        let token = encode_lease_token(Some(Feature::User), &lease);
        let (f, u, h) = decode_lease_token(&token, Some(Feature::User)).unwrap();
        assert_eq!(
            (f, u.as_str(), h.as_str()),
            (Feature::User, "alice", "pod-1")
        );
        assert_eq!(
            decode_lease_token(&token, None).unwrap_err().field,
            "page_token"
        );
        assert_eq!(
            decode_lease_token("%%", None).unwrap_err().field,
            "page_token"
        );
    }

    #[test]
    fn days_are_utc_days_since_1970() {
        let t: DateTime<Utc> = "2026-12-07T23:59:59Z".parse().unwrap();
        assert_eq!(day_name(day_of(t)), "2026-12-07");
    }
}
