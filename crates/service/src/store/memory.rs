//! The embedded in-memory store: the default for one-command local runs and a
//! reference for the Redis store's semantics. Its state is lost on restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    AcquireOutcome, AssignOutcome, Change, ChangeKind, Changes, ClockReading, Floor, Incident,
    LeaseAcquire, LeaseReleaseOutcome, LeaseUsage, LicenseWrite, Position, ReleaseOutcome,
    RenewOutcome, RepairWrite, SeatKey, Snapshot, Store, StoreError, StoredLicense, Summary,
    USAGE_DAYS,
};
use crate::domain::audit::{
    AuditEntry, AuditEvent, AuditRetention, merge_newest_first, parse_entry_id,
};
use crate::domain::capacity::reflag;
use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AssignPlan, Clock, Feature, Holder, Lease, ReconcileStatus, Seat, SeatSource, TryoutRecord,
    UserId,
};
use chrono::{DateTime, Utc};

/// How many changes the feed keeps for mirrors that fall behind.
const FEED_LEN: usize = 10_000;

pub struct MemoryStore {
    // One lock for all data: every operation is a few map operations, and one lock
    // makes each of them atomic, as a Lua script is in Redis. Never held across an await.
    inner: Mutex<Inner>,
    // Tells waiting `changes` calls that the version moved.
    version_tx: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    // The audit trail. Its own lock: audit writes never wait for seat writes
    // or the other way round.
    audit: Mutex<AuditLog>,
}

/// The audit trail as two lists under their own bounds (as the two streams in
/// Redis), oldest first, ids unique across both.
#[derive(Default)]
struct AuditLog {
    changes: VecDeque<AuditEntry>,
    refusals: VecDeque<AuditEntry>,
    // The last id's (ms, seq), over both lists.
    last: (u64, u64),
}

struct Inner {
    /// `None` until initialized (or after `wipe`, to test repair).
    epoch: Option<String>,
    version: u64,
    seats: BTreeMap<(Feature, UserId), Seat>,
    /// Seats per (feature, source), kept with `seats` so capacity checks are O(1).
    counts: HashMap<(Feature, SeatSource), u32>,
    /// The over-capacity order of each purchased pool, kept with `seats` (as
    /// the order sets in Redis), so flags move in O(changed · log N).
    order: HashMap<Feature, PoolOrder>,
    license: Option<StoredLicense>,
    tryout: Option<TryoutRecord>,
    reconcile: ReconcileStatus,
    initialization: Option<PendingInitialization>,
    retired_license: Option<StoredLicense>,
    high_water_ms: i64,
    incident: Option<Incident>,
    /// The reconcile lease: holder and when it expires.
    lease: Option<(String, std::time::Instant)>,
    /// The leases of concurrent features, as in Redis: records by id, the id
    /// of each (feature, user, holder), and per feature the ids by expiry.
    leases: Leases,
    /// Per (feature, day since 1970): the day's peak of live leases and its
    /// refused acquisitions.
    usage: BTreeMap<(Feature, i64), (u32, u64)>,
    /// Grows with every lease grant (the fencing token).
    fence: u64,
    feed: VecDeque<Change>,
}

/// A seat's place in the over-capacity order: ascending, so the most recently
/// assigned (ties: the higher user id) is the last.
type OrderKey = (DateTime<Utc>, UserId);

/// The purchased seats of one feature in over-capacity order, and the flagged ones.
struct PoolOrder {
    seats: BTreeSet<OrderKey>,
    flagged: BTreeSet<OrderKey>,
    /// Whether `flagged` is known to be the top of `seats` (the newest
    /// `flagged.len()`): then flags move without a walk over the pool. Every
    /// reflag leaves it so and removing a seat keeps it; only a seat put among
    /// or above flagged ones (a repair, a restore, an assignment into a pool
    /// with stale flags) loses it, until the next reflag walks the pool once.
    prefix: bool,
}

impl Default for PoolOrder {
    fn default() -> Self {
        Self {
            seats: BTreeSet::new(),
            flagged: BTreeSet::new(),
            prefix: true,
        }
    }
}

