//! Seats and the two decisions of the hot path: is this seat licensed
//! (`check_seat`), and from which pool may a new seat come (`plan_assign`).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::activation::{ActivationState, LapseAction};
use super::error::LicensingError;
use super::ids::{Edition, Feature, UserId};
use super::leases::LeasePlan;
use super::license::SeatModel;
use super::tryout::{self, TryoutPolicy, TryoutRecord, TryoutState};

/// Where a seat comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatSource {
    Purchased,
    Tryout,
}

impl SeatSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SeatSource::Purchased => "purchased",
            SeatSource::Tryout => "tryout",
        }
    }
}

/// One user holding one unit of a feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    pub user_id: UserId,
    pub feature: Feature,
    pub source: SeatSource,
    pub assigned_at: DateTime<Utc>,
    /// Set when a capacity drop left this seat beyond the purchased quantity; it
    /// stays licensed until the over-capacity grace after this instant.
    pub over_capacity_since: Option<DateTime<Utc>>,
}

/// What the seat decision reads of a seat: its source and its over-capacity
/// flag. No user id, so a caller that keeps seats compactly (a replica, a
/// client deciding in process) decides without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatFacts {
    pub source: SeatSource,
    pub over_capacity_since: Option<DateTime<Utc>>,
}

impl From<&Seat> for SeatFacts {
    fn from(seat: &Seat) -> Self {
        Self {
            source: seat.source,
            over_capacity_since: seat.over_capacity_since,
        }
    }
}

/// A seat as a copy of the whole pool keeps it (a replica's mirror, a
/// client's copy): 16 bytes, the user id and feature being the keys it is
/// found by. The assignment time in milliseconds is shifted left by two: the
/// lowest bit is the source, the next a mark the copy's owner may use (a
/// replica's full resync marks the seats it found unchanged; not part of the
/// seat: equality ignores it). A missing over-capacity flag is `i64::MIN`.
#[derive(Debug, Clone, Copy)]
pub struct CompactSeat {
    at: i64,
    over: i64,
}

impl PartialEq for CompactSeat {
    fn eq(&self, other: &Self) -> bool {
        (self.at & !Self::MARK) == (other.at & !Self::MARK) && self.over == other.over
    }
}

impl Eq for CompactSeat {}

impl CompactSeat {
    const NO_FLAG: i64 = i64::MIN;
    const MARK: i64 = 0b10;

    /// Times in milliseconds since 1970; stored times are within chrono's
    /// range (|ms| < 2^53), so the shift cannot overflow.
    pub fn new(
        source: SeatSource,
        assigned_at_ms: i64,
        over_capacity_since_ms: Option<i64>,
    ) -> Self {
        let bit = match source {
            SeatSource::Purchased => 0,
            SeatSource::Tryout => 1,
        };
        Self {
            at: (assigned_at_ms << 2) | bit,
            over: over_capacity_since_ms.unwrap_or(Self::NO_FLAG),
        }
    }

    /// The owner's mark (see the type).
    pub fn mark(self) -> bool {
        self.at & Self::MARK != 0
    }

    /// The same seat with the mark set or cleared.
    pub fn with_mark(self, mark: bool) -> Self {
        Self {
            at: (self.at & !Self::MARK) | if mark { Self::MARK } else { 0 },
            over: self.over,
        }
    }

    pub fn from_seat(seat: &Seat) -> Self {
        Self::new(
            seat.source,
            seat.assigned_at.timestamp_millis(),
            seat.over_capacity_since.map(|t| t.timestamp_millis()),
        )
    }

    pub fn source(self) -> SeatSource {
        if self.at & 1 == 1 {
            SeatSource::Tryout
        } else {
            SeatSource::Purchased
        }
    }

    pub fn assigned_at_ms(self) -> i64 {
        self.at >> 2
    }

    pub fn over_capacity_since_ms(self) -> Option<i64> {
        (self.over != Self::NO_FLAG).then_some(self.over)
    }

    /// What the decision reads: no allocation.
    pub fn facts(self) -> SeatFacts {
        SeatFacts {
            source: self.source(),
            over_capacity_since: self.over_capacity_since_ms().map(millis),
        }
    }

    pub fn to_seat(self, user_id: UserId, feature: Feature) -> Seat {
        Seat {
            user_id,
            feature,
            source: self.source(),
            assigned_at: millis(self.assigned_at_ms()),
            over_capacity_since: self.over_capacity_since_ms().map(millis),
        }
    }
}

