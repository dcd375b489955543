//! Where seats, the applied license, the tryout record and the reconcile status
//! live. Two implementations, held to one conformance suite
//! (`tests/store_conformance/`):
//!
//! - [`memory::MemoryStore`]: embedded, for one-command local runs; lost on restart.
//! - [`redis::RedisStore`]: shared by all replicas; every write is one Lua script.
//!
//! Every write bumps a version and appends a [`Change`] to a feed, so each replica's
//! in-memory mirror (`crate::mirror`) can follow without re-reading everything.

pub mod memory;
pub mod records;
pub mod redis;
pub mod redis_conn;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::audit::{AuditEntry, AuditEvent, AuditRetention};
use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AssignPlan, Feature, Holder, Lease, LeasePlan, ReconcileStatus, Seat, SeatSource, TryoutRecord,
    UserId,
};

pub use crate::domain::history::{
    Change, ChangeKind, Incident, Position, RepairWrite, Snapshot, StoredLicense,
};

/// The writer's floor: where the writing replica's copy of the store is. Every
/// write that changes licensing state takes it as an argument and is refused
/// with [`StoreError::Moved`] (nothing written) when the store holds another
/// epoch or a lower version: it went back, and the writes this replica has seen
/// must be repaired first. `None`: no check (a replica that has not read the
/// store yet, tests). Only `restore` and `repair` bring a store forward.
pub type Floor<'a> = Option<&'a Position>;

/// `pause` less up to half of it, at random: the pause before a retry, so
/// replicas that failed together do not come back together.
pub fn jittered(pause: Duration) -> Duration {
    let half = pause / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// What `Store::advance_clock` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// The stored high-water mark (ms).
    pub high_water_ms: i64,
    /// The store's own time (ms): Redis `TIME`, the deployment's reference.
    pub reference_ms: i64,
}

/// What applying a license writes, in one atomic step.
#[derive(Debug, Clone, Copy)]
pub struct LicenseWrite<'a> {
    /// The stored document this one replaces (`None`: none stored); otherwise
    /// nothing is written.
    pub expected_id: Option<&'a str>,
    pub license: &'a StoredLicense,
    /// A tryout change (expected record, new record) the license causes.
    pub tryout: Option<(Option<&'a TryoutRecord>, &'a TryoutRecord)>,
    /// The new purchased quantity of every seat feature: each pool's over-capacity
    /// flags are set against it.
    pub capacities: &'a [(Feature, u32)],
    /// An activation consumes the pending initialization it answers; nothing is
    /// written if it is no longer the stored one.
    pub consume_initialization: Option<&'a PendingInitialization>,
    /// The reconcile lease's fencing token: nothing is written when another
    /// holder has taken the lease since.
    pub fence: Option<u64>,
}

/// What [`Store::summary`] answers: enough to tell, without reading a seat,
/// whether a replica's copy still matches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None`: the store holds no epoch.
    pub position: Option<Position>,
    /// Seat records stored, of every pool (corrupt ones included).
    pub seats: u64,
    /// The feed entry at the version asked for, while the feed still holds it.
    pub change_at: Option<Change>,
}

/// What the feed has after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The changes right after the position, in order (possibly none).
    Events(Vec<Change>),
    /// The position cannot be continued from (another epoch, a gap, history
    /// trimmed): read a new snapshot.
    Resync,
}

/// What an assignment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    /// A new seat was written (`change` is its feed entry).
    Created(Change),
    /// The user already held an acceptable seat of the feature: nothing written.
    /// `version` is the store's version when it looked: the seat is visible there.
    Existing { seat: Seat, version: u64 },
    /// The pool is full.
    Exhausted { capacity: u32, in_use: u32 },
    /// The plan was made against another license document than the one stored:
    /// re-read and plan again.
    LicenseChanged,
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The seat was freed: its feed entry, then any flag changes.
    Released(Vec<Change>),
    /// The user held no seat of the feature: nothing written. `version` is the
    /// store's version when it looked: the absence is visible there.
    NotHeld { version: u64 },
}

/// Where a seat listing resumes: strictly after this (feature, user).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeatKey {
    pub feature: Feature,
    pub user_id: UserId,
}

/// What a lease acquisition asks for.
#[derive(Debug, Clone, Copy)]
pub struct LeaseAcquire<'a> {
    pub user: &'a UserId,
    pub feature: Feature,
    pub holder: &'a Holder,
    /// The quantity and the license it was read from: the store refuses the
    /// write ([`AcquireOutcome::LicenseChanged`]) when another one is stored.
    pub plan: &'a LeasePlan,
    /// The id a new lease gets (an existing one keeps its own).
    pub new_id: &'a str,
    /// The lease length: it expires this long after the store's time now.
    pub duration: Duration,
}

