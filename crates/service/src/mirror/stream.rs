//! A full snapshot read into the replica's copy as it streams in, never held
//! whole beside it (`Store::snapshot_into`):
//!
//! - **No copy yet** (start-up, or a copy without seats): the seats go straight
//!   into the new copy's maps, sized once from the pools' record counts
//!   ([`Fresh`]); the copy is swapped in at the end.
//! - **A copy** (a resync after a gap, another epoch, a difference the periodic
//!   check found): each page is compared with the copy under a short write
//!   lock, a thousand seats at a time ([`Compare`]). A seat the copy holds
//!   unchanged is only marked (a bit of `MirrorSeat`); a seat that differs, and
//!   every seat the replayed feed touches, is kept apart (few). At the end one
//!   write lock applies the differences, removes the seats left unmarked (those
//!   the store no longer holds; a pass over the copy only when there are any)
//!   and takes the snapshot's records and position. The copy answers from its
//!   old state until then: `CheckSeat` waits at most for one batch's compare.
//!
//! The marks are only true while the copy does not move. When it applied
//! changes meanwhile (local writes), the comparison still holds if the
//! replayed feed has the last word on each seat they changed (a pass over the
//! copy then settles the marks they overwrote); otherwise nothing is installed
//! and the replica reads the snapshot whole instead.

use std::collections::HashMap;

use compact_str::CompactString;
use parking_lot::RwLock;

use super::state::{self, Users};
use super::{Mirror, MirrorSeat, MirrorState, SeatFeed};
use crate::domain::Feature;
use crate::store::{SeatSink, SeatValue, Snapshot};

/// Seats compared per write lock.
const BATCH: usize = 1024;

type Seats = HashMap<Feature, Users>;

/// The seats of a new copy, as read.
#[derive(Default)]
pub(super) struct Fresh {
    seats: Seats,
}

impl SeatSink for Fresh {
    fn expect(&mut self, feature: Feature, records: usize) {
        self.seats.entry(feature).or_default().reserve(records);
    }

    fn page_seat(&mut self, feature: Feature, user: &str, seat: SeatValue) {
        self.seats
            .entry(feature)
            .or_default()
            .insert(user.into(), state::from_value(seat));
    }

    fn replayed(&mut self, feature: Feature, user: &str, seat: Option<SeatValue>) {
        let users = self.seats.entry(feature).or_default();
        match seat {
            Some(seat) => {
                users.insert(user.into(), state::from_value(seat));
            }
            None => {
                users.remove(user);
            }
        }
    }

    fn cleared(&mut self) {
        self.seats.values_mut().for_each(Users::clear);
    }

    fn restart(&mut self) {
        self.cleared();
    }
}

/// A snapshot compared with the copy as it streams in (see the module).
pub(super) struct Compare<'a> {
    state: &'a RwLock<MirrorState>,
    /// The mark this resync sets (the copy's seats carry the other one).
    target: bool,
    /// Where the copy was when the resync started: the marks hold only there.
    at: (Option<String>, u64),
    /// Seats of the copy marked so far (each once).
    marked: usize,
    /// A page's seats not compared yet.
    batch: Vec<(Feature, CompactString, MirrorSeat)>,
    /// Seats of the pages that the copy lacks or holds otherwise.
    differs: HashMap<(Feature, CompactString), MirrorSeat>,
    /// The replayed feed's last word per seat (`None`: released).
    replayed: HashMap<(Feature, CompactString), Option<MirrorSeat>>,
    /// A re-setup came in the replayed feed: only `replayed` counts.
    cleared: bool,
    /// Marks were set and not yet installed or taken back.
    marking: bool,
    /// One comparison at a time (the marks are the copy's): held until the
    /// comparison is installed or dropped.
    _one: tokio::sync::MutexGuard<'a, ()>,
}

impl<'a> Compare<'a> {
    fn new(state: &'a RwLock<MirrorState>, one: tokio::sync::MutexGuard<'a, ()>) -> Self {
        let (target, at) = {
            let s = state.read();
            (
                !s.parity,
                (s.position.as_ref().map(|p| p.epoch.clone()), s.version()),
            )
        };
        Self {
            state,
            target,
            at,
            marked: 0,
            batch: Vec::with_capacity(BATCH),
            differs: HashMap::new(),
            replayed: HashMap::new(),
            cleared: false,
            marking: false,
            _one: one,
        }
    }

