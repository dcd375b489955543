//! The stored value format. What is written to Redis is an API between replicas
//! of different versions, so it gets its own versioned structs (`v` field),
//! converted explicitly to and from domain types. Add optional fields freely;
//! anything else needs a new `v`.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{Incident, StoreError, StoredLicense};
use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    Feature, ReconcileStatus, Seat, SeatSource, SignedLicense, TryoutRecord, UserId,
};

/// The only seat format version this code writes.
pub const SEAT_V1: u32 = 1;

/// A seat's value; the user id and feature are in its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatRecordV1 {
    pub v: u32,
    pub source: SeatSource,
    /// Milliseconds since the Unix epoch (Redis `TIME` in the Redis store).
    pub assigned_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_capacity_since_ms: Option<i64>,
}

impl SeatRecordV1 {
    pub fn from_seat(seat: &Seat) -> Self {
        Self {
            v: SEAT_V1,
            source: seat.source,
            assigned_at_ms: seat.assigned_at.timestamp_millis(),
            over_capacity_since_ms: seat.over_capacity_since.map(|t| t.timestamp_millis()),
        }
    }

    pub fn encode(seat: &Seat) -> String {
        serde_json::to_string(&Self::from_seat(seat)).expect("a seat record always serializes")
    }

    pub fn into_seat(self, user_id: UserId, feature: Feature) -> Result<Seat, StoreError> {
        if self.v != SEAT_V1 {
            return Err(StoreError::Corrupt(format!(
                "seat format v{} unknown",
                self.v
            )));
        }
        Ok(Seat {
            user_id,
            feature,
            source: self.source,
            assigned_at: millis(self.assigned_at_ms)?,
            over_capacity_since: self.over_capacity_since_ms.map(millis).transpose()?,
        })
    }

    pub fn parse(json: &str) -> Result<Self, StoreError> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("seat record: {e}")))
    }

    /// The seat's values, checked as [`Self::into_seat`] checks them.
    pub fn into_value(self) -> Result<super::SeatValue, StoreError> {
        if self.v != SEAT_V1 {
            return Err(StoreError::Corrupt(format!(
                "seat format v{} unknown",
                self.v
            )));
        }
        millis(self.assigned_at_ms)?;
        self.over_capacity_since_ms.map(millis).transpose()?;
        Ok(super::SeatValue {
            source: self.source,
            assigned_at_ms: self.assigned_at_ms,
            over_capacity_since_ms: self.over_capacity_since_ms,
        })
    }
}

/// The applied license document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRecordV1 {
    pub v: u32,
    pub signed: SignedLicense,
    pub applied_at: DateTime<Utc>,
}

impl LicenseRecordV1 {
    pub fn from_stored(l: &StoredLicense) -> Self {
        Self {
            v: 1,
            signed: l.signed.clone(),
            applied_at: l.applied_at,
        }
    }

    pub fn encode(l: &StoredLicense) -> String {
        serde_json::to_string(&Self::from_stored(l)).expect("a license record always serializes")
    }

    pub fn parse(json: &str) -> Result<StoredLicense, StoreError> {
        let r: Self = serde_json::from_str(json)
            .map_err(|e| StoreError::Corrupt(format!("license record: {e}")))?;
        known_version("license", r.v)?;
        Ok(StoredLicense {
            signed: r.signed,
            applied_at: r.applied_at,
        })
    }
}

/// The tryout record. Serialized deterministically (fixed field order), so
/// compare-and-set can compare the stored text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryoutRecordV1 {
    pub v: u32,
    pub record: TryoutRecord,
}

impl TryoutRecordV1 {
    pub fn encode(record: &TryoutRecord) -> String {
        serde_json::to_string(&Self {
            v: 1,
            record: record.clone(),
        })
        .expect("a tryout record always serializes")
    }

    pub fn parse(json: &str) -> Result<TryoutRecord, StoreError> {
        let r = serde_json::from_str::<Self>(json)
            .map_err(|e| StoreError::Corrupt(format!("tryout record: {e}")))?;
        known_version("tryout", r.v)?;
        Ok(r.record)
    }
}

/// The last reconcile's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileRecordV1 {
    pub v: u32,
    pub status: ReconcileStatus,
}

impl ReconcileRecordV1 {
    pub fn encode(status: &ReconcileStatus) -> String {
        serde_json::to_string(&Self {
            v: 1,
            status: status.clone(),
        })
        .expect("a reconcile status always serializes")
    }

    pub fn parse(json: &str) -> Result<ReconcileStatus, StoreError> {
        let r = serde_json::from_str::<Self>(json)
            .map_err(|e| StoreError::Corrupt(format!("reconcile record: {e}")))?;
        known_version("reconcile", r.v)?;
        Ok(r.status)
    }
}

/// The last repair of lost data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRecordV1 {
    pub v: u32,
    pub incident: Incident,
}

impl IncidentRecordV1 {
    pub fn encode(incident: &Incident) -> String {
        serde_json::to_string(&Self {
            v: 1,
            incident: incident.clone(),
        })
        .expect("an incident record always serializes")
    }

    pub fn parse(json: &str) -> Result<Incident, StoreError> {
        let r = serde_json::from_str::<Self>(json)
            .map_err(|e| StoreError::Corrupt(format!("incident record: {e}")))?;
        known_version("incident", r.v)?;
        Ok(r.incident)
    }
}

/// This code reads format version 1 of every record; a newer one is refused
/// rather than misread.
fn known_version(what: &str, v: u32) -> Result<(), StoreError> {
    if v == 1 {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "{what} record format v{v} unknown"
        )))
    }
}