/// What a lease acquisition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The lease was taken (`created`) or, held by the same holder already,
    /// renewed; `change` is its feed entry (a [`ChangeKind::LeaseAcquired`]),
    /// `in_use` the feature's live leases after it.
    Acquired {
        change: Change,
        created: bool,
        in_use: u32,
    },
    /// The feature's live leases are at (or above) the quantity: nothing written.
    Exhausted { capacity: u32, in_use: u32 },
    /// The plan was made against another license document than the one
    /// stored: re-read and plan again.
    LicenseChanged,
}

/// What a renewal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenewOutcome {
    /// The renewed leases, with their new expiry.
    pub leases: Vec<Lease>,
    /// The ids not renewed: expired, released, unknown or another holder's.
    pub lost: Vec<String>,
    /// The feed entries of the renewal, in version order (none when nothing
    /// was renewed; a store may renew a large set in several steps).
    pub changes: Vec<Change>,
    /// The version the outcome is visible at.
    pub version: u64,
}

/// What a lease release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReleaseOutcome {
    /// The lease was removed: its feed entry.
    Released(Change),
    /// No such lease: nothing written; the store's version when it looked.
    NotHeld { version: u64 },
}

/// One day's use of a concurrent feature, kept 400 days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseUsage {
    pub feature: Feature,
    /// Days since 1970-01-01 (UTC, the store's clock).
    pub day: i64,
    /// The most leases live at the same time that day.
    pub peak: u32,
    /// Acquisitions refused that day because the feature was at capacity.
    pub busy: u64,
}

/// How many days of lease usage the store keeps.
pub const USAGE_DAYS: i64 = 400;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not reachable, or no answer within the configured timeout. The outcome of
    /// a write is unknown (Redis may have run the script before the answer was
    /// lost); retrying it is safe: every write is idempotent or compare-and-set.
    #[error("store unreachable: {0}")]
    Unavailable(String),
    /// The store is not where this replica last saw it: it went back (a restart
    /// from an older snapshot, a failover to a lagging replica) or was replaced.
    /// Nothing was written; resynchronise (which repairs) and retry.
    #[error("store went back behind this replica's copy (rolled back or replaced)")]
    Moved,
    /// The store has no epoch (never initialized, or its data was lost and not yet
    /// repaired): writes are refused until the mirror repairs it.
    #[error("store holds no data epoch (empty or being repaired)")]
    NotInitialized,
    /// Stored data that does not parse.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The write needs something the store is still preparing in the
    /// background (the Redis store's seat order sets, built once from the
    /// pools): nothing was written; retry after about `retry_after`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
}

tokio::task_local! {
    /// The instant by which the call being served must have answered (its
    /// RPC deadline), where one is set.
    static ANSWER_BY: tokio::time::Instant;
}

/// Runs `call` knowing that it must answer by `deadline`: a store call that
/// would wait for the store (a write waiting for a one-time preparation,
/// [`StoreError::Busy`]) waits no longer than that. Set by the server's
/// deadline layer around every call it serves.
pub async fn answering_by<F: std::future::Future>(
    deadline: tokio::time::Instant,
    call: F,
) -> F::Output {
    ANSWER_BY.scope(deadline, call).await
}

/// The deadline of the call being served, if [`answering_by`] set one.
pub fn answer_by() -> Option<tokio::time::Instant> {
    ANSWER_BY.try_with(|d| *d).ok()
}

/// A seat as a streamed snapshot hands it over: plain values, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatValue {
    pub source: SeatSource,
    pub assigned_at_ms: i64,
    pub over_capacity_since_ms: Option<i64>,
}

impl SeatValue {
    pub fn of(seat: &Seat) -> Self {
        Self {
            source: seat.source,
            assigned_at_ms: seat.assigned_at.timestamp_millis(),
            over_capacity_since_ms: seat.over_capacity_since.map(|t| t.timestamp_millis()),
        }
    }

    /// The seat of `user_id`; the times were checked when it was read.
    pub fn to_seat(self, user_id: UserId, feature: Feature) -> Seat {
        use chrono::TimeZone as _;
        let at = |ms: i64| {
            chrono::Utc
                .timestamp_millis_opt(ms)
                .single()
                .unwrap_or_default()
        };
        Seat {
            user_id,
            feature,
            source: self.source,
            assigned_at: at(self.assigned_at_ms),
            over_capacity_since: self.over_capacity_since_ms.map(at),
        }
    }
}

