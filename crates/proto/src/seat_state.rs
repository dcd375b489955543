//! The seat state between the domain's types and the `WatchSeats` messages,
//! both ways: the service encodes its copy with these, a client decodes the
//! stream with them (and encodes its copy again for its cache file). Nothing
//! here decides: the decision is the domain's [`Rules::check`].
//!
//! Decoding is strict where a wrong value would change a decision (an unknown
//! feature, source or edition, a time out of range is an [`Invalid`] message)
//! and lenient where the contract allows absence (an unset optional time).

use chrono::{DateTime, Duration, Utc};
use comtrexx_licensing_domain::activation::ActivationState;
use comtrexx_licensing_domain::license::LICENSE_FORMAT;
use comtrexx_licensing_domain::tryout::{TryoutEnd, TryoutEndReason};
use comtrexx_licensing_domain::{
    AppliedLicense, CompactSeat, Edition, Entitlement, Feature, Holder, LapseAction, Lease,
    LicensePayload, ReconcileOutcome, ReconcileStatus, Rules, Seat, SeatModel, SeatReason,
    SeatSource, SerialNumber, SignedLicense, TryoutPolicy, TryoutRecord,
};
use ed25519_dalek::VerifyingKey;
use prost_types::Timestamp;

use crate::pb;
use crate::{from_timestamp, timestamp};

/// A message that does not decode into the domain's types: what is wrong, by
/// field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid seat state: {0}")]
pub struct Invalid(pub String);

fn invalid(what: impl Into<String>) -> Invalid {
    Invalid(what.into())
}

// ---- domain to messages ----

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(timestamp)
}

/// Milliseconds since 1970 as a timestamp (before 1970 too).
pub fn millis_timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn seat_source(s: SeatSource) -> pb::SeatSource {
    match s {
        SeatSource::Purchased => pb::SeatSource::Purchased,
        SeatSource::Tryout => pb::SeatSource::Tryout,
    }
}

pub fn seat_reason(r: SeatReason) -> pb::SeatReason {
    match r {
        SeatReason::Assigned => pb::SeatReason::Assigned,
        SeatReason::NotAssigned => pb::SeatReason::NotAssigned,
        SeatReason::TryoutOver => pb::SeatReason::TryoutOver,
        SeatReason::NotActivated => pb::SeatReason::NotActivated,
        SeatReason::OverCapacity => pb::SeatReason::OverCapacity,
        SeatReason::LicenseLapsed => pb::SeatReason::LicenseLapsed,
        SeatReason::NoLease => pb::SeatReason::NoLease,
    }
}

pub fn seat_model(m: SeatModel) -> pb::SeatModel {
    match m {
        SeatModel::Assigned => pb::SeatModel::Assigned,
        SeatModel::Concurrent => pb::SeatModel::Concurrent,
    }
}

/// A seat model as sent: unspecified (an older sender) means assigned.
pub fn seat_model_of(raw: i32) -> Result<SeatModel, Invalid> {
    match pb::SeatModel::try_from(raw) {
        Ok(pb::SeatModel::Unspecified | pb::SeatModel::Assigned) => Ok(SeatModel::Assigned),
        Ok(pb::SeatModel::Concurrent) => Ok(SeatModel::Concurrent),
        Err(_) => Err(invalid(format!("seat_model {raw} is unknown"))),
    }
}

pub fn lease(l: &Lease) -> pb::Lease {
    pb::Lease {
        lease_id: l.lease_id.clone(),
        user_id: l.user_id.as_str().to_owned(),
        feature: l.feature.as_str().to_owned(),
        holder: l.holder.as_str().to_owned(),
        acquired_at: Some(timestamp(l.acquired_at)),
        expires_at: Some(timestamp(l.expires_at)),
    }
}

pub fn lease_of(l: &pb::Lease) -> Result<Lease, Invalid> {
    Ok(Lease {
        lease_id: comtrexx_licensing_domain::leases::parse_lease_id(&l.lease_id, "lease_id")
            .map_err(|e| invalid(format!("lease_id: {}", e.message)))?,
        user_id: comtrexx_licensing_domain::UserId::parse(&l.user_id)
            .map_err(|e| invalid(format!("lease user_id: {}", e.message)))?,
        feature: feature_of(&l.feature)?,
        holder: Holder::parse(&l.holder)
            .map_err(|e| invalid(format!("lease holder: {}", e.message)))?,
        acquired_at: time("lease.acquired_at", l.acquired_at.as_ref())?,
        expires_at: time("lease.expires_at", l.expires_at.as_ref())?,
    })
}

