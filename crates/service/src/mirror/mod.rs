//! Each replica's in-memory copy of the store: seats, the verified license, the
//! tryout record and the reconcile status. `CheckSeat` and the overviews answer
//! from it, so the hot path never waits for Redis and keeps answering (flagged
//! `stale`) while Redis is unreachable.
//!
//! A background task keeps it current: read a snapshot, then follow the store's
//! change feed in version order; resynchronise on any gap and on another epoch.
//! Every `resync_interval`, as a safety net, it checks the copy against the store
//! in one small read (`Store::summary`: position, the write at this copy's
//! version, the number of seats) and reads a full snapshot only when they differ.
//! A full snapshot of the Redis store is read in bounded pages, never as one
//! blocking call (`store::redis`).
//!
//! Every resynchronisation first checks that the store still holds this
//! replica's history: the same epoch, at least the version this copy reached, and
//! the same write at that version. When it does not (the store lost its data, went
//! back to an older snapshot, failed over to a lagging replica, or was re-created
//! by another replica), the task writes back what the store lost and this replica
//! holds (`domain::repair` plans it), reports what it could not, and only then follows the
//! store again. Until then the store refuses this replica's writes (its floor).

mod state;
mod stream;
mod sync;

use state::Applied;
pub use state::{MirrorSeat, MirrorState, StateSource, Verifier};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{broadcast, watch};

use crate::domain::{AppliedLicense, Clock, TryoutPolicy};
use crate::events::EventHub;
use crate::store::{Change, Position, Snapshot, Store, StoreError};

