//! Conversions between generated protobuf types and domain types. Request
//! validation happens here (bad input becomes `INVALID_ARGUMENT` before the
//! domain is called).

use super::pb;
use crate::domain::ActivationState;
use crate::domain::leases::parse_lease_id;
use crate::domain::{
    Feature, Holder, InvalidInput, Seat, SeatCheck, TryoutState, TryoutView, UserId,
};
use crate::events::LicenseEvent;
use crate::service::{CheckAnswer, EntitlementUse, Overview};

/// A validated (user, feature) pair from `CheckSeat`, `AssignSeat`, `ReleaseSeat`.
#[derive(Debug, Clone)]
pub struct SeatRequest {
    pub user_id: UserId,
    pub feature: Feature,
}

impl SeatRequest {
    fn parse(user_id: &str, feature: &str) -> Result<Self, InvalidInput> {
        Ok(Self {
            user_id: UserId::parse(user_id)?,
            feature: Feature::parse_seat(feature)?,
        })
    }
}

/// A validated `AcquireLease` request.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub user_id: UserId,
    pub feature: Feature,
    pub holder: Holder,
}

impl TryFrom<&pb::AcquireLeaseRequest> for LeaseRequest {
    type Error = InvalidInput;
    fn try_from(r: &pb::AcquireLeaseRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            user_id: UserId::parse(&r.user_id)?,
            feature: Feature::parse_seat(&r.feature)?,
            holder: Holder::parse(&r.holder)?,
        })
    }
}

/// A validated `RenewLeases` request.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    pub holder: Holder,
    pub lease_ids: Vec<String>,
}

impl TryFrom<&pb::RenewLeasesRequest> for RenewRequest {
    type Error = InvalidInput;
    fn try_from(r: &pb::RenewLeasesRequest) -> Result<Self, Self::Error> {
        let holder = Holder::parse(&r.holder)?;
        if r.lease_ids.len() > crate::service::MAX_RENEW_IDS {
            return Err(InvalidInput::new(
                "lease_ids",
                format!(
                    "at most {} ids in one call, got {}",
                    crate::service::MAX_RENEW_IDS,
                    r.lease_ids.len()
                ),
            ));
        }
        let lease_ids = r
            .lease_ids
            .iter()
            .map(|id| parse_lease_id(id, "lease_ids"))
            .collect::<Result<_, _>>()?;
        Ok(Self { holder, lease_ids })
    }
}

impl TryFrom<&pb::CheckSeatRequest> for SeatRequest {
    type Error = InvalidInput;
    fn try_from(r: &pb::CheckSeatRequest) -> Result<Self, Self::Error> {
        Self::parse(&r.user_id, &r.feature)
    }
}

impl TryFrom<&pb::AssignSeatRequest> for SeatRequest {
    type Error = InvalidInput;
    fn try_from(r: &pb::AssignSeatRequest) -> Result<Self, Self::Error> {
        Self::parse(&r.user_id, &r.feature)
    }
}

impl TryFrom<&pb::ReleaseSeatRequest> for SeatRequest {
    type Error = InvalidInput;
    fn try_from(r: &pb::ReleaseSeatRequest) -> Result<Self, Self::Error> {
        Self::parse(&r.user_id, &r.feature)
    }
}

pub use comtrexx_licensing_proto::seat_state::{
    edition, lease, opt_timestamp, reconcile_outcome, seat_model, seat_reason, seat_source,
};
pub use comtrexx_licensing_proto::timestamp;

pub fn tryout_state(s: TryoutState) -> pb::TryoutState {
    match s {
        TryoutState::Available => pb::TryoutState::Available,
        TryoutState::Active => pb::TryoutState::Active,
        TryoutState::Expired => pb::TryoutState::Expired,
        TryoutState::Ended => pb::TryoutState::Ended,
        TryoutState::Unavailable => pb::TryoutState::Unavailable,
    }
}

pub fn seat(s: &Seat) -> pb::Seat {
    pb::Seat {
        user_id: s.user_id.to_string(),
        feature: s.feature.to_string(),
        source: seat_source(s.source).into(),
        assigned_at: Some(timestamp(s.assigned_at)),
        over_capacity: s.over_capacity_since.is_some(),
    }
}

pub fn check_response(a: &CheckAnswer) -> pb::CheckSeatResponse {
    let SeatCheck {
        licensed,
        source,
        reason,
        valid_until,
    } = &a.check;
    pb::CheckSeatResponse {
        licensed: *licensed,
        source: source
            .map_or(pb::SeatSource::Unspecified, seat_source)
            .into(),
        reason: seat_reason(*reason).into(),
        valid_until: opt_timestamp(*valid_until),
        stale: a.stale,
        version: a.version,
    }
}

