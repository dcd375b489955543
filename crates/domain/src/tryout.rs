//! The tryout state machine: a VM PBX may run 14 days with 3 test seats, once per
//! serial number, ever.
//!
//! ```text
//! AVAILABLE --start--> ACTIVE --time runs out--> EXPIRED
//!     |                  |
//!     | purchase         +--operator ends / purchase--> ENDED
//!     v
//! UNAVAILABLE (forfeited; also always for Business/Advanced)
//! ```
//!
//! Only the record is stored; the state is derived from it, the edition and the
//! clock, so expiry needs no background job.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::error::LicensingError;
use super::ids::Edition;

/// What is stored about a serial's tryout. Absent means it was never used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TryoutRecord {
    Started {
        started_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ended: Option<TryoutEnd>,
    },
    /// Licenses were purchased before the tryout was ever started: it can never
    /// start now.
    Forfeited { at: DateTime<Utc> },
}

/// When and why an active tryout was left before it expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryoutEnd {
    pub at: DateTime<Utc>,
    pub reason: TryoutEndReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TryoutEndReason {
    /// The operator left the tryout.
    Operator,
    /// User licenses were purchased.
    Purchased,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryoutState {
    Available,
    Active,
    Expired,
    Ended,
    Unavailable,
}

/// How long a tryout lasts and how many test seats it has (configurable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TryoutPolicy {
    pub days: u32,
    pub seats: u32,
}

impl Default for TryoutPolicy {
    fn default() -> Self {
        Self { days: 14, seats: 3 }
    }
}

/// The tryout as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryoutView {
    pub state: TryoutState,
    pub started_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub days_remaining: u32,
    pub seats_total: u32,
    pub seats_used: u32,
}

/// Derives the state from the stored record.
pub fn state(edition: Edition, record: Option<&TryoutRecord>, now: DateTime<Utc>) -> TryoutState {
    if !edition.has_tryout() {
        return TryoutState::Unavailable;
    }
    match record {
        None => TryoutState::Available,
        Some(TryoutRecord::Forfeited { .. }) => TryoutState::Unavailable,
        Some(TryoutRecord::Started { ended: Some(_), .. }) => TryoutState::Ended,
        Some(TryoutRecord::Started { ends_at, .. }) if now >= *ends_at => TryoutState::Expired,
        Some(TryoutRecord::Started { .. }) => TryoutState::Active,
    }
}

/// The record a successful start writes.
pub fn start(
    edition: Edition,
    record: Option<&TryoutRecord>,
    now: DateTime<Utc>,
    policy: TryoutPolicy,
) -> Result<TryoutRecord, LicensingError> {
    match state(edition, record, now) {
        TryoutState::Available => Ok(TryoutRecord::Started {
            started_at: now,
            // Checked: `now` may come from a stored clock, which nothing bounds.
            ends_at: now
                .checked_add_signed(Duration::days(i64::from(policy.days)))
                .ok_or_else(|| {
                    LicensingError::Internal(format!(
                        "the time {now} plus the tryout's {} days is beyond the representable range (a broken clock)",
                        policy.days
                    ))
                })?,
            ended: None,
        }),
        TryoutState::Unavailable if !edition.has_tryout() => Err(LicensingError::precondition(
            "TRYOUT_UNAVAILABLE",
            format!("edition {edition} has no tryout: it always needs purchased licenses"),
        )),
        _ => Err(LicensingError::precondition(
            "TRYOUT_NOT_AVAILABLE",
            match used(edition, record, now) {
                Some(Used::Active { ends_at }) => format!(
                    "the tryout is already active, until {}: assign its test seats with AssignSeat",
                    ends_at.to_rfc3339()
                ),
                Some(used) => format!("{}: {}", used.describe(), used.next_step()),
                // Not reached (only an available tryout starts); said plainly anyway.
                None => "the tryout cannot start: it runs only once per serial number".to_owned(),
            },
        )),
    }
}

/// How the tryout of a serial number was used, where it cannot start (again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    /// Running now.
    Active { ends_at: DateTime<Utc> },
    /// Ran out.
    Expired { ends_at: DateTime<Utc> },
    /// Left early by an operator.
    EndedByOperator { at: DateTime<Utc> },
    /// Left early because user licenses were purchased.
    EndedByPurchase { at: DateTime<Utc> },
    /// Never started: a purchased license came first.
    Forfeited { at: DateTime<Utc> },
}