    /// Compares the batch with the copy (one short write lock).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.marking = true;
        let mut state = self.state.write();
        for (feature, user, seat) in self.batch.drain(..) {
            let kept = state
                .seats
                .get_mut(&feature)
                .and_then(|users| users.get_mut(&user));
            match kept {
                Some(kept) if *kept == seat => {
                    if kept.mark() != self.target {
                        *kept = kept.with_mark(self.target);
                        self.marked += 1;
                    }
                    if !self.differs.is_empty() {
                        self.differs.remove(&(feature, user));
                    }
                }
                _ => {
                    self.differs.insert((feature, user), seat);
                }
            }
        }
    }

    /// Takes every mark back (the resync did not install, or starts again).
    fn unmark(&mut self) {
        self.batch.clear();
        if self.marking {
            let mut state = self.state.write();
            let parity = state.parity;
            for users in state.seats.values_mut() {
                for seat in users.values_mut() {
                    *seat = seat.with_mark(parity);
                }
            }
            self.marking = false;
        }
        self.marked = 0;
    }

    /// Applies what differs to the copy and takes the snapshot's records, in
    /// one write lock; `false` (nothing changed) when the copy moved since the
    /// resync started.
    fn install(mut self, snapshot: Snapshot, mirror: &Mirror) -> bool {
        self.flush();
        let mut state = self.state.write();
        let epoch = state.position.as_ref().map(|p| p.epoch.clone());
        if epoch != self.at.0 || state.parity == self.target || state.from_disk {
            drop(state);
            self.unmark();
            return false;
        }
        // Changes the copy applied meanwhile (local writes): fine when each
        // one's seat has its last word in the replayed feed (then the marks
        // they overwrote do not count: a pass settles them); else the
        // comparison is off.
        let mut settle = false;
        if state.version() != self.at.1 {
            let newer = match &snapshot.position {
                Some(p) => Some(&p.epoch) == epoch.as_ref() && p.version < state.version(),
                None => false,
            };
            if newer {
                // The copy is further along than the snapshot: it stays.
                drop(state);
                self.unmark();
                return true;
            }
            if !self.explains(&state) {
                drop(state);
                self.unmark();
                return false;
            }
            settle = true;
        }
        let target = self.target;
        if self.cleared {
            state.seats.values_mut().for_each(Users::clear);
            state.counts.clear();
            self.marked = 0;
        }
        let mut marked = self.marked;
        let differs = std::mem::take(&mut self.differs);
        let replayed = std::mem::take(&mut self.replayed);
        let puts = differs
            .into_iter()
            .map(|(k, s)| (k, Some(s)))
            .chain(replayed);
        for ((feature, user), seat) in puts {
            let old = match seat {
                Some(seat) => {
                    marked += 1;
                    state.put(feature, &user, seat.with_mark(target))
                }
                None => state.take(feature, &user),
            };
            if old.is_some_and(|old| old.mark() == target) {
                marked = marked.saturating_sub(1);
            }
        }
        // Seats the store no longer holds: left unmarked (a pass only when
        // there are any).
        if settle || state.seat_total() != marked {
            for users in state.seats.values_mut() {
                users.retain(|_, seat| seat.mark() == target);
            }
            state.recount();
        }
        state.parity = target;
        self.marking = false;
        let changed = state.position.as_ref().map(|p| (&p.epoch, p.version))
            != snapshot.position.as_ref().map(|p| (&p.epoch, p.version));
        state.take_records(snapshot, &mirror.verifier);
        mirror.installed(&mut state, changed);
        true
    }
}

impl Compare<'_> {
    /// Whether the replayed feed has the last word on every seat the copy
    /// changed since the comparison started (and no re-setup came).
    fn explains(&self, state: &MirrorState) -> bool {
        use crate::store::ChangeKind;
        let since = self.at.1;
        if state.journal.front().is_none_or(|c| c.version > since + 1) {
            return false;
        }
        state
            .journal
            .iter()
            .filter(|c| c.version > since)
            .all(|c| match &c.kind {
                ChangeKind::SeatAssigned(seat) | ChangeKind::SeatFlagged(seat) => self
                    .replayed
                    .contains_key(&(seat.feature, seat.user_id.as_str().into())),
                ChangeKind::SeatReleased { feature, user_id } => self
                    .replayed
                    .contains_key(&(*feature, user_id.as_str().into())),
                ChangeKind::Reset => false,
                // The snapshot's records are at least as new.
                _ => true,
            })
    }
}

impl Drop for Compare<'_> {
    fn drop(&mut self) {
        self.unmark();
    }
}

