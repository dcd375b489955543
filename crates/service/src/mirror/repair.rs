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
//! - the later reconcile status wins.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::MirrorState;
use crate::domain::{
    AppliedLicense, Edition, Feature, Seat, SeatSource, TryoutPolicy, TryoutRecord, UserId,
};
use crate::store::{Change, ChangeKind, RepairWrite, Snapshot};

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
    pub mine: &'a MirrorState,
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
    if let (Some(m), false) = (input.mine.license.as_ref(), newer_license || newer_reset) {
        let newer = input
            .store_license
            .is_none_or(|s| s.id() != m.id() && m.payload.issued_at > s.payload.issued_at);
        if newer && let Some(stored) = &input.mine.stored_license {
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
    let still_held = |seat: &Seat| {
        input
            .mine
            .seat(seat.feature, seat.user_id.as_str())
            .map(|m| m.to_seat(seat.user_id.clone(), seat.feature))
            .filter(|m| m.assigned_at == seat.assigned_at)
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
                        if input.mine.seat(*feature, user_id.as_str()).is_none()
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
        Lost::Everything => candidates = input.mine.to_snapshot().seats,
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
        [input.mine.license.as_ref(), license]
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

    let empty = w.add_seats.is_empty()
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
