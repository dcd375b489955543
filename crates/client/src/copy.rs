//! The client's copy of the seat state as a pure value: loaded from a
//! snapshot, changed by one change at a time in version order, asked with the
//! domain's own decision ([`Rules::check`]). Time is the deployment's
//! reference time from the stream, advanced by the monotonic clock
//! ([`Instant`]), never the wall clock.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use compact_str::CompactString;
use comtrexx_licensing_domain::{
    AppliedLicense, CompactSeat, Feature, LeaseBook, LicenseState, ReconcileStatus, Rules,
    SeatCheck, SeatModel, TryoutRecord,
};
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::pb::seat_state_change::Kind as ChangeKind;
use comtrexx_licensing_proto::seat_state::{self as wire, Invalid};
use comtrexx_licensing_proto::{from_timestamp, timestamp};
use ed25519_dalek::VerifyingKey;

/// The seat state at one version of the store's history.
#[derive(Debug, Clone)]
pub struct SeatCopy {
    /// The version of the store's history the copy is at.
    pub version: u64,
    /// The store's epoch the version counts in.
    pub epoch: String,
    /// The PBX's serial number.
    pub serial: String,
    /// The PBX's fixed rules.
    pub rules: Rules,
    seats: HashMap<Feature, HashMap<CompactString, CompactSeat>>,
    /// The license the service trusts.
    pub license: Option<AppliedLicense>,
    /// The tryout record.
    pub tryout: Option<TryoutRecord>,
    /// The reconcile history.
    pub reconcile: ReconcileStatus,
    /// The leases of concurrent features.
    pub leases: LeaseBook,
    /// The deployment's reference time at `anchored`.
    reference: DateTime<Utc>,
    anchored: Instant,
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The copy moved to the message's version.
    Changed,
    /// A change that is not the next one: the stream must be resumed.
    Gap {
        /// The copy's version.
        have: u64,
        /// The change's version.
        got: u64,
    },
}