impl PoolOrder {
    fn insert(&mut self, seat: &Seat) {
        let key = (seat.assigned_at, seat.user_id.clone());
        if seat.over_capacity_since.is_some() {
            // Still the top only when newer than every seat without a flag.
            let unflagged_top = match self.flagged.first() {
                Some(low) => self.seats.range(..low.clone()).next_back(),
                None => self.seats.last(),
            };
            self.prefix &= unflagged_top.is_none_or(|top| key > *top);
            self.flagged.insert(key.clone());
        } else if self.flagged.first().is_some_and(|low| key > *low) {
            self.prefix = false;
        }
        self.seats.insert(key);
    }

    fn remove(&mut self, seat: &Seat) {
        let key = (seat.assigned_at, seat.user_id.clone());
        self.seats.remove(&key);
        self.flagged.remove(&key);
    }
}

/// The leases of concurrent features.
#[derive(Default)]
struct Leases {
    records: HashMap<String, Lease>,
    ids: HashMap<(Feature, UserId, Holder), String>,
    /// Per feature, (expires_at ms, id): the live ones are a range from now.
    pools: HashMap<Feature, BTreeSet<(i64, String)>>,
}

impl Leases {
    fn put(&mut self, lease: Lease) {
        self.remove(&lease.lease_id);
        let key = (lease.feature, lease.user_id.clone(), lease.holder.clone());
        if let Some(old) = self.ids.get(&key).cloned() {
            self.remove(&old);
        }
        self.ids.insert(key, lease.lease_id.clone());
        self.pools
            .entry(lease.feature)
            .or_default()
            .insert((lease.expires_at.timestamp_millis(), lease.lease_id.clone()));
        self.records.insert(lease.lease_id.clone(), lease);
    }

    fn remove(&mut self, id: &str) -> Option<Lease> {
        let lease = self.records.remove(id)?;
        self.ids
            .remove(&(lease.feature, lease.user_id.clone(), lease.holder.clone()));
        if let Some(pool) = self.pools.get_mut(&lease.feature) {
            pool.remove(&(lease.expires_at.timestamp_millis(), lease.lease_id.clone()));
        }
        Some(lease)
    }

    /// Live leases of a feature at `now_ms` (expiry after now): O(log N + live).
    fn live(&self, feature: Feature, now_ms: i64) -> usize {
        self.pools
            .get(&feature)
            .map_or(0, |p| p.range((now_ms + 1, String::new())..).count())
    }

    /// Removes the feature's expired leases; their ids.
    fn reclaim(&mut self, feature: Feature, now_ms: i64) -> Vec<String> {
        let expired: Vec<String> = self.pools.get(&feature).map_or_else(Vec::new, |p| {
            p.range(..(now_ms + 1, String::new()))
                .map(|(_, id)| id.clone())
                .collect()
        });
        for id in &expired {
            self.remove(id);
        }
        expired
    }

    fn clear(&mut self) {
        *self = Leases::default();
    }
}

/// Days since 1970 of a time in ms.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

impl AuditLog {
    /// Appends one entry with the next id, then applies the bounds.
    fn append(&mut self, event: &AuditEvent, retention: &AuditRetention, now_ms: u64) {
        // Ids as Redis stream ids: the time in ms, then a sequence within it.
        let id = if now_ms > self.last.0 {
            (now_ms, 0)
        } else {
            (self.last.0, self.last.1 + 1)
        };
        self.last = id;
        let entries = if event.is_refusal() {
            &mut self.refusals
        } else {
            &mut self.changes
        };
        entries.push_back(AuditEntry {
            id: format!("{}-{}", id.0, id.1),
            event: event.clone(),
        });
        let max = usize::try_from(retention.max_of(event)).unwrap_or(usize::MAX);
        while entries.len() > max {
            entries.pop_front();
        }
        // As in Redis: ids from the store's clock, the age bound from the event's time.
        let min_ms = u64::try_from(
            event
                .time
                .timestamp_millis()
                .saturating_sub(retention.max_age.num_milliseconds()),
        )
        .unwrap_or(0);
        for entries in [&mut self.changes, &mut self.refusals] {
            while entries
                .front()
                .and_then(|e| parse_entry_id(&e.id))
                .is_some_and(|(ms, _)| ms < min_ms)
            {
                entries.pop_front();
            }
        }
    }
}

