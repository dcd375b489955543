//! Each replica's in-memory copy of the store: seats, the verified license, the
//! tryout record and the reconcile status. `CheckSeat` and the overviews answer
//! from it, so the hot path never waits for Redis and keeps answering (flagged
//! `stale`) while Redis is unreachable.
//!
//! A background task keeps it current: read a snapshot, then follow the store's
//! change feed in version order; resynchronise on any gap, on another epoch, and
//! every `resync_interval` as a safety net. When the store has lost its data (no
//! epoch), the task writes this replica's last known state back (`Store::restore`)
//! before writes are accepted again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use ed25519_dalek::VerifyingKey;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AppliedLicense, Clock, Edition, Feature, ReconcileStatus, Seat, SeatSource, SerialNumber,
    TryoutRecord, UserId,
};
use crate::events::EventHub;
use crate::store::{
    Change, ChangeKind, Changes, Position, Snapshot, Store, StoreError, StoredLicense,
};

/// How the mirror follows the store.
#[derive(Debug, Clone, Copy)]
pub struct MirrorConfig {
    /// Past this long without a successful contact, answers are flagged stale.
    pub stale_after: Duration,
    /// A full resynchronisation at least this often, whatever the feed says.
    pub resync_interval: Duration,
    /// How long one feed read waits for news (also the heartbeat period).
    pub feed_wait: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(2),
            resync_interval: Duration::from_secs(30),
            feed_wait: Duration::from_millis(500),
        }
    }
}

/// What verifies license documents read back from the store.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub key: Option<VerifyingKey>,
    pub serial: SerialNumber,
    pub edition: Edition,
}

impl Verifier {
    /// Trusts a stored document only if it verifies again.
    pub fn verify(&self, stored: &StoredLicense) -> Result<AppliedLicense, String> {
        let key = self
            .key
            .as_ref()
            .ok_or("no vendor_public_key configured: stored license cannot be verified")?;
        let payload = stored
            .signed
            .verify(key, &self.serial, self.edition)
            .map_err(|e| e.to_string())?;
        Ok(AppliedLicense {
            signed: stored.signed.clone(),
            payload,
            applied_at: stored.applied_at,
        })
    }
}

/// A seat as the mirror keeps it: small, because a replica holds every seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorSeat {
    pub source: SeatSource,
    pub assigned_at_ms: i64,
    pub over_capacity_since_ms: Option<i64>,
}

impl MirrorSeat {
    fn from_seat(seat: &Seat) -> Self {
        Self {
            source: seat.source,
            assigned_at_ms: seat.assigned_at.timestamp_millis(),
            over_capacity_since_ms: seat.over_capacity_since.map(|t| t.timestamp_millis()),
        }
    }

    pub fn to_seat(self, user_id: UserId, feature: Feature) -> Seat {
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        Seat {
            user_id,
            feature,
            source: self.source,
            assigned_at: at(self.assigned_at_ms),
            over_capacity_since: self.over_capacity_since_ms.map(at),
        }
    }
}

/// The mirrored state.
#[derive(Debug, Default)]
pub struct MirrorState {
    /// Where in the store's history this copy is; `None` before the first sync.
    pub position: Option<Position>,
    /// Seats by feature, then user id (O(1) lookups on the hot path).
    seats: HashMap<Feature, HashMap<Box<str>, MirrorSeat>>,
    /// Seats held per (feature, source).
    counts: HashMap<(Feature, SeatSource), u32>,
    /// The stored document, trusted or not (kept for repair).
    pub stored_license: Option<StoredLicense>,
    /// The stored document after it verified again.
    pub license: Option<AppliedLicense>,
    /// Why the stored document is not trusted, if it is not.
    pub license_problem: Option<String>,
    pub tryout: Option<TryoutRecord>,
    pub reconcile: ReconcileStatus,
    /// The initialization this PBX last issued and nobody used yet.
    pub initialization: Option<PendingInitialization>,
}

impl MirrorState {
    pub fn seat(&self, feature: Feature, user_id: &str) -> Option<MirrorSeat> {
        self.seats.get(&feature)?.get(user_id).copied()
    }