/// A time from milliseconds since 1970 (out of chrono's range: 1970).
fn millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub use super::license::AppliedLicense;

/// Why a seat is or is not licensed (the API's `SeatReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatReason {
    Assigned,
    NotAssigned,
    TryoutOver,
    NotActivated,
    OverCapacity,
    LicenseLapsed,
    /// A concurrent feature the user holds no live lease of.
    NoLease,
}

/// The answer to "is this user licensed for this feature?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatCheck {
    pub licensed: bool,
    pub source: Option<SeatSource>,
    pub reason: SeatReason,
    /// When this answer stops holding; `None` when open-ended.
    pub valid_until: Option<DateTime<Utc>>,
}

/// From which pool a new seat may come, with the capacity the store enforces
/// atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignPlan {
    /// A purchased seat. `license_id` names the document the capacity comes from:
    /// the store refuses the write if another document was applied meanwhile.
    Purchased { capacity: u32, license_id: String },
    /// A tryout test seat (feature `user` only).
    Tryout { capacity: u32 },
}

impl AssignPlan {
    pub fn source(&self) -> SeatSource {
        match self {
            AssignPlan::Purchased { .. } => SeatSource::Purchased,
            AssignPlan::Tryout { .. } => SeatSource::Tryout,
        }
    }

    pub fn capacity(&self) -> u32 {
        match self {
            AssignPlan::Purchased { capacity, .. } | AssignPlan::Tryout { capacity } => *capacity,
        }
    }
}

/// Everything the seat decisions need to know about this PBX's licenses.
#[derive(Debug, Clone, Copy)]
pub struct Licenses<'a> {
    pub edition: Edition,
    pub license: Option<&'a AppliedLicense>,
    pub tryout: Option<&'a TryoutRecord>,
    pub tryout_policy: TryoutPolicy,
    /// How long an over-capacity seat stays licensed.
    pub over_capacity_grace: Duration,
    /// Whether the license is confirmed, in grace, or lapsed.
    pub activation: ActivationState,
    /// What a lapse means for new seats.
    pub lapse_action: LapseAction,
}

