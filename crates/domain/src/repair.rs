//! What a replica writes back into a store that lost acknowledged writes: a pure
//! plan (no I/O) from the replica's copy, the writes the store lost, the store's
//! snapshot and the writes the store took since the loss.
//!
//! The rules, each keeping the newer truth:
//!
//! - a seat the replica holds and the store lost comes back, unless the store
//!   took a newer write of the same (feature, user) or a re-setup since; oldest
//!   assignment first, only while its pool has room (I1), otherwise it is
//!   reported lost (I2);
//! - a release the store lost is done again, under the same condition;
//! - a newer license document comes back unless the store applied another one
//!   (or a re-setup) since;
//! - the tryout record that started first wins, an end is never lost: a tryout
//!   never starts twice for a serial (I5);
//! - a pending initialization whose nonce an applied license consumed is removed
//!   (a consumed nonce is never accepted again, I5); a lost pending one comes back;
//! - the later reconcile status wins;
//! - a lease the replica holds live and the store lost comes back, unless the
//!   store took a newer write of it (the same id) or a re-setup since, and only
//!   while its feature has room under the quantity (I1) and the store holds no
//!   other lease of its (user, holder) (one each, I1b); otherwise it is
//!   reported lost (its holder's next renewal answers it `lost`);
//! - a lease release the store lost is done again, unless the store took a
//!   newer write of that lease or a re-setup since (a released use never
//!   comes back to fill its feature).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::history::{Change, ChangeKind, RepairWrite, Snapshot};
use crate::ids::{Edition, Feature, UserId};
use crate::license::AppliedLicense;
use crate::seats::{Seat, SeatSource};
use crate::tryout::{TryoutPolicy, TryoutRecord};

/// Which of the replica's writes the store lost.
#[derive(Debug, Clone, Copy)]
pub enum Lost<'a> {
    /// These changes (the replica's history after the last point both share).
    Changes(&'a [Change]),
    /// Unknown: compare everything the replica holds.
    Everything,
}

/// Everything a repair plan is made from.
pub struct Input<'a> {
    /// What the replica holds: its copy of the store, as a snapshot.
    pub mine: &'a Snapshot,
    /// The replica's license document, verified (`None`: none, or not trusted).
    pub mine_license: Option<&'a AppliedLicense>,
    pub lost: Lost<'a>,
    pub store: &'a Snapshot,
    /// The store's license document, verified (`None`: none, or not trusted).
    pub store_license: Option<&'a AppliedLicense>,
    /// The writes the store took after the point both share (newer than the loss).
    pub newer: &'a [Change],
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    pub now: DateTime<Utc>,
}