/// Where a streamed snapshot ([`Store::snapshot_into`]) puts its seats as they
/// are read: the pages first (a seat may come twice; the later one counts),
/// then the feed replayed after them, which has the last word.
pub trait SeatSink: Send {
    /// How many seat records `feature`'s pools hold, before their pages come.
    fn expect(&mut self, _feature: Feature, _records: usize) {}
    /// A seat of a page.
    fn page_seat(&mut self, feature: Feature, user: &str, seat: SeatValue);
    /// The end of a page.
    fn page_done(&mut self) {}
    /// A seat as the replayed feed leaves it (`None`: released).
    fn replayed(&mut self, feature: Feature, user: &str, seat: Option<SeatValue>);
    /// A re-setup in the replayed feed: no seat read before it is left.
    fn cleared(&mut self);
    /// The snapshot starts again (its feed could not be continued): forget
    /// everything put so far.
    fn restart(&mut self);
}

/// The seat store shared by all replicas.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A consistent copy of everything.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// [`Store::snapshot`] with its seats handed to `sink` as they are read
    /// (the snapshot returned holds none, only its position and records): a
    /// replica that keeps its copy in a compact form of its own never holds
    /// the store's seats twice.
    async fn snapshot_into(&self, sink: &mut dyn SeatSink) -> Result<Snapshot, StoreError> {
        let mut snapshot = self.snapshot().await?;
        for seat in std::mem::take(&mut snapshot.seats) {
            sink.page_seat(seat.feature, seat.user_id.as_str(), SeatValue::of(&seat));
        }
        sink.page_done();
        Ok(snapshot)
    }

    /// The changes after `since`, waiting up to `wait` for at least one.
    async fn changes(&self, since: &Position, wait: Duration) -> Result<Changes, StoreError>;

    /// Gives `user` a seat of `feature` from the plan's pool, atomically: the
    /// capacity check and the write are one step across all replicas. Idempotent:
    /// a user holding a purchased seat, or a tryout seat under a tryout plan, gets
    /// it back; a tryout seat is replaced by a purchased one under a purchased plan.
    async fn assign_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        plan: &AssignPlan,
    ) -> Result<AssignOutcome, StoreError>;

    /// Frees the user's seat of `feature` ([`ReleaseOutcome::NotHeld`] when there
    /// was none). With
    /// `capacity` (the purchased quantity and the id of the license it was read
    /// from), the pool's over-capacity flags are set again against it, guarded
    /// like an assignment: [`StoreError::Moved`] and nothing written when the
    /// stored license is another. The changes are the release, then any flag changes.
    async fn release_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        capacity: Option<(u32, &str)>,
    ) -> Result<ReleaseOutcome, StoreError>;

    /// Seats ordered by (feature, user id), strictly after `after`, at most `limit`.
    async fn list_seats(
        &self,
        feature: Option<Feature>,
        after: Option<&SeatKey>,
        limit: usize,
    ) -> Result<Vec<Seat>, StoreError>;

    /// Takes a lease of a concurrent feature, atomically across all replicas:
    /// expired leases of the feature are reclaimed, the live ones counted
    /// against the plan's quantity and the lease written, in one step, with
    /// the store's own clock. Idempotent per (user, feature, holder): the
    /// holder's live lease comes back renewed (`created` false); an expired
    /// one of the same key is replaced. A refusal for capacity counts one
    /// "busy" of the day (outside the versioned state).
    async fn acquire_seat_lease(
        &self,
        floor: Floor<'_>,
        request: LeaseAcquire<'_>,
    ) -> Result<AcquireOutcome, StoreError>;

    /// Renews `holder`'s leases among `lease_ids` to expire `duration` after
    /// the store's time now, in one round trip; the others are `lost`. A feed
    /// entry per step (none when nothing was renewed): the Redis store renews
    /// at most 500 ids per script, so no script holds Redis for long.
    async fn renew_seat_leases(
        &self,
        floor: Floor<'_>,
        holder: &Holder,
        lease_ids: &[String],
        duration: Duration,
    ) -> Result<RenewOutcome, StoreError>;

    /// Removes a lease (live or expired); [`LeaseReleaseOutcome::NotHeld`]
    /// when there is none.
    async fn release_seat_lease(
        &self,
        floor: Floor<'_>,
        lease_id: &str,
    ) -> Result<LeaseReleaseOutcome, StoreError>;

    /// The live leases (of `feature`, or all), ordered by (feature, user, holder).
    async fn list_seat_leases(&self, feature: Option<Feature>) -> Result<Vec<Lease>, StoreError>;

    /// The lease usage of the days from `since_day` on (days since 1970),
    /// ordered by (feature, day).
    async fn lease_usage(&self, since_day: i64) -> Result<Vec<LeaseUsage>, StoreError>;

    /// Writes `new` only if the stored tryout record equals `expected`; `None`
    /// when it did not.
    async fn compare_and_set_tryout(
        &self,
        floor: Floor<'_>,
        expected: Option<&TryoutRecord>,
        new: &TryoutRecord,
    ) -> Result<Option<Change>, StoreError>;

    /// Stores a license document (and, with it, a tryout change) only if the
    /// stored document is still `expected_id` and the tryout record still the
    /// expected one; `None` when either changed meanwhile.
    async fn apply_license(
        &self,
        floor: Floor<'_>,
        write: LicenseWrite<'_>,
    ) -> Result<Option<Vec<Change>>, StoreError>;

    /// Stores the initialization this PBX just issued (replacing an earlier one).
    async fn set_initialization(
        &self,
        floor: Floor<'_>,
        pending: &PendingInitialization,
    ) -> Result<Change, StoreError>;

    /// Re-setup: removes seats, the license, the reconcile status and any pending
    /// initialization; keeps the tryout record (a tryout is once per serial, ever).
    async fn reset(&self, floor: Floor<'_>) -> Result<Change, StoreError>;

    /// Takes the reconcile lease for `ttl` if nobody holds it; returns a fencing
    /// token that grows with every grant.
    async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError>;

    /// Gives the lease back if `holder` still holds it.
    async fn release_lease(&self, holder: &str) -> Result<(), StoreError>;

    /// Records the outcome of a reconcile.
    async fn record_reconcile(
        &self,
        floor: Floor<'_>,
        status: &ReconcileStatus,
    ) -> Result<Change, StoreError>;

    /// Re-creates a store that lost its data (no epoch) from a replica's last
    /// known state, and starts a new epoch. Does nothing and answers `false` when
    /// the store has an epoch (another replica got there first, or nothing was lost).
    async fn restore(&self, from: &Snapshot) -> Result<bool, StoreError>;

    /// The feed entries after `after` in the current epoch, in order, as far as
    /// the feed still holds them.
    async fn history(&self, after: u64) -> Result<Vec<Change>, StoreError>;

    /// Where the store is, how many seat records it holds and its feed entry at
    /// version `at`, at one instant: one small read, whatever the number of seats
    /// (a replica's periodic check and its lineage check).
    async fn summary(&self, at: u64) -> Result<Summary, StoreError>;

    /// Writes back what a replica holds and the store lost, in one step, only if
    /// the store is still at `expected`; `None` when it moved. The version jumps
    /// to above `version_floor` first; every part is a feed entry, the incident last.
    async fn repair(&self, write: &RepairWrite) -> Result<Option<Vec<Change>>, StoreError>;

    /// Raises the stored high-water clock to `ms` if that is larger, but never
    /// beyond the store's own time (`0` only reads); returns the stored mark and
    /// that time, the deployment's reference. Not a versioned write (no feed entry).
    async fn advance_clock(&self, ms: i64) -> Result<ClockReading, StoreError>;
    /// Appends an entry to the audit trail, then drops entries beyond
    /// `retention` (the oldest first, and any older than its age). The trail is
    /// outside the data epoch: it is written even before the store is initialized.
    async fn append_audit(
        &self,
        event: &AuditEvent,
        retention: &AuditRetention,
    ) -> Result<(), StoreError> {
        self.append_audit_batch(std::slice::from_ref(event), retention)
            .await
    }

    /// Appends entries in order in one step, as [`Store::append_audit`] one by
    /// one would (ids unique and growing across both lists, each list under its
    /// bound); an empty batch writes nothing. The audit writer's path: one call
    /// per batch keeps up with the highest write rate.
    async fn append_audit_batch(
        &self,
        events: &[AuditEvent],
        retention: &AuditRetention,
    ) -> Result<(), StoreError>;

    /// Audit entries newest first, strictly older than the entry id `before`
    /// (from the start when `None`), at most `limit`.
    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// A short description for logs and the overview (no secrets).
    fn describe(&self) -> String;
}