fn millis(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seat_record_format_is_stable() {
        let json = r#"{"v":1,"source":"tryout","assigned_at_ms":1767225600000}"#;
        let seat = SeatRecordV1::parse(json)
            .unwrap()
            .into_seat(UserId::parse("u").unwrap(), Feature::User)
            .unwrap();
        assert_eq!(seat.source, SeatSource::Tryout);
        assert_eq!(seat.assigned_at.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(
            serde_json::to_string(&SeatRecordV1::from_seat(&seat)).unwrap(),
            json
        );
        assert!(
            SeatRecordV1::parse(r#"{"v":2,"source":"tryout","assigned_at_ms":1}"#)
                .unwrap()
                .into_seat(UserId::parse("u").unwrap(), Feature::User)
                .is_err()
        );
        assert!(SeatRecordV1::parse("nope").is_err());
    }

    #[test]
    fn unknown_record_versions_are_refused() {
        assert!(
            TryoutRecordV1::parse(
                r#"{"v":2,"record":{"kind":"forfeited","at":"2026-01-01T00:00:00Z"}}"#
            )
            .is_err()
        );
        assert!(
            TryoutRecordV1::parse(
                r#"{"v":1,"record":{"kind":"forfeited","at":"2026-01-01T00:00:00Z"}}"#
            )
            .is_ok()
        );
        assert!(ReconcileRecordV1::parse(r#"{"v":9,"status":{}}"#).is_err());
        assert!(ReconcileRecordV1::parse(r#"{"v":1,"status":{}}"#).is_ok());
    }
}

/// The pending initialization. Serialized deterministically, so an activation
/// can name the exact one it consumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializationRecordV1 {
    pub v: u32,
    pub pending: PendingInitialization,
}

impl InitializationRecordV1 {
    pub fn encode(pending: &PendingInitialization) -> String {
        serde_json::to_string(&Self {
            v: 1,
            pending: pending.clone(),
        })
        .expect("an initialization record always serializes")
    }

    pub fn parse(json: &str) -> Result<PendingInitialization, StoreError> {
        let r = serde_json::from_str::<Self>(json)
            .map_err(|e| StoreError::Corrupt(format!("initialization record: {e}")))?;
        known_version("initialization", r.v)?;
        Ok(r.pending)
    }
}

/// The only audit entry format version this code writes.
pub const AUDIT_V1: u32 = 1;

/// One audit trail entry as stored (a stream entry's `record` field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecordV1 {
    pub v: u32,
    pub time_ms: i64,
    pub caller: String,
    pub role: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub feature: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
}

impl AuditRecordV1 {
    pub fn encode(e: &crate::domain::audit::AuditEvent) -> String {
        let record = Self {
            v: AUDIT_V1,
            time_ms: e.time.timestamp_millis(),
            caller: e.caller.clone(),
            role: e.role.clone(),
            method: e.method.clone(),
            user_id: e.user_id.clone(),
            feature: e.feature.clone(),
            code: e.code.clone(),
            detail: e.detail.clone(),
            trace_id: e.trace_id.clone(),
        };
        serde_json::to_string(&record).expect("an audit record always serializes")
    }

    pub fn decode(json: &str) -> Result<crate::domain::audit::AuditEvent, StoreError> {
        let r: Self = serde_json::from_str(json)
            .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
        if r.v != AUDIT_V1 {
            return Err(StoreError::Corrupt(format!(
                "audit format v{} unknown",
                r.v
            )));
        }
        Ok(crate::domain::audit::AuditEvent {
            time: millis(r.time_ms)?,
            caller: r.caller,
            role: r.role,
            method: r.method,
            user_id: r.user_id,
            feature: r.feature,
            code: r.code,
            detail: r.detail,
            trace_id: r.trace_id,
        })
    }
}

/// The only lease format version this code writes.
pub const LEASE_V1: u32 = 1;

/// A lease's value (`lic:{S}:lease_rec`, keyed by lease id). Written by
/// `lease_acquire.lua` too (field order as there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecordV1 {
    pub v: u32,
    pub user: String,
    pub feature: String,
    pub holder: String,
    /// Milliseconds since the Unix epoch (Redis `TIME` in the Redis store).
    pub acquired_at_ms: i64,
    pub expires_at_ms: i64,
}

impl LeaseRecordV1 {
    pub fn from_lease(l: &crate::domain::Lease) -> Self {
        Self {
            v: LEASE_V1,
            user: l.user_id.as_str().to_owned(),
            feature: l.feature.as_str().to_owned(),
            holder: l.holder.as_str().to_owned(),
            acquired_at_ms: l.acquired_at.timestamp_millis(),
            expires_at_ms: l.expires_at.timestamp_millis(),
        }
    }

    pub fn encode(l: &crate::domain::Lease) -> String {
        serde_json::to_string(&Self::from_lease(l)).expect("a lease record always serializes")
    }

    pub fn parse(json: &str) -> Result<Self, StoreError> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("lease record: {e}")))
    }

    pub fn into_lease(self, lease_id: &str) -> Result<crate::domain::Lease, StoreError> {
        if self.v != LEASE_V1 {
            return Err(StoreError::Corrupt(format!(
                "lease format v{} unknown",
                self.v
            )));
        }
        let corrupt = |what: &str, e: crate::domain::InvalidInput| {
            StoreError::Corrupt(format!("stored lease {what}: {}", e.message))
        };
        Ok(crate::domain::Lease {
            lease_id: lease_id.to_owned(),
            user_id: UserId::parse(&self.user).map_err(|e| corrupt("user", e))?,
            feature: self.feature.parse().map_err(|e| corrupt("feature", e))?,
            holder: crate::domain::Holder::parse(&self.holder).map_err(|e| corrupt("holder", e))?,
            acquired_at: millis(self.acquired_at_ms)?,
            expires_at: millis(self.expires_at_ms)?,
        })
    }
}
