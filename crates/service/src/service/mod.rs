//! The application service: validated requests in, domain decisions, store writes,
//! mirror reads. Knows nothing of gRPC; the `grpc` module adapts it.
//!
//! This file: seats, tryout, overview. `licenses`: initialization, activation,
//! re-setup, reconcile and its schedule.

mod leases;
mod licenses;
mod watch;

pub use leases::{Acquired, ConcurrentUse, LeasePage, MAX_RENEW_IDS, Renewed, day_name, day_of};
pub use licenses::parse_response as parse_activation_response;
pub use watch::{SeatState, WatchStart};

use std::sync::Arc;
use std::time::Duration as StdDuration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex as AsyncMutex;

use crate::domain::activation::{self, Activation};
use crate::domain::signed_tryout::{self, SignedTryout, TryoutQuestion, VendorTryout};
use crate::domain::{
    Clock, Edition, Entitlement, Feature, InvalidInput, LapseAction, Licenses, LicensingError,
    ReconcileOutcome, ReconcileStatus, Rules, Seat, SeatCheck, SeatSource, SerialNumber,
    TimeAuthority, TryoutPolicy, TryoutRecord, TryoutView, UserId, tryout,
};
use crate::mirror::{Mirror, MirrorState};
use crate::store::{AssignOutcome, ReleaseOutcome, SeatKey, Store, StoreError};
use crate::upstream::{Backoff, LicensingServer, TryoutClaim, UpstreamError};

/// How often a write re-plans after finding the mirror out of date before giving up.
const WRITE_ATTEMPTS: usize = 3;

/// What one attempt of a write found (`Licensing::with_retries`).
enum Attempt<T> {
    /// Written (or nothing to write): the answer.
    Done(T),
    /// This copy was behind the store (a compare-and-set found another value):
    /// nothing written; resync, then decide again.
    Stale,
    /// The store answered an error: it went back or lost data (repair, then
    /// again), or it cannot be reached (the write ends).
    Refused(StoreError),
}

/// The settings the service decides with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub serial: SerialNumber,
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    pub over_capacity_grace: Duration,
    pub vendor_key: Option<VerifyingKey>,
    /// How long the last good entitlements hold while the source is unreachable.
    pub grace: Duration,
    pub lapse_action: LapseAction,
    pub reconcile_interval: StdDuration,
    pub reconcile_jitter_percent: u32,
    /// How long an initialization code is accepted.
    pub code_ttl: Duration,
    /// Retries of transient licensing-server failures within one reconcile.
    pub backoff: Backoff,
    /// Who needs credentials (`auth.mode`), shown in the overview.
    pub auth_mode: &'static str,
    /// Trusts a vendor key other than the built-in one, shown in the overview.
    pub development_installation: bool,
    /// How long a read with `min_version` waits for this copy to reach it
    /// (`consistency.max_wait_ms`).
    pub consistency_max_wait: StdDuration,
    /// How long a lease of a concurrent feature holds unless renewed
    /// (`leases.duration_seconds`).
    pub lease_duration: StdDuration,
}

/// An answer with its version: for a write, the position in the store's
/// history at which its outcome is visible (a write that changed nothing: one at
/// which the existing state is visible); for a read, the version of the copy
/// that answered. A read on any replica with this as `min_version` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// What `AssignSeat` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub seat: Seat,
    /// False when the user already held the seat (nothing written).
    pub created: bool,
    pub version: u64,
}

/// The answer to `CheckSeat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckAnswer {
    pub check: SeatCheck,
    /// Answered from a copy that may be out of date (store unreachable).
    pub stale: bool,
    /// The version of the copy that answered.
    pub version: u64,
}

/// One page of seats.
#[derive(Debug, Clone)]
pub struct SeatPage {
    pub seats: Vec<Seat>,
    pub next_page_token: String,
    /// The version of this replica's copy when the page was read (the seats
    /// come from the store and reflect at least that version).
    pub version: u64,
}

/// An entitlement with the seats held of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitlementUse {
    pub entitlement: Entitlement,
    pub in_use: u32,
}

