//! The whole authorization policy as data: which role may call which RPC
//! (API.md, "Callers, roles and credentials"), and which RPCs change state
//! (those are always audited). The authorization layer reads this table and
//! nothing else; the tests iterate it.

use super::Role;

/// The gRPC path prefix of the licensing service.
pub const SERVICE_PREFIX: &str = "/comtrexx.licensing.v1.LicensingService/";
/// Health (kubelet probes, load balancers) needs no caller.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Server reflection (v1 and v1alpha) is open to every known caller.
pub const REFLECTION_PREFIX: &str = "/grpc.reflection.";

use Role::{CallHandling as CH, Monitoring as MON, Operator as OP, UserManagement as UM};

/// One RPC of `LicensingService`: who may call it, and whether it changes state.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    pub roles: &'static [Role],
    pub changes_state: bool,
}

const fn rule(method: &'static str, roles: &'static [Role], changes_state: bool) -> Rule {
    Rule {
        method,
        roles,
        changes_state,
    }
}

/// Every RPC of `LicensingService`. An RPC missing here is refused to all but
/// operators, so a new RPC is never open by accident.
pub const POLICY: &[Rule] = &[
    rule("CheckSeat", &[CH, UM, OP], false),
    rule("WatchLicenseEvents", &[CH, UM, OP], false),
    rule("AssignSeat", &[UM, OP], true),
    rule("ReleaseSeat", &[UM, OP], true),
    rule("ListSeats", &[UM, OP], false),
    rule("GetTryoutStatus", &[UM, MON, OP], false),
    rule("GetLicenseOverview", &[UM, MON, OP], false),
    rule("StartTryout", &[OP], true),
    rule("EndTryout", &[OP], true),
    rule("Reconcile", &[OP], true),
    rule("CreateInitializationCode", &[OP], true),
    rule("ApplyActivation", &[OP], true),
    rule("ResetActivation", &[OP], true),
    rule("ActivateOnline", &[OP], true),
    rule("ListAuditEvents", &[OP], false),
];

/// What a request path is, as far as authorization goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Health: open to anyone, no caller established.
    Health,
    /// Server reflection: any known caller.
    Reflection,
    /// A `LicensingService` RPC, by short name.
    Rpc(&'a str),
    /// Anything else (answered UNIMPLEMENTED by the router): operators only.
    Other(&'a str),
}

/// Classifies a gRPC request path (`/package.Service/Method`).
pub fn target(path: &str) -> Target<'_> {
    if path.starts_with(HEALTH_PREFIX) {
        Target::Health
    } else if path.starts_with(REFLECTION_PREFIX) {
        Target::Reflection
    } else if let Some(method) = path.strip_prefix(SERVICE_PREFIX) {
        Target::Rpc(method)
    } else {
        Target::Other(path)
    }
}

/// The rule of a `LicensingService` RPC.
pub fn rule_of(method: &str) -> Option<&'static Rule> {
    POLICY.iter().find(|r| r.method == method)
}

/// Whether `role` may call `target`.
pub fn allows(role: Role, target: Target<'_>) -> bool {
    match target {
        Target::Health | Target::Reflection => true,
        Target::Rpc(method) => rule_of(method).map_or(role == OP, |r| r.roles.contains(&role)),
        Target::Other(_) => role == OP,
    }
}

/// Whether a call of `method` is recorded in the audit trail even when accepted.
pub fn changes_state(method: &str) -> bool {
    rule_of(method).is_some_and(|r| r.changes_state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_may_call_everything_and_nobody_else_may_audit() {
        for r in POLICY {
            assert!(r.roles.contains(&OP), "{}", r.method);
        }
        for role in [CH, UM, MON] {
            assert!(!allows(role, Target::Rpc("ListAuditEvents")));
            assert!(!allows(role, Target::Rpc("NotYetInTheTable")));
            assert!(allows(role, Target::Reflection));
        }
    }

    #[test]
    fn paths_are_classified() {
        assert_eq!(target("/grpc.health.v1.Health/Check"), Target::Health);
        assert_eq!(
            target("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Target::Reflection
        );
        assert_eq!(
            target("/comtrexx.licensing.v1.LicensingService/CheckSeat"),
            Target::Rpc("CheckSeat")
        );
        assert_eq!(target("/x.Y/Z"), Target::Other("/x.Y/Z"));
    }

    #[test]
    fn every_rpc_of_the_proto_has_a_rule() {
        let proto = include_str!("../../../../proto/comtrexx/licensing/v1/licensing.proto");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert_eq!(rpcs.len(), POLICY.len(), "{rpcs:?}");
        for rpc in rpcs {
            assert!(rule_of(rpc).is_some(), "{rpc} has no rule");
        }
    }
}
