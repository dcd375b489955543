//! Callers and roles: who is calling, established once per request (client
//! certificate or bearer token) and carried as a request extension.

use std::fmt;

/// The fixed role names of the contract (`API.md`, "Callers, roles and credentials").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    CallHandling,
    UserManagement,
    Monitoring,
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::CallHandling,
        Role::UserManagement,
        Role::Monitoring,
        Role::Operator,
    ];

    /// The name used in the callers file, logs, metrics and the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::CallHandling => "call_handling",
            Role::UserManagement => "user_management",
            Role::Monitoring => "monitoring",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