pub fn tryout_status(v: &TryoutView) -> pb::TryoutStatus {
    pb::TryoutStatus {
        state: tryout_state(v.state).into(),
        started_at: opt_timestamp(v.started_at),
        ends_at: opt_timestamp(v.ends_at),
        days_remaining: v.days_remaining,
        test_seats_total: v.seats_total,
        test_seats_used: v.seats_used,
    }
}

pub fn entitlement(e: &EntitlementUse) -> pb::Entitlement {
    pb::Entitlement {
        feature: e.entitlement.feature.to_string(),
        quantity: e.entitlement.quantity,
        in_use: e.in_use,
        expires_at: opt_timestamp(e.entitlement.expires_at),
        seat_model: seat_model(e.entitlement.seat_model).into(),
    }
}

pub fn overview(o: &Overview) -> pb::GetLicenseOverviewResponse {
    pb::GetLicenseOverviewResponse {
        serial_number: o.serial.to_string(),
        edition: edition(o.edition).into(),
        activation_state: match o.activation.state {
            ActivationState::NotInitialized => pb::ActivationState::NotInitialized,
            ActivationState::Active => pb::ActivationState::Active,
            ActivationState::Grace => pb::ActivationState::Grace,
            ActivationState::Lapsed => pb::ActivationState::Lapsed,
        }
        .into(),
        entitlements: o.entitlements.iter().map(entitlement).collect(),
        tryout: Some(tryout_status(&o.tryout)),
        last_reconciled_at: opt_timestamp(o.reconcile.last_success_at),
        last_reconcile_outcome: reconcile_outcome(o.reconcile.last_outcome).into(),
        grace_ends_at: opt_timestamp(o.activation.grace_ends_at),
        next_reconcile_at: opt_timestamp(o.reconcile.next_reconcile_at),
        license_source: o.license_source.clone(),
        last_reconcile_error: o
            .reconcile
            .last_error
            .clone()
            .or_else(|| o.license_problem.clone())
            .unwrap_or_default(),
        system_activated: o.system_activated,
        last_store_repair_at: opt_timestamp(o.incident.as_ref().map(|i| i.at)),
        writes_restored: o.incident.as_ref().map_or(0, |i| i.restored_total),
        writes_lost: o.incident.as_ref().map_or(0, |i| i.lost_total),
        lost_writes: o
            .incident
            .as_ref()
            .map(|i| i.lost.clone())
            .unwrap_or_default(),
        time_high_water: Some(timestamp(o.time_high_water)),
        clock_rolled_back: o.clock_rolled_back,
        clock_skew_ms: o.clock_skew_ms.unwrap_or(0),
        clock_skewed: o.clock_skewed,
        corrupt_records: u32::try_from(o.corrupt_records).unwrap_or(u32::MAX),
        activation_reason: o.activation_reason.clone(),
        over_capacity: o
            .over_capacity
            .iter()
            .map(|c| pb::OverCapacity {
                feature: c.feature.to_string(),
                seats: c.seats,
                grace_ends_at: opt_timestamp(c.grace_ends_at),
            })
            .collect(),
        concurrent_use: o
            .concurrent
            .iter()
            .map(|c| pb::ConcurrentUse {
                feature: c.feature.to_string(),
                capacity: c.capacity,
                in_use: c.in_use,
                peak_in_use_today: c.peak_today,
                busy_today: c.busy_today,
                at_capacity: c.capacity > 0 && c.in_use >= c.capacity,
            })
            .collect(),
        auth_mode: o.auth_mode.to_owned(),
        development_installation: o.development_installation,
        version: o.version,
    }
}

pub fn event(e: &LicenseEvent) -> pb::WatchLicenseEventsResponse {
    pb::WatchLicenseEventsResponse {
        kind: e.kind.to_owned(),
        occurred_at: Some(timestamp(e.occurred_at)),
        seat: e.seat.as_ref().map(seat),
        user_id: e
            .user_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        feature: e.feature.map(|f| f.to_string()).unwrap_or_default(),
        detail: e.detail.clone(),
        days_remaining: e.days_remaining.unwrap_or(0),
    }
}

pub fn audit_event(e: &crate::domain::audit::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        time: Some(timestamp(e.time)),
        caller: e.caller.clone(),
        role: e.role.clone(),
        method: e.method.clone(),
        user_id: e.user_id.clone(),
        feature: e.feature.clone(),
        code: e.code.clone(),
        detail: e.detail.clone(),
        trace_id: e.trace_id.clone(),
    }
}
