//! A replica's copy of the store as a pure value: seats by feature and user
//! (O(1) lookups on the hot path), counts per pool, the stored and the verified
//! license, the tryout record, the reconcile status, the journal of applied
//! changes. Loading a snapshot and applying a change are plain functions of
//! the value; the handle (`Mirror`) holds it under a lock, the sync task
//! (`sync`) feeds it.

use std::collections::{HashMap, VecDeque};

use compact_str::CompactString;

use chrono::{TimeZone, Utc};
use ed25519_dalek::VerifyingKey;

use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AppliedLicense, CompactSeat, Edition, Feature, Lease, LeaseBook, LicenseState, ReconcileStatus,
    Seat, SeatSource, SerialNumber, TryoutRecord, UserId,
};
use crate::store::{Change, ChangeKind, Incident, Position, SeatValue, Snapshot, StoredLicense};

/// The seats of one feature, by user id. Hashed with foldhash (seeded per
/// process): a replica hashes every id of the pool at start and on a full
/// resync, and on every `CheckSeat`.
pub type Users = HashMap<CompactString, MirrorSeat, foldhash::fast::RandomState>;

/// How many applied changes a replica remembers, to know what a store that went
/// back lost (about 100 bytes each).
const JOURNAL_LEN: usize = 10_000;

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

/// A seat as the mirror keeps it: the domain's 16-byte [`CompactSeat`],
/// whose mark bit a full resync uses (`mirror::stream`).
pub type MirrorSeat = CompactSeat;

/// A seat as a snapshot page hands it over.
pub(super) fn from_value(seat: SeatValue) -> MirrorSeat {
    CompactSeat::new(
        seat.source,
        seat.assigned_at_ms,
        seat.over_capacity_since_ms,
    )
}

/// The mirrored state.
#[derive(Debug, Default)]
pub struct MirrorState {
    /// Where in the store's history this copy is; `None` before the first sync.
    pub position: Option<Position>,
    /// Seats by feature, then user id (O(1) lookups on the hot path).
    pub(super) seats: HashMap<Feature, Users>,
    /// Seats held per (feature, source).
    pub(super) counts: HashMap<(Feature, SeatSource), u32>,
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
    /// Of those, seat records (the store counts them among its seats).
    pub(super) corrupt_seats: usize,
    /// The high-water clock (ms): the largest time seen, here or in the store.
    pub high_water_ms: i64,
    /// The changes applied since the last snapshot, in order (bounded).
    pub(super) journal: VecDeque<Change>,
    /// Loaded from the state file, not (yet) from the store: it serves reads
    /// only, is never written back to the store and never plans a repair.
    pub from_disk: bool,
    /// The leases of concurrent features (live, or expired and not yet
    /// reclaimed by an acquisition: a decision reads their expiry).
    pub(super) leases: LeaseBook,
    /// The resync mark every seat put into this copy carries: a full resync
    /// marks the seats it finds unchanged with the other value (`mirror::stream`).
    pub(super) parity: bool,
}

impl MirrorState {
    pub fn seat(&self, feature: Feature, user_id: &str) -> Option<CompactSeat> {
        self.seats.get(&feature)?.get(user_id).copied()
    }

    /// The latest expiry (ms) of the user's leases of `feature`, live or not
    /// (the decision compares it with its time); `None` without one.
    pub fn lease_until_ms(&self, feature: Feature, user_id: &str) -> Option<i64> {
        self.leases.until_ms(feature, user_id)
    }

    /// The live leases of `feature` at `now_ms`.
    pub fn live_leases(&self, feature: Feature, now_ms: i64) -> u32 {
        self.leases.live(feature, now_ms)
    }

    /// Every lease this copy holds (live or not), unordered.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter()
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
                .filter_map(|s| s.over_capacity_since_ms())
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

