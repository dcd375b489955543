//! The one table from domain errors to gRPC status codes (API.md, "Status
//! codes"). Handlers never build a `Status` themselves. Each status carries an
//! `ErrorInfo` detail whose `reason` callers may branch on.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::auth::AuthError;
use crate::domain::LicensingError;

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
        LicensingError::Internal(_) => (Code::Internal, "INTERNAL", HashMap::new()),
    };
    if code == Code::Internal {
        tracing::error!(%message, "internal error");
    }
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
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