impl Inner {
    /// Takes the seats and records of `snapshot` (not its position, clock or
    /// incident, which the callers decide).
    fn load(&mut self, snapshot: &Snapshot) {
        self.seats.clear();
        self.counts.clear();
        self.order.clear();
        for seat in &snapshot.seats {
            self.put(seat.clone());
        }
        self.license = snapshot.license.clone();
        self.tryout = snapshot.tryout.clone();
        self.reconcile = snapshot.reconcile.clone();
        self.initialization = snapshot.initialization.clone();
        self.retired_license = snapshot.retired_license.clone();
        self.leases.clear();
        for lease in &snapshot.leases {
            self.leases.put(lease.clone());
        }
    }

    /// Inserts or replaces a seat, keeping the counts and the order.
    fn put(&mut self, seat: Seat) {
        *self.counts.entry((seat.feature, seat.source)).or_default() += 1;
        if let Some(old) = self
            .seats
            .insert((seat.feature, seat.user_id.clone()), seat.clone())
        {
            self.uncount(old.feature, old.source);
            if old.source == SeatSource::Purchased
                && let Some(order) = self.order.get_mut(&old.feature)
            {
                order.remove(&old);
            }
        }
        if seat.source == SeatSource::Purchased {
            self.order.entry(seat.feature).or_default().insert(&seat);
        }
    }

    /// Removes a seat; `false` when there was none.
    fn remove(&mut self, feature: Feature, user: &UserId) -> bool {
        match self.seats.remove(&(feature, user.clone())) {
            Some(old) => {
                self.uncount(old.feature, old.source);
                if old.source == SeatSource::Purchased
                    && let Some(order) = self.order.get_mut(&old.feature)
                {
                    order.remove(&old);
                }
                true
            }
            None => false,
        }
    }

    /// Removes every seat.
    fn clear_seats(&mut self) {
        self.seats.clear();
        self.counts.clear();
        self.order.clear();
    }

    /// The purchased seats of `feature` whose flag must move so that exactly
    /// the (count - quantity) most recently assigned are flagged, an existing
    /// flag keeping its time: `domain::capacity::reflag`, without walking the
    /// pool while the flags are known to be its top.
    fn plan_flags(&self, feature: Feature, quantity: u32, now: DateTime<Utc>) -> Vec<Seat> {
        let Some(order) = self.order.get(&feature) else {
            return Vec::new();
        };
        let excess = order.seats.len().saturating_sub(quantity as usize);
        let seat = |key: &OrderKey| self.seats.get(&(feature, key.1.clone())).cloned();
        if !order.prefix {
            let pool: Vec<Seat> = order.seats.iter().filter_map(seat).collect();
            return reflag(&pool, quantity, now);
        }
        let flagged = order.flagged.len();
        if excess > flagged {
            // The next newest below the lowest flag are flagged.
            let below: Box<dyn Iterator<Item = &OrderKey>> = match order.flagged.first() {
                Some(low) => Box::new(order.seats.range(..low.clone()).rev()),
                None => Box::new(order.seats.iter().rev()),
            };
            below
                .take(excess - flagged)
                .filter_map(seat)
                .map(|s| Seat {
                    over_capacity_since: Some(now),
                    ..s
                })
                .collect()
        } else {
            // The oldest flags are cleared.
            order
                .flagged
                .iter()
                .take(flagged - excess)
                .filter_map(seat)
                .map(|s| Seat {
                    over_capacity_since: None,
                    ..s
                })
                .collect()
        }
    }

    fn uncount(&mut self, feature: Feature, source: SeatSource) {
        if let Some(c) = self.counts.get_mut(&(feature, source)) {
            *c = c.saturating_sub(1);
        }
    }
}