/// Plans the write-back; `None` when the store lacks nothing the replica holds.
pub fn plan(input: &Input<'_>) -> Option<RepairWrite> {
    let mut w = RepairWrite::default();
    let mut touched: HashSet<(Feature, &str)> = HashSet::new();
    let mut newer_license = false;
    let mut newer_tryout = false;
    let mut newer_init = false;
    let mut newer_reconcile = false;
    let mut newer_reset = false;
    let mut touched_leases: HashSet<&str> = HashSet::new();
    for change in input.newer {
        match &change.kind {
            ChangeKind::SeatAssigned(s) | ChangeKind::SeatFlagged(s) => {
                touched.insert((s.feature, s.user_id.as_str()));
            }
            ChangeKind::SeatReleased { feature, user_id } => {
                touched.insert((*feature, user_id.as_str()));
            }
            ChangeKind::LicenseApplied(_) => newer_license = true,
            ChangeKind::TryoutChanged(_) => newer_tryout = true,
            ChangeKind::InitializationIssued(_) | ChangeKind::InitializationConsumed => {
                newer_init = true;
            }
            ChangeKind::ReconcileRecorded(_) => newer_reconcile = true,
            ChangeKind::Reset => newer_reset = true,
            ChangeKind::Repaired(_) => {}
            ChangeKind::LeaseAcquired { lease, reclaimed } => {
                touched_leases.insert(lease.lease_id.as_str());
                touched_leases.extend(reclaimed.iter().map(String::as_str));
            }
            ChangeKind::LeasesRenewed { lease_ids, .. } => {
                touched_leases.extend(lease_ids.iter().map(String::as_str));
            }
            ChangeKind::LeaseReleased { lease_id } => {
                touched_leases.insert(lease_id.as_str());
            }
        }
    }
    let in_store: HashSet<(Feature, &str)> = input
        .store
        .seats
        .iter()
        .map(|s| (s.feature, s.user_id.as_str()))
        .collect();
    let untouched = |f: Feature, u: &str| !newer_reset && !touched.contains(&(f, u));

    // The license: the replica's newer document, unless the store moved on.
    let mut license = input.store_license;
    if let (Some(m), false) = (input.mine_license, newer_license || newer_reset) {
        let newer = input
            .store_license
            .is_none_or(|s| s.id() != m.id() && m.payload.issued_at > s.payload.issued_at);
        if newer && let Some(stored) = &input.mine.license {
            w.license = Some(stored.clone());
            w.incident
                .restored(format!("license issued {}", m.payload.issued_at));
            license = Some(m);
        }
    }

    // The tryout record.
    let tryout = merge_tryout(
        input.mine.tryout.as_ref(),
        input.store.tryout.as_ref(),
        newer_tryout,
    );
    if let Some((record, note)) = tryout {
        w.incident.restored(note);
        w.tryout = Some(record);
    }

    // Seats.
    let mut candidates: Vec<Seat> = Vec::new();
    let mut releases: Vec<(Feature, UserId)> = Vec::new();
    let held: HashMap<(Feature, &str), &Seat> = input
        .mine
        .seats
        .iter()
        .map(|s| ((s.feature, s.user_id.as_str()), s))
        .collect();
    let still_held = |seat: &Seat| {
        held.get(&(seat.feature, seat.user_id.as_str()))
            .filter(|m| m.assigned_at == seat.assigned_at)
            .map(|m| (*m).clone())
    };
    match input.lost {
        Lost::Changes(changes) => {
            for change in changes {
                match &change.kind {
                    ChangeKind::SeatAssigned(seat) | ChangeKind::SeatFlagged(seat) => {
                        if let Some(held) = still_held(seat)
                            && !candidates
                                .iter()
                                .any(|c| c.feature == held.feature && c.user_id == held.user_id)
                        {
                            candidates.push(held);
                        }
                    }
                    ChangeKind::SeatReleased { feature, user_id }
                        if !held.contains_key(&(*feature, user_id.as_str()))
                            && in_store.contains(&(*feature, user_id.as_str()))
                            && untouched(*feature, user_id.as_str())
                            && !releases.contains(&(*feature, user_id.clone())) =>
                    {
                        releases.push((*feature, user_id.clone()));
                    }
                    _ => {}
                }
            }
        }
        Lost::Everything => candidates = input.mine.seats.clone(),
    }
    candidates.retain(|s| {
        !in_store.contains(&(s.feature, s.user_id.as_str()))
            && untouched(s.feature, s.user_id.as_str())
    });
    candidates.sort_by(|a, b| {
        (a.assigned_at, a.feature, &a.user_id).cmp(&(b.assigned_at, b.feature, &b.user_id))
    });
    let final_tryout = w.tryout.as_ref().or(input.store.tryout.as_ref());
    let used = |feature: Feature, source: SeatSource| {
        input
            .store
            .seats
            .iter()
            .filter(|s| s.feature == feature && s.source == source)
            .count()
    };
    let mut added: Vec<(Feature, SeatSource)> = Vec::new();
    for seat in candidates {
        let capacity = match seat.source {
            SeatSource::Purchased => license.map_or(0, |l| {
                l.payload
                    .entitlement(seat.feature)
                    .filter(|e| e.is_current(input.now))
                    .map_or(0, |e| e.quantity)
            }),
            SeatSource::Tryout => {
                let used_tryout = final_tryout.is_some() && input.edition.has_tryout();
                if used_tryout { input.tryout.seats } else { 0 }
            }
        };
        let in_use = used(seat.feature, seat.source)
            + added
                .iter()
                .filter(|k| **k == (seat.feature, seat.source))
                .count();
        let name = format!("seat {}/{}", seat.feature, seat.user_id.as_str());
        if u32::try_from(in_use).unwrap_or(u32::MAX) < capacity {
            added.push((seat.feature, seat.source));
            w.incident.restored(name);
            w.add_seats.push(seat);
        } else {
            w.incident
                .lost(format!("{name} (its pool was full by then)"));
        }
    }
    for (feature, user) in releases {
        w.incident
            .restored(format!("release of {feature}/{}", user.as_str()));
        w.remove_seats.push((feature, user));
    }

    // The pending initialization.
    let consumed = |nonce: &str| {
        [input.mine_license, license]
            .into_iter()
            .flatten()
            .any(|l| l.payload.nonce.as_deref() == Some(nonce))
    };
    match (&input.store.initialization, &input.mine.initialization) {
        (Some(p), _) if consumed(&p.nonce) => {
            w.initialization = Some(None);
            w.incident
                .restored("use of the initialization code (its nonce is consumed)".into());
        }
        (None, Some(p)) if !newer_init && !newer_reset && !consumed(&p.nonce) => {
            w.initialization = Some(Some(p.clone()));
            w.incident.restored("pending initialization code".into());
        }
        _ => {}
    }

    // The reconcile status.
    if !newer_reconcile
        && !newer_reset
        && input.mine.reconcile.last_attempt_at > input.store.reconcile.last_attempt_at
    {
        w.reconcile = Some(input.mine.reconcile.clone());
        w.incident.restored("reconcile status".into());
    }

    // Lease releases the store lost: the leases it still holds that this
    // replica released, unless the store wrote them since.
    let mut unleased: HashSet<&str> = HashSet::new();
    if let Lost::Changes(changes) = input.lost {
        for change in changes {
            if let ChangeKind::LeaseReleased { lease_id } = &change.kind
                && !newer_reset
                && !touched_leases.contains(lease_id.as_str())
                && !input.mine.leases.iter().any(|l| &l.lease_id == lease_id)
                && let Some(stored) = input.store.leases.iter().find(|l| &l.lease_id == lease_id)
                && unleased.insert(stored.lease_id.as_str())
            {
                w.incident.restored(format!(
                    "release of lease {}/{} held by {}",
                    stored.feature,
                    stored.user_id.as_str(),
                    stored.holder
                ));
                w.remove_leases.push(stored.clone());
            }
        }
    }

    // Leases: the replica's live ones the store lacks, while their feature
    // has room under the quantity of the license the store will hold.
    let mut live_in_store: HashMap<Feature, u32> = HashMap::new();
    let mut stored_keys: HashSet<(Feature, &str, &str)> = HashSet::new();
    let mut stored_ids: HashSet<&str> = HashSet::new();
    for l in input
        .store
        .leases
        .iter()
        .filter(|l| !unleased.contains(l.lease_id.as_str()))
    {
        stored_keys.insert((l.feature, l.user_id.as_str(), l.holder.as_str()));
        stored_ids.insert(l.lease_id.as_str());
        if l.is_live(input.now) {
            *live_in_store.entry(l.feature).or_default() += 1;
        }
    }
    let mut lease_candidates: Vec<&crate::leases::Lease> = input
        .mine
        .leases
        .iter()
        .filter(|l| {
            l.is_live(input.now)
                && !newer_reset
                && !touched_leases.contains(l.lease_id.as_str())
                && !stored_ids.contains(l.lease_id.as_str())
        })
        .collect();
    lease_candidates.sort_by(|a, b| (a.acquired_at, a.key()).cmp(&(b.acquired_at, b.key())));
    for lease in lease_candidates {
        let capacity = license.map_or(0, |l| {
            l.payload
                .entitlement(lease.feature)
                .filter(|e| {
                    e.is_current(input.now) && e.seat_model == crate::license::SeatModel::Concurrent
                })
                .map_or(0, |e| e.quantity)
        });
        let in_use = live_in_store.entry(lease.feature).or_default();
        let name = format!(
            "lease {}/{} held by {}",
            lease.feature,
            lease.user_id.as_str(),
            lease.holder
        );
        if stored_keys.contains(&(lease.feature, lease.user_id.as_str(), lease.holder.as_str())) {
            // One lease per (user, holder): the store's stays. This one is
            // lost all the same (its holder's renewal answers it `lost`).
            w.incident
                .lost(format!("{name} (the store holds another lease of it)"));
        } else if *in_use < capacity {
            *in_use += 1;
            w.incident.restored(name);
            w.add_leases.push(lease.clone());
        } else {
            w.incident
                .lost(format!("{name} (its feature was at capacity by then)"));
        }
    }

    let empty = w.add_seats.is_empty()
        && w.add_leases.is_empty()
        && w.remove_leases.is_empty()
        && w.remove_seats.is_empty()
        && w.license.is_none()
        && w.tryout.is_none()
        && w.initialization.is_none()
        && w.reconcile.is_none()
        && w.incident.lost_total == 0;
    (!empty).then_some(w)
}