/// The operator's overview.
#[derive(Debug, Clone)]
pub struct Overview {
    pub serial: SerialNumber,
    pub edition: Edition,
    pub activation: Activation,
    pub system_activated: bool,
    pub entitlements: Vec<EntitlementUse>,
    pub tryout: TryoutView,
    pub reconcile: ReconcileStatus,
    pub license_source: String,
    /// Why the stored license is not trusted, if it is not.
    pub license_problem: Option<String>,
    /// The last repair of a store that lost writes.
    pub incident: Option<crate::store::Incident>,
    /// The high-water clock, and whether this node's clock is behind it.
    pub time_high_water: DateTime<Utc>,
    pub clock_rolled_back: bool,
    /// This node's clock minus the reference time (ms), `None` before a reading.
    pub clock_skew_ms: Option<i64>,
    /// Whether that is beyond `clock.max_skew_ms` (decisions use the reference).
    pub clock_skewed: bool,
    pub corrupt_records: usize,
    /// Why the PBX is in its activation state (one sentence).
    pub activation_reason: String,
    /// Per seat feature with seats beyond its purchased quantity.
    pub over_capacity: Vec<OverCapacity>,
    /// Per concurrent feature: capacity, leases in use, today's peak and refusals.
    pub concurrent: Vec<ConcurrentUse>,
    pub auth_mode: &'static str,
    pub development_installation: bool,
    /// The version of the copy it was read from.
    pub version: u64,
}

/// Seats of one feature beyond the purchased quantity: licensed until their
/// over-capacity grace ends, the first of them at `grace_ends_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverCapacity {
    pub feature: Feature,
    pub seats: u32,
    pub grace_ends_at: Option<DateTime<Utc>>,
}

/// What `Reconcile` answers.
#[derive(Debug, Clone)]
pub struct ReconcileReport {
    pub outcome: ReconcileOutcome,
    pub entitlements: Vec<EntitlementUse>,
    pub reconciled_at: DateTime<Utc>,
    pub next_reconcile_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// Where the recorded outcome is visible in the store's history.
    pub version: u64,
}

/// The opaque `page_token`: where the next page starts, and for which filter.
#[derive(Debug, Serialize, Deserialize)]
struct PageToken {
    v: u32,
    /// The feature filter the token was made for (`None` = all).
    filter: Option<Feature>,
    feature: Feature,
    user: String,
}

pub struct Licensing {
    store: Arc<dyn Store>,
    mirror: Arc<Mirror>,
    /// The time decisions are made at: `time`, as a plain clock.
    clock: Arc<dyn Clock>,
    /// Judges this node's clock against the reference (see `keep_high_water`).
    time: Arc<TimeAuthority>,
    settings: Settings,
    /// The license source (licensing server or license file); `None`: none.
    source: Option<Arc<dyn LicensingServer>>,
    // One reconcile at a time in this replica (the lease covers all replicas).
    reconcile_lock: AsyncMutex<()>,
    // Names this replica as lease holder.
    replica_id: String,
    // Today's lease usage per concurrent feature as last read from the store
    // (and this replica's own acquisitions since): the overview and metrics.
    usage: parking_lot::Mutex<Vec<crate::store::LeaseUsage>>,
}

/// A store error as the caller sees it. Every `UNAVAILABLE` from a write means
/// "outcome unknown, safe to retry".
fn store_error(e: StoreError) -> LicensingError {
    match e {
        StoreError::Unavailable(m) => LicensingError::Unavailable(format!(
            "{m}; the outcome of a write is unknown and retrying it is safe"
        )),
        StoreError::NotInitialized | StoreError::Moved => LicensingError::Unavailable(
            "seat store is empty or being repaired; retry shortly".into(),
        ),
        StoreError::Corrupt(m) => LicensingError::Internal(m),
        StoreError::Busy {
            message,
            retry_after,
        } => LicensingError::StoreBusy {
            message: format!("{message}; nothing was written"),
            retry_after,
        },
    }
}

/// A licensing-server error as the caller sees it: no answer is
/// `LicensingServerUnavailable` (nothing changed here, retry), a refusal is a
/// precondition with reason `refused`. `what` names the request.
fn upstream_error(e: UpstreamError, what: &str, refused: &'static str) -> LicensingError {
    match e {
        UpstreamError::Transient(m) => LicensingError::LicensingServerUnavailable(format!(
            "the licensing server must confirm {what} and did not answer ({m}); nothing changed, retry"
        )),
        UpstreamError::Conclusive(m) => LicensingError::precondition(
            refused,
            format!("the licensing server refused {what}: {m}"),
        ),
    }
}

