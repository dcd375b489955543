//! The one error table: every way a call can fail (domain errors, refusals of
//! a limit, of the authorization layer) and its gRPC status code (API.md,
//! "Status codes"). Nothing else builds a `Status`. Each status carries an
//! `ErrorInfo` detail whose `reason` callers may branch on.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::domain::LicensingError;
use crate::rpc::{Role, RpcClass};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "licensing.comtrexx";

/// Why a call was refused before (or instead of) doing its work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("server busy: too many concurrent {} calls; nothing was done, retry with backoff", class.as_str())]
    Overloaded { class: RpcClass },
    #[error("rate limited; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error(
        "too many open streams (WatchLicenseEvents and WatchSeats together) for this caller (at most {limit})"
    )]
    TooManySubscribers { limit: usize },
    #[error("shutting down, reconnect")]
    ShuttingDown,
    #[error("deadline of {} ms passed", deadline.as_millis())]
    DeadlineExceeded { deadline: Duration },
    #[error("request message larger than {limit} bytes")]
    MessageTooLarge { limit: usize },
    #[error("this caller already holds {limit} concurrent {} calls, its share; nothing was done, retry with backoff", class.as_str())]
    CallerShare { class: RpcClass, limit: usize },
    #[error("request did not arrive whole within {} ms", timeout.as_millis())]
    RequestIncomplete { timeout: Duration },
    #[error("too many health watches (at most {limit})")]
    TooManyWatches { limit: usize },
}

impl Refusal {
    /// The word metrics and the audit log use.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Overloaded { .. } => "overloaded",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooManySubscribers { .. } => "too_many_subscribers",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::DeadlineExceeded { .. } => "deadline_exceeded",
            Refusal::MessageTooLarge { .. } => "message_too_large",
            Refusal::CallerShare { .. } => "caller_share",
            Refusal::RequestIncomplete { .. } => "request_incomplete",
            Refusal::TooManyWatches { .. } => "too_many_watches",
        }
    }
}

/// Why a call was refused before it reached a handler. The gRPC error table
/// ([`auth_status`]) turns it into a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credentials: send a client certificate or an `authorization: Bearer <token>` header"
    )]
    MissingCredentials,
    #[error("bearer token unusable: {0}")]
    MalformedToken(&'static str),
    #[error("bearer token is not known (not in the callers file)")]
    UnknownToken,
    #[error(
        "bearer token refused: sent without TLS from a peer that is not on loopback, so it \
         crossed the network in clear text; serve gRPC over TLS (tls.cert_file, tls.key_file), \
         or set auth.allow_plaintext_tokens = true where the network itself is protected"
    )]
    PlaintextToken,
    #[error("client certificate does not verify against tls.client_ca_file: {0}")]
    CertificateRejected(String),
    #[error("client certificate identity {0:?} is not in the callers file")]
    UnknownCertificate(String),
    #[error(
        "caller {caller:?} (role {role}) may not call {method}; {}",
        roles_needed(method)
    )]
    Denied {
        caller: String,
        role: Role,
        method: String,
    },
}

/// Which roles may call `method` (from the RPC table), as a refusal says it.
fn roles_needed(method: &str) -> String {
    match crate::rpc::by_name(method) {
        Some(rpc) => {
            let roles: Vec<&str> = rpc.roles.iter().map(|r| r.as_str()).collect();
            format!("it needs the role {}", roles.join(" or "))
        }
        None => "only operators may call it".to_owned(),
    }
}

impl AuthError {
    /// A short label for metrics and the `ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "NO_CREDENTIALS",
            AuthError::MalformedToken(_) => "MALFORMED_TOKEN",
            AuthError::UnknownToken => "UNKNOWN_TOKEN",
            AuthError::PlaintextToken => "PLAINTEXT_TOKEN",
            AuthError::CertificateRejected(_) => "CERTIFICATE_REJECTED",
            AuthError::UnknownCertificate(_) => "UNKNOWN_CERTIFICATE",
            AuthError::Denied { .. } => "ROLE_NOT_ALLOWED",
        }
    }
}

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
        // Nothing was written; `RetryInfo` says when to try again (below).
        LicensingError::StoreBusy { retry_after, .. } => (
            Code::Unavailable,
            "STORE_BUSY",
            HashMap::from([(
                "retry_after_ms".to_owned(),
                retry_after.as_millis().to_string(),
            )]),
        ),
        // Nothing was written: the state moved on meanwhile; retry.
        LicensingError::Aborted(_) => (Code::Aborted, "CONCURRENT_CHANGE", HashMap::new()),
        LicensingError::LicensingServerUnavailable(_) => (
            Code::Unavailable,
            "LICENSING_SERVER_UNAVAILABLE",
            HashMap::new(),
        ),
        // Retry shortly, or ask another replica: never a definite "not licensed".
        LicensingError::NoStateYet(_) => (Code::Unavailable, "NO_STATE_YET", HashMap::new()),
        // Read your writes: the copy is behind the version asked for; nothing
        // was answered. Retry, or ask another replica.
        LicensingError::NotYetConsistent {
            min_version,
            version,
            ..
        } => (
            Code::Unavailable,
            "NOT_YET_CONSISTENT",
            HashMap::from([
                ("min_version".to_owned(), min_version.to_string()),
                ("version".to_owned(), version.to_string()),
            ]),
        ),
        LicensingError::Internal(_) => (Code::Internal, "INTERNAL", HashMap::new()),
    };
    if code == Code::Internal {
        tracing::error!(%message, "internal error");
    }
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    if let LicensingError::StoreBusy { retry_after, .. } = &error {
        details.set_retry_info(Some(*retry_after));
    }
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

    #[test]
    fn a_denial_names_the_roles_that_may_call() {
        let denied = |method: &str| AuthError::Denied {
            caller: "pbx".into(),
            role: Role::CallHandling,
            method: method.into(),
        };
        let status = auth_status(&denied("AssignSeat"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            r#"caller "pbx" (role call_handling) may not call AssignSeat; it needs the role user_management or operator"#
        );
        assert!(
            denied("/x.Y/Z")
                .to_string()
                .ends_with("only operators may call it")
        );
    }
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
            (LicensingError::Aborted("raced".into()), Code::Aborted),
            (
                LicensingError::LicensingServerUnavailable("down".into()),
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
        // A store outage and a licensing-server outage are told apart.
        let reason = |e| to_status(e).get_details_error_info().unwrap().reason;
        assert_eq!(
            reason(LicensingError::Unavailable("down".into())),
            "STORE_UNAVAILABLE"
        );
        assert_eq!(
            reason(LicensingError::LicensingServerUnavailable("down".into())),
            "LICENSING_SERVER_UNAVAILABLE"
        );
        assert_eq!(
            reason(LicensingError::Aborted("raced".into())),
            "CONCURRENT_CHANGE"
        );
        assert_eq!(info.metadata["capacity"], "5");
    }

    #[test]
    fn refusals_follow_the_contract() {
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
                    class: crate::rpc::RpcClass::HotPath,
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
            role: crate::rpc::Role::Monitoring,
            method: "AssignSeat".into(),
        });
        assert_eq!(denied.code(), Code::PermissionDenied);
        let info = denied.get_details_error_info().unwrap();
        assert_eq!(info.metadata["role"], "monitoring");
        assert_eq!(info.metadata["method"], "AssignSeat");
    }
}