    pub fn count(&self, feature: Feature, source: SeatSource) -> u32 {
        self.counts.get(&(feature, source)).copied().unwrap_or(0)
    }

    /// The seats of `feature` flagged over capacity, and the earliest instant one
    /// was flagged (its over-capacity grace ends first).
    pub fn over_capacity(&self, feature: Feature) -> (u32, Option<i64>) {
        self.seats.get(&feature).map_or((0, None), |users| {
            users
                .values()
                .filter_map(|s| s.over_capacity_since_ms)
                .fold((0, None), |(n, first): (u32, Option<i64>), since| {
                    (n + 1, Some(first.map_or(since, |f| f.min(since))))
                })
        })
    }

    pub fn seat_total(&self) -> usize {
        self.seats.values().map(HashMap::len).sum()
    }

    fn put_seat(&mut self, seat: &Seat) {
        let new = MirrorSeat::from_seat(seat);
        let old = self
            .seats
            .entry(seat.feature)
            .or_default()
            .insert(seat.user_id.as_str().into(), new);
        if let Some(old) = old {
            self.decrement(seat.feature, old.source);
        }
        *self.counts.entry((seat.feature, new.source)).or_default() += 1;
    }

    fn remove_seat(&mut self, feature: Feature, user_id: &str) {
        if let Some(old) = self.seats.get_mut(&feature).and_then(|m| m.remove(user_id)) {
            self.decrement(feature, old.source);
        }
    }

    fn decrement(&mut self, feature: Feature, source: SeatSource) {
        if let Some(c) = self.counts.get_mut(&(feature, source)) {
            *c = c.saturating_sub(1);
        }
    }

    fn set_license(&mut self, stored: Option<StoredLicense>, verifier: &Verifier) {
        match stored.as_ref().map(|s| verifier.verify(s)) {
            None => {
                self.license = None;
                self.license_problem = None;
            }
            Some(Ok(applied)) => {
                self.license = Some(applied);
                self.license_problem = None;
            }
            Some(Err(problem)) => {
                tracing::error!(%problem, "stored license document is not trusted; its seats are not licensed");
                self.license = None;
                self.license_problem = Some(problem);
            }
        }
        self.stored_license = stored;
    }

    /// Everything as a snapshot, for repairing a store that lost its data.
    pub fn to_snapshot(&self) -> Snapshot {
        let mut seats = Vec::with_capacity(self.seat_total());
        for (feature, users) in &self.seats {
            for (user, seat) in users {
                if let Ok(user_id) = UserId::parse(user) {
                    seats.push(seat.to_seat(user_id, *feature));
                }
            }
        }
        Snapshot {
            position: self.position.clone(),
            seats,
            license: self.stored_license.clone(),
            tryout: self.tryout.clone(),
            reconcile: self.reconcile.clone(),
            initialization: self.initialization.clone(),
        }
    }

    fn load(snapshot: Snapshot, verifier: &Verifier) -> Self {
        let mut state = MirrorState {
            position: snapshot.position,
            tryout: snapshot.tryout,
            reconcile: snapshot.reconcile,
            initialization: snapshot.initialization,
            ..Default::default()
        };
        for seat in &snapshot.seats {
            state.put_seat(seat);
        }
        state.set_license(snapshot.license, verifier);
        state
    }

    /// Applies one change if it is the next one; `Gap` when it is not.
    fn apply(&mut self, change: &Change, verifier: &Verifier) -> Applied {
        let Some(position) = self.position.as_mut() else {
            return Applied::Gap;
        };
        if change.version <= position.version {
            return Applied::Already; // a local write the feed repeats
        }
        if change.version != position.version + 1 {
            return Applied::Gap;
        }
        position.version = change.version;
        match &change.kind {
            ChangeKind::SeatAssigned(seat) | ChangeKind::SeatFlagged(seat) => self.put_seat(seat),
            ChangeKind::SeatReleased { feature, user_id } => {
                self.remove_seat(*feature, user_id.as_str())
            }
            ChangeKind::LicenseApplied(stored) => self.set_license(Some(stored.clone()), verifier),
            ChangeKind::TryoutChanged(record) => self.tryout = Some(record.clone()),
            ChangeKind::ReconcileRecorded(status) => self.reconcile = status.clone(),
            ChangeKind::InitializationIssued(p) => self.initialization = Some(p.clone()),
            ChangeKind::InitializationConsumed => self.initialization = None,
            ChangeKind::Reset => {
                self.seats.clear();
                self.counts.clear();
                self.set_license(None, verifier);
                self.reconcile = ReconcileStatus::default();
                self.initialization = None;
            }
        }
        Applied::Now
    }
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Now,
    Already,
    Gap,
}

