//! The authorization decision: whether a role may call a path, read from the
//! RPC table (`crate::rpc`, the roles of each method; API.md, "Callers, roles
//! and credentials"). The authorization layer asks this and nothing else.

use crate::rpc::{self, Role, Target};

/// Whether `role` may call `target`.
pub fn allows(role: Role, target: Target<'_>) -> bool {
    match target {
        Target::Health | Target::Reflection => true,
        Target::Rpc(method) => {
            rpc::by_name(method).map_or(role == Role::Operator, |r| r.roles.contains(&role))
        }
        Target::Other(_) => role == Role::Operator,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::{CallHandling as CH, Monitoring as MON, UserManagement as UM};

    #[test]
    fn nobody_but_operators_may_audit_or_call_what_the_table_lacks() {
        for role in [CH, UM, MON] {
            assert!(!allows(role, Target::Rpc("ListAuditEvents")));
            assert!(!allows(role, Target::Rpc("NotYetInTheTable")));
            assert!(!allows(role, Target::Other("/x.Y/Z")));
            assert!(allows(role, Target::Reflection));
            assert!(allows(role, Target::Health));
        }
        assert!(allows(Role::Operator, Target::Rpc("NotYetInTheTable")));
        assert!(allows(CH, Target::Rpc("CheckSeat")));
        assert!(!allows(CH, Target::Rpc("AssignSeat")));
        assert!(allows(MON, Target::Rpc("GetLicenseOverview")));
    }
}