impl MemoryStore {
    /// A new, initialized, empty store.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let (version_tx, _) = watch::channel(0);
        Self {
            inner: Mutex::new(Inner {
                epoch: Some(new_epoch()),
                version: 0,
                seats: BTreeMap::new(),
                counts: HashMap::new(),
                order: HashMap::new(),
                license: None,
                tryout: None,
                reconcile: ReconcileStatus::default(),
                initialization: None,
                retired_license: None,
                high_water_ms: 0,
                incident: None,
                lease: None,
                leases: Leases::default(),
                usage: BTreeMap::new(),
                fence: 0,
                feed: VecDeque::new(),
            }),
            version_tx,
            clock,
            audit: Mutex::new(AuditLog::default()),
        }
    }

    /// Goes back to an earlier state of the same epoch, as a Redis restarted
    /// from an older snapshot does. For tests of the rollback repair.
    pub fn roll_back_to(&self, snapshot: &Snapshot) {
        let mut inner = self.inner.lock();
        let Some(position) = snapshot.position.clone() else {
            return;
        };
        inner.epoch = Some(position.epoch);
        inner.version = position.version;
        inner.load(snapshot);
        inner.incident = snapshot.incident.clone();
        let v = position.version;
        inner.feed.retain(|c| c.version <= v);
        drop(inner);
        self.version_tx.send_replace(v);
    }

    /// Loses all data, as a Redis restarted without persistence does. For tests
    /// of the repair path.
    pub fn wipe(&self) {
        let mut inner = self.inner.lock();
        inner.epoch = None;
        inner.version = 0;
        inner.clear_seats();
        inner.license = None;
        inner.tryout = None;
        inner.reconcile = ReconcileStatus::default();
        inner.initialization = None;
        inner.retired_license = None;
        inner.high_water_ms = 0;
        inner.incident = None;
        inner.lease = None;
        inner.leases.clear();
        inner.usage.clear();
        inner.feed.clear();
        drop(inner);
        self.version_tx.send_replace(0);
    }

    fn record(&self, inner: &mut Inner, kind: ChangeKind) -> Change {
        inner.version += 1;
        let change = Change {
            version: inner.version,
            kind,
        };
        inner.feed.push_back(change.clone());
        if inner.feed.len() > FEED_LEN {
            inner.feed.pop_front();
        }
        self.version_tx.send_replace(inner.version);
        change
    }

    /// Sets the over-capacity flags of a feature's purchased pool against
    /// `quantity`, recording a change per seat whose flag moved.
    fn reflag(&self, inner: &mut Inner, feature: Feature, quantity: u32) -> Vec<Change> {
        let moved = inner.plan_flags(feature, quantity, self.clock.now());
        let changes = moved
            .into_iter()
            .map(|seat| {
                inner.put(seat.clone());
                self.record(inner, ChangeKind::SeatFlagged(seat))
            })
            .collect();
        // The flags are now exactly the newest seats.
        if let Some(order) = inner.order.get_mut(&feature) {
            order.prefix = true;
        }
        changes
    }
}

pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[async_trait]
impl Store for MemoryStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let inner = self.inner.lock();
        Ok(Snapshot {
            position: inner.epoch.as_ref().map(|epoch| Position {
                epoch: epoch.clone(),
                version: inner.version,
            }),
            seats: inner.seats.values().cloned().collect(),
            license: inner.license.clone(),
            tryout: inner.tryout.clone(),
            reconcile: inner.reconcile.clone(),
            initialization: inner.initialization.clone(),
            retired_license: inner.retired_license.clone(),
            high_water_ms: inner.high_water_ms,
            incident: inner.incident.clone(),
            leases: {
                let mut leases: Vec<Lease> = inner.leases.records.values().cloned().collect();
                leases.sort_by(|a, b| a.key().cmp(&b.key()));
                leases
            },
            corrupt: Vec::new(),
        })
    }

    async fn changes(&self, since: &Position, wait: Duration) -> Result<Changes, StoreError> {
        let mut rx = self.version_tx.subscribe();
        rx.mark_unchanged();
        for attempt in 0..2 {
            {
                let inner = self.inner.lock();
                if inner.epoch.as_deref() != Some(since.epoch.as_str())
                    || since.version > inner.version
                {
                    return Ok(Changes::Resync);
                }
                if since.version < inner.version {
                    let first = inner.feed.front().map_or(u64::MAX, |c| c.version);
                    if first > since.version + 1 {
                        return Ok(Changes::Resync);
                    }
                    let events = inner
                        .feed
                        .iter()
                        .filter(|c| c.version > since.version)
                        .cloned()
                        .collect();
                    return Ok(Changes::Events(events));
                }
            }
            if attempt == 0 {
                // Nothing new yet: wait for the version to move, or time out.
                let _ = tokio::time::timeout(wait, rx.changed()).await;
            }
        }
        Ok(Changes::Events(Vec::new()))
    }

    async fn assign_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        plan: &AssignPlan,
    ) -> Result<AssignOutcome, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        let key = (feature, user.clone());
        let existing = inner.seats.get(&key).cloned();
        match (&existing, plan) {
            (Some(seat), _) if seat.source == SeatSource::Purchased => {
                return Ok(AssignOutcome::Existing {
                    seat: seat.clone(),
                    version: inner.version,
                });
            }
            (Some(seat), AssignPlan::Tryout { .. }) => {
                return Ok(AssignOutcome::Existing {
                    seat: seat.clone(),
                    version: inner.version,
                });
            }
            _ => {}
        }
        if let AssignPlan::Purchased { license_id, .. } = plan
            && inner.license.as_ref().map(|l| l.id()) != Some(license_id.as_str())
        {
            return Ok(AssignOutcome::LicenseChanged);
        }
        let source = plan.source();
        let in_use = inner.counts.get(&(feature, source)).copied().unwrap_or(0);
        if in_use >= plan.capacity() {
            return Ok(AssignOutcome::Exhausted {
                capacity: plan.capacity(),
                in_use,
            });
        }
        let seat = Seat {
            user_id: user.clone(),
            feature,
            source,
            assigned_at: self.clock.now(),
            over_capacity_since: None,
        };
        inner.put(seat.clone());
        Ok(AssignOutcome::Created(
            self.record(&mut inner, ChangeKind::SeatAssigned(seat)),
        ))
    }

    async fn release_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        capacity: Option<(u32, &str)>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        if let Some((_, license_id)) = capacity
            && inner.license.as_ref().map(StoredLicense::id) != Some(license_id)
        {
            return Err(StoreError::Moved);
        }
        if !inner.remove(feature, user) {
            return Ok(ReleaseOutcome::NotHeld {
                version: inner.version,
            });
        }
        let kind = ChangeKind::SeatReleased {
            feature,
            user_id: user.clone(),
        };
        let mut changes = vec![self.record(&mut inner, kind)];
        if let Some((quantity, _)) = capacity {
            changes.extend(self.reflag(&mut inner, feature, quantity));
        }
        Ok(ReleaseOutcome::Released(changes))
    }

    async fn list_seats(
        &self,
        feature: Option<Feature>,
        after: Option<&SeatKey>,
        limit: usize,
    ) -> Result<Vec<Seat>, StoreError> {
        use std::ops::Bound;
        let inner = self.inner.lock();
        let start = match after {
            Some(k) => Bound::Excluded((k.feature, k.user_id.clone())),
            None => Bound::Unbounded,
        };
        Ok(inner
            .seats
            .range((start, Bound::Unbounded))
            .map(|(_, s)| s)
            .filter(|s| feature.is_none_or(|f| s.feature == f))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn acquire_seat_lease(
        &self,
        floor: Floor<'_>,
        r: LeaseAcquire<'_>,
    ) -> Result<AcquireOutcome, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        if inner.license.as_ref().map(StoredLicense::id) != Some(r.plan.license_id.as_str()) {
            return Ok(AcquireOutcome::LicenseChanged);
        }
        let now = self.clock.now();
        let now_ms = now.timestamp_millis();
        let expires_at = now + chrono::Duration::from_std(r.duration).unwrap_or_default();
        let key = (r.feature, r.user.clone(), r.holder.clone());
        let own = inner
            .leases
            .ids
            .get(&key)
            .and_then(|id| inner.leases.records.get(id))
            .filter(|l| l.is_live(now))
            .cloned();
        let live = u32::try_from(inner.leases.live(r.feature, now_ms)).unwrap_or(u32::MAX);
        if own.is_none() && live >= r.plan.capacity {
            inner
                .usage
                .entry((r.feature, day_of(now_ms)))
                .or_default()
                .1 += 1;
            return Ok(AcquireOutcome::Exhausted {
                capacity: r.plan.capacity,
                in_use: live,
            });
        }
        let reclaimed = inner.leases.reclaim(r.feature, now_ms);
        let created = own.is_none();
        let lease = match own {
            Some(l) => Lease { expires_at, ..l },
            None => Lease {
                lease_id: r.new_id.to_owned(),
                user_id: r.user.clone(),
                feature: r.feature,
                holder: r.holder.clone(),
                acquired_at: now,
                expires_at,
            },
        };
        inner.leases.put(lease.clone());
        let in_use = u32::try_from(inner.leases.live(r.feature, now_ms)).unwrap_or(u32::MAX);
        let day = day_of(now_ms);
        let peak = &mut inner.usage.entry((r.feature, day)).or_default().0;
        *peak = (*peak).max(in_use);
        inner.usage.retain(|(_, d), _| *d > day - USAGE_DAYS);
        let change = self.record(&mut inner, ChangeKind::LeaseAcquired { lease, reclaimed });
        Ok(AcquireOutcome::Acquired {
            change,
            created,
            in_use,
        })
    }

    async fn renew_seat_leases(
        &self,
        floor: Floor<'_>,
        holder: &Holder,
        lease_ids: &[String],
        duration: Duration,
    ) -> Result<RenewOutcome, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        let now = self.clock.now();
        let expires_at = now + chrono::Duration::from_std(duration).unwrap_or_default();
        let mut leases = Vec::new();
        let mut lost = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in lease_ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            match inner.leases.records.get(id) {
                Some(l) if l.holder == *holder && l.is_live(now) => {
                    let renewed = Lease {
                        expires_at,
                        ..l.clone()
                    };
                    inner.leases.put(renewed.clone());
                    leases.push(renewed);
                }
                _ => lost.push(id.clone()),
            }
        }
        if leases.is_empty() {
            return Ok(RenewOutcome {
                leases,
                lost,
                changes: Vec::new(),
                version: inner.version,
            });
        }
        let kind = ChangeKind::LeasesRenewed {
            holder: holder.clone(),
            lease_ids: leases.iter().map(|l| l.lease_id.clone()).collect(),
            expires_at,
        };
        let change = self.record(&mut inner, kind);
        Ok(RenewOutcome {
            leases,
            lost,
            version: change.version,
            changes: vec![change],
        })
    }

    async fn release_seat_lease(
        &self,
        floor: Floor<'_>,
        lease_id: &str,
    ) -> Result<LeaseReleaseOutcome, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        if inner.leases.remove(lease_id).is_none() {
            return Ok(LeaseReleaseOutcome::NotHeld {
                version: inner.version,
            });
        }
        let kind = ChangeKind::LeaseReleased {
            lease_id: lease_id.to_owned(),
        };
        Ok(LeaseReleaseOutcome::Released(self.record(&mut inner, kind)))
    }

    async fn list_seat_leases(&self, feature: Option<Feature>) -> Result<Vec<Lease>, StoreError> {
        let inner = self.inner.lock();
        let now = self.clock.now();
        let mut leases: Vec<Lease> = inner
            .leases
            .records
            .values()
            .filter(|l| feature.is_none_or(|f| l.feature == f) && l.is_live(now))
            .cloned()
            .collect();
        leases.sort_by(|a, b| a.key().cmp(&b.key()));
        Ok(leases)
    }

    async fn lease_usage(&self, since_day: i64) -> Result<Vec<LeaseUsage>, StoreError> {
        let inner = self.inner.lock();
        Ok(inner
            .usage
            .iter()
            .filter(|((_, day), _)| *day >= since_day)
            .map(|((feature, day), (peak, busy))| LeaseUsage {
                feature: *feature,
                day: *day,
                peak: *peak,
                busy: *busy,
            })
            .collect())
    }

    async fn compare_and_set_tryout(
        &self,
        floor: Floor<'_>,
        expected: Option<&TryoutRecord>,
        new: &TryoutRecord,
    ) -> Result<Option<Change>, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        if inner.tryout.as_ref() != expected {
            return Ok(None);
        }
        inner.tryout = Some(new.clone());
        Ok(Some(self.record(
            &mut inner,
            ChangeKind::TryoutChanged(new.clone()),
        )))
    }

    async fn apply_license(
        &self,
        floor: Floor<'_>,
        w: LicenseWrite<'_>,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        if inner.license.as_ref().map(StoredLicense::id) != w.expected_id {
            return Ok(None);
        }
        if let Some((expected, _)) = w.tryout
            && inner.tryout.as_ref() != expected
        {
            return Ok(None);
        }
        if let Some(pending) = w.consume_initialization
            && inner.initialization.as_ref() != Some(pending)
        {
            return Ok(None);
        }
        if let Some(fence) = w.fence
            && inner.fence != fence
        {
            return Ok(None);
        }
        inner.license = Some(w.license.clone());
        let mut changes =
            vec![self.record(&mut inner, ChangeKind::LicenseApplied(w.license.clone()))];
        if let Some((_, new)) = w.tryout {
            inner.tryout = Some(new.clone());
            changes.push(self.record(&mut inner, ChangeKind::TryoutChanged(new.clone())));
        }
        if w.consume_initialization.is_some() {
            inner.initialization = None;
            changes.push(self.record(&mut inner, ChangeKind::InitializationConsumed));
        }
        for (feature, quantity) in w.capacities {
            changes.extend(self.reflag(&mut inner, *feature, *quantity));
        }
        Ok(Some(changes))
    }

    async fn set_initialization(
        &self,
        floor: Floor<'_>,
        pending: &PendingInitialization,
    ) -> Result<Change, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        inner.initialization = Some(pending.clone());
        Ok(self.record(
            &mut inner,
            ChangeKind::InitializationIssued(pending.clone()),
        ))
    }

    async fn reset(&self, floor: Floor<'_>) -> Result<Change, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        inner.clear_seats();
        inner.leases.clear();
        if let Some(license) = inner.license.take() {
            inner.retired_license = Some(license);
        }
        inner.reconcile = ReconcileStatus::default();
        inner.initialization = None;
        Ok(self.record(&mut inner, ChangeKind::Reset))
    }

    async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let mut inner = self.inner.lock();
        let now = std::time::Instant::now();
        if inner.lease.as_ref().is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        inner.fence += 1;
        inner.lease = Some((holder.to_owned(), now + ttl));
        Ok(Some(inner.fence))
    }

    async fn release_lease(&self, holder: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        if inner.lease.as_ref().is_some_and(|(h, _)| h == holder) {
            inner.lease = None;
        }
        Ok(())
    }

    async fn record_reconcile(
        &self,
        floor: Floor<'_>,
        status: &ReconcileStatus,
    ) -> Result<Change, StoreError> {
        let mut inner = self.inner.lock();
        guard(&inner, floor)?;
        inner.reconcile = status.clone();
        Ok(self.record(&mut inner, ChangeKind::ReconcileRecorded(status.clone())))
    }

    async fn restore(&self, from: &Snapshot) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        if inner.epoch.is_some() {
            return Ok(false);
        }
        inner.load(from);
        // As in Redis: the replica's mark, but never beyond the store's time.
        let now = self.clock.now().timestamp_millis();
        inner.high_water_ms = inner.high_water_ms.max(from.high_water_ms.min(now));
        inner.incident = None;
        inner.version = from.position.as_ref().map_or(0, |p| p.version);
        inner.epoch = Some(new_epoch());
        inner.feed.clear();
        self.version_tx.send_replace(inner.version);
        Ok(true)
    }

    async fn history(&self, after: u64) -> Result<Vec<Change>, StoreError> {
        let inner = self.inner.lock();
        Ok(inner
            .feed
            .iter()
            .filter(|c| c.version > after)
            .cloned()
            .collect())
    }

    async fn summary(&self, at: u64) -> Result<Summary, StoreError> {
        let inner = self.inner.lock();
        Ok(Summary {
            position: inner.epoch.clone().map(|epoch| Position {
                epoch,
                version: inner.version,
            }),
            seats: inner.seats.len() as u64,
            change_at: inner.feed.iter().find(|c| c.version == at).cloned(),
        })
    }

    async fn append_audit_batch(
        &self,
        events: &[AuditEvent],
        retention: &AuditRetention,
    ) -> Result<(), StoreError> {
        let now_ms = u64::try_from(self.clock.now().timestamp_millis()).unwrap_or(0);
        let mut audit = self.audit.lock();
        for event in events {
            audit.append(event, retention, now_ms);
        }
        Ok(())
    }

    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let before = match before {
            Some(id) => Some(
                parse_entry_id(id)
                    .ok_or_else(|| StoreError::Corrupt(format!("audit id {id:?}")))?,
            ),
            None => None,
        };
        let audit = self.audit.lock();
        let newer = |list: &VecDeque<AuditEntry>| -> Vec<AuditEntry> {
            list.iter()
                .rev()
                .filter(|e| before.is_none_or(|b| parse_entry_id(&e.id).is_some_and(|id| id < b)))
                .take(limit)
                .cloned()
                .collect()
        };
        Ok(merge_newest_first(
            newer(&audit.changes),
            newer(&audit.refusals),
            limit,
        ))
    }

    async fn repair(&self, w: &RepairWrite) -> Result<Option<Vec<Change>>, StoreError> {
        let mut inner = self.inner.lock();
        let at = inner.epoch.clone().map(|epoch| Position {
            epoch,
            version: inner.version,
        });
        if w.expected.is_none() || at != w.expected {
            return Ok(None);
        }
        inner.version = inner.version.max(w.version_floor);
        let mut changes = Vec::new();
        for seat in &w.add_seats {
            inner.put(seat.clone());
            changes.push(self.record(&mut inner, ChangeKind::SeatAssigned(seat.clone())));
        }
        for (feature, user) in &w.remove_seats {
            inner.remove(*feature, user);
            let kind = ChangeKind::SeatReleased {
                feature: *feature,
                user_id: user.clone(),
            };
            changes.push(self.record(&mut inner, kind));
        }
        for lease in &w.remove_leases {
            inner.leases.remove(&lease.lease_id);
            let kind = ChangeKind::LeaseReleased {
                lease_id: lease.lease_id.clone(),
            };
            changes.push(self.record(&mut inner, kind));
        }
        for lease in &w.add_leases {
            inner.leases.put(lease.clone());
            let kind = ChangeKind::LeaseAcquired {
                lease: lease.clone(),
                reclaimed: Vec::new(),
            };
            changes.push(self.record(&mut inner, kind));
        }
        if let Some(license) = &w.license {
            inner.license = Some(license.clone());
            changes.push(self.record(&mut inner, ChangeKind::LicenseApplied(license.clone())));
        }

        if let Some(tryout) = &w.tryout {
            inner.tryout = Some(tryout.clone());
            changes.push(self.record(&mut inner, ChangeKind::TryoutChanged(tryout.clone())));
        }
        if let Some(reconcile) = &w.reconcile {
            inner.reconcile = reconcile.clone();
            let kind = ChangeKind::ReconcileRecorded(reconcile.clone());
            changes.push(self.record(&mut inner, kind));
        }
        match &w.initialization {
            None => {}
            Some(None) => {
                inner.initialization = None;
                changes.push(self.record(&mut inner, ChangeKind::InitializationConsumed));
            }
            Some(Some(p)) => {
                inner.initialization = Some(p.clone());
                let kind = ChangeKind::InitializationIssued(p.clone());
                changes.push(self.record(&mut inner, kind));
            }
        }
        inner.incident = Some(w.incident.clone());
        changes.push(self.record(&mut inner, ChangeKind::Repaired(w.incident.clone())));
        Ok(Some(changes))
    }

    async fn advance_clock(&self, ms: i64) -> Result<ClockReading, StoreError> {
        // Embedded, there is no other clock to ask: this process's own clock is
        // the reference (what Redis `TIME` is for replicas sharing a Redis).
        let reference_ms = self.clock.now().timestamp_millis();
        let mut inner = self.inner.lock();
        inner.high_water_ms = inner.high_water_ms.max(ms.min(reference_ms));
        Ok(ClockReading {
            high_water_ms: inner.high_water_ms,
            reference_ms,
        })
    }

    fn describe(&self) -> String {
        "embedded in-memory store (state is lost on restart)".to_owned()
    }
}

/// Refuses a write on a store without epoch, or one that went back behind the
/// writer's floor (as the Lua prelude does).
fn guard(inner: &Inner, floor: Floor<'_>) -> Result<(), StoreError> {
    let Some(epoch) = inner.epoch.as_ref() else {
        return Err(StoreError::NotInitialized);
    };
    match floor {
        Some(floor) if floor.epoch != *epoch || inner.version < floor.version => {
            Err(StoreError::Moved)
        }
        _ => Ok(()),
    }
}
