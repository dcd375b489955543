//! Each replica's in-memory copy of the store: seats, the verified license, the
//! tryout record and the reconcile status. `CheckSeat` and the overviews answer
//! from it, so the hot path never waits for Redis and keeps answering (flagged
//! `stale`) while Redis is unreachable.
//!
//! A background task keeps it current: read a snapshot, then follow the store's
//! change feed in version order; resynchronise on any gap, on another epoch, and
//! every `resync_interval` as a safety net.
//!
//! Every resynchronisation first checks that the store still holds this
//! replica's history: the same epoch, at least the version this copy reached, and
//! the same write at that version. When it does not (the store lost its data, went
//! back to an older snapshot, failed over to a lagging replica, or was re-created
//! by another replica), the task writes back what the store lost and this replica
//! holds (`repair`), reports what it could not, and only then follows the
//! store again. Until then the store refuses this replica's writes (its floor).

pub mod repair;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use ed25519_dalek::VerifyingKey;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AppliedLicense, Clock, Edition, Feature, LicenseState, ReconcileStatus, Seat, SeatSource,
    SerialNumber, TryoutPolicy, TryoutRecord, UserId,
};
use crate::events::EventHub;
use crate::store::{
    Change, ChangeKind, Changes, Incident, Position, Snapshot, Store, StoreError, StoredLicense,
};

/// How many applied changes a replica remembers, to know what a store that went
/// back lost (about 100 bytes each).
const JOURNAL_LEN: usize = 10_000;

/// How often a resynchronisation re-reads and re-plans when the store moves
/// under a repair.
const REPAIR_ATTEMPTS: usize = 5;

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
    /// The license a re-setup removed, when it verified (older documents stay refused).
    pub retired_license: Option<StoredLicense>,
    pub retired_issued_at: Option<chrono::DateTime<Utc>>,
    /// The last repair of lost data.
    pub incident: Option<Incident>,
    /// Corrupt records skipped in the last snapshot.
    pub corrupt_records: usize,
    /// The high-water clock (ms): the largest time seen, here or in the store.
    pub high_water_ms: i64,
    /// The changes applied since the last snapshot, in order (bounded).
    journal: VecDeque<Change>,
    /// Loaded from the state file, not (yet) from the store: it serves reads
    /// only, is never written back to the store and never plans a repair.
    pub from_disk: bool,
}

impl MirrorState {
    pub fn seat(&self, feature: Feature, user_id: &str) -> Option<MirrorSeat> {
        self.seats.get(&feature)?.get(user_id).copied()
    }

    /// What the seat decision reads of this copy (`domain::decision`).
    pub fn license_state(&self) -> LicenseState<'_> {
        LicenseState {
            license: self.license.as_ref(),
            tryout: self.tryout.as_ref(),
            reconcile: &self.reconcile,
        }
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

    /// Whether there is anything to answer from: a snapshot of the store, or
    /// the state file.
    pub fn has_state(&self) -> bool {
        self.position.is_some() || self.from_disk
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
            retired_license: self.retired_license.clone(),
            high_water_ms: self.high_water_ms,
            incident: None,
            corrupt: Vec::new(),
        }
    }

    /// The later of `node_now` and the high-water clock: time-based decisions
    /// never go back with a clock that does.
    pub fn now(&self, node_now: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
        // The common case (the node clock at or past the high-water mark) costs
        // one comparison on the hot path.
        if node_now.timestamp_millis() >= self.high_water_ms {
            return node_now;
        }
        Utc.timestamp_millis_opt(self.high_water_ms)
            .single()
            .unwrap_or(node_now)
    }

    fn load(snapshot: Snapshot, verifier: &Verifier) -> Self {
        let retired_issued_at = snapshot
            .retired_license
            .as_ref()
            .and_then(|l| verifier.verify(l).ok())
            .map(|l| l.payload.issued_at);
        let mut state = MirrorState {
            position: snapshot.position,
            tryout: snapshot.tryout,
            reconcile: snapshot.reconcile,
            initialization: snapshot.initialization,
            retired_license: snapshot.retired_license,
            retired_issued_at,
            incident: snapshot.incident,
            corrupt_records: snapshot.corrupt.len(),
            high_water_ms: snapshot.high_water_ms,
            ..Default::default()
        };
        for seat in &snapshot.seats {
            state.put_seat(seat);
        }
        state.set_license(snapshot.license, verifier);
        state
    }

    /// The newest issued_at of a license this PBX applied, current or retired by
    /// a re-setup: an older document is never applied.
    pub fn newest_license_issued_at(&self) -> Option<chrono::DateTime<Utc>> {
        let current = self.license.as_ref().map(|l| l.payload.issued_at);
        current.max(self.retired_issued_at)
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
        if self.journal.len() >= JOURNAL_LEN {
            self.journal.pop_front();
        }
        self.journal.push_back(change.clone());
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
            ChangeKind::Repaired(incident) => self.incident = Some(incident.clone()),
            ChangeKind::Reset => {
                self.seats.clear();
                self.counts.clear();
                if self.stored_license.is_some() {
                    self.retired_license = self.stored_license.clone();
                    self.retired_issued_at = self.license.as_ref().map(|l| l.payload.issued_at);
                }
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

/// Where the copy's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSource {
    /// A snapshot of the store (and its feed since).
    Store,
    /// The state file: the last state known before this process started.
    Disk,
    /// Nothing: the store was not reached since start and no state file was
    /// loaded. Nothing can be answered definitely.
    None,
}

impl StateSource {
    pub const ALL: [StateSource; 3] = [StateSource::Store, StateSource::Disk, StateSource::None];

    pub fn as_str(self) -> &'static str {
        match self {
            StateSource::Store => "store",
            StateSource::Disk => "disk",
            StateSource::None => "none",
        }
    }

    fn of(state: &MirrorState) -> Self {
        if state.position.is_some() {
            StateSource::Store
        } else if state.from_disk {
            StateSource::Disk
        } else {
            StateSource::None
        }
    }
}