    /// The changes after `since` up to this copy's version, from the journal;
    /// `None` when it no longer reaches back that far (or `since` is not a
    /// version of this copy: ahead of it, or without a copy from the store).
    pub fn changes_since(&self, since: u64) -> Option<Vec<Change>> {
        let version = self.position.as_ref()?.version;
        if since > version {
            return None;
        }
        if since == version {
            return Some(Vec::new());
        }
        let first = self.journal.front()?.version;
        let last = self.journal.back()?.version;
        if first > since + 1 || last != version {
            return None;
        }
        Some(
            self.journal
                .iter()
                .filter(|c| c.version > since)
                .cloned()
                .collect(),
        )
    }

    /// The seats of `features` (all when empty), as kept, for a snapshot built
    /// outside the lock.
    pub fn seats_of(&self, features: &[Feature]) -> Vec<(Feature, CompactString, CompactSeat)> {
        let mut out = Vec::new();
        for (feature, users) in &self.seats {
            if !features.is_empty() && !features.contains(feature) {
                continue;
            }
            out.reserve(users.len());
            out.extend(users.iter().map(|(u, s)| (*feature, u.clone(), *s)));
        }
        out
    }

    /// The version this copy has reached in the store's history (read your
    /// writes); 0 before the first snapshot of the store (also while answering
    /// from the state file, which is at no position of the store).
    pub fn version(&self) -> u64 {
        self.position.as_ref().map_or(0, |p| p.version)
    }

    pub fn seat_total(&self) -> usize {
        self.seats.values().map(Users::len).sum()
    }

    pub(super) fn put_seat(&mut self, seat: &Seat) {
        let new = CompactSeat::from_seat(seat).with_mark(self.parity);
        self.put(seat.feature, seat.user_id.as_str(), new);
    }

    /// Puts a seat as kept (its mark as given); the seat it replaced, if any.
    pub(super) fn put(
        &mut self,
        feature: Feature,
        user: &str,
        new: MirrorSeat,
    ) -> Option<MirrorSeat> {
        let old = self
            .seats
            .entry(feature)
            .or_default()
            .insert(user.into(), new);
        if let Some(old) = old {
            self.decrement(feature, old.source());
        }
        *self.counts.entry((feature, new.source())).or_default() += 1;
        old
    }

    /// Removes a seat; the seat removed, if any.
    pub(super) fn take(&mut self, feature: Feature, user: &str) -> Option<MirrorSeat> {
        let old = self.seats.get_mut(&feature).and_then(|m| m.remove(user))?;
        self.decrement(feature, old.source());
        Some(old)
    }

    /// Counts the seats per (feature, source) again.
    pub(super) fn recount(&mut self) {
        self.counts.clear();
        for (feature, users) in &self.seats {
            for seat in users.values() {
                *self.counts.entry((*feature, seat.source())).or_default() += 1;
            }
        }
    }

    pub(super) fn remove_seat(&mut self, feature: Feature, user_id: &str) {
        self.take(feature, user_id);
    }

    pub(super) fn decrement(&mut self, feature: Feature, source: SeatSource) {
        if let Some(c) = self.counts.get_mut(&(feature, source)) {
            *c = c.saturating_sub(1);
        }
    }

