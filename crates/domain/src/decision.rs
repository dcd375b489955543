//! The whole `CheckSeat` decision as one pure function over what a replica
//! knows of the PBX ([`LicenseState`]), the PBX's fixed rules ([`Rules`]) and a
//! time: the service answers with it from its copy of the store, and a client
//! deciding in process from a streamed copy decides with the same code.
//!
//! The rules in one place: the activation (confirmed, in grace, lapsed; and
//! without a configured license source, nothing can confirm a license, so a
//! trusted one counts as confirmed), then [`Licenses::check_seat`]: the first
//! cause from the PBX down to the user.

use chrono::{DateTime, Duration, Utc};

use super::activation::{self, Activation, ActivationState, LapseAction};
use super::ids::{Edition, Feature};
use super::license::AppliedLicense;
use super::reconcile::ReconcileStatus;
use super::seats::{Licenses, Seat, SeatCheck, SeatFacts};
use super::tryout::{TryoutPolicy, TryoutRecord};

/// The PBX's fixed rules: its edition and the policies of its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    /// How long an over-capacity seat stays licensed.
    pub over_capacity_grace: Duration,
    /// How long the last good entitlements hold while the source cannot confirm them.
    pub grace: Duration,
    /// What a lapse means for new seats.
    pub lapse_action: LapseAction,
    /// Whether a license source (licensing server or license file) is
    /// configured. Without one nothing can confirm a license: a trusted one
    /// counts as confirmed (no grace, no lapse).
    pub has_license_source: bool,
}

/// What a replica knows of the PBX's licenses: the verified license, the
/// tryout record, the reconcile history.
#[derive(Debug, Clone, Copy)]
pub struct LicenseState<'a> {
    pub license: Option<&'a AppliedLicense>,
    pub tryout: Option<&'a TryoutRecord>,
    pub reconcile: &'a ReconcileStatus,
}

impl Rules {
    /// The activation at `now`: ACTIVE, GRACE or LAPSED from the license and
    /// the reconcile history ([`activation::activation`]); NOT_INITIALIZED
    /// without a license. Without a license source a license is ACTIVE.
    pub fn activation(&self, state: &LicenseState<'_>, now: DateTime<Utc>) -> Activation {
        let a = activation::activation(state.license, state.reconcile, now, self.grace);
        if !self.has_license_source && a.state != ActivationState::NotInitialized {
            return Activation {
                state: ActivationState::Active,
                grace_ends_at: None,
            };
        }
        a
    }