pub fn edition(e: Edition) -> pb::Edition {
    match e {
        Edition::Vm => pb::Edition::Vm,
        Edition::Business => pb::Edition::Business,
        Edition::Advanced => pb::Edition::Advanced,
    }
}

pub fn reconcile_outcome(o: Option<ReconcileOutcome>) -> pb::ReconcileOutcome {
    match o {
        None => pb::ReconcileOutcome::Unspecified,
        Some(ReconcileOutcome::Updated) => pb::ReconcileOutcome::Updated,
        Some(ReconcileOutcome::Unchanged) => pb::ReconcileOutcome::Unchanged,
        Some(ReconcileOutcome::Unreachable) => pb::ReconcileOutcome::Unreachable,
        Some(ReconcileOutcome::Rejected) => pb::ReconcileOutcome::Rejected,
    }
}

pub fn activation_state(s: ActivationState) -> pb::ActivationState {
    match s {
        ActivationState::NotInitialized => pb::ActivationState::NotInitialized,
        ActivationState::Active => pb::ActivationState::Active,
        ActivationState::Grace => pb::ActivationState::Grace,
        ActivationState::Lapsed => pb::ActivationState::Lapsed,
    }
}

pub fn rules(r: &Rules) -> pb::SeatRules {
    pb::SeatRules {
        edition: edition(r.edition).into(),
        tryout_days: r.tryout.days,
        tryout_seats: r.tryout.seats,
        over_capacity_grace_seconds: r.over_capacity_grace.num_seconds(),
        grace_seconds: r.grace.num_seconds(),
        lapse_action: match r.lapse_action {
            LapseAction::DenyNew => pb::LapseAction::DenyNew,
            LapseAction::Reset => pb::LapseAction::Reset,
        }
        .into(),
        has_license_source: r.has_license_source,
    }
}

pub fn compact_seat(feature: Feature, user: &str, s: CompactSeat) -> pb::WatchedSeat {
    pb::WatchedSeat {
        user_id: user.to_owned(),
        feature: feature.as_str().to_owned(),
        source: seat_source(s.source()).into(),
        assigned_at: Some(millis_timestamp(s.assigned_at_ms())),
        over_capacity_since: s.over_capacity_since_ms().map(millis_timestamp),
    }
}

pub fn watched_seat(s: &Seat) -> pb::WatchedSeat {
    pb::WatchedSeat {
        user_id: s.user_id.as_str().to_owned(),
        feature: s.feature.as_str().to_owned(),
        source: seat_source(s.source).into(),
        assigned_at: Some(timestamp(s.assigned_at)),
        over_capacity_since: opt_timestamp(s.over_capacity_since),
    }
}

pub fn license(l: &AppliedLicense) -> pb::LicenseDocument {
    pb::LicenseDocument {
        format: l.signed.format.clone(),
        payload: l.signed.payload.clone(),
        signature: l.signed.signature.clone(),
        applied_at: Some(timestamp(l.applied_at)),
        edition: edition(l.payload.edition).into(),
        issued_at: Some(timestamp(l.payload.issued_at)),
        entitlements: l
            .payload
            .entitlements
            .iter()
            .map(|e| pb::Entitlement {
                feature: e.feature.as_str().to_owned(),
                quantity: e.quantity,
                in_use: 0,
                expires_at: opt_timestamp(e.expires_at),
                seat_model: seat_model(e.seat_model).into(),
            })
            .collect(),
    }
}

pub fn tryout(r: &TryoutRecord) -> pb::TryoutRecord {
    match r {
        TryoutRecord::Started {
            started_at,
            ends_at,
            ended,
        } => pb::TryoutRecord {
            started_at: Some(timestamp(*started_at)),
            ends_at: Some(timestamp(*ends_at)),
            ended_at: ended.as_ref().map(|e| timestamp(e.at)),
            end_reason: ended
                .as_ref()
                .map_or(pb::TryoutEndReason::Unspecified, |e| match e.reason {
                    TryoutEndReason::Operator => pb::TryoutEndReason::Operator,
                    TryoutEndReason::Purchased => pb::TryoutEndReason::Purchased,
                })
                .into(),
            forfeited_at: None,
        },
        TryoutRecord::Forfeited { at } => pb::TryoutRecord {
            forfeited_at: Some(timestamp(*at)),
            ..pb::TryoutRecord::default()
        },
    }
}

pub fn reconcile(r: &ReconcileStatus) -> pb::ReconcileRecord {
    pb::ReconcileRecord {
        last_success_at: opt_timestamp(r.last_success_at),
        last_attempt_at: opt_timestamp(r.last_attempt_at),
        last_outcome: reconcile_outcome(r.last_outcome).into(),
        last_error: r.last_error.clone().unwrap_or_default(),
        next_reconcile_at: opt_timestamp(r.next_reconcile_at),
    }
}

