//! The one table from domain errors to gRPC status codes (API.md, "Status
//! codes"). Handlers never build a `Status` themselves. Each status carries an
//! `ErrorInfo` detail whose `reason` callers may branch on.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::auth::AuthError;
use crate::domain::LicensingError;
use crate::limits::Refusal;

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "licensing.comtrexx";

pub fn to_status(error: LicensingError) -> Status {
    let message = error.to_string();
    let (code, reason, metadata): (Code, &str, HashMap<String, String>) = match &error {
        LicensingError::InvalidInput(i) => (
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            HashMap::from([("field".to_owned(), i.field.to_owned())]),
        ),
        LicensingError::NoFreeSeat {
            feature,
            capacity,
            in_use,
        } => (
            Code::ResourceExhausted,
            "NO_FREE_SEAT",
            HashMap::from([
                ("feature".to_owned(), feature.to_string()),
                ("capacity".to_owned(), capacity.to_string()),
                ("in_use".to_owned(), in_use.to_string()),
            ]),
        ),
        LicensingError::FailedPrecondition { reason, .. } => {
            (Code::FailedPrecondition, *reason, HashMap::new())
        }
        LicensingError::Unavailable(_) => (Code::Unavailable, "STORE_UNAVAILABLE", HashMap::new()),
        // Retry shortly, or ask another replica: never a definite "not licensed".
        LicensingError::NoStateYet(_) => (Code::Unavailable, "NO_STATE_YET", HashMap::new()),
        LicensingError::Internal(_) => (Code::Internal, "INTERNAL", HashMap::new()),
    };
    if code == Code::Internal {
        tracing::error!(%message, "internal error");
    }
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// How long a shed call should wait before its retry (`RetryInfo`).
const OVERLOAD_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The same table for calls refused by a limit (`limits`): overload and
/// draining are `UNAVAILABLE` (nothing was done; retry, with backoff), caller
/// quotas are `RESOURCE_EXHAUSTED`, the server-side deadline is
/// `DEADLINE_EXCEEDED`; an over-size request is `RESOURCE_EXHAUSTED`. Where a wait helps, `RetryInfo` says how long.
pub fn refusal_status(refusal: &Refusal) -> Status {
    let entry = |k: &str, v: String| HashMap::from([(k.to_owned(), v)]);
    let (code, reason, retry_delay, metadata) = match refusal {
        Refusal::Overloaded { class } => (
            Code::Unavailable,
            "OVERLOADED",
            Some(OVERLOAD_RETRY_DELAY),
            entry("class", class.as_str().to_owned()),
        ),
        Refusal::RateLimited { retry_after } => (
            Code::ResourceExhausted,
            "RATE_LIMITED",
            Some(*retry_after),
            HashMap::new(),
        ),
        Refusal::TooManySubscribers { limit } => (
            Code::ResourceExhausted,
            "TOO_MANY_SUBSCRIBERS",
            None,
            entry("limit", limit.to_string()),
        ),
        Refusal::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN", None, HashMap::new()),
        Refusal::DeadlineExceeded { deadline } => (
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
            None,
            entry("deadline_ms", deadline.as_millis().to_string()),
        ),
        Refusal::MessageTooLarge { limit } => (
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
            None,
            entry("limit_bytes", limit.to_string()),
        ),
        // One caller over its share of a budget: its quota, not the server's
        // capacity; the others are still served.
        Refusal::CallerShare { class, limit } => (
            Code::ResourceExhausted,
            "CALLER_SHARE_EXCEEDED",
            Some(OVERLOAD_RETRY_DELAY),
            HashMap::from([
                ("class".to_owned(), class.as_str().to_owned()),
                ("limit".to_owned(), limit.to_string()),
            ]),
        ),
        Refusal::RequestIncomplete { timeout } => (
            Code::DeadlineExceeded,
            "REQUEST_INCOMPLETE",
            None,
            entry("timeout_ms", timeout.as_millis().to_string()),
        ),
        Refusal::TooManyWatches { limit } => (
            Code::ResourceExhausted,
            "TOO_MANY_WATCHES",
            None,
            entry("limit", limit.to_string()),
        ),
    };
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    if retry_delay.is_some() {
        details.set_retry_info(retry_delay);
    }
    Status::with_error_details(code, refusal.to_string(), details)
}

/// Refusals of the authorization layer: a caller not established is
/// `UNAUTHENTICATED` (the message says which credential is missing or wrong), a
/// known caller whose role does not allow the RPC is `PERMISSION_DENIED`
/// (naming caller, role and RPC).
pub fn auth_status(error: &AuthError) -> Status {
    let (code, metadata) = match error {
        AuthError::Denied {
            caller,
            role,
            method,
        } => (
            Code::PermissionDenied,
            HashMap::from([
                ("caller".to_owned(), caller.clone()),
                ("role".to_owned(), role.to_string()),
                ("method".to_owned(), method.clone()),
            ]),
        ),
        _ => (Code::Unauthenticated, HashMap::new()),
    };
    let details = ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, metadata);
    Status::with_error_details(code, error.to_string(), details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Feature, InvalidInput};

    #[test]
    fn codes_follow_the_contract() {
        let cases = [
            (
                LicensingError::from(InvalidInput::new("user_id", "empty")),
                Code::InvalidArgument,
            ),
            (
                LicensingError::NoFreeSeat {
                    feature: Feature::User,
                    capacity: 5,
                    in_use: 5,
                },
                Code::ResourceExhausted,
            ),
            (
                LicensingError::precondition("X", "no"),
                Code::FailedPrecondition,
            ),
            (
                LicensingError::Unavailable("down".into()),
                Code::Unavailable,
            ),
            (LicensingError::Internal("bug".into()), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(error).code(), code);
        }
        let status = to_status(LicensingError::NoFreeSeat {
            feature: Feature::User,
            capacity: 5,
            in_use: 5,
        });
        assert!(status.message().contains("capacity 5") && status.message().contains("in use 5"));
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "NO_FREE_SEAT");
        assert_eq!(info.metadata["capacity"], "5");
    }

    #[test]
    fn refusals_follow_the_contract() {
        use crate::limits::{Refusal, RpcClass};
        use std::time::Duration;
        let cases = [
            (
                Refusal::Overloaded {
                    class: RpcClass::Writes,
                },
                Code::Unavailable,
                "OVERLOADED",
                true,
            ),
            (
                Refusal::RateLimited {
                    retry_after: Duration::from_secs(7),
                },
                Code::ResourceExhausted,
                "RATE_LIMITED",
                true,
            ),
            (
                Refusal::TooManySubscribers { limit: 2 },
                Code::ResourceExhausted,
                "TOO_MANY_SUBSCRIBERS",
                false,
            ),
            (
                Refusal::ShuttingDown,
                Code::Unavailable,
                "SHUTTING_DOWN",
                false,
            ),
            (
                Refusal::DeadlineExceeded {
                    deadline: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                false,
            ),
            (
                Refusal::MessageTooLarge { limit: 65536 },
                Code::ResourceExhausted,
                "MESSAGE_TOO_LARGE",
                false,
            ),
            (
                Refusal::CallerShare {
                    class: crate::limits::RpcClass::HotPath,
                    limit: 512,
                },
                Code::ResourceExhausted,
                "CALLER_SHARE_EXCEEDED",
                true,
            ),
            (
                Refusal::RequestIncomplete {
                    timeout: Duration::from_secs(5),
                },
                Code::DeadlineExceeded,
                "REQUEST_INCOMPLETE",
                false,
            ),
            (
                Refusal::TooManyWatches { limit: 8 },
                Code::ResourceExhausted,
                "TOO_MANY_WATCHES",
                false,
            ),
        ];
        for (refusal, code, reason, retry) in cases {
            let status = refusal_status(&refusal);
            assert_eq!(status.code(), code, "{refusal:?}");
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
            assert_eq!(
                status.get_details_retry_info().is_some(),
                retry,
                "{refusal:?}"
            );
        }
        let status = refusal_status(&Refusal::RateLimited {
            retry_after: Duration::from_secs(7),
        });
        assert_eq!(
            status.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn auth_refusals_follow_the_contract() {
        assert_eq!(
            auth_status(&AuthError::MissingCredentials).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            auth_status(&AuthError::UnknownToken).code(),
            Code::Unauthenticated
        );
        let denied = auth_status(&AuthError::Denied {
            caller: "pbx".into(),
            role: crate::auth::Role::Monitoring,
            method: "AssignSeat".into(),
        });
        assert_eq!(denied.code(), Code::PermissionDenied);
        let info = denied.get_details_error_info().unwrap();
        assert_eq!(info.metadata["role"], "monitoring");
        assert_eq!(info.metadata["method"], "AssignSeat");
    }
}
