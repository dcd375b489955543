//! The one table of `LicensingService`'s RPCs, as data. Each method is written
//! once, here: the roles allowed to call it, the budget it draws from, whether it
//! changes state (then every accepted call is audited), its rate limit, and which
//! request fields its audit entry records. The authorization policy
//! (`auth::policy`), the limits (`limits`), the handlers (`grpc::handlers`) and
//! the metric labels all read this table; a test ties it to the proto.
//!
//! The lowest layer of the service: it imports nothing of the crate.

use std::fmt;

/// The fully qualified name of the licensing service.
pub const SERVICE: &str = "comtrexx.licensing.v1.LicensingService";
/// The gRPC path prefix of the licensing service (`/` + [`SERVICE`] + `/`).
pub const SERVICE_PREFIX: &str = "/comtrexx.licensing.v1.LicensingService/";
/// Health (kubelet probes, load balancers) needs no caller.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Server reflection (v1 and v1alpha) is open to every known caller.
pub const REFLECTION_PREFIX: &str = "/grpc.reflection.";
/// The method name recorded for a path no service serves (the audit trail's).
pub use comtrexx_licensing_domain::audit::UNKNOWN_METHOD;

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

/// Which concurrency budget a call draws from (`limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcClass {
    /// Answered from memory for call handling; must keep answering under load.
    HotPath,
    /// Goes to the store (or the licensing server) and changes state.
    Writes,
    /// Operator and monitoring reads (overview, seat lists, tryout status).
    OperatorReads,
}

impl RpcClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcClass::HotPath => "hot_path",
            RpcClass::Writes => "writes",
            RpcClass::OperatorReads => "operator_reads",
        }
    }
}

/// A per-caller rate limit (a token bucket per method and caller, `limits.activation_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// Initialization and activation: a few a minute, each a signed exchange.
    Activation,
}

/// A request field that goes into the call's audit entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditField {
    UserId,
    Feature,
}

impl AuditField {
    /// The field's name in the request message of the proto.
    pub fn proto_name(self) -> &'static str {
        match self {
            AuditField::UserId => "user_id",
            AuditField::Feature => "feature",
        }
    }
}

/// One RPC of `LicensingService`.
#[derive(Debug, PartialEq, Eq)]
pub struct Rpc {
    /// The method's short name, as in the proto (`AssignSeat`).
    pub name: &'static str,
    /// The roles that may call it (operators may call everything).
    pub roles: &'static [Role],
    /// The budget it draws from; `None` for a stream capped per caller instead.
    pub class: Option<RpcClass>,
    /// Whether it changes state: every accepted call is then audited.
    pub changes_state: bool,
    pub rate_limit: Option<RateLimit>,
    /// The request fields its audit entry records (refusals and changes).
    pub audit_fields: &'static [AuditField],
}

use AuditField::{Feature as F, UserId as U};
use Role::{CallHandling as CH, Monitoring as MON, Operator as OP, UserManagement as UM};
use RpcClass::{HotPath, OperatorReads, Writes};

const fn rpc(
    name: &'static str,
    roles: &'static [Role],
    class: Option<RpcClass>,
    changes_state: bool,
    audit_fields: &'static [AuditField],
) -> Rpc {
    Rpc {
        name,
        roles,
        class,
        changes_state,
        rate_limit: None,
        audit_fields,
    }
}

const fn rate_limited(rpc: Rpc, limit: RateLimit) -> Rpc {
    Rpc {
        rate_limit: Some(limit),
        ..rpc
    }
}

pub const CHECK_SEAT: Rpc = rpc("CheckSeat", &[CH, UM, OP], Some(HotPath), false, &[U, F]);
pub const ASSIGN_SEAT: Rpc = rpc("AssignSeat", &[UM, OP], Some(Writes), true, &[U, F]);
pub const RELEASE_SEAT: Rpc = rpc("ReleaseSeat", &[UM, OP], Some(Writes), true, &[U, F]);
pub const LIST_SEATS: Rpc = rpc("ListSeats", &[UM, OP], Some(OperatorReads), false, &[F]);
pub const GET_TRYOUT_STATUS: Rpc = rpc(
    "GetTryoutStatus",
    &[UM, MON, OP],
    Some(OperatorReads),
    false,
    &[],
);
pub const START_TRYOUT: Rpc = rpc("StartTryout", &[OP], Some(Writes), true, &[]);
pub const END_TRYOUT: Rpc = rpc("EndTryout", &[OP], Some(Writes), true, &[]);
pub const GET_LICENSE_OVERVIEW: Rpc = rpc(
    "GetLicenseOverview",
    &[UM, MON, OP],
    Some(OperatorReads),
    false,
    &[],
);
pub const RECONCILE: Rpc = rpc("Reconcile", &[OP], Some(Writes), true, &[]);
pub const CREATE_INITIALIZATION_CODE: Rpc = rate_limited(
    rpc("CreateInitializationCode", &[OP], Some(Writes), true, &[]),
    RateLimit::Activation,
);
pub const APPLY_ACTIVATION: Rpc = rate_limited(
    rpc("ApplyActivation", &[OP], Some(Writes), true, &[]),
    RateLimit::Activation,
);
pub const WATCH_LICENSE_EVENTS: Rpc = rpc("WatchLicenseEvents", &[CH, UM, OP], None, false, &[]);
pub const RESET_ACTIVATION: Rpc = rpc("ResetActivation", &[OP], Some(Writes), true, &[]);
pub const ACTIVATE_ONLINE: Rpc = rpc("ActivateOnline", &[OP], Some(Writes), true, &[]);
pub const LIST_AUDIT_EVENTS: Rpc = rpc("ListAuditEvents", &[OP], Some(OperatorReads), false, &[U]);
/// A stream like `WatchLicenseEvents`: capped per caller, not budgeted.
pub const WATCH_SEATS: Rpc = rpc("WatchSeats", &[CH, UM, OP], None, false, &[]);