/// A replica's mirror, shared by the request handlers and its sync task.
pub struct Mirror {
    // Read on every CheckSeat, written by the sync task and after local writes;
    // never held across an await.
    state: RwLock<MirrorState>,
    verifier: Verifier,
    config: MirrorConfig,
    // The tryout's seats, for the capacity of restored tryout seats.
    tryout: TryoutPolicy,
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
    // On-demand resyncs run one at a time. Held while one runs; holds the
    // generation and result of the last one that finished, which callers that
    // asked before it started share (single flight).
    resync_flight: tokio::sync::Mutex<(u64, Result<(), StoreError>)>,
    // On-demand resyncs started; the generation of the newest one.
    resyncs_started: AtomicU64,
    // The store this mirror follows (set by `run`): it learns the writer's floor.
    store: OnceLock<Arc<dyn Store>>,
    // Where the state comes from; health follows it (NOT_SERVING while `None`).
    source_tx: watch::Sender<StateSource>,
    // The last error reaching the store, and why no state file was loaded: the
    // message of a NO_STATE_YET answer.
    last_error: Mutex<Option<String>>,
    disk_problem: Mutex<Option<String>>,
}

/// How the store relates to this replica's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lineage {
    /// The store holds everything this copy saw (or the copy saw nothing yet).
    Extends,
    /// The store lost some of it: from the point both share (`common`, `None`:
    /// unknown), after this copy had reached `from`.
    Lost { common: Option<u64>, from: u64 },
}