// ---- messages to domain ----

fn time(field: &str, t: Option<&Timestamp>) -> Result<DateTime<Utc>, Invalid> {
    let t = t.ok_or_else(|| invalid(format!("{field} is missing")))?;
    from_timestamp(t).ok_or_else(|| invalid(format!("{field} is out of range")))
}

fn opt_time(field: &str, t: Option<&Timestamp>) -> Result<Option<DateTime<Utc>>, Invalid> {
    t.map(|t| from_timestamp(t).ok_or_else(|| invalid(format!("{field} is out of range"))))
        .transpose()
}

fn millis_of(field: &str, t: Option<&Timestamp>) -> Result<Option<i64>, Invalid> {
    // Through chrono: the range check the store's own times pass.
    Ok(opt_time(field, t)?.map(|t| t.timestamp_millis()))
}

pub fn feature_of(raw: &str) -> Result<Feature, Invalid> {
    Feature::parse_seat(raw).map_err(|e| invalid(format!("feature {raw:?}: {}", e.message)))
}

pub fn edition_of(raw: i32) -> Result<Edition, Invalid> {
    match pb::Edition::try_from(raw) {
        Ok(pb::Edition::Vm) => Ok(Edition::Vm),
        Ok(pb::Edition::Business) => Ok(Edition::Business),
        Ok(pb::Edition::Advanced) => Ok(Edition::Advanced),
        _ => Err(invalid(format!("edition {raw} is not known"))),
    }
}

pub fn seat_source_of(raw: i32) -> Result<SeatSource, Invalid> {
    match pb::SeatSource::try_from(raw) {
        Ok(pb::SeatSource::Purchased) => Ok(SeatSource::Purchased),
        Ok(pb::SeatSource::Tryout) => Ok(SeatSource::Tryout),
        _ => Err(invalid(format!("seat source {raw} is not known"))),
    }
}

/// The domain's reason for an API reason; `None` for a value this version
/// does not know (or `UNSPECIFIED`).
pub fn seat_reason_of(raw: i32) -> Option<SeatReason> {
    match pb::SeatReason::try_from(raw).ok()? {
        pb::SeatReason::Assigned => Some(SeatReason::Assigned),
        pb::SeatReason::NotAssigned => Some(SeatReason::NotAssigned),
        pb::SeatReason::TryoutOver => Some(SeatReason::TryoutOver),
        pb::SeatReason::NotActivated => Some(SeatReason::NotActivated),
        pb::SeatReason::OverCapacity => Some(SeatReason::OverCapacity),
        pb::SeatReason::LicenseLapsed => Some(SeatReason::LicenseLapsed),
        pb::SeatReason::NoLease => Some(SeatReason::NoLease),
        _ => None,
    }
}

pub fn rules_of(r: &pb::SeatRules) -> Result<Rules, Invalid> {
    let seconds = |field: &str, s: i64| {
        Duration::try_seconds(s)
            .filter(|d| *d >= Duration::zero())
            .ok_or_else(|| invalid(format!("rules.{field} {s} is out of range")))
    };
    Ok(Rules {
        edition: edition_of(r.edition)?,
        tryout: TryoutPolicy {
            days: r.tryout_days,
            seats: r.tryout_seats,
        },
        over_capacity_grace: seconds("over_capacity_grace_seconds", r.over_capacity_grace_seconds)?,
        grace: seconds("grace_seconds", r.grace_seconds)?,
        lapse_action: match pb::LapseAction::try_from(r.lapse_action) {
            Ok(pb::LapseAction::DenyNew) => LapseAction::DenyNew,
            Ok(pb::LapseAction::Reset) => LapseAction::Reset,
            _ => {
                return Err(invalid(format!(
                    "lapse_action {} is not known",
                    r.lapse_action
                )));
            }
        },
        has_license_source: r.has_license_source,
    })
}

/// A seat: its feature, user id and compact form.
pub fn seat_of(s: &pb::WatchedSeat) -> Result<(Feature, &str, CompactSeat), Invalid> {
    if s.user_id.is_empty() {
        return Err(invalid("seat.user_id is empty"));
    }
    let feature = feature_of(&s.feature)?;
    let source = seat_source_of(s.source)?;
    let at = millis_of("seat.assigned_at", s.assigned_at.as_ref())?
        .ok_or_else(|| invalid("seat.assigned_at is missing"))?;
    let over = millis_of("seat.over_capacity_since", s.over_capacity_since.as_ref())?;
    Ok((feature, &s.user_id, CompactSeat::new(source, at, over)))
}