impl Used {
    /// What happened, in words an operator recognises.
    pub fn describe(self) -> String {
        match self {
            Used::Active { ends_at } => {
                format!("the tryout is active until {}", ends_at.to_rfc3339())
            }
            Used::Expired { ends_at } => format!(
                "the tryout expired at {} and runs only once per serial number",
                ends_at.to_rfc3339()
            ),
            Used::EndedByOperator { at } => format!(
                "the tryout was ended by an operator at {} and runs only once per serial number",
                at.to_rfc3339()
            ),
            Used::EndedByPurchase { at } => format!(
                "the tryout ended when a purchased license was applied at {} and runs only once per serial number",
                at.to_rfc3339()
            ),
            Used::Forfeited { at } => format!(
                "the tryout was forfeited when a purchased license was applied at {} (a tryout can only start before a serial number's first license)",
                at.to_rfc3339()
            ),
        }
    }

    /// What licenses users from here on.
    pub fn next_step(self) -> &'static str {
        match self {
            Used::Active { .. } => "its test seats license users until then",
            Used::EndedByPurchase { .. } | Used::Forfeited { .. } => {
                "users are licensed with purchased seats (apply the license again if it is no longer applied)"
            }
            Used::Expired { .. } | Used::EndedByOperator { .. } => {
                "apply a purchased license to license users"
            }
        }
    }
}

/// How this serial's tryout was used; `None` while it is available, or on an
/// edition without a tryout.
pub fn used(edition: Edition, record: Option<&TryoutRecord>, now: DateTime<Utc>) -> Option<Used> {
    if !edition.has_tryout() {
        return None;
    }
    match record? {
        TryoutRecord::Forfeited { at } => Some(Used::Forfeited { at: *at }),
        TryoutRecord::Started {
            ended: Some(end), ..
        } => Some(match end.reason {
            TryoutEndReason::Operator => Used::EndedByOperator { at: end.at },
            TryoutEndReason::Purchased => Used::EndedByPurchase { at: end.at },
        }),
        TryoutRecord::Started { ends_at, .. } if now >= *ends_at => {
            Some(Used::Expired { ends_at: *ends_at })
        }
        TryoutRecord::Started { ends_at, .. } => Some(Used::Active { ends_at: *ends_at }),
    }
}

/// The tryout's part in "how do I license users on this PBX": an offer only where
/// a start can succeed, else why there is none.
pub fn alternative(edition: Edition, record: Option<&TryoutRecord>, now: DateTime<Utc>) -> String {
    if !edition.has_tryout() {
        return format!("edition {edition} has no tryout");
    }
    match used(edition, record, now) {
        None => "or start the tryout (StartTryout)".to_owned(),
        Some(used) => used.describe(),
    }
}

/// The record an operator's "end tryout" writes; `Ok(None)` when the tryout is
/// already over (nothing to change, not an error).
pub fn end(
    edition: Edition,
    record: Option<&TryoutRecord>,
    now: DateTime<Utc>,
) -> Result<Option<TryoutRecord>, LicensingError> {
    match state(edition, record, now) {
        TryoutState::Active => Ok(record.map(|r| ended(r, now, TryoutEndReason::Operator))),
        TryoutState::Ended | TryoutState::Expired => Ok(None),
        other => Err(LicensingError::precondition(
            "TRYOUT_NOT_ACTIVE",
            format!("no tryout to end: tryout is {}", state_name(other)),
        )),
    }
}

/// What purchasing user licenses does to the tryout: an active one ends, an
/// unused one is forfeited. `None` when nothing changes.
pub fn on_purchase(
    edition: Edition,
    record: Option<&TryoutRecord>,
    now: DateTime<Utc>,
) -> Option<TryoutRecord> {
    match (state(edition, record, now), record) {
        (TryoutState::Active, Some(r)) => Some(ended(r, now, TryoutEndReason::Purchased)),
        (TryoutState::Available, None) => Some(TryoutRecord::Forfeited { at: now }),
        _ => None,
    }
}

fn ended(record: &TryoutRecord, now: DateTime<Utc>, reason: TryoutEndReason) -> TryoutRecord {
    match record {
        TryoutRecord::Started {
            started_at,
            ends_at,
            ..
        } => TryoutRecord::Started {
            started_at: *started_at,
            ends_at: *ends_at,
            ended: Some(TryoutEnd { at: now, reason }),
        },
        other => other.clone(),
    }
}