/// Concurrent-use seats: the holders (call handling, user management) take,
/// renew and give back leases; user management and monitoring list them.
pub const ACQUIRE_LEASE: Rpc = rpc("AcquireLease", &[CH, UM, OP], Some(Writes), true, &[U, F]);
pub const RENEW_LEASES: Rpc = rpc("RenewLeases", &[CH, UM, OP], Some(Writes), true, &[]);
pub const RELEASE_LEASE: Rpc = rpc("ReleaseLease", &[CH, UM, OP], Some(Writes), true, &[]);
pub const LIST_LEASES: Rpc = rpc(
    "ListLeases",
    &[UM, MON, OP],
    Some(OperatorReads),
    false,
    &[F],
);

/// Every RPC of `LicensingService`. One missing here is refused to all but
/// operators and counts as an operator read, so a new RPC is never open by accident.
pub const RPCS: [&Rpc; 20] = [
    &CHECK_SEAT,
    &ASSIGN_SEAT,
    &RELEASE_SEAT,
    &LIST_SEATS,
    &GET_TRYOUT_STATUS,
    &START_TRYOUT,
    &END_TRYOUT,
    &GET_LICENSE_OVERVIEW,
    &RECONCILE,
    &CREATE_INITIALIZATION_CODE,
    &APPLY_ACTIVATION,
    &WATCH_LICENSE_EVENTS,
    &RESET_ACTIVATION,
    &ACTIVATE_ONLINE,
    &LIST_AUDIT_EVENTS,
    &WATCH_SEATS,
    &ACQUIRE_LEASE,
    &RENEW_LEASES,
    &RELEASE_LEASE,
    &LIST_LEASES,
];

/// The RPC of a short method name.
pub fn by_name(method: &str) -> Option<&'static Rpc> {
    RPCS.into_iter().find(|r| r.name == method)
}

/// What a request path is, as far as authorization and limits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Health: open to anyone, no caller established.
    Health,
    /// Server reflection: any known caller.
    Reflection,
    /// A `LicensingService` method, by short name: known (in [`RPCS`]) or not.
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

/// The name a path is recorded under (audit, metrics): a known RPC's short
/// name; every other path of the service, and paths of no service, as one
/// method, so that made-up paths cannot grow label sets or summaries.
pub fn method_label(path: &str) -> &'static str {
    match target(path) {
        Target::Rpc(method) => by_name(method).map_or(UNKNOWN_METHOD, |r| r.name),
        _ => UNKNOWN_METHOD,
    }
}

/// The canonical name of a status code, as metrics and the audit trail label it.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    /// The table and the proto name the same methods, and every audited field
    /// exists in its method's request message.
    #[test]
    fn the_table_is_the_proto() {
        let set = FileDescriptorSet::decode(comtrexx_licensing_proto::FILE_DESCRIPTOR_SET).unwrap();
        let file = set
            .file
            .iter()
            .find(|f| f.service.iter().any(|s| s.name() == "LicensingService"))
            .unwrap();
        assert_eq!(format!("{}.LicensingService", file.package()), SERVICE);
        assert_eq!(format!("/{SERVICE}/"), SERVICE_PREFIX);
        assert_eq!(comtrexx_licensing_proto::SERVICE_NAME, SERVICE);
        let service = file
            .service
            .iter()
            .find(|s| s.name() == "LicensingService")
            .unwrap();
        assert_eq!(service.method.len(), RPCS.len());
        for method in &service.method {
            let rpc = by_name(method.name())
                .unwrap_or_else(|| panic!("{} is not in the RPC table", method.name()));
            let input = method.input_type().rsplit('.').next().unwrap();
            let message = file
                .message_type
                .iter()
                .find(|m| m.name() == input)
                .unwrap();
            for field in rpc.audit_fields {
                assert!(
                    message.field.iter().any(|f| f.name() == field.proto_name()),
                    "{}: {input} has no field {}",
                    rpc.name,
                    field.proto_name()
                );
            }
            // A stream has no budget (capped per caller); every unary call has one.
            assert_eq!(
                rpc.class.is_none(),
                method.server_streaming(),
                "{}",
                rpc.name
            );
        }
    }

    #[test]
    fn operators_may_call_everything_and_reads_change_nothing() {
        for rpc in RPCS {
            assert!(rpc.roles.contains(&Role::Operator), "{}", rpc.name);
            if rpc.class == Some(RpcClass::OperatorReads) || rpc.class == Some(HotPath) {
                assert!(!rpc.changes_state, "{}", rpc.name);
            }
            if rpc.changes_state {
                assert_eq!(rpc.class, Some(Writes), "{}", rpc.name);
            }
        }
        // CheckSeat is alone in its class: no other RPC can take its capacity.
        let hot: Vec<_> = RPCS.iter().filter(|r| r.class == Some(HotPath)).collect();
        assert_eq!(hot.len(), 1);
        assert_eq!(hot[0].name, "CheckSeat");
    }

    #[test]
    fn paths_are_classified_and_labelled() {
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
        assert_eq!(
            method_label("/comtrexx.licensing.v1.LicensingService/AssignSeat"),
            "AssignSeat"
        );
        assert_eq!(
            method_label("/comtrexx.licensing.v1.LicensingService/Made-Up"),
            UNKNOWN_METHOD
        );
        assert_eq!(method_label("/x.Y/Z"), UNKNOWN_METHOD);
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }
}