impl SeatCopy {
    /// A copy from a snapshot at `version`, read at `at`.
    pub fn from_snapshot(
        version: u64,
        s: &pb::SeatStateSnapshot,
        key: Option<&VerifyingKey>,
        at: Instant,
    ) -> Result<Self, Invalid> {
        let rules = wire::rules_of(
            s.rules
                .as_ref()
                .ok_or_else(|| Invalid("snapshot.rules is missing".into()))?,
        )?;
        let mut seats: HashMap<Feature, HashMap<CompactString, CompactSeat>> = HashMap::new();
        for w in &s.seats {
            let (feature, user, seat) = wire::seat_of(w)?;
            seats
                .entry(feature)
                .or_insert_with(|| HashMap::with_capacity(s.seats.len()))
                .insert(CompactString::from(user), seat);
        }
        for map in seats.values_mut() {
            map.shrink_to_fit();
        }
        let license = s
            .license
            .as_ref()
            .map(|l| wire::license_of(l, &s.serial_number, rules.edition, key))
            .transpose()?;
        let mut leases = LeaseBook::default();
        for l in &s.leases {
            leases.put(&wire::lease_of(l)?);
        }
        let reference = s
            .reference_time
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| Invalid("snapshot.reference_time is missing".into()))?;
        Ok(Self {
            version,
            epoch: s.epoch.clone(),
            serial: s.serial_number.clone(),
            rules,
            seats,
            license,
            tryout: s.tryout.as_ref().map(wire::tryout_of).transpose()?,
            reconcile: s
                .reconcile
                .as_ref()
                .map(wire::reconcile_of)
                .transpose()?
                .unwrap_or_default(),
            leases,
            reference,
            anchored: at,
        })
    }

    /// Applies the change that moves the copy to `version`; a change that is
    /// not exactly the next one is a gap and changes nothing. A change that
    /// does not decode changes nothing either (the error names the field).
    pub fn apply(
        &mut self,
        version: u64,
        change: &pb::SeatStateChange,
        key: Option<&VerifyingKey>,
    ) -> Result<Applied, Invalid> {
        if version != self.version + 1 {
            return Ok(Applied::Gap {
                have: self.version,
                got: version,
            });
        }
        match change
            .kind
            .as_ref()
            .ok_or_else(|| Invalid("change.kind is missing".into()))?
        {
            ChangeKind::SeatPut(w) => {
                let (feature, user, seat) = wire::seat_of(w)?;
                self.seats
                    .entry(feature)
                    .or_default()
                    .insert(CompactString::from(user), seat);
            }
            ChangeKind::SeatRemoved(r) => {
                let feature = wire::feature_of(&r.feature)?;
                if let Some(map) = self.seats.get_mut(&feature) {
                    map.remove(r.user_id.as_str());
                }
            }
            ChangeKind::LicenseApplied(doc) => {
                self.license = Some(wire::license_of(
                    doc,
                    &self.serial,
                    self.rules.edition,
                    key,
                )?);
            }
            ChangeKind::LicenseRemoved(_) => self.license = None,
            ChangeKind::TryoutChanged(t) => self.tryout = Some(wire::tryout_of(t)?),
            ChangeKind::ReconcileRecorded(r) => self.reconcile = wire::reconcile_of(r)?,
            ChangeKind::Reset(_) => {
                self.seats.clear();
                self.license = None;
                self.reconcile = ReconcileStatus::default();
                self.leases.clear();
            }
            ChangeKind::LeasePut(put) => {
                let lease = wire::lease_of(
                    put.lease
                        .as_ref()
                        .ok_or_else(|| Invalid("lease_put.lease is missing".into()))?,
                )?;
                for id in &put.reclaimed {
                    self.leases.remove(id);
                }
                self.leases.put(&lease);
            }
            ChangeKind::LeasesRenewed(r) => {
                let until = r
                    .expires_at
                    .as_ref()
                    .and_then(from_timestamp)
                    .ok_or_else(|| Invalid("leases_renewed.expires_at is missing".into()))?;
                for id in &r.lease_ids {
                    self.leases.renew(id, until);
                }
            }
            ChangeKind::LeaseReleased(id) => self.leases.remove(id),
            ChangeKind::Other(_) => {}
        }
        self.version = version;
        Ok(Applied::Changed)
    }

    /// A reference time heard at `at` (a heartbeat). The copy's time never
    /// goes back: a reference behind what the monotonic clock says keeps the
    /// copy's own.
    pub fn heard(&mut self, reference: DateTime<Utc>, at: Instant) {
        let own = self.now(at);
        self.reference = reference.max(own);
        self.anchored = at;
    }

    /// The deployment's time at `at`.
    pub fn now(&self, at: Instant) -> DateTime<Utc> {
        let elapsed = at.saturating_duration_since(self.anchored);
        chrono::Duration::from_std(elapsed)
            .ok()
            .and_then(|d| self.reference.checked_add_signed(d))
            .unwrap_or(self.reference)
    }

    /// `CheckSeat` at `now`, as the service decides it. No allocation.
    pub fn check(&self, user_id: &str, feature: Feature, now: DateTime<Utc>) -> SeatCheck {
        self.decide(user_id, feature, None, now)
    }

    /// [`SeatCopy::check`] of a concurrent feature as if the user also held a
    /// lease until `until` (one of this client's own, not yet in the copy).
    pub fn check_with_lease(
        &self,
        user_id: &str,
        feature: Feature,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        self.decide(user_id, feature, Some(until), now)
    }

    fn decide(
        &self,
        user_id: &str,
        feature: Feature,
        own_lease: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        let seat = self
            .seats
            .get(&feature)
            .and_then(|m| m.get(user_id))
            .map(|s| s.facts());
        let state = LicenseState {
            license: self.license.as_ref(),
            tryout: self.tryout.as_ref(),
            reconcile: &self.reconcile,
        };
        // A concurrent feature is decided by the user's leases.
        if self
            .license
            .as_ref()
            .is_some_and(|l| l.payload.seat_model(feature) == SeatModel::Concurrent)
        {
            let copied = self
                .leases
                .until_ms(feature, user_id)
                .and_then(DateTime::from_timestamp_millis);
            let until = copied.max(own_lease);
            return self.rules.check_leased(&state, feature, seat, until, now);
        }
        self.rules.check(&state, feature, seat, now)
    }

    /// How the copy's license sells `feature` (no license: assigned).
    pub fn seat_model(&self, feature: Feature) -> SeatModel {
        self.license
            .as_ref()
            .map_or(SeatModel::Assigned, |l| l.payload.seat_model(feature))
    }

    /// How many seats the copy holds.
    pub fn seat_count(&self) -> usize {
        self.seats.values().map(HashMap::len).sum()
    }

    /// The copy as a snapshot message (for the cache file), its reference
    /// time being the copy's time at `at`.
    pub fn to_snapshot(&self, at: Instant) -> pb::SeatStateSnapshot {
        let now = self.now(at);
        let state = LicenseState {
            license: self.license.as_ref(),
            tryout: self.tryout.as_ref(),
            reconcile: &self.reconcile,
        };
        let activation = self.rules.activation(&state, now);
        let mut seats = Vec::with_capacity(self.seat_count());
        for (feature, map) in &self.seats {
            for (user, seat) in map {
                seats.push(wire::compact_seat(*feature, user, *seat));
            }
        }
        pb::SeatStateSnapshot {
            serial_number: self.serial.clone(),
            rules: Some(wire::rules(&self.rules)),
            seats,
            license: self.license.as_ref().map(wire::license),
            tryout: self.tryout.as_ref().map(wire::tryout),
            reconcile: Some(wire::reconcile(&self.reconcile)),
            activation_state: wire::activation_state(activation.state).into(),
            grace_ends_at: wire::opt_timestamp(activation.grace_ends_at),
            reference_time: Some(timestamp(now)),
            epoch: self.epoch.clone(),
            leases: self.leases.iter().map(wire::lease).collect(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use comtrexx_licensing_domain::license::testing::{key, payload};
    use comtrexx_licensing_domain::{
        Edition, LapseAction, SeatReason, SeatSource, SignedLicense, TryoutPolicy,
    };
    use std::time::Duration;

    pub fn t0() -> DateTime<Utc> {
        "2026-03-01T10:00:00Z".parse().unwrap()
    }

    pub fn rules() -> Rules {
        Rules {
            edition: Edition::Vm,
            tryout: TryoutPolicy::default(),
            over_capacity_grace: chrono::Duration::days(7),
            grace: chrono::Duration::days(30),
            lapse_action: LapseAction::DenyNew,
            has_license_source: false,
        }
    }

    pub fn seat(user: &str, feature: &str, source: SeatSource) -> pb::WatchedSeat {
        pb::WatchedSeat {
            user_id: user.into(),
            feature: feature.into(),
            source: wire::seat_source(source).into(),
            assigned_at: Some(timestamp(t0())),
            over_capacity_since: None,
        }
    }

    /// A snapshot at `t0` of a VM PBX with a license for `users` user seats
    /// and the given seats.
    pub fn snapshot(users: u32, seats: Vec<pb::WatchedSeat>) -> pb::SeatStateSnapshot {
        let p = payload("SN-1", users);
        let applied = AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t0(),
        };
        pb::SeatStateSnapshot {
            serial_number: "SN-1".into(),
            rules: Some(wire::rules(&rules())),
            seats,
            license: Some(wire::license(&applied)),
            tryout: None,
            reconcile: Some(wire::reconcile(&ReconcileStatus::default())),
            activation_state: pb::ActivationState::Active.into(),
            grace_ends_at: None,
            reference_time: Some(timestamp(t0())),
            epoch: "e1".into(),
            leases: Vec::new(),
        }
    }

    fn change(kind: ChangeKind) -> pb::SeatStateChange {
        pb::SeatStateChange { kind: Some(kind) }
    }

    #[test]
    fn a_snapshot_then_changes_in_order_decide_like_the_domain() {
        let at = Instant::now();
        let s = snapshot(5, vec![seat("alice", "user", SeatSource::Purchased)]);
        let mut copy = SeatCopy::from_snapshot(10, &s, None, at).unwrap();
        assert_eq!((copy.version, copy.seat_count()), (10, 1));
        assert!(copy.check("alice", Feature::User, t0()).licensed);
        assert_eq!(
            copy.check("bob", Feature::User, t0()).reason,
            SeatReason::NotAssigned
        );

        let put = change(ChangeKind::SeatPut(seat(
            "bob",
            "user",
            SeatSource::Purchased,
        )));
        assert_eq!(copy.apply(11, &put, None).unwrap(), Applied::Changed);
        assert!(copy.check("bob", Feature::User, t0()).licensed);
        let gap = copy.apply(13, &put, None).unwrap();
        assert_eq!(gap, Applied::Gap { have: 11, got: 13 });
        let removed = change(ChangeKind::SeatRemoved(pb::SeatRemoved {
            user_id: "alice".into(),
            feature: "user".into(),
        }));
        copy.apply(12, &removed, None).unwrap();
        assert!(!copy.check("alice", Feature::User, t0()).licensed);
        copy.apply(
            13,
            &change(ChangeKind::LicenseRemoved(pb::LicenseRemoved {})),
            None,
        )
        .unwrap();
        assert_eq!(
            copy.check("bob", Feature::User, t0()).reason,
            SeatReason::NotActivated
        );
        copy.apply(14, &change(ChangeKind::Reset(pb::StateReset {})), None)
            .unwrap();
        assert_eq!(copy.seat_count(), 0);
        copy.apply(15, &change(ChangeKind::Other("x".into())), None)
            .unwrap();
        assert_eq!(copy.version, 15);
    }

    #[test]
    fn a_bad_change_names_its_field_and_changes_nothing() {
        let at = Instant::now();
        let s = snapshot(5, vec![seat("alice", "user", SeatSource::Purchased)]);
        let mut copy = SeatCopy::from_snapshot(1, &s, None, at).unwrap();
        let mut bad = seat("bob", "user", SeatSource::Purchased);
        bad.source = 42;
        let e = copy
            .apply(2, &change(ChangeKind::SeatPut(bad)), None)
            .unwrap_err();
        assert!(e.0.contains("source"), "{e}");
        assert_eq!((copy.version, copy.seat_count()), (1, 1));
    }

    #[test]
    fn time_is_the_reference_advanced_by_the_monotonic_clock_and_never_goes_back() {
        let at = Instant::now();
        let s = snapshot(5, vec![]);
        let mut copy = SeatCopy::from_snapshot(1, &s, None, at).unwrap();
        let later = at + Duration::from_secs(60);
        assert_eq!(copy.now(later), t0() + chrono::Duration::seconds(60));
        // A reference behind the copy's own time keeps the copy's.
        copy.heard(t0(), later);
        assert_eq!(copy.now(later), t0() + chrono::Duration::seconds(60));
        // One ahead moves it forward.
        copy.heard(t0() + chrono::Duration::hours(1), later);
        assert_eq!(copy.now(later), t0() + chrono::Duration::hours(1));
    }

    #[test]
    fn an_over_capacity_seat_runs_out_at_the_copy_time() {
        let at = Instant::now();
        let mut flagged = seat("alice", "user", SeatSource::Purchased);
        flagged.over_capacity_since = Some(timestamp(t0()));
        let copy = SeatCopy::from_snapshot(1, &snapshot(5, vec![flagged]), None, at).unwrap();
        assert!(copy.check("alice", Feature::User, copy.now(at)).licensed);
        let after = copy.now(at + Duration::from_secs(8 * 86_400));
        assert_eq!(
            copy.check("alice", Feature::User, after).reason,
            SeatReason::OverCapacity
        );
    }

    #[test]
    fn the_copy_round_trips_through_a_snapshot() {
        let at = Instant::now();
        let s = snapshot(
            5,
            vec![
                seat("alice", "user", SeatSource::Purchased),
                seat("ann", "call_assist", SeatSource::Purchased),
            ],
        );
        let copy = SeatCopy::from_snapshot(7, &s, Some(&key(1).verifying_key()), at).unwrap();
        let again = SeatCopy::from_snapshot(7, &copy.to_snapshot(at), None, at).unwrap();
        assert_eq!(again.seat_count(), 2);
        assert_eq!(
            again.license,
            copy.license.clone().map(|mut l| {
                // Without the key the payload comes from the listed entitlements.
                l.payload.nonce = None;
                l
            })
        );
        for (user, feature) in [("alice", Feature::User), ("ann", Feature::CallAssist)] {
            assert_eq!(
                again.check(user, feature, t0()),
                copy.check(user, feature, t0())
            );
        }
    }
}