impl Applied {
    fn in_order(self) -> bool {
        self != Applied::Gap
    }
}

/// A replica's mirror, shared by the request handlers and its sync task.
pub struct Mirror {
    // Read on every CheckSeat, written by the sync task and after local writes;
    // never held across an await.
    state: RwLock<MirrorState>,
    verifier: Verifier,
    config: MirrorConfig,
    // Whether the last contact with the store succeeded.
    connected: AtomicBool,
    // When the store last answered; drives `stale`.
    last_contact: Mutex<Option<Instant>>,
    // The version the copy has reached, for writers waiting to read their own write.
    version_tx: watch::Sender<u64>,
    // Where the changes this replica learns go out as events.
    events: EventHub,
    // Stamps events (injected, like every clock here).
    clock: Arc<dyn Clock>,
    // When this never-synced replica first found the store empty.
    empty_store_since: Mutex<Option<Instant>>,
}

impl Mirror {
    pub fn new(verifier: Verifier, config: MirrorConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            state: RwLock::new(MirrorState::default()),
            verifier,
            config,
            connected: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            version_tx: watch::channel(0).0,
            events: EventHub::default(),
            clock,
            empty_store_since: Mutex::new(None),
        }
    }

    /// Reads the state (never across an await).
    pub fn read<T>(&self, f: impl FnOnce(&MirrorState) -> T) -> T {
        f(&self.state.read())
    }

    /// True when answers come from a copy that may be out of date: the store did
    /// not answer lately, or the first sync has not happened.
    pub fn is_stale(&self) -> bool {
        if !self.connected.load(Ordering::Relaxed) {
            return true;
        }
        self.last_contact
            .lock()
            .is_none_or(|t| t.elapsed() > self.config.stale_after)
    }

    /// Seconds since the store last answered (for metrics); `None` before that.
    pub fn seconds_since_contact(&self) -> Option<f64> {
        self.last_contact.lock().map(|t| t.elapsed().as_secs_f64())
    }

    fn contact(&self, ok: bool) {
        let was = self.connected.swap(ok, Ordering::Relaxed);
        if ok {
            *self.last_contact.lock() = Some(Instant::now());
            if !was {
                tracing::info!("seat store reachable; mirror following it");
            }
        } else if was {
            tracing::warn!("seat store unreachable; answering CheckSeat from last known state");
        }
    }

    /// Applies the change a local write made, so this replica reads its own writes
    /// at once. When the copy is behind (earlier writes of other replicas not yet
    /// applied), waits up to `feed_wait` for the feed to bring it up to that write.
    pub async fn apply_local(&self, change: &Change) {
        let applied = {
            let mut state = self.state.write();
            let applied = self.apply(&mut state, change);
            self.publish_version(&state);
            applied
        };
        if !applied.in_order() {
            let mut rx = self.version_tx.subscribe();
            let reached =
                tokio::time::timeout(self.config.feed_wait, rx.wait_for(|v| *v >= change.version))
                    .await;
            if reached.is_err() {
                tracing::debug!(
                    version = change.version,
                    "mirror did not reach a local write in time"
                );
            }
        }
    }

    /// The events of the changes this replica learns.
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// Applies a change and announces it when it is new here.
    fn apply(&self, state: &mut MirrorState, change: &Change) -> Applied {
        let applied = state.apply(change, &self.verifier);
        if applied == Applied::Now
            && let Some(event) = crate::events::from_change(&change.kind, self.clock.now())
        {
            self.events.publish(event);
        }
        applied
    }

    fn publish_version(&self, state: &MirrorState) {
        let version = state.position.as_ref().map_or(0, |p| p.version);
        self.version_tx.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
    }

    /// Replaces the copy with a snapshot, unless the copy is already further along
    /// in the same epoch (local writes applied after the snapshot was read).
    fn install(&self, snapshot: Snapshot) {
        let loaded = MirrorState::load(snapshot, &self.verifier);
        let mut state = self.state.write();
        let older = match (&state.position, &loaded.position) {
            (Some(have), Some(got)) => have.epoch == got.epoch && got.version < have.version,
            _ => false,
        };
        if !older {
            let skipped = match (&state.position, &loaded.position) {
                (Some(have), Some(got)) => have.epoch != got.epoch || have.version != got.version,
                (None, _) => false,
                (Some(_), None) => true,
            };
            *state = loaded;
            if skipped {
                // Changes were not seen one by one: subscribers should re-read.
                self.events
                    .publish(crate::events::LicenseEvent::new("resync", self.clock.now()));
            }
        }
        self.publish_version(&state);
    }

    /// Whether a replica that never synced may initialize an empty store: only
    /// after the store has stayed empty for two feed periods (the time replicas
    /// holding data need to notice and restore it).
    fn may_initialize(&self) -> bool {
        let mut since = self.empty_store_since.lock();
        let first = *since.get_or_insert_with(Instant::now);
        first.elapsed() >= self.config.feed_wait * 2
    }

    /// Reads a fresh snapshot now (after a write found the copy out of date).
    pub async fn resync_now(&self, store: &dyn Store) -> Result<(), StoreError> {
        let result = self.resync(store).await;
        self.contact(result.is_ok());
        result
    }

    async fn resync(&self, store: &dyn Store) -> Result<(), StoreError> {
        let snapshot = store.snapshot().await?;
        if snapshot.position.is_none() {
            // The store lost its data (or is new): write back what this replica
            // knows, then read again. Another replica may win the race; fine.
            let ours = self.state.read().to_snapshot();
            if ours.position.is_none() && !self.may_initialize() {
                // This replica knows nothing yet: give replicas that hold the
                // seats time to restore them first, so an empty copy never wins.
                return Err(StoreError::NotInitialized);
            }
            let seats = ours.seats.len();
            if store.restore(&ours).await? {
                if ours.position.is_some() {
                    tracing::warn!(
                        seats,
                        "seat store had lost its data; restored it from this replica's last known state"
                    );
                } else {
                    tracing::info!("seat store initialized");
                }
            }
            let snapshot = store.snapshot().await?;
            if snapshot.position.is_none() {
                return Err(StoreError::NotInitialized);
            }
            self.install(snapshot);
            return Ok(());
        }
        self.install(snapshot);
        Ok(())
    }

    /// Follows the store until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        let mut need_resync = true;
        let mut last_resync = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            if last_resync.elapsed() >= self.config.resync_interval {
                need_resync = true;
            }
            let step = async {
                if need_resync {
                    // After a full read, follow the feed.
                    self.resync(store.as_ref()).await.map(|()| false)
                } else {
                    let position = self.state.read().position.clone();
                    let Some(position) = position else {
                        return Ok(true);
                    };
                    match store.changes(&position, self.config.feed_wait).await? {
                        Changes::Events(events) => {
                            let mut state = self.state.write();
                            let in_order =
                                events.iter().all(|c| self.apply(&mut state, c).in_order());
                            self.publish_version(&state);
                            Ok(!in_order)
                        }
                        Changes::Resync => Ok(true),
                    }
                }
            };
            let outcome = tokio::select! {
                outcome = step => outcome,
                () = &mut shutdown => return,
            };
            match outcome {
                Ok(resync_next) => {
                    if need_resync {
                        last_resync = Instant::now();
                    }
                    need_resync = resync_next;
                    backoff = Duration::from_millis(50);
                    self.contact(true);
                }
                Err(error) => {
                    if self.connected.load(Ordering::Relaxed) {
                        tracing::warn!(%error, "mirror lost the seat store");
                    }
                    self.contact(false);
                    // Resync after an outage: the feed may have moved on without us.
                    need_resync = true;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