/// The operator's view; `seats_used` is the number of tryout seats held.
pub fn view(
    edition: Edition,
    record: Option<&TryoutRecord>,
    now: DateTime<Utc>,
    policy: TryoutPolicy,
    seats_used: u32,
) -> TryoutView {
    let state = state(edition, record, now);
    let (started_at, ends_at) = match record {
        Some(TryoutRecord::Started {
            started_at,
            ends_at,
            ..
        }) if edition.has_tryout() => (Some(*started_at), Some(*ends_at)),
        _ => (None, None),
    };
    let days_remaining = match (state, ends_at) {
        (TryoutState::Active, Some(end)) => {
            let secs = (end - now).num_seconds().max(0);
            u32::try_from((secs + 86_399) / 86_400).unwrap_or(u32::MAX)
        }
        _ => 0,
    };
    TryoutView {
        state,
        started_at,
        ends_at,
        days_remaining,
        seats_total: if edition.has_tryout() {
            policy.seats
        } else {
            0
        },
        seats_used,
    }
}

pub fn state_name(state: TryoutState) -> &'static str {
    match state {
        TryoutState::Available => "available",
        TryoutState::Active => "active",
        TryoutState::Expired => "expired",
        TryoutState::Ended => "ended",
        TryoutState::Unavailable => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        "2026-03-01T10:00:00Z".parse().unwrap()
    }

    fn started() -> TryoutRecord {
        start(Edition::Vm, None, t0(), TryoutPolicy::default()).unwrap()
    }

    /// The refusal of a second start names how the tryout was used and what
    /// licenses users now.
    #[test]
    fn a_refused_start_names_how_the_tryout_was_used() {
        let refusal = |record: &TryoutRecord, now| match start(
            Edition::Vm,
            Some(record),
            now,
            TryoutPolicy::default(),
        ) {
            Err(LicensingError::FailedPrecondition { reason, message }) => {
                assert_eq!(reason, "TRYOUT_NOT_AVAILABLE");
                message
            }
            other => panic!("{other:?}"),
        };
        let forfeited = on_purchase(Edition::Vm, None, t0()).unwrap();
        let text = refusal(&forfeited, t0());
        assert!(
            text.starts_with(
                "the tryout was forfeited when a purchased license was applied at 2026-03-01T10:00:00"
            ),
            "{text}"
        );
        assert!(text.contains("purchased seats"), "{text}");
        let r = started();
        let text = refusal(&r, t0());
        assert!(text.contains("already active, until 2026-03-15"), "{text}");
        let text = refusal(&r, t0() + Duration::days(20));
        assert!(text.contains("expired at 2026-03-15"), "{text}");
        assert!(text.contains("apply a purchased license"), "{text}");
        let purchased = on_purchase(Edition::Vm, Some(&r), t0() + Duration::days(1)).unwrap();
        let text = refusal(&purchased, t0() + Duration::days(2));
        assert!(
            text.contains("ended when a purchased license was applied at 2026-03-02"),
            "{text}"
        );
        let by_operator = end(Edition::Vm, Some(&r), t0()).unwrap().unwrap();
        let text = refusal(&by_operator, t0());
        assert!(text.contains("ended by an operator"), "{text}");
        assert!(
            alternative(Edition::Vm, None, t0()).contains("start the tryout"),
            "available: offered"
        );
        assert_eq!(
            alternative(Edition::Business, None, t0()),
            "edition business has no tryout"
        );
        assert!(!alternative(Edition::Vm, Some(&forfeited), t0()).contains("start the tryout"));
    }

    #[test]
    fn vm_starts_available_and_runs_fourteen_days() {
        assert_eq!(state(Edition::Vm, None, t0()), TryoutState::Available);
        let r = started();
        assert_eq!(state(Edition::Vm, Some(&r), t0()), TryoutState::Active);
        let last_second = t0() + Duration::days(14) - Duration::seconds(1);
        assert_eq!(
            state(Edition::Vm, Some(&r), last_second),
            TryoutState::Active
        );
        assert_eq!(
            state(Edition::Vm, Some(&r), t0() + Duration::days(14)),
            TryoutState::Expired
        );
    }

    #[test]
    fn a_start_at_the_end_of_time_is_an_error_not_a_panic() {
        let err = start(
            Edition::Vm,
            None,
            DateTime::<Utc>::MAX_UTC,
            TryoutPolicy::default(),
        )
        .unwrap_err();
        assert!(matches!(err, LicensingError::Internal(_)), "{err:?}");
    }

    #[test]
    fn business_and_advanced_have_no_tryout() {
        for ed in [Edition::Business, Edition::Advanced] {
            assert_eq!(state(ed, None, t0()), TryoutState::Unavailable);
            let err = start(ed, None, t0(), TryoutPolicy::default()).unwrap_err();
            assert!(matches!(
                err,
                LicensingError::FailedPrecondition {
                    reason: "TRYOUT_UNAVAILABLE",
                    ..
                }
            ));
            assert!(end(ed, None, t0()).is_err());
            assert_eq!(on_purchase(ed, None, t0()), None);
        }
    }

    #[test]
    fn starts_only_once_ever() {
        let r = started();
        for when in [t0(), t0() + Duration::days(20)] {
            assert!(start(Edition::Vm, Some(&r), when, TryoutPolicy::default()).is_err());
        }
        let ended = end(Edition::Vm, Some(&r), t0() + Duration::days(1))
            .unwrap()
            .unwrap();
        assert_eq!(state(Edition::Vm, Some(&ended), t0()), TryoutState::Ended);
        assert!(start(Edition::Vm, Some(&ended), t0(), TryoutPolicy::default()).is_err());
    }

    #[test]
    fn operator_end() {
        let r = started();
        let e = end(Edition::Vm, Some(&r), t0() + Duration::hours(1))
            .unwrap()
            .unwrap();
        match &e {
            TryoutRecord::Started {
                ended: Some(end), ..
            } => {
                assert_eq!(end.reason, TryoutEndReason::Operator)
            }
            other => panic!("unexpected {other:?}"),
        }
        // Ending again, or ending an expired tryout, changes nothing.
        assert_eq!(end(Edition::Vm, Some(&e), t0()).unwrap(), None);
        assert_eq!(
            end(Edition::Vm, Some(&r), t0() + Duration::days(15)).unwrap(),
            None
        );
        // Nothing to end before it started.
        assert!(end(Edition::Vm, None, t0()).is_err());
    }

    #[test]
    fn purchase_ends_active_and_forfeits_unused() {
        let r = started();
        let after = on_purchase(Edition::Vm, Some(&r), t0() + Duration::days(2)).unwrap();
        assert_eq!(state(Edition::Vm, Some(&after), t0()), TryoutState::Ended);
        let forfeited = on_purchase(Edition::Vm, None, t0()).unwrap();
        assert_eq!(
            state(Edition::Vm, Some(&forfeited), t0()),
            TryoutState::Unavailable
        );
        assert!(start(Edition::Vm, Some(&forfeited), t0(), TryoutPolicy::default()).is_err());
        // Expired or ended tryouts stay as they are.
        assert_eq!(
            on_purchase(Edition::Vm, Some(&r), t0() + Duration::days(30)),
            None
        );
        assert_eq!(on_purchase(Edition::Vm, Some(&after), t0()), None);
    }

    #[test]
    fn view_counts_days_up() {
        let r = started();
        let v = view(Edition::Vm, Some(&r), t0(), TryoutPolicy::default(), 2);
        assert_eq!(v.days_remaining, 14);
        assert_eq!((v.seats_total, v.seats_used), (3, 2));
        let v = view(
            Edition::Vm,
            Some(&r),
            t0() + Duration::days(13) + Duration::hours(1),
            TryoutPolicy::default(),
            0,
        );
        assert_eq!(v.days_remaining, 1);
        let v = view(
            Edition::Vm,
            Some(&r),
            t0() + Duration::days(14),
            TryoutPolicy::default(),
            0,
        );
        assert_eq!((v.state, v.days_remaining), (TryoutState::Expired, 0));
        let v = view(Edition::Business, None, t0(), TryoutPolicy::default(), 0);
        assert_eq!((v.state, v.seats_total), (TryoutState::Unavailable, 0));
    }

    #[test]
    fn record_serializes_stably() {
        let json = serde_json::to_string(&TryoutRecord::Forfeited { at: t0() }).unwrap();
        assert_eq!(json, r#"{"kind":"forfeited","at":"2026-03-01T10:00:00Z"}"#);
        let r = started();
        let back: TryoutRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