impl Licenses<'_> {
    /// Business/Advanced need a current `system_activation` entitlement; VM needs
    /// only a trusted document.
    pub fn system_activated(&self, now: DateTime<Utc>) -> bool {
        let Some(license) = self.license else {
            return false;
        };
        !self.edition.needs_system_activation()
            || license
                .payload
                .entitlement(Feature::SystemActivation)
                .is_some_and(|e| e.quantity >= 1 && e.is_current(now))
    }

    pub fn tryout_state(&self, now: DateTime<Utc>) -> TryoutState {
        tryout::state(self.edition, self.tryout, now)
    }

    /// How the seats of `feature` are held under the applied license
    /// (assigned without one, or when the license does not grant it).
    pub fn seat_model(&self, feature: Feature) -> SeatModel {
        self.license
            .map_or(SeatModel::Assigned, |l| l.payload.seat_model(feature))
    }

    /// [`Licenses::check`] for a feature that may be concurrent: there the user
    /// is licensed while they hold a live lease (`lease_until`, the latest
    /// expiry of their leases of `feature`), else `NoLease`, after the PBX's
    /// causes. The tryout's test seats stay assigned: a user holding one is
    /// licensed by it while the tryout is active. An assigned feature is
    /// decided by [`Licenses::check`] alone.
    pub fn check_leased(
        &self,
        feature: Feature,
        seat: Option<SeatFacts>,
        lease_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        if self.seat_model(feature) == SeatModel::Assigned {
            return self.check(feature, seat, now);
        }
        if let Some(seat) = seat.filter(|s| s.source == SeatSource::Tryout) {
            let own = self.check_own_seat(feature, Some(seat), now);
            if own.licensed {
                return own;
            }
        }
        let own = match lease_until.filter(|until| now < *until) {
            Some(until) => self.check_lease(feature, until, now),
            None => not_licensed(None, SeatReason::NoLease),
        };
        if own.licensed {
            return own;
        }
        match self.pbx_cause(feature, now) {
            Some(cause) => not_licensed(own.source, cause),
            None => own,
        }
    }

    /// A live lease: licensed while the PBX is activated and the entitlement
    /// current, until the earlier of the lease's and the entitlement's end.
    fn check_lease(&self, feature: Feature, until: DateTime<Utc>, now: DateTime<Utc>) -> SeatCheck {
        let purchased = Some(SeatSource::Purchased);
        let Some(license) = self.license else {
            return not_licensed(purchased, SeatReason::NotActivated);
        };
        if !self.system_activated(now) {
            return not_licensed(purchased, SeatReason::NotActivated);
        }
        let entitlement = license.payload.entitlement(feature);
        let Some(entitlement) = entitlement.filter(|e| e.is_current(now)) else {
            return not_licensed(purchased, SeatReason::LicenseLapsed);
        };
        SeatCheck {
            licensed: true,
            source: purchased,
            reason: SeatReason::Assigned,
            valid_until: Some(entitlement.expires_at.map_or(until, |e| e.min(until))),
        }
    }

    /// Whether a lease of `feature` may be acquired now, and against which
    /// quantity: only a concurrent feature of a current, activated license;
    /// `WRONG_SEAT_MODEL` for an assigned one. `in_use` counts the feature's
    /// live leases (for the error message only).
    pub fn plan_lease(
        &self,
        feature: Feature,
        now: DateTime<Utc>,
        in_use: impl Fn(Feature) -> u32,
    ) -> Result<LeasePlan, LicensingError> {
        if !feature.is_seat() {
            return Err(super::error::InvalidInput::new(
                "feature",
                format!("{feature} is not a seat feature"),
            )
            .into());
        }
        if self.license.is_none() {
            return Err(LicensingError::precondition(
                "NOT_ACTIVATED",
                "the PBX is not activated (no license applied): leases need a license that sells the feature for concurrent use",
            ));
        }
        if self.seat_model(feature) != SeatModel::Concurrent {
            return Err(LicensingError::precondition(
                "WRONG_SEAT_MODEL",
                format!(
                    "feature {feature} is sold as assigned seats: use AssignSeat, not AcquireLease"
                ),
            ));
        }
        let license = self
            .license
            .expect("a concurrent feature comes from a license");
        if !self.system_activated(now) {
            return Err(LicensingError::precondition(
                "NOT_ACTIVATED",
                format!(
                    "edition {} needs a system_activation license before leases can be acquired",
                    self.edition
                ),
            ));
        }
        if self.activation == ActivationState::Lapsed && self.lapse_action == LapseAction::DenyNew {
            return Err(LicensingError::precondition(
                "LICENSE_LAPSED",
                "activation lapsed (the licensing server was not reached within the grace period): no new leases until a reconcile succeeds",
            ));
        }
        match license
            .payload
            .entitlement(feature)
            .filter(|e| e.is_current(now) && e.quantity > 0)
        {
            Some(e) => Ok(LeasePlan {
                capacity: e.quantity,
                license_id: license.id().to_owned(),
            }),
            None => Err(LicensingError::NoFreeSeat {
                feature,
                capacity: 0,
                in_use: in_use(feature),
            }),
        }
    }

    /// Decides whether the user's seat of `feature` (`seat`, if they hold one) is
    /// licensed. An answer that is not licensed names the first cause that applies,
    /// from the PBX down to the user (API.md): `NotActivated`, `LicenseLapsed`, then
    /// the user's own `NotAssigned`, `TryoutOver`, `OverCapacity`.
    pub fn check_seat(
        &self,
        feature: Feature,
        seat: Option<&Seat>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        self.check(feature, seat.map(SeatFacts::from), now)
    }

    /// [`Licenses::check_seat`] from what the decision reads of the seat.
    pub fn check(
        &self,
        feature: Feature,
        seat: Option<SeatFacts>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        let own = self.check_own_seat(feature, seat, now);
        if own.licensed {
            return own;
        }
        match self.pbx_cause(feature, now) {
            Some(cause) => not_licensed(own.source, cause),
            None => own,
        }
    }

    /// Why no user of `feature` can be licensed right now, if there is a reason at
    /// the PBX's level: not activated (a Business/Advanced PBX without system
    /// activation, or no trusted license and no tryout ever started), or lapsed
    /// (activation not confirmed within the grace period, or the feature's
    /// entitlement expired while no tryout covers it).
    pub fn pbx_cause(&self, feature: Feature, now: DateTime<Utc>) -> Option<SeatReason> {
        let tryout = self.tryout_state(now);
        let never_tried = matches!(tryout, TryoutState::Available | TryoutState::Unavailable);
        if (self.license.is_some() || self.edition.needs_system_activation())
            && !self.system_activated(now)
        {
            return Some(SeatReason::NotActivated);
        }
        if self.license.is_none() && never_tried {
            return Some(SeatReason::NotActivated);
        }
        if self.license.is_some() && self.activation == ActivationState::Lapsed {
            return Some(SeatReason::LicenseLapsed);
        }
        let tryout_covers = feature == Feature::User && tryout == TryoutState::Active;
        let expired = self
            .license
            .and_then(|l| l.payload.entitlement(feature))
            .is_some_and(|e| !e.is_current(now));
        if expired && !tryout_covers {
            return Some(SeatReason::LicenseLapsed);
        }
        None
    }

    /// The user's own answer: their seat and its source, without the PBX's causes.
    fn check_own_seat(
        &self,
        feature: Feature,
        seat: Option<SeatFacts>,
        now: DateTime<Utc>,
    ) -> SeatCheck {
        let Some(seat) = seat else {
            return not_licensed(None, SeatReason::NotAssigned);
        };
        match seat.source {
            SeatSource::Tryout => match (self.tryout_state(now), self.tryout) {
                (TryoutState::Active, Some(TryoutRecord::Started { ends_at, .. })) => SeatCheck {
                    licensed: true,
                    source: Some(SeatSource::Tryout),
                    reason: SeatReason::Assigned,
                    valid_until: Some(*ends_at),
                },
                _ => not_licensed(Some(SeatSource::Tryout), SeatReason::TryoutOver),
            },
            SeatSource::Purchased => self.check_purchased(feature, seat, now),
        }
    }

    fn check_purchased(&self, feature: Feature, seat: SeatFacts, now: DateTime<Utc>) -> SeatCheck {
        let purchased = Some(SeatSource::Purchased);
        let Some(license) = self.license else {
            return not_licensed(purchased, SeatReason::NotActivated);
        };
        if !self.system_activated(now) {
            return not_licensed(purchased, SeatReason::NotActivated);
        }
        let entitlement = license.payload.entitlement(feature);
        if entitlement.is_some_and(|e| !e.is_current(now)) {
            return not_licensed(purchased, SeatReason::LicenseLapsed);
        }
        // A feature the license no longer grants: a capacity drop to zero when the
        // seat is flagged (grace applies), else lapsed.
        if entitlement.is_none() && seat.over_capacity_since.is_none() {
            return not_licensed(purchased, SeatReason::LicenseLapsed);
        }
        let mut valid_until = entitlement.and_then(|e| e.expires_at);
        if let Some(since) = seat.over_capacity_since {
            // Saturating: no stored value may panic here (a far-future flag
            // simply keeps its grace).
            let deadline = since
                .checked_add_signed(self.over_capacity_grace)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            if now >= deadline {
                return not_licensed(purchased, SeatReason::OverCapacity);
            }
            valid_until = Some(valid_until.map_or(deadline, |v| v.min(deadline)));
        }
        SeatCheck {
            licensed: true,
            source: purchased,
            reason: SeatReason::Assigned,
            valid_until,
        }
    }

    /// Chooses the pool a new seat of `feature` comes from. `in_use` counts the
    /// purchased seats of a feature (for the error message only).
    pub fn plan_assign(
        &self,
        feature: Feature,
        now: DateTime<Utc>,
        in_use: impl Fn(Feature) -> u32,
    ) -> Result<AssignPlan, LicensingError> {
        if !feature.is_seat() {
            return Err(super::error::InvalidInput::new(
                "feature",
                format!("{feature} is not a seat feature"),
            )
            .into());
        }
        let activated = self.system_activated(now);
        if self.activation == ActivationState::Lapsed && self.lapse_action == LapseAction::DenyNew {
            return Err(LicensingError::precondition(
                "LICENSE_LAPSED",
                "activation lapsed (the licensing server was not reached within the grace period): no new seats until a reconcile succeeds",
            ));
        }
        if activated && self.seat_model(feature) == SeatModel::Concurrent {
            return Err(LicensingError::precondition(
                "WRONG_SEAT_MODEL",
                format!(
                    "feature {feature} is licensed for concurrent use: acquire a lease (AcquireLease), not a seat"
                ),
            ));
        }
        if let Some(license) = self.license.filter(|_| activated)
            && let Some(e) = license
                .payload
                .entitlement(feature)
                .filter(|e| e.is_current(now) && e.quantity > 0)
        {
            return Ok(AssignPlan::Purchased {
                capacity: e.quantity,
                license_id: license.id().to_owned(),
            });
        }
        if feature == Feature::User && self.tryout_state(now) == TryoutState::Active {
            return Ok(AssignPlan::Tryout {
                capacity: self.tryout_policy.seats,
            });
        }
        if feature != Feature::User
            && self.tryout_state(now) == TryoutState::Active
            && self.license.is_none()
        {
            return Err(LicensingError::precondition(
                "NOT_ACTIVATED",
                format!(
                    "tryout test seats are for feature user only; {feature} needs a purchased license"
                ),
            ));
        }
        if self.license.is_some() && activated {
            return Err(LicensingError::NoFreeSeat {
                feature,
                capacity: 0,
                in_use: in_use(feature),
            });
        }
        if self.license.is_some() {
            return Err(LicensingError::precondition(
                "NOT_ACTIVATED",
                format!(
                    "edition {} needs a system_activation license before seats can be assigned",
                    self.edition
                ),
            ));
        }
        // The tryout is offered only where it can start.
        let tryout = tryout::alternative(self.edition, self.tryout, now);
        let separator = if tryout.starts_with("or ") {
            ", "
        } else {
            "; "
        };
        Err(LicensingError::precondition(
            "NOT_ACTIVATED",
            format!(
                "the PBX is not activated (no license applied) and no tryout is active: apply a license (an initialization code and the vendor's activation response, or Reconcile){separator}{tryout}"
            ),
        ))
    }
}