/// The license of a document the service trusted. With `key`, the signed
/// payload is verified again for `serial` and `edition` (what the service did)
/// and decides; without one, the document's listed entitlements are taken as
/// sent (the stream is authenticated).
pub fn license_of(
    doc: &pb::LicenseDocument,
    serial: &str,
    edition: Edition,
    key: Option<&VerifyingKey>,
) -> Result<AppliedLicense, Invalid> {
    let signed = SignedLicense {
        format: doc.format.clone(),
        payload: doc.payload.clone(),
        signature: doc.signature.clone(),
    };
    let applied_at = time("license.applied_at", doc.applied_at.as_ref())?;
    let payload = match key {
        Some(key) => {
            let serial = SerialNumber::parse(serial)
                .map_err(|e| invalid(format!("serial_number {serial:?}: {}", e.message)))?;
            signed
                .verify(key, &serial, edition)
                .map_err(|e| invalid(format!("license: {e}")))?
        }
        None => {
            if signed.format != LICENSE_FORMAT {
                return Err(invalid(format!(
                    "license format {:?} is not {LICENSE_FORMAT:?}",
                    signed.format
                )));
            }
            let mut entitlements = Vec::with_capacity(doc.entitlements.len());
            for e in &doc.entitlements {
                let feature = e.feature.parse::<Feature>().map_err(|err| {
                    invalid(format!(
                        "entitlement feature {:?}: {}",
                        e.feature, err.message
                    ))
                })?;
                if entitlements
                    .iter()
                    .any(|o: &Entitlement| o.feature == feature)
                {
                    return Err(invalid(format!("entitlement {feature} appears twice")));
                }
                entitlements.push(Entitlement {
                    seat_model: seat_model_of(e.seat_model)?,
                    feature,
                    quantity: e.quantity,
                    expires_at: opt_time("entitlement.expires_at", e.expires_at.as_ref())?,
                });
            }
            LicensePayload {
                serial_number: serial.to_owned(),
                edition: edition_of(doc.edition)?,
                issued_at: time("license.issued_at", doc.issued_at.as_ref())?,
                entitlements,
                nonce: None,
            }
        }
    };
    Ok(AppliedLicense {
        signed,
        payload,
        applied_at,
    })
}

pub fn tryout_of(r: &pb::TryoutRecord) -> Result<TryoutRecord, Invalid> {
    if let Some(at) = opt_time("tryout.forfeited_at", r.forfeited_at.as_ref())? {
        return Ok(TryoutRecord::Forfeited { at });
    }
    let ended = match opt_time("tryout.ended_at", r.ended_at.as_ref())? {
        None => None,
        Some(at) => Some(TryoutEnd {
            at,
            reason: match pb::TryoutEndReason::try_from(r.end_reason) {
                Ok(pb::TryoutEndReason::Operator) => TryoutEndReason::Operator,
                Ok(pb::TryoutEndReason::Purchased) => TryoutEndReason::Purchased,
                _ => {
                    return Err(invalid(format!(
                        "tryout.end_reason {} is not known",
                        r.end_reason
                    )));
                }
            },
        }),
    };
    Ok(TryoutRecord::Started {
        started_at: time("tryout.started_at", r.started_at.as_ref())?,
        ends_at: time("tryout.ends_at", r.ends_at.as_ref())?,
        ended,
    })
}

