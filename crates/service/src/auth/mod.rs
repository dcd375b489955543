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

use std::path::PathBuf;
use std::time::Duration;

pub use crate::rpc::Role;

pub use crate::caller::Caller;

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

pub use crate::status::AuthError;

/// Who may call, and how the credentials are kept fresh (the `auth.*` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOptions {
    pub mode: AuthMode,
    /// The callers file (read by [`callers::CallersFile::load`], not here).
    pub callers_file: Option<PathBuf>,
    /// How often the callers file and the TLS files are checked for changes.
    pub reload_interval: Duration,
    /// Accept a callers file that names no callers.
    pub allow_empty_callers_file: bool,
    /// Accept bearer tokens over plaintext from peers not on loopback.
    pub allow_plaintext_tokens: bool,
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