/// The tryout record to write back, with what it restores; `None` to keep the store's.
fn merge_tryout(
    mine: Option<&TryoutRecord>,
    store: Option<&TryoutRecord>,
    store_changed_it: bool,
) -> Option<(TryoutRecord, String)> {
    let mine = mine?;
    match store {
        None => Some((mine.clone(), "tryout record".into())),
        Some(s) if s == mine => None,
        Some(TryoutRecord::Started {
            started_at: b,
            ended: store_end,
            ..
        }) => match mine {
            TryoutRecord::Started {
                started_at: a,
                ends_at,
                ended,
            } if a < b => Some((
                TryoutRecord::Started {
                    started_at: *a,
                    ends_at: *ends_at,
                    ended: ended.clone().or_else(|| store_end.clone()),
                },
                "tryout start (the store had started it again)".into(),
            )),
            TryoutRecord::Started {
                started_at: a,
                ended: Some(_),
                ..
            } if a == b && store_end.is_none() && !store_changed_it => {
                Some((mine.clone(), "tryout end".into()))
            }
            TryoutRecord::Forfeited { .. } if !store_changed_it => {
                Some((mine.clone(), "tryout forfeit".into()))
            }
            _ => None,
        },
        Some(TryoutRecord::Forfeited { .. }) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600 + s, 0).unwrap()
    }

    fn started(at: i64) -> TryoutRecord {
        TryoutRecord::Started {
            started_at: t(at),
            ends_at: t(at) + Duration::days(14),
            ended: None,
        }
    }

    fn tryout_seat(user: &str, at: i64) -> Seat {
        Seat {
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            source: SeatSource::Tryout,
            assigned_at: t(at),
            over_capacity_since: None,
        }
    }

    fn input<'a>(mine: &'a Snapshot, store: &'a Snapshot, newer: &'a [Change]) -> Input<'a> {
        Input {
            mine,
            mine_license: None,
            lost: Lost::Everything,
            store,
            store_license: None,
            newer,
            edition: Edition::Vm,
            tryout: TryoutPolicy::default(),
            now: t(100),
        }
    }

    /// A store that went back lost three test seats; meanwhile it took one of
    /// another user: the oldest two fit the 3 test seats again, the newest is
    /// reported lost (I1, I2).
    #[test]
    fn lost_seats_come_back_oldest_first_while_the_pool_has_room() {
        let mine = Snapshot {
            seats: vec![
                tryout_seat("c", 3),
                tryout_seat("a", 1),
                tryout_seat("b", 2),
            ],
            tryout: Some(started(0)),
            ..Snapshot::default()
        };
        let store = Snapshot {
            seats: vec![tryout_seat("z", 4)],
            tryout: Some(started(0)),
            ..Snapshot::default()
        };
        let plan = plan(&input(&mine, &store, &[])).expect("a plan");
        let users: Vec<&str> = plan.add_seats.iter().map(|s| s.user_id.as_str()).collect();
        assert_eq!(users, ["a", "b"]);
        assert_eq!(plan.incident.restored_total, 2);
        assert_eq!(plan.incident.lost_total, 1);
        assert!(
            plan.incident.lost[0].contains("user/c"),
            "{:?}",
            plan.incident
        );
    }

    /// A seat the store took a newer write of since the loss keeps the
    /// store's truth; a store that lacks nothing gets no plan.
    #[test]
    fn newer_writes_of_the_store_win_and_nothing_lost_plans_nothing() {
        let mine = Snapshot {
            seats: vec![tryout_seat("a", 1)],
            tryout: Some(started(0)),
            ..Snapshot::default()
        };
        let store = Snapshot {
            tryout: Some(started(0)),
            ..Snapshot::default()
        };
        let released = [Change {
            version: 9,
            kind: ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: UserId::parse("a").unwrap(),
            },
        }];
        assert_eq!(plan(&input(&mine, &store, &released)), None);
        assert_eq!(plan(&input(&mine, &mine, &[])), None);
    }

    /// A live lease of `user` held by pod-1.
    fn lease(id: &str, user: &str) -> crate::leases::Lease {
        crate::leases::Lease {
            lease_id: id.into(),
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            holder: crate::leases::Holder::parse("pod-1").unwrap(),
            acquired_at: t(10),
            expires_at: t(1000),
        }
    }

    /// A lease the store lost whose (user, holder) the store holds under
    /// another id (one the store went back to) is not written back, and is
    /// reported lost; the store's own copy of a lease is not a loss.
    #[test]
    fn a_lost_lease_whose_holder_holds_another_is_reported_lost() {
        let mine = Snapshot {
            leases: vec![lease("new", "u1"), lease("kept", "u2")],
            ..Snapshot::default()
        };
        let store = Snapshot {
            leases: vec![lease("old", "u1"), lease("kept", "u2")],
            ..Snapshot::default()
        };
        let plan = plan(&input(&mine, &store, &[])).expect("a plan");
        assert!(plan.add_leases.is_empty());
        assert_eq!(plan.incident.lost_total, 1);
        assert_eq!(
            plan.incident.lost,
            ["lease user/u1 held by pod-1 (the store holds another lease of it)"]
        );
    }

    /// A lease release the store lost is done again (the store still holds
    /// the lease, this replica released it); not when the store wrote that
    /// lease since, nor for a lease this replica still holds.
    #[test]
    fn a_lost_lease_release_is_done_again() {
        let released = |id: &str| Change {
            version: 7,
            kind: ChangeKind::LeaseReleased {
                lease_id: id.into(),
            },
        };
        let mine = Snapshot {
            leases: vec![lease("held", "u3")],
            ..Snapshot::default()
        };
        let store = Snapshot {
            leases: vec![
                lease("gone", "u1"),
                lease("renewed", "u2"),
                lease("held", "u3"),
            ],
            ..Snapshot::default()
        };
        let lost = [released("gone"), released("renewed"), released("held")];
        let newer = [Change {
            version: 8,
            kind: ChangeKind::LeasesRenewed {
                holder: crate::leases::Holder::parse("pod-1").unwrap(),
                lease_ids: vec!["renewed".into()],
                expires_at: t(2000),
            },
        }];
        let plan = plan(&Input {
            lost: Lost::Changes(&lost),
            ..input(&mine, &store, &newer)
        })
        .expect("a plan");
        let removed: Vec<&str> = plan
            .remove_leases
            .iter()
            .map(|l| l.lease_id.as_str())
            .collect();
        assert_eq!(removed, ["gone"]);
        assert_eq!(
            plan.incident.restored,
            ["release of lease user/u1 held by pod-1"]
        );
    }

    #[test]
    fn the_first_tryout_start_wins() {
        assert_eq!(merge_tryout(None, Some(&started(5)), false), None);
        assert_eq!(
            merge_tryout(Some(&started(1)), None, false).map(|r| r.0),
            Some(started(1))
        );
        assert_eq!(
            merge_tryout(Some(&started(1)), Some(&started(5)), true).map(|r| r.0),
            Some(started(1))
        );
        assert_eq!(
            merge_tryout(Some(&started(5)), Some(&started(1)), false),
            None
        );
        assert_eq!(
            merge_tryout(Some(&started(1)), Some(&started(1)), false),
            None
        );
    }
}