pub fn reconcile_of(r: &pb::ReconcileRecord) -> Result<ReconcileStatus, Invalid> {
    Ok(ReconcileStatus {
        last_success_at: opt_time("reconcile.last_success_at", r.last_success_at.as_ref())?,
        last_attempt_at: opt_time("reconcile.last_attempt_at", r.last_attempt_at.as_ref())?,
        last_outcome: match pb::ReconcileOutcome::try_from(r.last_outcome) {
            Ok(pb::ReconcileOutcome::Unspecified) => None,
            Ok(pb::ReconcileOutcome::Updated) => Some(ReconcileOutcome::Updated),
            Ok(pb::ReconcileOutcome::Unchanged) => Some(ReconcileOutcome::Unchanged),
            Ok(pb::ReconcileOutcome::Unreachable) => Some(ReconcileOutcome::Unreachable),
            Ok(pb::ReconcileOutcome::Rejected) => Some(ReconcileOutcome::Rejected),
            Err(_) => {
                return Err(invalid(format!(
                    "reconcile.last_outcome {} is not known",
                    r.last_outcome
                )));
            }
        },
        last_error: (!r.last_error.is_empty()).then(|| r.last_error.clone()),
        next_reconcile_at: opt_time("reconcile.next_reconcile_at", r.next_reconcile_at.as_ref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use comtrexx_licensing_domain::UserId;
    use comtrexx_licensing_domain::license::testing::{key, payload};

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn seat_times_keep_milliseconds_before_and_after_1970() {
        let seat = CompactSeat::new(SeatSource::Purchased, -1, Some(1_500));
        let pb = compact_seat(Feature::User, "alice", seat);
        let at = pb.assigned_at.unwrap();
        assert_eq!((at.seconds, at.nanos), (-1, 999_000_000));
        let since = pb.over_capacity_since.unwrap();
        assert_eq!((since.seconds, since.nanos), (1, 500_000_000));
        assert_eq!(seat_of(&pb).unwrap(), (Feature::User, "alice", seat));
    }

    #[test]
    fn every_record_round_trips() {
        let seat = Seat {
            user_id: UserId::parse("bob").unwrap(),
            feature: Feature::CallAssist,
            source: SeatSource::Tryout,
            assigned_at: t("2026-03-01T10:00:00.123Z"),
            over_capacity_since: Some(t("2026-03-02T00:00:00Z")),
        };
        let wire = watched_seat(&seat);
        let (f, u, c) = seat_of(&wire).unwrap();
        assert_eq!(c.to_seat(UserId::parse(u).unwrap(), f), seat);

        let r = Rules {
            edition: Edition::Business,
            tryout: TryoutPolicy { days: 14, seats: 3 },
            over_capacity_grace: Duration::days(7),
            grace: Duration::days(30),
            lapse_action: LapseAction::Reset,
            has_license_source: true,
        };
        assert_eq!(rules_of(&rules(&r)).unwrap(), r);

        for record in [
            TryoutRecord::Started {
                started_at: t("2026-01-01T00:00:00Z"),
                ends_at: t("2026-01-15T00:00:00Z"),
                ended: None,
            },
            TryoutRecord::Started {
                started_at: t("2026-01-01T00:00:00Z"),
                ends_at: t("2026-01-15T00:00:00Z"),
                ended: Some(TryoutEnd {
                    at: t("2026-01-03T00:00:00Z"),
                    reason: TryoutEndReason::Purchased,
                }),
            },
            TryoutRecord::Forfeited {
                at: t("2026-01-02T00:00:00Z"),
            },
        ] {
            assert_eq!(tryout_of(&tryout(&record)).unwrap(), record);
        }

        let status = ReconcileStatus {
            last_success_at: Some(t("2026-01-01T00:00:00Z")),
            last_attempt_at: Some(t("2026-01-02T00:00:00Z")),
            last_outcome: Some(ReconcileOutcome::Unreachable),
            last_error: Some("connection refused".into()),
            next_reconcile_at: None,
        };
        assert_eq!(reconcile_of(&reconcile(&status)).unwrap(), status);
    }

    #[test]
    fn a_license_decodes_with_and_without_the_vendor_key() {
        let mut p = payload("SN-1", 20);
        p.issued_at = t("2026-01-01T00:00:00Z");
        let applied = AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t("2026-01-02T00:00:00Z"),
        };
        let doc = license(&applied);
        let trusted = license_of(&doc, "SN-1", Edition::Vm, None).unwrap();
        assert_eq!(trusted.payload.entitlements, applied.payload.entitlements);
        assert_eq!(trusted.applied_at, applied.applied_at);
        let verified =
            license_of(&doc, "SN-1", Edition::Vm, Some(&key(1).verifying_key())).unwrap();
        assert_eq!(verified, applied);
        let e = license_of(&doc, "SN-1", Edition::Vm, Some(&key(2).verifying_key())).unwrap_err();
        assert!(e.0.contains("signature"), "{e}");
    }

    #[test]
    fn unknown_values_are_refused_by_field() {
        let mut seat = compact_seat(
            Feature::User,
            "a",
            CompactSeat::new(SeatSource::Purchased, 0, None),
        );
        seat.source = 99;
        assert!(seat_of(&seat).unwrap_err().0.contains("source"));
        seat.source = pb::SeatSource::Purchased.into();
        seat.feature = "system_activation".into();
        assert!(seat_of(&seat).unwrap_err().0.contains("feature"));
        seat.feature = "user".into();
        seat.assigned_at = None;
        assert!(seat_of(&seat).unwrap_err().0.contains("assigned_at"));
        assert!(edition_of(0).is_err());
        assert_eq!(seat_reason_of(0), None);
        assert_eq!(
            seat_reason_of(seat_reason(SeatReason::OverCapacity).into()),
            Some(SeatReason::OverCapacity)
        );
    }
}