/// Whether a write was refused because the store lost data this replica has
/// seen (or all of it): resynchronising repairs it, then the write can go again.
fn needs_repair(e: &StoreError) -> bool {
    matches!(e, StoreError::Moved | StoreError::NotInitialized)
}

impl Licensing {
    pub fn new(
        store: Arc<dyn Store>,
        mirror: Arc<Mirror>,
        time: Arc<TimeAuthority>,
        settings: Settings,
        source: Option<Arc<dyn LicensingServer>>,
    ) -> Self {
        Self {
            store,
            mirror,
            clock: time.clone(),
            time,
            settings,
            source,
            reconcile_lock: AsyncMutex::new(()),
            replica_id: format!("{:016x}", rand::random::<u64>()),
            usage: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The PBX's fixed rules of the seat decision (the domain's `Rules`).
    fn rules(&self) -> Rules {
        Rules {
            edition: self.settings.edition,
            tryout: self.settings.tryout,
            over_capacity_grace: self.settings.over_capacity_grace,
            grace: self.settings.grace,
            lapse_action: self.settings.lapse_action,
            has_license_source: self.source.is_some(),
        }
    }

    /// The activation at `now` (`Rules::activation`: without a license source
    /// nothing can confirm or lapse a license, so it stays active).
    fn activation(&self, state: &MirrorState, now: DateTime<Utc>) -> Activation {
        self.rules().activation(&state.license_state(), now)
    }

    /// The time decisions are made at: the node clock as the time authority
    /// corrects it (the reference while it disagrees), never behind the
    /// high-water clock (the largest time this PBX has seen).
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let node = self.clock.now();
        self.mirror.read(|s| s.now(node))
    }

    /// The one retry policy of writes: at most `WRITE_ATTEMPTS` attempts; after
    /// an attempt that found this copy behind the store ([`Attempt::Stale`]) a
    /// resync, after one the store refused because it went back or lost data
    /// ([`Attempt::Refused`]) a resync that repairs it; a store that cannot be
    /// reached ends the write at once (`UNAVAILABLE`). Past the last attempt the
    /// write wrote nothing and answers `ABORTED`, naming `what` (or
    /// `UNAVAILABLE` when the store was still refusing).
    async fn with_retries<T, Fut>(
        &self,
        what: &str,
        mut attempt: impl FnMut(usize) -> Fut,
    ) -> Result<T, LicensingError>
    where
        Fut: std::future::Future<Output = Result<Attempt<T>, LicensingError>>,
    {
        let mut refused = None;
        for n in 0..WRITE_ATTEMPTS {
            match attempt(n).await? {
                Attempt::Done(done) => return Ok(done),
                Attempt::Stale => refused = None,
                Attempt::Refused(e) if needs_repair(&e) => refused = Some(e),
                Attempt::Refused(e) => return Err(store_error(e)),
            }
            self.mirror.resync_now().await.map_err(store_error)?;
        }
        // A store still being repaired is unavailable; a store that kept
        // moving under this write is contention.
        Err(match refused {
            Some(e) => store_error(e),
            None => LicensingError::Aborted(format!(
                "{what} changed concurrently on every attempt and nothing was written; retrying is safe"
            )),
        })
    }