    pub(super) fn set_license(&mut self, stored: Option<StoredLicense>, verifier: &Verifier) {
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
            leases: self.leases.iter().cloned().collect(),
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

    /// A copy of a streamed snapshot (`snapshot`'s seats are in `seats`).
    pub(super) fn load_with(
        mut snapshot: Snapshot,
        seats: HashMap<Feature, Users>,
        verifier: &Verifier,
    ) -> Self {
        snapshot.seats = Vec::new();
        let mut state = Self::load(snapshot, verifier);
        state.seats = seats;
        state.recount();
        state
    }

    /// Takes everything but the seats from `snapshot` (a full resync that
    /// changed the seats in place), as [`Self::load`] does.
    pub(super) fn take_records(&mut self, snapshot: Snapshot, verifier: &Verifier) {
        let mut snapshot = snapshot;
        snapshot.seats = Vec::new();
        let loaded = Self::load(snapshot, verifier);
        self.position = loaded.position;
        self.stored_license = loaded.stored_license;
        self.license = loaded.license;
        self.license_problem = loaded.license_problem;
        self.tryout = loaded.tryout;
        self.reconcile = loaded.reconcile;
        self.initialization = loaded.initialization;
        self.retired_license = loaded.retired_license;
        self.retired_issued_at = loaded.retired_issued_at;
        self.incident = loaded.incident;
        self.leases = loaded.leases;
        self.corrupt_records = loaded.corrupt_records;
        self.corrupt_seats = loaded.corrupt_seats;
        self.high_water_ms = self.high_water_ms.max(loaded.high_water_ms);
        self.from_disk = false;
    }

    pub(super) fn load(snapshot: Snapshot, verifier: &Verifier) -> Self {
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
            corrupt_seats: snapshot
                .corrupt
                .iter()
                .filter(|c| c.starts_with("seat "))
                .count(),
            high_water_ms: snapshot.high_water_ms,
            ..Default::default()
        };
        // Sized once (no rehash while loading), then consumed seat by seat:
        // each id's heap copy goes as its entry is made.
        let mut per_feature: HashMap<Feature, usize> = HashMap::new();
        for seat in &snapshot.seats {
            *per_feature.entry(seat.feature).or_default() += 1;
        }
        for (feature, n) in per_feature {
            state.seats.insert(
                feature,
                Users::with_capacity_and_hasher(n, Default::default()),
            );
        }
        for seat in snapshot.seats {
            state.put_seat(&seat);
        }
        for lease in &snapshot.leases {
            state.leases.put(lease);
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
    pub(super) fn apply(&mut self, change: &Change, verifier: &Verifier) -> Applied {
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
            ChangeKind::LeaseAcquired { lease, reclaimed } => {
                for id in reclaimed {
                    self.leases.remove(id);
                }
                self.leases.put(lease);
            }
            ChangeKind::LeasesRenewed {
                lease_ids,
                expires_at,
                ..
            } => {
                for id in lease_ids {
                    self.leases.renew(id, *expires_at);
                }
            }
            ChangeKind::LeaseReleased { lease_id } => self.leases.remove(lease_id),
            ChangeKind::Reset => {
                self.seats.clear();
                self.counts.clear();
                self.leases.clear();
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
pub(super) enum Applied {
    Now,
    Already,
    Gap,
}

impl Applied {
    pub(super) fn in_order(self) -> bool {
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

    pub(super) fn of(state: &MirrorState) -> Self {
        if state.position.is_some() {
            StateSource::Store
        } else if state.from_disk {
            StateSource::Disk
        } else {
            StateSource::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::{Edition, TryoutRecord};

    fn verifier() -> Verifier {
        Verifier {
            key: None,
            serial: SerialNumber::parse("STATE-1").unwrap(),
            edition: Edition::Vm,
        }
    }

    fn t0() -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap()
    }

    fn seat(user: &str, source: SeatSource) -> Seat {
        Seat {
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            source,
            assigned_at: t0(),
            over_capacity_since: None,
        }
    }

    fn at(version: u64) -> Snapshot {
        Snapshot {
            position: Some(Position {
                epoch: "e1".into(),
                version,
            }),
            seats: vec![seat("alice", SeatSource::Tryout)],
            ..Snapshot::default()
        }
    }

    fn change(version: u64, kind: ChangeKind) -> Change {
        Change { version, kind }
    }

    #[test]
    fn a_snapshot_loads_seats_and_counts() {
        let state = MirrorState::load(at(7), &verifier());
        assert!(state.has_state());
        assert_eq!(state.seat_total(), 1);
        assert_eq!(state.count(Feature::User, SeatSource::Tryout), 1);
        assert_eq!(state.count(Feature::User, SeatSource::Purchased), 0);
        assert!(state.seat(Feature::User, "alice").is_some());
        assert!(
            MirrorState::default()
                .seat(Feature::User, "alice")
                .is_none()
        );
        assert!(!MirrorState::default().has_state());
    }

    #[test]
    fn changes_apply_in_version_order_once_and_a_gap_is_refused() {
        let v = verifier();
        let mut state = MirrorState::load(at(7), &v);
        let bob = change(
            8,
            ChangeKind::SeatAssigned(seat("bob", SeatSource::Purchased)),
        );
        assert_eq!(state.apply(&bob, &v), Applied::Now);
        // The feed repeating a local write changes nothing.
        assert_eq!(state.apply(&bob, &v), Applied::Already);
        assert_eq!(state.count(Feature::User, SeatSource::Purchased), 1);
        // Version 10 after 8: a change was missed; nothing is applied.
        let skipped = change(
            10,
            ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: UserId::parse("alice").unwrap(),
            },
        );
        assert_eq!(state.apply(&skipped, &v), Applied::Gap);
        assert!(!Applied::Gap.in_order());
        assert!(state.seat(Feature::User, "alice").is_some());
        assert_eq!(state.position.as_ref().unwrap().version, 8);
        let released = change(9, skipped.kind.clone());
        assert_eq!(state.apply(&released, &v), Applied::Now);
        assert!(state.seat(Feature::User, "alice").is_none());
        assert_eq!(state.count(Feature::User, SeatSource::Tryout), 0);
        // A copy without a snapshot applies nothing.
        assert_eq!(MirrorState::default().apply(&bob, &v), Applied::Gap);
    }

    #[test]
    fn a_reset_keeps_the_tryout_record_and_the_journal_is_bounded() {
        let v = verifier();
        let mut state = MirrorState::load(at(1), &v);
        let tryout = TryoutRecord::Started {
            started_at: t0(),
            ends_at: t0() + chrono::Duration::days(14),
            ended: None,
        };
        state.apply(&change(2, ChangeKind::TryoutChanged(tryout.clone())), &v);
        state.apply(&change(3, ChangeKind::Reset), &v);
        assert_eq!(state.seat_total(), 0);
        assert_eq!(state.count(Feature::User, SeatSource::Tryout), 0);
        assert_eq!(state.tryout, Some(tryout));
        for version in 4..(4 + JOURNAL_LEN as u64 + 5) {
            let kind = ChangeKind::ReconcileRecorded(ReconcileStatus::default());
            assert_eq!(state.apply(&change(version, kind), &v), Applied::Now);
        }
        assert_eq!(state.journal.len(), JOURNAL_LEN);
        assert_eq!(
            state.journal.back().unwrap().version,
            3 + JOURNAL_LEN as u64 + 5
        );
    }

    #[test]
    fn changes_since_reach_back_as_far_as_the_journal() {
        let v = verifier();
        let mut state = MirrorState::load(at(7), &v);
        // Nothing applied since the snapshot: only the copy's own version.
        assert_eq!(state.changes_since(7), Some(Vec::new()));
        assert_eq!(state.changes_since(6), None);
        assert_eq!(state.changes_since(8), None);
        for version in 8..=10 {
            let kind = ChangeKind::ReconcileRecorded(ReconcileStatus::default());
            state.apply(&change(version, kind), &v);
        }
        let versions =
            |c: Option<Vec<Change>>| c.map(|c| c.iter().map(|c| c.version).collect::<Vec<_>>());
        assert_eq!(versions(state.changes_since(7)), Some(vec![8, 9, 10]));
        assert_eq!(versions(state.changes_since(9)), Some(vec![10]));
        assert_eq!(versions(state.changes_since(10)), Some(vec![]));
        assert_eq!(state.changes_since(6), None);
        assert_eq!(state.changes_since(11), None);
        assert_eq!(MirrorState::default().changes_since(0), None);
        let seats = state.seats_of(&[Feature::CallAssist]);
        assert!(seats.is_empty());
        assert_eq!(state.seats_of(&[]).len(), 1);
        assert_eq!(state.seats_of(&[Feature::User]).len(), 1);
    }

    #[test]
    fn a_snapshot_round_trips_through_the_state() {
        let state = MirrorState::load(at(7), &verifier());
        let again = state.to_snapshot();
        assert_eq!(again.position, at(7).position);
        assert_eq!(again.seats, at(7).seats);
    }

    fn lease(id: &str, user: &str, holder: &str, expires_s: i64) -> Lease {
        Lease {
            lease_id: id.into(),
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            holder: crate::domain::Holder::parse(holder).unwrap(),
            acquired_at: t0(),
            expires_at: t0() + chrono::Duration::seconds(expires_s),
        }
    }

    #[test]
    fn leases_follow_the_feed_one_per_user_and_holder() {
        let ms = |s: i64| (t0() + chrono::Duration::seconds(s)).timestamp_millis();
        let mut snapshot = at(1);
        snapshot.leases = vec![lease("a1", "alice", "pod-1", 90)];
        let mut state = MirrorState::load(snapshot, &verifier());
        assert_eq!(state.lease_until_ms(Feature::User, "alice"), Some(ms(90)));
        assert_eq!(state.live_leases(Feature::User, ms(0)), 1);
        assert_eq!(
            state.live_leases(Feature::User, ms(90)),
            0,
            "expired at its end"
        );

        // A second holder of alice, then bob; the first lease expired and
        // reclaimed by bob's acquisition.
        let kind = |l: Lease, reclaimed: &[&str]| ChangeKind::LeaseAcquired {
            lease: l,
            reclaimed: reclaimed.iter().map(|s| (*s).to_owned()).collect(),
        };
        let v = verifier();
        assert!(
            state
                .apply(
                    &change(2, kind(lease("a2", "alice", "pod-2", 120), &[])),
                    &v
                )
                .in_order()
        );
        assert_eq!(state.lease_until_ms(Feature::User, "alice"), Some(ms(120)));
        assert!(
            state
                .apply(
                    &change(3, kind(lease("b1", "bob", "pod-1", 200), &["a1"])),
                    &v
                )
                .in_order()
        );
        assert_eq!(state.leases().count(), 2);
        // The same key again with another id (a repair): one lease per key.
        assert!(
            state
                .apply(
                    &change(4, kind(lease("a3", "alice", "pod-2", 150), &[])),
                    &v
                )
                .in_order()
        );
        assert_eq!(state.leases().count(), 2);
        assert_eq!(state.lease_until_ms(Feature::User, "alice"), Some(ms(150)));

        // A renewal moves the expiry of the ids it names.
        let renewed = ChangeKind::LeasesRenewed {
            holder: crate::domain::Holder::parse("pod-2").unwrap(),
            lease_ids: vec!["a3".into(), "unknown".into()],
            expires_at: t0() + chrono::Duration::seconds(300),
        };
        assert!(state.apply(&change(5, renewed), &v).in_order());
        assert_eq!(state.lease_until_ms(Feature::User, "alice"), Some(ms(300)));
        assert_eq!(state.live_leases(Feature::User, ms(250)), 1);

        let released = ChangeKind::LeaseReleased {
            lease_id: "a3".into(),
        };
        assert!(state.apply(&change(6, released), &v).in_order());
        assert_eq!(state.lease_until_ms(Feature::User, "alice"), None);
        assert_eq!(
            state.to_snapshot().leases,
            vec![lease("b1", "bob", "pod-1", 200)]
        );
        assert!(state.apply(&change(7, ChangeKind::Reset), &v).in_order());
        assert_eq!(state.leases().count(), 0);
        assert_eq!(state.lease_until_ms(Feature::User, "bob"), None);
    }
}
