//! Callers and roles: who is calling, established once per request (client
//! certificate or bearer token) and carried as a request extension.
//!
//! - [`policy`]: the role → RPC table, the whole policy as data.
//! - [`callers`]: the callers file (names, roles, certificate identities, token digests).
//! - [`tls`]: the listener's TLS with reloadable certificate, key and client CA.
//! - [`layer`]: the one tower layer in front of every service that establishes
//!   the caller, checks the policy and records refusals.

pub mod callers;
pub mod layer;
pub mod policy;
pub mod tls;

pub use crate::rpc::Role;

/// A caller whose identity was established for this request. Inserted into the
/// request's extensions by the authorization layer; handlers read it from there
/// and never re-parse credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The name from the callers file (or `loopback` / `anonymous` where the
    /// mode grants a role without credentials).
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller of a request, where the authorization layer set one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// Who needs credentials (`auth.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A loopback peer without credentials is an operator; others need credentials.
    Protected,
    /// Every caller needs credentials.
    Enforce,
    /// Everyone is an operator (warned at start, shown in the overview and metrics).
    Disabled,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Protected => "protected",
            AuthMode::Enforce => "enforce",
            AuthMode::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<AuthMode> {
        [AuthMode::Protected, AuthMode::Enforce, AuthMode::Disabled]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// Why a call was refused before it reached a handler. The gRPC error table
/// (`grpc::status::auth_status`) turns it into a status.
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
    #[error("caller {caller:?} (role {role}) may not call {method}")]
    Denied {
        caller: String,
        role: Role,
        method: String,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("admin"), None);
    }
}