impl Mirror {
    pub fn new(verifier: Verifier, config: MirrorConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            state: RwLock::new(MirrorState::default()),
            verifier,
            config,
            tryout: TryoutPolicy::default(),
            connected: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            version_tx: watch::channel(0).0,
            events: EventHub::default(),
            clock,
            resync_flight: tokio::sync::Mutex::new((0, Ok(()))),
            resyncs_started: AtomicU64::new(0),
            store: OnceLock::new(),
            source_tx: watch::channel(StateSource::None).0,
            last_error: Mutex::new(None),
            disk_problem: Mutex::new(Some("state_dir not set".into())),
        }
    }

    /// Answers from the last known state of the state file until the store is
    /// reached (only before the first snapshot; a copy from the store wins).
    pub fn load_disk(&self, snapshot: Snapshot) {
        let mut state = self.state.write();
        if state.position.is_some() {
            return;
        }
        *state = MirrorState::load(snapshot, &self.verifier);
        state.position = None;
        state.from_disk = true;
        *self.disk_problem.lock() = None;
        self.publish_source(&state);
    }

    /// Why no state file was loaded (part of the NO_STATE_YET message).
    pub fn set_disk_problem(&self, problem: String) {
        *self.disk_problem.lock() = Some(problem);
    }

    /// Where the state comes from now.
    pub fn source(&self) -> StateSource {
        *self.source_tx.borrow()
    }

    /// Follows [`Mirror::source`].
    pub fn source_watch(&self) -> watch::Receiver<StateSource> {
        self.source_tx.subscribe()
    }

    /// Follows the version the copy reached (it moves with every change).
    pub fn version_watch(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// Why there is no state: the store not reached since start (and its last
    /// error), and why no state file was loaded.
    pub fn why_no_state(&self) -> String {
        let store = self
            .last_error
            .lock()
            .clone()
            .unwrap_or_else(|| "not answered yet".into());
        let disk = self
            .disk_problem
            .lock()
            .clone()
            .unwrap_or_else(|| "none".into());
        format!(
            "seat store unreachable since this replica started ({store}); no saved state ({disk})"
        )
    }

    fn publish_source(&self, state: &MirrorState) {
        let source = StateSource::of(state);
        self.source_tx.send_if_modified(|s| {
            let changed = *s != source;
            if changed && source == StateSource::Store && *s == StateSource::Disk {
                tracing::info!(
                    "seat store reached; its snapshot replaces the state from state_dir"
                );
            }
            *s = source;
            changed
        });
    }

    /// The tryout policy (seats of restored tryout seats fit within it).
    #[must_use]
    pub fn with_tryout(mut self, tryout: TryoutPolicy) -> Self {
        self.tryout = tryout;
        self
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

    /// Raises the high-water clock to `ms` (a time this replica or the store saw).
    pub fn raise_high_water(&self, ms: i64) {
        let higher = self.state.read().high_water_ms < ms;
        if higher {
            let mut state = self.state.write();
            state.high_water_ms = state.high_water_ms.max(ms);
        }
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
        if let Some(store) = self.store.get() {
            store.set_floor(state.position.clone());
        }
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
            let journal = std::mem::take(&mut state.journal);
            // The state file's clock serves its reads only: the store's decides.
            let high_water = if state.from_disk {
                i64::MIN
            } else {
                state.high_water_ms
            };
            *state = loaded;
            state.high_water_ms = state.high_water_ms.max(high_water);
            if !skipped {
                // Nothing happened in between: the history stays known.
                state.journal = journal;
            } else {
                // Changes were not seen one by one: subscribers should re-read.
                self.events
                    .publish(crate::events::LicenseEvent::new("resync", self.clock.now()));
            }
        }
        self.publish_version(&state);
        self.publish_source(&state);
    }

    /// Reads a fresh snapshot now (after a write found the copy out of date).
    /// Coalesced: while one resync runs, every caller that asks meanwhile waits
    /// and shares the next one, which starts after they asked (so each sees the
    /// store as it was at least when it asked). Many writes failing at once cost
    /// two snapshots, not one each.
    pub async fn resync_now(&self, store: &dyn Store) -> Result<(), StoreError> {
        let asked_after = self.resyncs_started.load(Ordering::SeqCst);
        let mut last = self.resync_flight.lock().await;
        if last.0 > asked_after {
            // One started after this call asked, and (the lock is ours) finished.
            return last.1.clone();
        }
        let generation = self.resyncs_started.fetch_add(1, Ordering::SeqCst) + 1;
        let result = self.resync(store).await;
        self.contact(result.is_ok());
        *last = (generation, result.clone());
        result
    }

    /// On-demand resyncs run so far (each one store snapshot, or two when the
    /// store had lost its data).
    pub fn on_demand_resyncs(&self) -> u64 {
        self.resyncs_started.load(Ordering::SeqCst)
    }

    /// Reads the store, repairs what it lost of this copy's history, and installs it.
    async fn resync(&self, store: &dyn Store) -> Result<(), StoreError> {
        for _ in 0..REPAIR_ATTEMPTS {
            // Where this copy is, before the snapshot: later local writes are newer.
            let before = self.state.read().position.clone();
            let mut snapshot = store.snapshot().await?;
            if snapshot.position.is_none() {
                // The store lost its data (or is new): write back what this replica
                // knows, then read again. Another replica may win the race; its
                // copy is then merged with this one below.
                // A copy from the state file may be older than what the store
                // had: never written back (it would invent or undo writes).
                let ours = self.read(|s| {
                    if s.from_disk {
                        Snapshot::default()
                    } else {
                        s.to_snapshot()
                    }
                });
                let seats = ours.seats.len();
                if store.restore(&ours).await? {
                    if let Some(from) = &ours.position {
                        tracing::warn!(
                            seats,
                            "seat store had lost its data; restored it from this replica's last known state"
                        );
                        let restored = store.snapshot().await?;
                        self.report_restore(store, &ours, from.version, restored)
                            .await?;
                    } else {
                        tracing::info!("seat store initialized");
                    }
                }
                snapshot = store.snapshot().await?;
                if snapshot.position.is_none() {
                    return Err(StoreError::NotInitialized);
                }
            }
            match self.lineage(store, before.as_ref(), &snapshot).await? {
                Lineage::Extends => {
                    self.install(snapshot);
                    return Ok(());
                }
                Lineage::Lost { common, from } => {
                    if self.repair(store, &snapshot, common, from).await? {
                        self.install(store.snapshot().await?);
                        return Ok(());
                    }
                    // The store moved under the plan: read and plan again.
                }
            }
        }
        Err(StoreError::Moved)
    }

    /// Whether the store still holds this copy's history.
    async fn lineage(
        &self,
        store: &dyn Store,
        before: Option<&Position>,
        snapshot: &Snapshot,
    ) -> Result<Lineage, StoreError> {
        let (Some(mine), Some(theirs)) = (before, snapshot.position.as_ref()) else {
            return Ok(Lineage::Extends);
        };
        if mine.epoch != theirs.epoch {
            return Ok(Lineage::Lost {
                common: None,
                from: mine.version,
            });
        }
        let journal: Vec<Change> = self.read(|s| s.journal.iter().cloned().collect());
        let Some(first) = journal.first().map(|c| c.version) else {
            // No change since the last snapshot: only the version can tell.
            return Ok(if theirs.version < mine.version {
                Lineage::Lost {
                    common: None,
                    from: mine.version,
                }
            } else {
                Lineage::Extends
            });
        };
        let history = store.history(first.saturating_sub(1)).await?;
        if theirs.version >= mine.version {
            let at_mine = history.iter().find(|c| c.version == mine.version);
            let last = journal.iter().rfind(|c| c.version <= mine.version);
            // The feed no longer reaching back this far tells nothing.
            let trimmed = history.first().is_none_or(|h| h.version > mine.version);
            if at_mine == last || (at_mine.is_none() && trimmed) {
                // The same write at this copy's version: the store extends it.
                return Ok(Lineage::Extends);
            }
            // Another write, or none (a repair jumped over this version): the
            // histories parted.
        }
        // The last change both hold is the point the histories share.
        let common = journal
            .iter()
            .rev()
            .find(|c| history.iter().any(|h| h == *c))
            .map_or(first - 1, |c| c.version);
        Ok(Lineage::Lost {
            common: Some(common),
            from: mine.version,
        })
    }

    /// Plans and writes back what the store lost; `false` when it moved meanwhile.
    async fn repair(
        &self,
        store: &dyn Store,
        snapshot: &Snapshot,
        common: Option<u64>,
        from: u64,
    ) -> Result<bool, StoreError> {
        let newer = store.history(common.unwrap_or(0)).await?;
        let store_license = snapshot
            .license
            .as_ref()
            .and_then(|l| self.verifier.verify(l).ok());
        let now = self.read(|s| s.now(self.clock.now()));
        let plan = self.read(|mine| {
            let lost_changes: Vec<Change>;
            let lost = match common {
                Some(c) if mine.journal.front().is_some_and(|f| f.version <= c + 1) => {
                    lost_changes = mine
                        .journal
                        .iter()
                        .filter(|x| x.version > c)
                        .cloned()
                        .collect();
                    repair::Lost::Changes(&lost_changes)
                }
                _ => repair::Lost::Everything,
            };
            repair::plan(&repair::Input {
                mine,
                lost,
                store: snapshot,
                store_license: store_license.as_ref(),
                newer: &newer,
                edition: self.verifier.edition,
                tryout: self.tryout,
                now,
            })
        });
        let theirs = snapshot.position.clone();
        let went_back = theirs.as_ref().is_some_and(|t| t.version < from);
        let plan = match plan {
            Some(plan) => plan,
            // Nothing to write back; a store that went back still jumps above
            // every version seen, so replicas following its feed re-read it.
            None if went_back => crate::store::RepairWrite::default(),
            None => return Ok(true),
        };
        let mut write = plan;
        write.expected = theirs.clone();
        write.version_floor = from.max(theirs.as_ref().map_or(0, |t| t.version));
        write.incident.at = self.clock.now();
        write.incident.rolled_back_from = from;
        let Some(changes) = store.repair(&write).await? else {
            return Ok(false);
        };
        crate::metrics::metrics().store_repair(
            if went_back { "rolled_back" } else { "replaced" },
            write.incident.restored_total,
            write.incident.lost_total,
        );
        report(&write.incident, went_back);
        let mut state = self.state.write();
        for change in &changes {
            self.apply(&mut state, change);
        }
        self.publish_version(&state);
        Ok(true)
    }

    /// Records (in the store, for every replica) that this replica re-created a
    /// store that had lost everything.
    async fn report_restore(
        &self,
        store: &dyn Store,
        ours: &Snapshot,
        from: u64,
        restored: Snapshot,
    ) -> Result<(), StoreError> {
        let mut incident = Incident {
            at: self.clock.now(),
            rolled_back_from: from,
            ..Incident::default()
        };
        for seat in &ours.seats {
            incident.restored(format!("seat {}/{}", seat.feature, seat.user_id.as_str()));
        }
        for (present, what) in [
            (ours.license.is_some(), "license"),
            (ours.tryout.is_some(), "tryout record"),
            (ours.initialization.is_some(), "pending initialization code"),
        ] {
            if present {
                incident.restored(what.into());
            }
        }
        let mut at = restored.position;
        for _ in 0..REPAIR_ATTEMPTS {
            let write = crate::store::RepairWrite {
                version_floor: at.as_ref().map_or(0, |p| p.version),
                expected: at,
                incident: incident.clone(),
                ..Default::default()
            };
            if store.repair(&write).await?.is_some() {
                crate::metrics::metrics().store_repair(
                    "lost_epoch",
                    incident.restored_total,
                    incident.lost_total,
                );
                report(&incident, false);
                return Ok(());
            }
            // Written to meanwhile: record it on the new position.
            at = store.snapshot().await?.position;
        }
        Ok(())
    }

    /// Follows the store until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        let _ = self.store.set(store.clone());
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
                    } else if self.last_error.lock().is_none() {
                        tracing::warn!(%error, source = self.source().as_str(), "seat store not reachable at start");
                    }
                    *self.last_error.lock() = Some(error.to_string());
                    self.contact(false);
                    // Resync after an outage: the feed may have moved on without us.
                    need_resync = true;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => return,
                    }
                    // Short, so the copy is repaired and current again well
                    // within a second after the store is back.
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }
}

