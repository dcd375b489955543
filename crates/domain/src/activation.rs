//! Activation over time: a trusted license stays valid while the license source
//! confirms it; when the source cannot be reached (or answers with something not
//! trusted), the last good entitlements hold for a grace period, then lapse.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::license::AppliedLicense;
use super::reconcile::{ReconcileOutcome, ReconcileStatus};
use super::tryout::{self, TryoutRecord, Used};

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

/// What the activation explanation is made from.
#[derive(Debug, Clone, Copy)]
pub struct ActivationFacts<'a> {
    pub activation: Activation,
    pub edition: super::Edition,
    /// Whether a trusted license holds system activation (where the edition needs it).
    pub system_activated: bool,
    /// When the trusted license was applied, if there is one.
    pub license_applied_at: Option<DateTime<Utc>>,
    /// Why the stored license is not trusted, if it is not.
    pub license_problem: Option<&'a str>,
    pub reconcile: &'a ReconcileStatus,
    pub lapse_action: LapseAction,
    /// The serial's tryout record, so that the next step offered is one that can work.
    pub tryout: Option<&'a TryoutRecord>,
    /// Whether a license source (licensing server or license file) is configured.
    pub has_license_source: bool,
    pub now: DateTime<Utc>,
}

/// Why the PBX is in its activation state, in one sentence an operator can act on.
pub fn explain(f: &ActivationFacts<'_>) -> String {
    let why_failing = f
        .reconcile
        .last_error
        .as_deref()
        .map_or_else(String::new, |e| format!(" (last reconcile: {e})"));
    match f.activation.state {
        ActivationState::NotInitialized => match f.license_problem {
            Some(problem) => format!("the stored license is not trusted: {problem}"),
            None => not_initialized(f),
        },
        ActivationState::Active | ActivationState::Grace if !f.system_activated => format!(
            "the license has no current system_activation entitlement, which edition {} needs before any seat is licensed",
            f.edition
        ),
        ActivationState::Active => match (f.reconcile.last_success_at, f.license_applied_at) {
            (Some(at), _) => format!(
                "license confirmed by the license source at {}",
                at.to_rfc3339()
            ),
            (None, Some(at)) => format!(
                "license applied at {}, not yet confirmed by a reconcile",
                at.to_rfc3339()
            ),
            (None, None) => "license applied".to_owned(),
        },
        ActivationState::Grace => format!(
            "the license source has not confirmed the license{why_failing}; it holds until the grace period ends at {}",
            f.activation
                .grace_ends_at
                .map_or_else(|| "?".to_owned(), |t| t.to_rfc3339())
        ),
        ActivationState::Lapsed => format!(
            "the license was not confirmed within the grace period (ended {}){why_failing}; {}",
            f.activation
                .grace_ends_at
                .map_or_else(|| "?".to_owned(), |t| t.to_rfc3339()),
            match f.lapse_action {
                LapseAction::DenyNew =>
                    "existing seats stay, no new seats until a reconcile succeeds",
                LapseAction::Reset => "license and seats are removed",
            }
        ),
    }
}

