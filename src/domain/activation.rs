//! Activation over time: a trusted license stays valid while the license source
//! confirms it; when the source cannot be reached (or answers with something not
//! trusted), the last good entitlements hold for a grace period, then lapse.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::reconcile::{ReconcileOutcome, ReconcileStatus};
use super::seats::AppliedLicense;

/// The API's `ActivationState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationState {
    NotInitialized,
    Active,
    Grace,
    Lapsed,
}

/// What happens when activation lapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LapseAction {
    /// Existing seats stay licensed; no new seats are assigned.
    DenyNew,
    /// Back to the initial state (the vendor's documented behaviour): license and
    /// seats are removed; the tryout record stays.
    Reset,
}

/// The activation state with the end of grace, when in grace or lapsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    pub state: ActivationState,
    pub grace_ends_at: Option<DateTime<Utc>>,
}

/// Derives the activation from the applied license and the reconcile history.
/// The grace period runs from the last confirmation (the last successful
/// reconcile, or the license's application when there was none since).
pub fn activation(
    license: Option<&AppliedLicense>,
    status: &ReconcileStatus,
    now: DateTime<Utc>,
    grace: Duration,
) -> Activation {
    let Some(license) = license else {
        return Activation {
            state: ActivationState::NotInitialized,
            grace_ends_at: None,
        };
    };
    let confirmed = status
        .last_success_at
        .map_or(license.applied_at, |t| t.max(license.applied_at));
    // Saturating: no stored time may panic here.
    let grace_ends_at = confirmed
        .checked_add_signed(grace)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let failing = matches!(
        status.last_outcome,
        Some(ReconcileOutcome::Unreachable | ReconcileOutcome::Rejected)
    ) && status.last_attempt_at.is_some_and(|t| t >= confirmed);
    if now >= grace_ends_at {
        Activation {
            state: ActivationState::Lapsed,
            grace_ends_at: Some(grace_ends_at),
        }
    } else if failing {
        Activation {
            state: ActivationState::Grace,
            grace_ends_at: Some(grace_ends_at),
        }
    } else {
        Activation {
            state: ActivationState::Active,
            grace_ends_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SignedLicense;
    use crate::domain::license::tests::{key, payload};

    fn t0() -> DateTime<Utc> {
        "2026-03-01T00:00:00Z".parse().unwrap()
    }

    fn license() -> AppliedLicense {
        let p = payload("S", 5);
        AppliedLicense {
            signed: SignedLicense::sign(&p, &key(1)),
            payload: p,
            applied_at: t0(),
        }
    }

    fn status(
        outcome: ReconcileOutcome,
        success: DateTime<Utc>,
        attempt: DateTime<Utc>,
    ) -> ReconcileStatus {
        ReconcileStatus {
            last_success_at: Some(success),
            last_attempt_at: Some(attempt),
            last_outcome: Some(outcome),
            last_error: None,
            next_reconcile_at: None,
        }
    }

    #[test]
    fn not_initialized_without_a_license() {
        let a = activation(None, &ReconcileStatus::default(), t0(), Duration::days(30));
        assert_eq!(a.state, ActivationState::NotInitialized);
    }

    #[test]
    fn active_while_confirmed() {
        let l = license();
        let s = status(
            ReconcileOutcome::Unchanged,
            t0() + Duration::days(10),
            t0() + Duration::days(10),
        );
        let a = activation(Some(&l), &s, t0() + Duration::days(35), Duration::days(30));
        assert_eq!((a.state, a.grace_ends_at), (ActivationState::Active, None));
    }

    #[test]
    fn grace_then_lapse_when_unreachable() {
        let l = license();
        let success = t0() + Duration::days(1);
        let s = status(
            ReconcileOutcome::Unreachable,
            success,
            success + Duration::hours(6),
        );
        let during = activation(
            Some(&l),
            &s,
            success + Duration::days(29),
            Duration::days(30),
        );
        assert_eq!(during.state, ActivationState::Grace);
        assert_eq!(during.grace_ends_at, Some(success + Duration::days(30)));
        let after = activation(
            Some(&l),
            &s,
            success + Duration::days(30),
            Duration::days(30),
        );
        assert_eq!(after.state, ActivationState::Lapsed);
        // A rejected answer is no confirmation either.
        let s = status(
            ReconcileOutcome::Rejected,
            success,
            success + Duration::hours(6),
        );
        assert_eq!(
            activation(
                Some(&l),
                &s,
                success + Duration::days(2),
                Duration::days(30)
            )
            .state,
            ActivationState::Grace
        );
    }

    #[test]
    fn unconfirmed_for_longer_than_grace_lapses() {
        // No reconcile at all since the license was applied, for more than grace.
        let l = license();
        let a = activation(
            Some(&l),
            &ReconcileStatus::default(),
            t0() + Duration::days(31),
            Duration::days(30),
        );
        assert_eq!(a.state, ActivationState::Lapsed);
        let a = activation(
            Some(&l),
            &ReconcileStatus::default(),
            t0() + Duration::days(29),
            Duration::days(30),
        );
        assert_eq!(a.state, ActivationState::Active);
    }
}