/// Logs a repair: an `audit` line naming what was lost, if anything.
fn report(incident: &Incident, went_back: bool) {
    if incident.lost_total > 0 {
        tracing::error!(
            target: "audit",
            lost = incident.lost_total,
            restored = incident.restored_total,
            what = ?incident.lost,
            "seat store lost acknowledged writes that could not be written back"
        );
    }
    tracing::warn!(
        went_back,
        rolled_back_from = incident.rolled_back_from,
        restored = incident.restored_total,
        lost = incident.lost_total,
        what = ?incident.restored,
        "seat store had lost writes; wrote back what this replica holds"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SeatSource, SystemClock};
    use crate::store::memory::MemoryStore;

    fn mirror(clock: Arc<dyn Clock>) -> Mirror {
        let verifier = Verifier {
            key: None,
            serial: SerialNumber::parse("MIRROR-1").unwrap(),
            edition: Edition::Vm,
        };
        Mirror::new(verifier, MirrorConfig::default(), clock)
    }

    /// The state file answers reads until the first snapshot, and never reaches
    /// the store: an empty store stays empty, its clock is not moved.
    #[tokio::test]
    async fn disk_state_serves_reads_only_and_is_never_restored() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mirror = mirror(clock.clone());
        assert_eq!(mirror.source(), StateSource::None);
        assert!(!mirror.read(MirrorState::has_state));
        let far = clock.now().timestamp_millis() + 86_400_000 * 365;
        mirror.load_disk(Snapshot {
            seats: vec![Seat {
                user_id: UserId::parse("alice").unwrap(),
                feature: Feature::User,
                source: SeatSource::Tryout,
                assigned_at: clock.now(),
                over_capacity_since: None,
            }],
            high_water_ms: far,
            ..Snapshot::default()
        });
        assert_eq!(mirror.source(), StateSource::Disk);
        assert!(mirror.read(|s| s.seat(Feature::User, "alice").is_some()));

        // A store that lost everything (no epoch): the first to notice re-creates it.
        let store = MemoryStore::new(clock.clone());
        store.wipe();
        mirror.resync_now(&store).await.unwrap();
        assert_eq!(mirror.source(), StateSource::Store);
        assert!(mirror.read(|s| s.seat(Feature::User, "alice").is_none()));
        let stored = store.snapshot().await.unwrap();
        assert!(stored.seats.is_empty(), "{stored:?}");
        assert!(stored.high_water_ms < far);
        assert!(mirror.read(|s| s.high_water_ms) < far);
    }
}