    /// Runs a store write; when the store went back or lost its data, repairs
    /// and tries again.
    async fn write<T, Fut>(&self, op: impl Fn() -> Fut) -> Result<T, LicensingError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let op = &op;
        self.with_retries("the stored state", move |_| async move {
            Ok(match op().await {
                Err(e) => Attempt::Refused(e),
                Ok(done) => Attempt::Done(done),
            })
        })
        .await
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    fn licenses<'a>(&self, state: &'a MirrorState, now: DateTime<Utc>) -> Licenses<'a> {
        self.rules().licenses(&state.license_state(), now)
    }

    /// The purchased quantity of a seat feature now (0 when the license does not
    /// grant it); `None` without a trusted license (no flags to keep).
    fn capacity(&self, state: &MirrorState, feature: Feature, now: DateTime<Utc>) -> Option<u32> {
        let license = state.license.as_ref()?;
        Some(
            license
                .payload
                .entitlement(feature)
                .filter(|e| e.is_current(now))
                .map_or(0, |e| e.quantity),
        )
    }

    fn no_state(&self) -> LicensingError {
        LicensingError::NoStateYet(self.mirror.why_no_state())
    }

    /// Reads the copy once it has reached `min_version`: `Ok` with the answer
    /// and the copy's version, or where it is (`None`: no state at all). One
    /// read lock, no allocation of its own: the hot path's cost.
    fn read_at<T>(
        &self,
        min_version: u64,
        read: impl FnOnce(&MirrorState, DateTime<Utc>) -> T,
    ) -> Result<(T, u64), Option<u64>> {
        let node = self.clock.now();
        self.mirror.read(|state| {
            // Checked under the lock the answer takes anyway (no second lock).
            if !state.has_state() {
                return Err(None);
            }
            let version = state.version();
            if version < min_version {
                return Err(Some(version));
            }
            Ok((read(state, state.now(node)), version))
        })
    }

    /// Read your writes: `read` on the copy once it has reached `min_version`
    /// (0: at once), waiting at most `consistency.max_wait_ms` (and nudging the
    /// copy to catch up), else `NOT_YET_CONSISTENT`. A copy already there
    /// answers at once, as without `min_version`. Without any state:
    /// `NO_STATE_YET`.
    async fn at_version<T>(
        &self,
        min_version: u64,
        read: impl Fn(&MirrorState, DateTime<Utc>) -> T,
    ) -> Result<(T, u64), LicensingError> {
        match self.read_at(min_version, &read) {
            Ok(answer) => return Ok(answer),
            Err(None) if min_version == 0 => return Err(self.no_state()),
            Err(_) => {}
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.consistency_max_wait;
        loop {
            let reached = self.mirror.wait_for_version(min_version, deadline).await;
            match self.read_at(min_version, &read) {
                Ok(answer) => return Ok(answer),
                // Reached, then went back (a store that lost writes, before its
                // repair): wait again, within the same bound.
                Err(_) if reached && tokio::time::Instant::now() < deadline => {}
                Err(None) => return Err(self.no_state()),
                Err(Some(version)) => {
                    return Err(LicensingError::NotYetConsistent {
                        min_version,
                        version,
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    });
                }
            }
        }
    }

    /// A version at which what this copy holds is visible, for a write that
    /// wrote nothing: this copy's; a copy not read from the store yet (the
    /// state file) is brought up to the store first.
    async fn visible_version(&self) -> Result<u64, LicensingError> {
        if let Some(p) = self.mirror.read(|s| s.position.clone()) {
            return Ok(p.version);
        }
        self.mirror.resync_now().await.map_err(store_error)?;
        Ok(self.mirror.read(MirrorState::version))
    }

    /// The hot path: answered from the mirror, never waiting for the store.
    pub fn check_seat(
        &self,
        user: &UserId,
        feature: Feature,
    ) -> Result<CheckAnswer, LicensingError> {
        let answer = self.read_at(0, |state, now| self.decide_seat(state, user, feature, now));
        let (check, version) = answer.map_err(|_| self.no_state())?;
        Ok(CheckAnswer {
            check,
            stale: self.mirror.is_stale(),
            version,
        })
    }

    /// `CheckSeat` with `min_version` (read your writes): as [`Self::check_seat`]
    /// when the copy has reached it (no wait, no allocation), else after waiting
    /// for it (bounded by `consistency.max_wait_ms`).
    pub async fn check_seat_at(
        &self,
        user: &UserId,
        feature: Feature,
        min_version: u64,
    ) -> Result<CheckAnswer, LicensingError> {
        let (check, version) = self
            .at_version(min_version, |state, now| {
                self.decide_seat(state, user, feature, now)
            })
            .await?;
        Ok(CheckAnswer {
            check,
            stale: self.mirror.is_stale(),
            version,
        })
    }

    fn decide_seat(
        &self,
        state: &MirrorState,
        user: &UserId,
        feature: Feature,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        let seat = state.seat(feature, user.as_str()).map(|s| s.facts());
        // A concurrent feature is decided by the user's leases; an assigned
        // one (the common case) pays one scan of the few entitlements.
        if state
            .license
            .as_ref()
            .is_some_and(|l| l.payload.seat_model(feature) == crate::domain::SeatModel::Concurrent)
        {
            let until = state
                .lease_until_ms(feature, user.as_str())
                .and_then(DateTime::from_timestamp_millis);
            return self
                .rules()
                .check_leased(&state.license_state(), feature, seat, until, now);
        }
        self.rules()
            .check(&state.license_state(), feature, seat, now)
    }

    /// Gives the user a seat; `created` is false when they already held one.
    pub async fn assign_seat(
        &self,
        user: &UserId,
        feature: Feature,
    ) -> Result<Assigned, LicensingError> {
        if !feature.is_seat() {
            return Err(
                InvalidInput::new("feature", format!("{feature} is not a seat feature")).into(),
            );
        }
        self.with_retries("the licenses", move |attempt| async move {
            let (now, floor) = (self.now(), self.mirror.floor());
            let plan = self.mirror.read(|state| {
                self.licenses(state, now)
                    .plan_assign(feature, now, |f| state.count(f, SeatSource::Purchased))
            });
            let plan = match plan {
                Ok(plan) => plan,
                // The copy may be a moment behind a license applied elsewhere:
                // look once more before refusing.
                Err(e) if attempt == 0 && !matches!(e, LicensingError::InvalidInput(_)) => {
                    return Ok(Attempt::Stale);
                }
                Err(e) => return Err(e),
            };
            let outcome = match self
                .store
                .assign_seat(floor.as_ref(), user, feature, &plan)
                .await
            {
                Err(e) => return Ok(Attempt::Refused(e)),
                Ok(outcome) => outcome,
            };
            match outcome {
                AssignOutcome::Created(change) => {
                    if let Err(e) = self.mirror.apply_local(&change).await {
                        return Ok(Attempt::Refused(e));
                    }
                    let version = change.version;
                    let crate::store::ChangeKind::SeatAssigned(seat) = change.kind else {
                        return Err(LicensingError::Internal(
                            "assign reported another change".into(),
                        ));
                    };
                    Ok(Attempt::Done(Assigned {
                        seat,
                        created: true,
                        version,
                    }))
                }
                AssignOutcome::Existing { seat, version } => Ok(Attempt::Done(Assigned {
                    seat,
                    created: false,
                    version,
                })),
                AssignOutcome::Exhausted { capacity, in_use } => Err(LicensingError::NoFreeSeat {
                    feature,
                    capacity,
                    in_use,
                }),
                AssignOutcome::LicenseChanged => Ok(Attempt::Stale),
            }
        })
        .await
    }

    /// Frees the user's seat; `false` when there was none. A freed purchased
    /// seat makes room for an over-capacity one, whose flag is cleared.
    pub async fn release_seat(
        &self,
        user: &UserId,
        feature: Feature,
    ) -> Result<Versioned<bool>, LicensingError> {
        self.with_retries("the licenses", move |_| async move {
            let (now, floor) = (self.now(), self.mirror.floor());
            // Flags are set against the license the store holds: the store
            // refuses (Moved) when it is not the one this capacity was read from.
            let capacity = self.mirror.read(|s| {
                let id = s.license.as_ref().map(|l| l.id().to_owned())?;
                Some((self.capacity(s, feature, now)?, id))
            });
            let capacity = capacity.as_ref().map(|(c, id)| (*c, id.as_str()));
            match self
                .store
                .release_seat(floor.as_ref(), user, feature, capacity)
                .await
            {
                Ok(ReleaseOutcome::Released(changes)) => {
                    for change in &changes {
                        if let Err(e) = self.mirror.apply_local(change).await {
                            return Ok(Attempt::Refused(e));
                        }
                    }
                    let version = changes.iter().map(|c| c.version).max().unwrap_or(0);
                    Ok(Attempt::Done(Versioned {
                        value: true,
                        version,
                    }))
                }
                Ok(ReleaseOutcome::NotHeld { version }) => Ok(Attempt::Done(Versioned {
                    value: false,
                    version,
                })),
                Err(e) => Ok(Attempt::Refused(e)),
            }
        })
        .await
    }

    /// The copy's version a listing answers at: now, or once the copy has
    /// reached `min_version` (0: no wait), as every read waits.
    async fn read_version(&self, min_version: u64) -> Result<u64, LicensingError> {
        if min_version == 0 {
            Ok(self.mirror.read(MirrorState::version))
        } else {
            Ok(self.at_version(min_version, |_, _| ()).await?.1)
        }
    }

    /// One page of seats, ordered by feature then user id. `feature` empty lists all.
    pub async fn list_seats(
        &self,
        feature: &str,
        page_size: i32,
        page_token: &str,
        min_version: u64,
    ) -> Result<SeatPage, LicensingError> {
        let (filter, size, after) = page_request(feature, page_size, page_token, decode_token)?;
        // The seats come from the store; a version asked for is waited for on
        // this copy, like every read (the store holds at least what it holds).
        let version = self.read_version(min_version).await?;
        let mut seats = self
            .store
            .list_seats(filter, after.as_ref(), size + 1)
            .await
            .map_err(store_error)?;
        let next_page_token = if seats.len() > size {
            seats.truncate(size);
            let last = seats.last().expect("a full page has a last seat");
            encode_token(filter, last)
        } else {
            String::new()
        };
        Ok(SeatPage {
            seats,
            next_page_token,
            version,
        })
    }

    pub fn tryout_status(&self) -> TryoutView {
        let now = self.now();
        self.mirror.read(|state| self.tryout_view(state, now))
    }

    /// `GetTryoutStatus` with `min_version` (read your writes).
    pub async fn tryout_status_at(
        &self,
        min_version: u64,
    ) -> Result<Versioned<TryoutView>, LicensingError> {
        let (value, version) = self
            .at_version(min_version, |state, now| self.tryout_view(state, now))
            .await?;
        Ok(Versioned { value, version })
    }

    fn tryout_view(&self, state: &MirrorState, now: DateTime<Utc>) -> TryoutView {
        tryout::view(
            self.settings.edition,
            state.tryout.as_ref(),
            now,
            self.settings.tryout,
            state.count(Feature::User, SeatSource::Tryout),
        )
    }

    /// Starts the tryout. With a licensing server, it is asked first and its
    /// record decides (a tryout is once per serial, also across a store that lost
    /// its data); unreachable, the answer is `UNAVAILABLE`, never a start it has
    /// not confirmed. A license file keeps no such record: the store's counts.
    pub async fn start_tryout(&self) -> Result<Versioned<TryoutView>, LicensingError> {
        let (edition, policy) = (self.settings.edition, self.settings.tryout);
        let start = |current: Option<&TryoutRecord>, now| {
            tryout::start(edition, current, now, policy).map(Some)
        };
        // What the store knows is checked first: no need to ask about a tryout
        // that is known to be used.
        let now = self.clock.now();
        let proposed = self.mirror.read(|s| start(s.tryout.as_ref(), now))?;
        let (Some(source), Some(TryoutRecord::Started { started_at, .. })) =
            (self.source.clone(), proposed)
        else {
            return self.change_tryout(start).await;
        };
        let nonce = signed_tryout::new_nonce();
        let claim = source
            .start_tryout(&self.settings.serial, started_at, &nonce)
            .await
            .map_err(|e| upstream_error(e, "the tryout start", "TRYOUT_NOT_CONFIRMED"))?;
        let Some(claim) = claim else {
            return self.change_tryout(start).await;
        };
        // The licensing server's start is the one kept, here too, once verified.
        let answer = self.verify_tryout(&claim, &nonce, source.as_ref())?;
        let record = answer.record();
        if answer.recorded {
            return self
                .change_tryout(|current, now| match current {
                    None => Ok(Some(record.clone())),
                    // Written meanwhile by another replica from the same answer.
                    Some(r) if *r == record => Ok(None),
                    Some(_) => start(current, now),
                })
                .await;
        }
        // Used before, e.g. before the store lost its data: the store takes the
        // licensing server's record back (best effort), and the start is refused.
        if let Err(error) = self
            .change_tryout(|current, _| Ok(current.is_none().then(|| record.clone())))
            .await
        {
            tracing::warn!(%error, "could not store the licensing server's tryout record");
        }
        Err(LicensingError::precondition(
            "TRYOUT_NOT_AVAILABLE",
            format!(
                "the licensing server recorded the tryout start of {} at {}; it runs only once per serial number: apply a purchased license to license users",
                self.settings.serial, answer.started_at
            ),
        ))
    }

    /// The licensing server's signed tryout answer, verified against this request
    /// (serial, nonce) and the reference time. An answer that is not trusted is
    /// conclusive, like a license with a bad signature: nothing starts, and the
    /// operator learns why (log line here, the refusal in the audit trail).
    fn verify_tryout(
        &self,
        claim: &TryoutClaim,
        nonce: &str,
        source: &dyn LicensingServer,
    ) -> Result<VendorTryout, LicensingError> {
        let key = self.settings.vendor_key.as_ref().ok_or_else(|| {
            LicensingError::precondition(
                "NO_VENDOR_KEY",
                "no vendor_public_key configured: the licensing server's tryout answer cannot be verified",
            )
        })?;
        let question = TryoutQuestion {
            serial: &self.settings.serial,
            nonce,
            now: self.now(),
            policy: self.settings.tryout,
        };
        SignedTryout::from_json(&claim.signed_tryout)
            .and_then(|signed| signed.verify(key, &question))
            .map_err(|rejection| {
                tracing::error!(
                    %rejection,
                    licensing_server = %source.describe(),
                    "tryout answer of the licensing server refused; nothing was started"
                );
                LicensingError::precondition(
                    "TRYOUT_NOT_CONFIRMED",
                    format!(
                        "the licensing server's tryout answer is not trusted ({rejection}); nothing was started: check licensing_server.url and vendor_public_key"
                    ),
                )
            })
    }

    pub async fn end_tryout(&self) -> Result<Versioned<TryoutView>, LicensingError> {
        self.change_tryout(|current, now| tryout::end(self.settings.edition, current, now))
            .await
    }

    /// Decides a tryout transition on the mirrored record and writes it with
    /// compare-and-set, re-reading when another replica got there first.
    async fn change_tryout(
        &self,
        decide: impl Fn(
            Option<&TryoutRecord>,
            DateTime<Utc>,
        ) -> Result<Option<TryoutRecord>, LicensingError>,
    ) -> Result<Versioned<TryoutView>, LicensingError> {
        let decide = &decide;
        self.with_retries("the tryout", move |_| async move {
            let (now, floor) = (self.now(), self.mirror.floor());
            let (current, at) = self
                .mirror
                .read(|s| (s.tryout.clone(), s.position.as_ref().map(|p| p.version)));
            let Some(new) = decide(current.as_ref(), now)? else {
                // Nothing to write: the record is visible at this copy's
                // version. A copy not read from the store yet reads it first.
                return Ok(match at {
                    Some(version) => Attempt::Done(Versioned {
                        value: self.tryout_status(),
                        version,
                    }),
                    None => Attempt::Stale,
                });
            };
            match self
                .store
                .compare_and_set_tryout(floor.as_ref(), current.as_ref(), &new)
                .await
            {
                Ok(Some(change)) => {
                    if let Err(e) = self.mirror.apply_local(&change).await {
                        return Ok(Attempt::Refused(e));
                    }
                    Ok(Attempt::Done(Versioned {
                        value: self.tryout_status(),
                        version: change.version,
                    }))
                }
                Ok(None) => Ok(Attempt::Stale),
                Err(e) => Ok(Attempt::Refused(e)),
            }
        })
        .await
    }

    /// The entitlements with their use at `now` (under the mirror's lock: it
    /// takes no other).
    fn entitlements(&self, state: &MirrorState, now: DateTime<Utc>) -> Vec<EntitlementUse> {
        state
            .license
            .as_ref()
            .map(|l| {
                l.payload
                    .entitlements
                    .iter()
                    .map(|e| EntitlementUse {
                        entitlement: e.clone(),
                        in_use: if e.seat_model == crate::domain::SeatModel::Concurrent {
                            state.live_leases(e.feature, now.timestamp_millis())
                        } else if e.feature.is_seat() {
                            state.count(e.feature, SeatSource::Purchased)
                        } else {
                            u32::from(e.quantity > 0)
                        },
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn overview(&self) -> Overview {
        let now = self.now();
        // Read before the mirror's lock is taken below: a second read lock taken
        // while one is held deadlocks once a writer queues between the two.
        let clock_rolled_back = self.clock_rolled_back();
        self.mirror
            .read(|state| self.overview_of(state, now, clock_rolled_back))
    }

    /// `GetLicenseOverview` with `min_version` (read your writes).
    pub async fn overview_at(&self, min_version: u64) -> Result<Overview, LicensingError> {
        // Outside the mirror's lock, as in `overview`.
        let clock_rolled_back = self.clock_rolled_back();
        let (overview, _) = self
            .at_version(min_version, |state, now| {
                self.overview_of(state, now, clock_rolled_back)
            })
            .await?;
        Ok(overview)
    }

    /// The answer of a write that returns the overview: at the version of its
    /// last write (`written`; 0: it wrote nothing), or of the overview when
    /// that is newer.
    async fn overview_after(&self, written: u64) -> Result<Versioned<Overview>, LicensingError> {
        if written == 0 {
            self.visible_version().await?;
        }
        let overview = self.overview();
        Ok(Versioned {
            version: written.max(overview.version),
            value: overview,
        })
    }

    /// The overview as `state` shows it at `now` (under the mirror's lock: it
    /// takes no other).
    fn overview_of(
        &self,
        state: &MirrorState,
        now: DateTime<Utc>,
        clock_rolled_back: bool,
    ) -> Overview {
        {
            let activation = self.activation(state, now);
            let system_activated = self.licenses(state, now).system_activated(now);
            let activation_reason = activation::explain(&activation::ActivationFacts {
                activation,
                edition: self.settings.edition,
                system_activated,
                license_applied_at: state.license.as_ref().map(|l| l.applied_at),
                license_problem: state.license_problem.as_deref(),
                reconcile: &state.reconcile,
                lapse_action: self.settings.lapse_action,
                tryout: state.tryout.as_ref(),
                has_license_source: self.source.is_some(),
                now,
            });
            let over_capacity = Feature::SEATS
                .into_iter()
                .filter_map(|feature| {
                    let (seats, first) = state.over_capacity(feature);
                    (seats > 0).then(|| OverCapacity {
                        feature,
                        seats,
                        grace_ends_at: first
                            .and_then(DateTime::<Utc>::from_timestamp_millis)
                            .and_then(|since| {
                                since.checked_add_signed(self.settings.over_capacity_grace)
                            }),
                    })
                })
                .collect();
            Overview {
                serial: self.settings.serial.clone(),
                edition: self.settings.edition,
                activation,
                system_activated,
                entitlements: self.entitlements(state, now),
                tryout: self.tryout_view(state, now),
                reconcile: state.reconcile.clone(),
                license_source: self.license_source(),
                license_problem: state.license_problem.clone(),
                activation_reason,
                over_capacity,
                concurrent: self.concurrent_use(state, now),
                auth_mode: self.settings.auth_mode,
                development_installation: self.settings.development_installation,
                incident: state.incident.clone(),
                time_high_water: chrono::TimeZone::timestamp_millis_opt(&Utc, state.high_water_ms)
                    .single()
                    .unwrap_or_default(),
                clock_rolled_back,
                clock_skew_ms: self.time.skew_ms(),
                clock_skewed: self.time.skewed(),
                corrupt_records: state.corrupt_records,
                version: state.version(),
            }
        }
    }

    fn license_source(&self) -> String {
        self.source
            .as_ref()
            .map_or_else(|| "none configured".to_owned(), |s| s.describe())
    }
}

fn encode_token(filter: Option<Feature>, last: &Seat) -> String {
    let token = PageToken {
        v: 1,
        filter,
        feature: last.feature,
        user: last.user_id.as_str().to_owned(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a page token always serializes"))
}

/// A page request of a listing: the feature filter (empty: all), the page
/// size, and the position after which the page starts, as `decode` reads the
/// page token.
fn page_request<K>(
    feature: &str,
    page_size: i32,
    page_token: &str,
    decode: impl Fn(&str, Option<Feature>) -> Result<K, InvalidInput>,
) -> Result<(Option<Feature>, usize, Option<K>), LicensingError> {
    let filter = if feature.is_empty() {
        None
    } else {
        Some(Feature::parse_seat(feature)?)
    };
    let size = crate::domain::page_size(page_size)?;
    let after = if page_token.is_empty() {
        None
    } else {
        Some(decode(page_token, filter)?)
    };
    Ok((filter, size, after))
}

/// Reads a `ListSeats` page token made for the `filter`: where the next page starts.
pub fn decode_token(raw: &str, filter: Option<Feature>) -> Result<SeatKey, InvalidInput> {
    let bad = || {
        InvalidInput::new(
            "page_token",
            "is not a token from a previous ListSeats response",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if token.v != 1 {
        return Err(bad());
    }
    if token.filter != filter {
        return Err(InvalidInput::new(
            "page_token",
            "was made for another feature filter",
        ));
    }
    Ok(SeatKey {
        feature: token.feature,
        user_id: UserId::parse(&token.user).map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests;