impl SeatSink for Compare<'_> {
    fn page_seat(&mut self, feature: Feature, user: &str, seat: SeatValue) {
        self.batch
            .push((feature, user.into(), state::from_value(seat)));
        if self.batch.len() >= BATCH {
            self.flush();
        }
    }

    fn page_done(&mut self) {
        self.flush();
    }

    fn replayed(&mut self, feature: Feature, user: &str, seat: Option<SeatValue>) {
        self.replayed
            .insert((feature, user.into()), seat.map(state::from_value));
    }

    fn cleared(&mut self) {
        self.batch.clear();
        self.differs.clear();
        self.replayed.clear();
        self.cleared = true;
    }

    fn restart(&mut self) {
        self.unmark();
        self.differs.clear();
        self.replayed.clear();
        self.cleared = false;
    }
}

/// What a streamed snapshot was read into.
pub(super) enum Streamed<'a> {
    Fresh(Fresh),
    Compared(Compare<'a>),
}

impl Mirror {
    /// Reads a full snapshot into a new copy's seats (no copy with seats
    /// yet) or compared with the copy (see the module). One at a time: the
    /// marks are the copy's.
    pub(super) async fn read_streamed(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<(Snapshot, Streamed<'_>), crate::store::StoreError> {
        let one = self.comparing.lock().await;
        let compare = self.read(|s| s.position.is_some() && !s.from_disk && s.seat_total() > 0);
        if compare {
            let mut sink = Compare::new(&self.state, one);
            let snapshot = store.snapshot_into(&mut sink).await?;
            Ok((snapshot, Streamed::Compared(sink)))
        } else {
            drop(one);
            let mut sink = Fresh::default();
            let snapshot = store.snapshot_into(&mut sink).await?;
            Ok((snapshot, Streamed::Fresh(sink)))
        }
    }

    /// Installs a streamed snapshot; `false` when it could not (the copy
    /// moved under a comparison): read it whole then.
    pub(super) fn install_streamed(&self, snapshot: Snapshot, streamed: Streamed<'_>) -> bool {
        match streamed {
            Streamed::Fresh(fresh) => {
                self.install_state(MirrorState::load_with(
                    snapshot,
                    fresh.seats,
                    &self.verifier,
                ));
                true
            }
            Streamed::Compared(compare) => compare.install(snapshot, self),
        }
    }

    /// What follows any installation of a snapshot: the journal kept when
    /// nothing was skipped, else subscribers told; the watchers told to read
    /// the copy again; version and source published.
    pub(super) fn installed(&self, state: &mut MirrorState, skipped: bool) {
        if skipped {
            state.journal.clear();
            self.events
                .publish(crate::events::LicenseEvent::new("resync", self.clock.now()));
        }
        self.publish_feed(SeatFeed::Resync);
        self.publish_version(state);
        self.publish_source(state);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::{AssignPlan, Edition, Seat, SeatSource, SerialNumber, SystemClock, UserId};
    use crate::mirror::{MirrorConfig, Verifier};
    use crate::store::memory::MemoryStore;
    use crate::store::{ReleaseOutcome, Store};

    fn mirror(store: Arc<MemoryStore>) -> Mirror {
        let verifier = Verifier {
            key: None,
            serial: SerialNumber::parse("STREAM-1").unwrap(),
            edition: Edition::Vm,
        };
        Mirror::new(
            store,
            verifier,
            MirrorConfig::default(),
            Arc::new(SystemClock),
        )
    }

    fn seat(user: &str) -> Seat {
        Seat {
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            source: SeatSource::Tryout,
            assigned_at: chrono::Utc::now() - chrono::Duration::hours(1),
            over_capacity_since: None,
        }
    }

    fn users(mirror: &Mirror) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = mirror.read(|s| {
            s.seats_of(&[])
                .into_iter()
                .map(|(_, u, seat)| (u.to_string(), seat.assigned_at_ms()))
                .collect()
        });
        out.sort();
        out
    }

    /// A full resync over a copy changes it in place: a seat the store
    /// released is removed, a new one added, one assigned again replaced, the
    /// others kept; the counts follow, and a second resync finds nothing to do.
    #[tokio::test]
    async fn a_full_resync_applies_only_the_differences() {
        let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        let snapshot = Snapshot {
            position: None,
            seats: ["alice", "bob", "carol"].map(seat).to_vec(),
            ..Snapshot::default()
        };
        store.wipe();
        assert!(store.restore(&snapshot).await.unwrap());
        let mirror = mirror(store.clone());
        mirror.resync(store.as_ref()).await.unwrap();
        assert_eq!(users(&mirror).len(), 3);
        let before = users(&mirror);

        // Behind the copy's back: carol released, dave assigned, bob again.
        let user = |u: &str| UserId::parse(u).unwrap();
        let plan = AssignPlan::Tryout { capacity: 10 };
        for u in ["carol", "bob"] {
            let released = store
                .release_seat(None, &user(u), Feature::User, None)
                .await
                .unwrap();
            assert!(matches!(released, ReleaseOutcome::Released(_)));
        }
        for u in ["dave", "bob"] {
            store
                .assign_seat(None, &user(u), Feature::User, &plan)
                .await
                .unwrap();
        }
        mirror.resync(store.as_ref()).await.unwrap();
        let after = users(&mirror);
        let names: Vec<&str> = after.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, ["alice", "bob", "dave"]);
        assert_eq!(after[0], before[0], "alice is kept as she was");
        assert_ne!(after[1], before[1], "bob's new seat replaced the old one");
        assert_eq!(
            mirror.read(|s| s.count(Feature::User, SeatSource::Tryout)),
            3
        );
        assert_eq!(
            mirror.read(|s| s.version()),
            store.snapshot().await.unwrap().position.unwrap().version
        );
        // Every seat carries the copy's mark again.
        let parity = mirror.read(|s| s.parity);
        assert!(mirror.read(|s| s.seats_of(&[]).iter().all(|(_, _, x)| x.mark() == parity)));
        mirror.resync(store.as_ref()).await.unwrap();
        assert_eq!(users(&mirror), after);
    }