/// How the mirror follows the store.
#[derive(Debug, Clone, Copy)]
pub struct MirrorConfig {
    /// Past this long without a successful contact, answers are flagged stale.
    pub stale_after: Duration,
    /// How often the copy is checked against the store (one small read; a full
    /// resynchronisation only when they differ).
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

/// How many applied changes a `WatchSeats` stream may fall behind before it is
/// sent a new snapshot instead: the broadcast keeps at most this many, however
/// many streams are open (about 200 bytes each).
pub const SEAT_FEED_BUFFER: usize = 1024;

/// What the watchers of the copy hear, in the order the copy changed (sent
/// under the state's write lock, so a receiver subscribed under its read lock
/// hears exactly what came after what it read).
#[derive(Debug, Clone)]
pub enum SeatFeed {
    /// One change applied: the copy is now at its version.
    Change(Arc<FeedChange>),
    /// The copy was replaced (a snapshot installed that skipped changes, the
    /// state file loaded): a watcher reads it whole again.
    Resync,
}

/// A change as applied here.
#[derive(Debug)]
pub struct FeedChange {
    pub change: Change,
    /// For a license change: the license this replica trusts after it (`None`:
    /// the document did not verify, so no license counts).
    pub license: Option<AppliedLicense>,
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
    // Every change applied, and every replacement of the copy, for
    // `WatchSeats` (bounded: a receiver that falls behind is told it lagged).
    feed: broadcast::Sender<SeatFeed>,
    // Stamps events (injected, like every clock here).
    clock: Arc<dyn Clock>,
    // On-demand resyncs run one at a time. Held while one runs; holds the
    // generation and result of the last one that finished, which callers that
    // asked before it started share (single flight).
    resync_flight: tokio::sync::Mutex<(u64, Result<(), StoreError>)>,
    // Full resyncs run one at a time (`sync::resync`): the sync task's and an
    // on-demand one after the same gap read the pool once, not twice.
    resyncing: tokio::sync::Mutex<()>,
    // A full resync compares the store with the copy one at a time (it marks
    // the copy's seats: `stream`).
    comparing: tokio::sync::Mutex<()>,
    // On-demand resyncs started; the generation of the newest one.
    resyncs_started: AtomicU64,
    // A nudge (a resync for readers waiting for a version) is queued and has not
    // started its resync yet: readers asking meanwhile are served by it.
    nudge_queued: AtomicBool,
    // The store this replica follows and writes to, handed over once.
    store: Arc<dyn Store>,
    // Where the state comes from; health follows it (NOT_SERVING while `None`).
    source_tx: watch::Sender<StateSource>,
    // The last error reaching the store, and why no state file was loaded: the
    // message of a NO_STATE_YET answer.
    last_error: Mutex<Option<String>>,
    disk_problem: Mutex<Option<String>>,
}

impl Mirror {
    pub fn new(
        store: Arc<dyn Store>,
        verifier: Verifier,
        config: MirrorConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            state: RwLock::new(MirrorState::default()),
            verifier,
            config,
            tryout: TryoutPolicy::default(),
            connected: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            version_tx: watch::channel(0).0,
            events: EventHub::default(),
            feed: broadcast::channel(SEAT_FEED_BUFFER).0,
            clock,
            resync_flight: tokio::sync::Mutex::new((0, Ok(()))),
            resyncing: tokio::sync::Mutex::new(()),
            comparing: tokio::sync::Mutex::new(()),
            resyncs_started: AtomicU64::new(0),
            nudge_queued: AtomicBool::new(false),
            store,
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
        self.publish_feed(SeatFeed::Resync);
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

    /// The writer's floor: where this copy is. Every write passes it to the
    /// store, which refuses the write when it went back behind it (`Moved`).
    /// A copy loaded from the state file has none: it never writes from it.
    pub fn floor(&self) -> Option<Position> {
        self.state.read().position.clone()
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
    ///
    /// `Err(Moved)` when the copy holds another write at this write's version:
    /// the store acknowledged it and then lost it in a failover before this
    /// copy held it (so no repair could write it back), and the new store's
    /// history passed its version. The write is not in force: the caller
    /// resyncs and writes again (every write is idempotent or
    /// compare-and-set), rather than answer a success nobody keeps.
    pub async fn apply_local(&self, change: &Change) -> Result<(), StoreError> {
        let applied = {
            let mut state = self.state.write();
            let applied = self.apply(&mut state, change);
            self.publish_version(&state);
            applied
        };
        if applied == Applied::Now {
            return Ok(());
        }
        if applied == Applied::Gap {
            let mut rx = self.version_tx.subscribe();
            let reached =
                tokio::time::timeout(self.config.feed_wait, rx.wait_for(|v| *v >= change.version))
                    .await;
            if reached.is_err() {
                tracing::debug!(
                    version = change.version,
                    "mirror did not reach a local write in time"
                );
                return Ok(());
            }
        }
        // At or past the write's version: the copy's own entry there (none
        // when a full resync cleared the journal since: nothing to tell).
        let other = self.read(|s| {
            s.journal
                .iter()
                .rfind(|c| c.version == change.version)
                .is_some_and(|c| c != change)
        });
        if other {
            tracing::warn!(
                version = change.version,
                "a write the store acknowledged was lost in a failover before this replica's copy held it; writing it again"
            );
            return Err(StoreError::Moved);
        }
        Ok(())
    }

    /// Read your writes: waits until the copy has reached `min` (a version a
    /// write answered, on any replica), at most until `deadline`; whether it did.
    /// Nudges the copy to catch up at once ([`Mirror::resync_now`]: one small
    /// read, then the feed up to the store's version) rather than waiting for the
    /// feed; concurrent waiters share one resync. The hot path does not come
    /// here: a reader checks the version under the lock it takes anyway.
    pub async fn wait_for_version(
        self: &Arc<Self>,
        min: u64,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut rx = self.version_tx.subscribe();
        if *rx.borrow_and_update() >= min {
            return true;
        }
        self.nudge();
        let reached = async move { rx.wait_for(|v| *v >= min).await.is_ok() };
        tokio::time::timeout_at(deadline, reached)
            .await
            .unwrap_or(false)
    }

    /// Starts a resync for waiting readers, unless one is queued that has not
    /// started yet (it starts after they asked, so it serves them too). Runs as
    /// a task of its own: a reader that gives up does not cancel it half-way.
    fn nudge(self: &Arc<Self>) {
        if self.nudge_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let mirror = self.clone();
        tokio::spawn(async move {
            // From here on a new reader queues its own nudge: this resync may
            // start before it asked.
            mirror.nudge_queued.store(false, Ordering::Release);
            if let Err(error) = mirror.resync_now().await {
                tracing::debug!(%error, "resync for a reader waiting for a version failed");
            }
        });
    }

    /// The events of the changes this replica learns.
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// Reads the state and subscribes to what changes after it, atomically:
    /// the receiver hears every change applied after what `f` read, and none
    /// before (changes are sent under the write lock).
    pub fn read_and_follow<T>(
        &self,
        f: impl FnOnce(&MirrorState) -> T,
    ) -> (T, broadcast::Receiver<SeatFeed>) {
        let state = self.state.read();
        let rx = self.feed.subscribe();
        (f(&state), rx)
    }

    /// A stored license as this replica trusts it (verified again), if it does.
    pub fn verify_license(&self, stored: &crate::store::StoredLicense) -> Option<AppliedLicense> {
        self.verifier.verify(stored).ok()
    }

    /// Applies a change and announces it when it is new here.
    fn apply(&self, state: &mut MirrorState, change: &Change) -> Applied {
        // A lease new to this copy may fill its feature (checked once applied).
        let new_lease = match &change.kind {
            crate::store::ChangeKind::LeaseAcquired { lease, .. } => {
                state.leases.get(&lease.lease_id).is_none().then_some(lease)
            }
            _ => None,
        };
        let applied = state.apply(change, &self.verifier);
        if applied == Applied::Now {
            let now = self.clock.now();
            if let Some(event) = crate::events::from_change(&change.kind, now) {
                self.events.publish(event);
            }
            if let Some(event) = new_lease.and_then(|lease| at_capacity(state, lease, now)) {
                self.events.publish(event);
            }
            if self.feed.receiver_count() > 0 {
                let license = match &change.kind {
                    crate::store::ChangeKind::LicenseApplied(_) => state.license.clone(),
                    _ => None,
                };
                self.publish_feed(SeatFeed::Change(Arc::new(FeedChange {
                    change: change.clone(),
                    license,
                })));
            }
        }
        applied
    }

    /// Sends to the `WatchSeats` streams (none listening: nothing to do).
    fn publish_feed(&self, item: SeatFeed) {
        let _ = self.feed.send(item);
    }

    fn publish_version(&self, state: &MirrorState) {
        let version = state.version();
        self.version_tx.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
    }

    /// Replaces the copy with a snapshot, unless the copy is already further along
    /// in the same epoch (local writes applied after the snapshot was read).
    fn install(&self, snapshot: Snapshot) {
        self.install_state(MirrorState::load(snapshot, &self.verifier));
    }

    /// [`Self::install`] of a copy already made.
    fn install_state(&self, loaded: MirrorState) {
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
            // Nothing happened in between: the history stays known.
            state.journal = journal;
            // A full read may differ from the copy even at the same position
            // (what the periodic check found): `WatchSeats` streams read it
            // whole again. Full reads are rare (start, gaps, differences).
            self.installed(&mut state, skipped);
        } else {
            self.publish_version(&state);
            self.publish_source(&state);
        }
    }
}

/// The `lease_at_capacity` event when `lease`, just taken, filled its feature:
/// every replica announces it as it learns the lease, whichever took it.
/// Leases are judged live at the lease's own acquisition (the store's time).
fn at_capacity(
    state: &MirrorState,
    lease: &crate::domain::Lease,
    at: chrono::DateTime<chrono::Utc>,
) -> Option<crate::events::LicenseEvent> {
    let capacity = state
        .license
        .as_ref()?
        .payload
        .entitlement(lease.feature)
        .filter(|e| e.seat_model == crate::domain::SeatModel::Concurrent)?
        .quantity;
    // Counting the live ones walks the feature's leases under the copy's
    // write lock: not while fewer leases than the quantity exist at all.
    if state.leases.len() < capacity as usize {
        return None;
    }
    let in_use = state.live_leases(lease.feature, lease.acquired_at.timestamp_millis());
    (in_use >= capacity).then(|| {
        crate::events::LicenseEvent {
            feature: Some(lease.feature),
            ..crate::events::LicenseEvent::new("lease_at_capacity", at)
        }
        .detail(format!("capacity {capacity}, in use {in_use}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Edition, Feature, Seat, SeatSource, SerialNumber, SystemClock, UserId};
    use crate::store::memory::MemoryStore;

    fn mirror(store: Arc<MemoryStore>, clock: Arc<dyn Clock>) -> Mirror {
        let verifier = Verifier {
            key: None,
            serial: SerialNumber::parse("MIRROR-1").unwrap(),
            edition: Edition::Vm,
        };
        Mirror::new(store, verifier, MirrorConfig::default(), clock)
    }

    /// A local write whose version the copy holds with another write (the
    /// store acknowledged it, then a failover lost it and the new history
    /// passed its version) is not taken as done: `Moved`, so the caller
    /// writes it again. The same write again, or one in order, is done.
    #[tokio::test]
    async fn a_local_write_another_history_passed_is_not_done() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(MemoryStore::new(clock.clone()));
        let mirror = mirror(store.clone(), clock.clone());
        mirror.resync_now().await.unwrap();
        let at = mirror.read(|s| s.version()) + 1;
        let assigned = |user: &str| Change {
            version: at,
            kind: crate::store::ChangeKind::SeatAssigned(Seat {
                user_id: UserId::parse(user).unwrap(),
                feature: Feature::User,
                source: SeatSource::Tryout,
                assigned_at: clock.now(),
                over_capacity_since: None,
            }),
        };
        let alice = assigned("alice");
        mirror.apply_local(&alice).await.unwrap();
        mirror.apply_local(&alice).await.unwrap();
        assert!(matches!(
            mirror.apply_local(&assigned("bob")).await,
            Err(StoreError::Moved)
        ));
        assert!(mirror.read(|s| s.seat(Feature::User, "bob").is_none()));
    }

    /// The state file answers reads until the first snapshot, and never reaches
    /// the store: an empty store stays empty, its clock is not moved.
    #[tokio::test]
    async fn disk_state_serves_reads_only_and_is_never_restored() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(MemoryStore::new(clock.clone()));
        let mirror = mirror(store.clone(), clock.clone());
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
        store.wipe();
        mirror.resync_now().await.unwrap();
        assert_eq!(mirror.source(), StateSource::Store);
        assert!(mirror.read(|s| s.seat(Feature::User, "alice").is_none()));
        let stored = store.snapshot().await.unwrap();
        assert!(stored.seats.is_empty(), "{stored:?}");
        assert!(stored.high_water_ms < far);
        assert!(mirror.read(|s| s.high_water_ms) < far);
    }
}