fn not_licensed(source: Option<SeatSource>, reason: SeatReason) -> SeatCheck {
    SeatCheck {
        licensed: false,
        source,
        reason,
        valid_until: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_seat_is_16_bytes_and_keeps_every_value() {
        assert_eq!(std::mem::size_of::<CompactSeat>(), 16);
        for source in [SeatSource::Purchased, SeatSource::Tryout] {
            for at in [
                0,
                1,
                -1,
                1_765_000_000_123,
                -62_135_596_800_000,
                8_000_000_000_000_000,
            ] {
                for over in [None, Some(0), Some(-5), Some(at), Some(i64::MAX)] {
                    let seat = CompactSeat::new(source, at, over);
                    let marked = seat.with_mark(true);
                    assert!(marked.mark() && !seat.mark() && marked == seat);
                    assert_eq!(marked.with_mark(false).assigned_at_ms(), at);
                    assert_eq!(
                        (
                            seat.source(),
                            seat.assigned_at_ms(),
                            seat.over_capacity_since_ms()
                        ),
                        (source, at, over)
                    );
                }
            }
        }
    }

    #[test]
    fn the_compact_decision_is_the_full_one() {
        let lic = applied(payload("S", 10));
        let tryout = TryoutRecord::Started {
            started_at: t0(),
            ends_at: t0() + Duration::days(14),
            ended: None,
        };
        for (license, tryout) in [
            (Some(&lic), None),
            (None, Some(&tryout)),
            (Some(&lic), Some(&tryout)),
        ] {
            let c = ctx(Edition::Vm, license, tryout);
            for source in [SeatSource::Purchased, SeatSource::Tryout] {
                for over in [None, Some(t0()), Some(t0() - Duration::days(30))] {
                    let mut s = seat(Feature::User, source);
                    s.over_capacity_since = over;
                    for at in [t0(), t0() + Duration::days(20)] {
                        let compact = CompactSeat::from_seat(&s).facts();
                        assert_eq!(
                            c.check(Feature::User, Some(compact), at),
                            c.check_seat(Feature::User, Some(&s), at),
                            "{source:?} {over:?} {at}"
                        );
                    }
                }
            }
        }
    }

    use crate::license::testing::{key, payload};
    use crate::license::{Entitlement, LicensePayload, SignedLicense};

    fn t0() -> DateTime<Utc> {
        "2026-03-01T10:00:00Z".parse().unwrap()
    }

    fn applied(p: LicensePayload) -> AppliedLicense {
        AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t0(),
        }
    }

    fn seat(feature: Feature, source: SeatSource) -> Seat {
        Seat {
            user_id: UserId::parse("alice").unwrap(),
            feature,
            source,
            assigned_at: t0(),
            over_capacity_since: None,
        }
    }

    fn ctx<'a>(
        edition: Edition,
        license: Option<&'a AppliedLicense>,
        tryout: Option<&'a TryoutRecord>,
    ) -> Licenses<'a> {
        Licenses {
            edition,
            license,
            tryout,
            tryout_policy: TryoutPolicy::default(),
            over_capacity_grace: Duration::days(14),
            activation: if license.is_some() {
                ActivationState::Active
            } else {
                ActivationState::NotInitialized
            },
            lapse_action: LapseAction::DenyNew,
        }
    }

    #[test]
    fn no_seat_is_not_assigned() {
        let lic = applied(payload("S", 5));
        let c = ctx(Edition::Vm, Some(&lic), None).check_seat(Feature::User, None, t0());
        assert_eq!(
            (c.licensed, c.reason, c.source),
            (false, SeatReason::NotAssigned, None)
        );
    }

    /// API.md's order: NOT_ACTIVATED, LICENSE_LAPSED, then NOT_ASSIGNED, TRYOUT_OVER,
    /// OVER_CAPACITY: the PBX's cause before the user's own.
    #[test]
    fn causes_are_named_from_the_pbx_down() {
        let user = seat(Feature::User, SeatSource::Purchased);
        let reason =
            |c: &Licenses<'_>, s: Option<&Seat>| c.check_seat(Feature::User, s, t0()).reason;

        // A Business PBX without system activation: NOT_ACTIVATED, seat or not.
        let mut p = payload("S", 5);
        p.edition = Edition::Business;
        let business = applied(p);
        let c = ctx(Edition::Business, Some(&business), None);
        assert_eq!(reason(&c, None), SeatReason::NotActivated);
        assert_eq!(reason(&c, Some(&user)), SeatReason::NotActivated);
        assert_eq!(
            reason(&ctx(Edition::Business, None, None), None),
            SeatReason::NotActivated
        );

        // No license and no tryout ever started: NOT_ACTIVATED.
        assert_eq!(
            reason(&ctx(Edition::Vm, None, None), None),
            SeatReason::NotActivated
        );
        // A tryout that is over: the user's own answer (no seat, or the test seat).
        let started = tryout::start(Edition::Vm, None, t0(), TryoutPolicy::default()).unwrap();
        let ended = tryout::end(Edition::Vm, Some(&started), t0())
            .unwrap()
            .unwrap();
        let c = ctx(Edition::Vm, None, Some(&ended));
        assert_eq!(reason(&c, None), SeatReason::NotAssigned);
        let test_seat = seat(Feature::User, SeatSource::Tryout);
        assert_eq!(reason(&c, Some(&test_seat)), SeatReason::TryoutOver);

        // Lapsed activation: LICENSE_LAPSED for whoever is not licensed; existing
        // seats stay licensed (deny_new).
        let lic = applied(payload("S", 5));
        let mut c = ctx(Edition::Vm, Some(&lic), None);
        c.activation = ActivationState::Lapsed;
        assert_eq!(reason(&c, None), SeatReason::LicenseLapsed);
        assert!(c.check_seat(Feature::User, Some(&user), t0()).licensed);

        // An expired entitlement: LICENSE_LAPSED, also for a user without a seat.
        let mut p = payload("S", 5);
        p.entitlements[0].expires_at = Some(t0() - Duration::days(1));
        let expired = applied(p);
        let c = ctx(Edition::Vm, Some(&expired), None);
        assert_eq!(reason(&c, None), SeatReason::LicenseLapsed);
        assert_eq!(reason(&c, Some(&user)), SeatReason::LicenseLapsed);

        // Only then the user's own: over capacity after its grace.
        let c = ctx(Edition::Vm, Some(&lic), None);
        let mut over = user.clone();
        over.over_capacity_since = Some(t0() - Duration::days(15));
        assert_eq!(reason(&c, Some(&over)), SeatReason::OverCapacity);
    }

    #[test]
    fn purchased_seat_is_assigned_and_expires() {
        let mut p = payload("S", 5);
        let end = t0() + Duration::days(30);
        p.entitlements[0].expires_at = Some(end);
        let lic = applied(p);
        let c = ctx(Edition::Vm, Some(&lic), None);
        let s = seat(Feature::User, SeatSource::Purchased);
        let ok = c.check_seat(s.feature, Some(&s), t0());
        assert_eq!(
            (ok.licensed, ok.reason, ok.valid_until),
            (true, SeatReason::Assigned, Some(end))
        );
        let lapsed = c.check_seat(s.feature, Some(&s), end);
        assert_eq!(
            (lapsed.licensed, lapsed.reason),
            (false, SeatReason::LicenseLapsed)
        );
        // A feature the document no longer grants has lapsed too.
        let ca = c.check_seat(
            Feature::CallAssist,
            Some(&seat(Feature::CallAssist, SeatSource::Purchased)),
            t0(),
        );
        assert_eq!(ca.reason, SeatReason::LicenseLapsed);
    }

    #[test]
    fn business_needs_system_activation() {
        let mut p = payload("S", 5);
        p.edition = Edition::Business;
        let without = applied(p.clone());
        let s = seat(Feature::User, SeatSource::Purchased);
        let c = ctx(Edition::Business, Some(&without), None);
        assert_eq!(
            c.check_seat(s.feature, Some(&s), t0()).reason,
            SeatReason::NotActivated
        );
        assert!(matches!(
            c.plan_assign(Feature::User, t0(), |_| 0),
            Err(LicensingError::FailedPrecondition {
                reason: "NOT_ACTIVATED",
                ..
            })
        ));
        p.entitlements.push(Entitlement {
            seat_model: Default::default(),
            feature: Feature::SystemActivation,
            quantity: 1,
            expires_at: None,
        });
        let with = applied(p);
        let c = ctx(Edition::Business, Some(&with), None);
        assert!(c.check_seat(s.feature, Some(&s), t0()).licensed);
        assert!(matches!(
            c.plan_assign(Feature::User, t0(), |_| 0),
            Ok(AssignPlan::Purchased { capacity: 5, .. })
        ));
        // Without any document the seat is not activated either.
        let none = ctx(Edition::Vm, None, None);
        assert_eq!(
            none.check_seat(s.feature, Some(&s), t0()).reason,
            SeatReason::NotActivated
        );
    }

    #[test]
    fn tryout_seat_follows_the_tryout() {
        let r = tryout::start(Edition::Vm, None, t0(), TryoutPolicy::default()).unwrap();
        let c = ctx(Edition::Vm, None, Some(&r));
        let s = seat(Feature::User, SeatSource::Tryout);
        let ok = c.check_seat(s.feature, Some(&s), t0());
        assert_eq!(ok.valid_until, Some(t0() + Duration::days(14)));
        assert!(ok.licensed);
        let over = c.check_seat(s.feature, Some(&s), t0() + Duration::days(14));
        assert_eq!(
            (over.licensed, over.reason, over.source),
            (false, SeatReason::TryoutOver, Some(SeatSource::Tryout))
        );
        let ended = tryout::end(Edition::Vm, Some(&r), t0()).unwrap().unwrap();
        let c = ctx(Edition::Vm, None, Some(&ended));
        assert_eq!(
            c.check_seat(s.feature, Some(&s), t0()).reason,
            SeatReason::TryoutOver
        );
    }

    #[test]
    fn over_capacity_seat_has_grace() {
        let lic = applied(payload("S", 1));
        let c = ctx(Edition::Vm, Some(&lic), None);
        let mut s = seat(Feature::User, SeatSource::Purchased);
        s.over_capacity_since = Some(t0());
        let during = c.check_seat(s.feature, Some(&s), t0() + Duration::days(13));
        assert!(during.licensed);
        assert_eq!(during.valid_until, Some(t0() + Duration::days(14)));
        let after = c.check_seat(s.feature, Some(&s), t0() + Duration::days(14));
        assert_eq!(
            (after.licensed, after.reason),
            (false, SeatReason::OverCapacity)
        );
        // A flagged seat of a feature the license dropped entirely has grace too.
        let mut ca = seat(Feature::CallAssist, SeatSource::Purchased);
        ca.over_capacity_since = Some(t0());
        assert!(
            c.check_seat(ca.feature, Some(&ca), t0() + Duration::days(1))
                .licensed
        );
        assert_eq!(
            c.check_seat(ca.feature, Some(&ca), t0() + Duration::days(15))
                .reason,
            SeatReason::OverCapacity
        );
    }

    #[test]
    fn lapsed_activation_denies_new_seats_but_keeps_existing() {
        let lic = applied(payload("S", 5));
        let mut c = ctx(Edition::Vm, Some(&lic), None);
        c.activation = ActivationState::Lapsed;
        assert!(matches!(
            c.plan_assign(Feature::User, t0(), |_| 0),
            Err(LicensingError::FailedPrecondition {
                reason: "LICENSE_LAPSED",
                ..
            })
        ));
        let s = seat(Feature::User, SeatSource::Purchased);
        assert!(c.check_seat(s.feature, Some(&s), t0()).licensed);
        c.lapse_action = LapseAction::Reset;
        assert!(c.plan_assign(Feature::User, t0(), |_| 0).is_ok());
    }

    #[test]
    fn plans() {
        let r = tryout::start(Edition::Vm, None, t0(), TryoutPolicy::default()).unwrap();
        // Tryout active, nothing purchased: test seats for users only.
        let c = ctx(Edition::Vm, None, Some(&r));
        assert_eq!(
            c.plan_assign(Feature::User, t0(), |_| 0).unwrap(),
            AssignPlan::Tryout { capacity: 3 }
        );
        assert!(matches!(
            c.plan_assign(Feature::CallAssist, t0(), |_| 0),
            Err(LicensingError::FailedPrecondition { .. })
        ));
        // Not activated, no tryout.
        let c = ctx(Edition::Vm, None, None);
        assert!(matches!(
            c.plan_assign(Feature::User, t0(), |_| 0),
            Err(LicensingError::FailedPrecondition { .. })
        ));
        // Activated, feature not purchased: no free seat with its counts.
        let lic = applied(payload("S", 4));
        let c = ctx(Edition::Vm, Some(&lic), None);
        assert!(matches!(
            c.plan_assign(Feature::CallAssist, t0(), |_| 2),
            Err(LicensingError::NoFreeSeat {
                capacity: 0,
                in_use: 2,
                ..
            })
        ));
        assert_eq!(
            c.plan_assign(Feature::User, t0(), |_| 0).unwrap(),
            AssignPlan::Purchased {
                capacity: 4,
                license_id: lic.id().to_owned()
            }
        );
        assert!(matches!(
            c.plan_assign(Feature::SystemActivation, t0(), |_| 0),
            Err(LicensingError::InvalidInput(_))
        ));
    }

    /// Every millisecond time chrono can hold, and a little beyond.
    const STORED_MS: std::ops::RangeInclusive<i64> = -8_210_298_412_800_001..=8_210_266_876_800_000;

    #[test]
    fn a_flag_at_the_end_of_time_does_not_panic() {
        let license = applied(payload("S1", 3));
        let mut s = seat(Feature::User, SeatSource::Purchased);
        s.over_capacity_since = Some(DateTime::<Utc>::MAX_UTC);
        let c = ctx(Edition::Vm, Some(&license), None);
        assert!(c.check_seat(Feature::User, Some(&s), t0()).licensed);
    }

    proptest::proptest! {
        /// No stored value makes CheckSeat (or the activation it depends on)
        /// panic: any assignment or over-capacity time the store can hold, any
        /// grace, any clock.
        #[test]
        fn check_seat_never_panics_on_stored_values(
            assigned_ms in STORED_MS,
            flagged_ms in proptest::option::of(STORED_MS),
            grace_days in 0i64..=100_000_000,
            now_ms in STORED_MS,
            last_success_ms in proptest::option::of(STORED_MS),
        ) {
            let at = |ms: i64| chrono::TimeZone::timestamp_millis_opt(&Utc, ms).single();
            // What a store hands out: times in range (others are skipped as corrupt).
            let (Some(assigned_at), Some(over_capacity_since)) =
                (at(assigned_ms), flagged_ms.map(at).map_or(Some(None), |f| f.map(Some)))
            else {
                return Ok(());
            };
            let stored = Seat {
                assigned_at,
                over_capacity_since,
                ..seat(Feature::User, SeatSource::Purchased)
            };
            let license = applied(payload("S1", 3));
            let mut c = ctx(Edition::Vm, Some(&license), None);
            c.over_capacity_grace = Duration::days(grace_days);
            let now = at(now_ms).unwrap_or(DateTime::<Utc>::MAX_UTC);
            let _ = c.check_seat(Feature::User, Some(&stored), now);
            let status = crate::ReconcileStatus {
                last_success_at: last_success_ms.and_then(at),
                ..Default::default()
            };
            let _ = crate::activation::activation(
                Some(&license),
                &status,
                now,
                Duration::days(grace_days),
            );
        }
    }
}