    /// A comparison whose copy moved meanwhile (a change applied that the
    /// replayed feed does not have the last word on) installs nothing and
    /// takes its marks back; one whose replayed feed has it installs.
    #[tokio::test]
    async fn a_comparison_whose_copy_moved_installs_only_what_the_feed_explains() {
        let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        let snapshot = Snapshot {
            position: None,
            seats: ["alice", "bob"].map(seat).to_vec(),
            ..Snapshot::default()
        };
        store.wipe();
        assert!(store.restore(&snapshot).await.unwrap());
        let mirror = mirror(store.clone());
        mirror.resync(store.as_ref()).await.unwrap();
        let parity = mirror.read(|s| s.parity);
        let one = mirror.comparing.lock().await;
        let mut compare = Compare::new(&mirror.state, one);
        let alice = mirror.read(|s| s.seat(Feature::User, "alice")).unwrap();
        compare.page_seat(
            Feature::User,
            "alice",
            SeatValue {
                source: alice.source(),
                assigned_at_ms: alice.assigned_at_ms(),
                over_capacity_since_ms: None,
            },
        );
        compare.page_done();
        assert!(
            mirror
                .read(|s| s.seat(Feature::User, "alice"))
                .unwrap()
                .mark()
                != parity
        );
        // A change applied to the copy meanwhile.
        let change = crate::store::Change {
            version: mirror.read(|s| s.version()) + 1,
            kind: crate::store::ChangeKind::SeatAssigned(seat("erin")),
        };
        mirror.apply_local(&change).await.unwrap();
        // The store moved on as well (its own write at that version).
        let plan = AssignPlan::Tryout { capacity: 10 };
        let frank = UserId::parse("frank").unwrap();
        store
            .assign_seat(None, &frank, Feature::User, &plan)
            .await
            .unwrap();
        let meta = store.snapshot().await.unwrap();
        assert!(!compare.install(meta, &mirror));
        assert!(mirror.read(|s| s.seats_of(&[]).iter().all(|(_, _, x)| x.mark() == parity)));
        assert_eq!(users(&mirror).len(), 3);

        // The same, with the replayed feed saying where erin is: installed.
        let one = mirror.comparing.lock().await;
        let mut compare = Compare::new(&mirror.state, one);
        let before = mirror.read(|s| s.version());
        let mut meta = store.snapshot().await.unwrap();
        for seat in std::mem::take(&mut meta.seats) {
            compare.page_seat(seat.feature, seat.user_id.as_str(), SeatValue::of(&seat));
        }
        compare.page_done();
        mirror
            .apply_local(&crate::store::Change {
                version: before + 1,
                kind: crate::store::ChangeKind::SeatAssigned(seat("gina")),
            })
            .await
            .unwrap();
        compare.replayed(Feature::User, "gina", None);
        meta.position.as_mut().unwrap().version = before + 1;
        assert!(compare.install(meta, &mirror));
        let names: Vec<String> = users(&mirror).into_iter().map(|(u, _)| u).collect();
        assert_eq!(names, ["alice", "bob", "frank"]);
    }
}
