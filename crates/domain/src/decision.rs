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