/// Without a license: the actual cause (nothing applied yet, or the last license
/// offered was rejected) and the next steps that can work on this PBX (the tryout
/// only where it can start; a reconcile only with a license source).
fn not_initialized(f: &ActivationFacts<'_>) -> String {
    let cause = match (f.reconcile.last_outcome, f.reconcile.last_error.as_deref()) {
        (Some(ReconcileOutcome::Rejected), Some(error)) => {
            format!(
                "no license applied: the last license from the license source was rejected ({error})"
            )
        }
        (_, Some(error)) => format!("no license applied yet (last reconcile: {error})"),
        (_, None) => "no license applied yet".to_owned(),
    };
    let apply = format!(
        "apply a license for this PBX (edition {}): an initialization code and the vendor's activation response{}",
        f.edition,
        if f.has_license_source {
            ", or Reconcile with the license source"
        } else {
            ""
        }
    );
    if !f.edition.has_tryout() {
        return format!("{cause}; {apply} (edition {} has no tryout)", f.edition);
    }
    match tryout::used(f.edition, f.tryout, f.now) {
        None => format!("{cause}; {apply}, or start the tryout (StartTryout)"),
        Some(used @ Used::Active { .. }) => format!(
            "{cause}; {}: {}; to license users beyond it, {apply}",
            used.describe(),
            used.next_step()
        ),
        Some(used) => format!("{cause}; {apply} ({})", used.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SignedLicense;
    use crate::license::testing::{key, payload};

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
    fn explanations_name_the_cause() {
        let l = license();
        let failing = ReconcileStatus {
            last_error: Some("connection refused".into()),
            ..status(
                ReconcileOutcome::Unreachable,
                t0(),
                t0() + Duration::hours(6),
            )
        };
        let now = t0() + Duration::days(2);
        let grace = activation(Some(&l), &failing, now, Duration::days(30));
        let facts = ActivationFacts {
            activation: grace,
            edition: crate::Edition::Vm,
            system_activated: true,
            license_applied_at: Some(t0()),
            license_problem: None,
            reconcile: &failing,
            lapse_action: LapseAction::DenyNew,
            tryout: None,
            has_license_source: true,
            now,
        };
        let text = explain(&facts);
        assert!(text.contains("connection refused"), "{text}");
        assert!(text.contains("2026-03-31"), "{text}");
        let business = ActivationFacts {
            edition: crate::Edition::Business,
            system_activated: false,
            activation: Activation {
                state: ActivationState::Active,
                grace_ends_at: None,
            },
            ..facts
        };
        assert!(explain(&business).contains("system_activation"));
        let untrusted = ActivationFacts {
            activation: activation(None, &failing, now, Duration::days(30)),
            license_problem: Some("bad signature"),
            ..facts
        };
        assert!(explain(&untrusted).contains("bad signature"));
    }

    /// Facts of a PBX without a license, after `reconcile`.
    fn unlicensed<'a>(
        edition: crate::Edition,
        tryout: Option<&'a TryoutRecord>,
        reconcile: &'a ReconcileStatus,
    ) -> ActivationFacts<'a> {
        ActivationFacts {
            activation: activation(None, reconcile, t0(), Duration::days(30)),
            edition,
            system_activated: false,
            license_applied_at: None,
            license_problem: None,
            reconcile,
            lapse_action: LapseAction::DenyNew,
            tryout,
            has_license_source: true,
            now: t0(),
        }
    }

    #[test]
    fn without_a_license_the_reason_offers_only_what_can_work() {
        // A VM license offered to a Business PBX: the rejection is named, and
        // Business has no tryout to offer.
        let rejected = ReconcileStatus {
            last_error: Some("license is for edition vm, this PBX is business".into()),
            ..status(ReconcileOutcome::Rejected, t0(), t0())
        };
        let text = explain(&unlicensed(crate::Edition::Business, None, &rejected));
        assert!(
            text.contains("was rejected (license is for edition vm"),
            "{text}"
        );
        assert!(text.contains("edition business has no tryout"), "{text}");
        assert!(!text.contains("start the tryout"), "{text}");
        assert!(!text.contains("applied yet"), "{text}");

        // A fresh VM PBX: the tryout is offered.
        let fresh = ReconcileStatus::default();
        let text = explain(&unlicensed(crate::Edition::Vm, None, &fresh));
        assert!(text.starts_with("no license applied yet;"), "{text}");
        assert!(text.contains("or start the tryout"), "{text}");
        assert!(text.contains("Reconcile"), "{text}");
        // Without a license source, no reconcile is offered.
        let text = explain(&ActivationFacts {
            has_license_source: false,
            ..unlicensed(crate::Edition::Vm, None, &fresh)
        });
        assert!(!text.contains("Reconcile"), "{text}");

        // After a re-setup, with the tryout used: never offered again.
        let policy = crate::TryoutPolicy::default();
        let started = tryout::start(crate::Edition::Vm, None, t0(), policy).unwrap();
        let ended = tryout::on_purchase(crate::Edition::Vm, Some(&started), t0()).unwrap();
        let text = explain(&unlicensed(crate::Edition::Vm, Some(&ended), &fresh));
        assert!(!text.contains("start the tryout"), "{text}");
        assert!(
            text.contains("the tryout ended when a purchased license was applied"),
            "{text}"
        );
        let forfeited = tryout::on_purchase(crate::Edition::Vm, None, t0()).unwrap();
        let text = explain(&unlicensed(crate::Edition::Vm, Some(&forfeited), &fresh));
        assert!(!text.contains("start the tryout"), "{text}");
        assert!(text.contains("forfeited"), "{text}");
        // A running tryout is named, with what licenses users beyond it.
        let text = explain(&unlicensed(crate::Edition::Vm, Some(&started), &fresh));
        assert!(text.contains("the tryout is active until"), "{text}");
        assert!(!text.contains("start the tryout"), "{text}");
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