    /// The seat rules at `now` for this state.
    pub fn licenses<'a>(&self, state: &LicenseState<'a>, now: DateTime<Utc>) -> Licenses<'a> {
        Licenses {
            edition: self.edition,
            license: state.license,
            tryout: state.tryout,
            tryout_policy: self.tryout,
            over_capacity_grace: self.over_capacity_grace,
            activation: self.activation(state, now).state,
            lapse_action: self.lapse_action,
        }
    }

    /// `CheckSeat`: whether the user's seat of `feature` (`seat`, if they hold
    /// one) is licensed at `now`, and if not, the first cause from the PBX down.
    pub fn check_seat(
        &self,
        state: &LicenseState<'_>,
        feature: Feature,
        seat: Option<&Seat>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        self.licenses(state, now).check_seat(feature, seat, now)
    }

    /// [`Rules::check_seat`] from what the decision reads of the seat
    /// ([`SeatFacts`]): what a copy that keeps seats compactly calls, with no
    /// allocation.
    pub fn check(
        &self,
        state: &LicenseState<'_>,
        feature: Feature,
        seat: Option<SeatFacts>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        self.licenses(state, now).check(feature, seat, now)
    }

    /// [`Rules::check`] for a feature that may be concurrent: licensed while
    /// the user holds a live lease (`lease_until`: the latest expiry of their
    /// leases of `feature`), else `NoLease` after the PBX's causes
    /// ([`Licenses::check_leased`]). For an assigned feature the same answer
    /// as [`Rules::check`].
    pub fn check_leased(
        &self,
        state: &LicenseState<'_>,
        feature: Feature,
        seat: Option<SeatFacts>,
        lease_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        self.licenses(state, now)
            .check_leased(feature, seat, lease_until, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserId;
    use crate::license::SignedLicense;
    use crate::license::testing::{key, payload};
    use crate::reconcile::ReconcileOutcome;
    use crate::seats::{SeatReason, SeatSource};

    fn t0() -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn rules(has_license_source: bool) -> Rules {
        Rules {
            edition: Edition::Vm,
            tryout: TryoutPolicy::default(),
            over_capacity_grace: Duration::days(7),
            grace: Duration::days(30),
            lapse_action: LapseAction::DenyNew,
            has_license_source,
        }
    }

    fn license() -> AppliedLicense {
        let p = payload("0123456789AB", 5);
        AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t0(),
        }
    }

    fn seat() -> Seat {
        Seat {
            user_id: UserId::parse("alice").unwrap(),
            feature: Feature::User,
            source: SeatSource::Purchased,
            assigned_at: t0(),
            over_capacity_since: None,
        }
    }

    #[test]
    fn a_license_never_confirmed_lapses_only_where_a_source_could_confirm_it() {
        let license = license();
        let failing = ReconcileStatus {
            last_attempt_at: Some(t0() + Duration::days(1)),
            last_outcome: Some(ReconcileOutcome::Unreachable),
            ..ReconcileStatus::default()
        };
        let state = LicenseState {
            license: Some(&license),
            tryout: None,
            reconcile: &failing,
        };
        let later = t0() + Duration::days(60);
        // With a source: lapsed after the grace; the first cause of a user
        // without a seat is the PBX's (existing seats stay, `DenyNew`).
        assert_eq!(
            rules(true).activation(&state, later).state,
            ActivationState::Lapsed
        );
        let with_source = rules(true).check_seat(&state, Feature::User, None, later);
        assert_eq!(
            (with_source.licensed, with_source.reason),
            (false, SeatReason::LicenseLapsed)
        );
        let kept = rules(true).check_seat(&state, Feature::User, Some(&seat()), later);
        assert!(kept.licensed);
        let in_grace = rules(true).activation(&state, t0() + Duration::days(2));
        assert_eq!(in_grace.state, ActivationState::Grace);
        // No source: nothing could confirm it, so nothing lapses.
        let without = rules(false).check_seat(&state, Feature::User, None, later);
        assert_eq!(
            (without.licensed, without.reason),
            (false, SeatReason::NotAssigned)
        );
        let licensed = rules(false).check_seat(&state, Feature::User, Some(&seat()), later);
        assert!(licensed.licensed);
        assert_eq!(licensed.reason, SeatReason::Assigned);
        assert_eq!(
            rules(false).activation(&state, later),
            Activation {
                state: ActivationState::Active,
                grace_ends_at: None
            }
        );
    }

    fn concurrent_license(expires: Option<DateTime<Utc>>) -> AppliedLicense {
        let mut p = payload("0123456789AB", 5);
        for e in &mut p.entitlements {
            if e.feature == Feature::User {
                e.seat_model = crate::SeatModel::Concurrent;
                e.expires_at = expires;
            }
        }
        AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t0(),
        }
    }

    #[test]
    fn a_concurrent_feature_is_licensed_while_a_lease_lives() {
        let license = concurrent_license(None);
        let history = ReconcileStatus::default();
        let state = LicenseState {
            license: Some(&license),
            tryout: None,
            reconcile: &history,
        };
        let r = rules(false);
        let now = t0() + Duration::hours(1);
        let until = now + Duration::seconds(90);
        let leased = r.check_leased(&state, Feature::User, None, Some(until), now);
        assert!(leased.licensed);
        assert_eq!(leased.reason, SeatReason::Assigned);
        assert_eq!(leased.valid_until, Some(until));
        // Expired: free again, and the answer says why.
        let expired = r.check_leased(&state, Feature::User, None, Some(now), now);
        assert_eq!(
            (expired.licensed, expired.reason),
            (false, SeatReason::NoLease)
        );
        let none = r.check_leased(&state, Feature::User, None, None, now);
        assert_eq!((none.licensed, none.reason), (false, SeatReason::NoLease));
        // An assigned seat does not license a concurrent feature.
        let seat = SeatFacts::from(&seat());
        let assigned = r.check_leased(&state, Feature::User, Some(seat), None, now);
        assert_eq!(assigned.reason, SeatReason::NoLease);
        // The assigned feature beside it is decided as before (no lease asked).
        let other = r.check_leased(&state, Feature::CallAssist, None, Some(until), now);
        assert_eq!(other, r.check(&state, Feature::CallAssist, None, now));
    }

    #[test]
    fn the_pbx_causes_come_before_no_lease_and_an_expired_entitlement_ends_a_lease() {
        let history = ReconcileStatus::default();
        let none = LicenseState {
            license: None,
            tryout: None,
            reconcile: &history,
        };
        let now = t0() + Duration::hours(1);
        // No license: the feature is not concurrent (nothing says so), and
        // the PBX's cause comes first.
        let check = rules(true).check_leased(&none, Feature::User, None, None, now);
        assert_eq!(check.reason, SeatReason::NotActivated);
        let ending = t0() + Duration::hours(2);
        let license = concurrent_license(Some(ending));
        let state = LicenseState {
            license: Some(&license),
            tryout: None,
            reconcile: &history,
        };
        let until = now + Duration::hours(5);
        let leased = rules(false).check_leased(&state, Feature::User, None, Some(until), now);
        assert_eq!(leased.valid_until, Some(ending));
        let later = ending + Duration::seconds(1);
        let lapsed = rules(false).check_leased(&state, Feature::User, None, Some(until), later);
        assert_eq!(
            (lapsed.licensed, lapsed.reason),
            (false, SeatReason::LicenseLapsed)
        );
    }

    #[test]
    fn leases_only_for_concurrent_features_and_seats_only_for_assigned_ones() {
        let license = concurrent_license(None);
        let history = ReconcileStatus::default();
        let state = LicenseState {
            license: Some(&license),
            tryout: None,
            reconcile: &history,
        };
        let l = rules(false).licenses(&state, t0());
        let plan = l.plan_lease(Feature::User, t0(), |_| 0).unwrap();
        assert_eq!(plan.license_id, license.id());
        assert_eq!(
            plan.capacity,
            license.payload.entitlement(Feature::User).unwrap().quantity
        );
        let wrong = |e: crate::LicensingError| match e {
            crate::LicensingError::FailedPrecondition { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            wrong(l.plan_assign(Feature::User, t0(), |_| 0).unwrap_err()),
            "WRONG_SEAT_MODEL"
        );
        assert_eq!(
            wrong(l.plan_lease(Feature::CallAssist, t0(), |_| 0).unwrap_err()),
            "WRONG_SEAT_MODEL"
        );
    }

    #[test]
    fn without_a_license_a_lease_is_refused_as_not_activated() {
        let history = ReconcileStatus::default();
        let state = LicenseState {
            license: None,
            tryout: None,
            reconcile: &history,
        };
        match rules(true)
            .licenses(&state, t0())
            .plan_lease(Feature::User, t0(), |_| 0)
        {
            Err(crate::LicensingError::FailedPrecondition { reason, .. }) => {
                assert_eq!(reason, "NOT_ACTIVATED")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_document_without_seat_model_means_assigned_and_keeps_its_bytes() {
        let e: crate::Entitlement =
            serde_json::from_str(r#"{"feature":"user","quantity":3}"#).unwrap();
        assert_eq!(e.seat_model, crate::SeatModel::Assigned);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"feature":"user","quantity":3}"#
        );
        let c: crate::Entitlement =
            serde_json::from_str(r#"{"feature":"user","quantity":3,"seat_model":"concurrent"}"#)
                .unwrap();
        assert_eq!(c.seat_model, crate::SeatModel::Concurrent);
    }

    #[test]
    fn without_a_license_nothing_is_activated_with_or_without_a_source() {
        let history = ReconcileStatus::default();
        let state = LicenseState {
            license: None,
            tryout: None,
            reconcile: &history,
        };
        for has_source in [true, false] {
            let r = rules(has_source);
            assert_eq!(
                r.activation(&state, t0()).state,
                ActivationState::NotInitialized
            );
            let check = r.check_seat(&state, Feature::User, Some(&seat()), t0());
            assert_eq!(check.reason, SeatReason::NotActivated);
        }
    }
}
