//! comtrexx-licensing-domain: the licensing rules, free of I/O: no tokio, tonic,
//! prost, hyper, axum or redis among its dependencies. Time comes
//! from an injected [`Clock`]; everything else is plain data and decisions.

pub mod activation;
pub mod audit;
pub mod capacity;
pub mod clock;
pub mod decision;
pub mod error;
pub mod history;
pub mod ids;
pub mod initcode;
pub mod leases;
pub mod license;
pub mod reconcile;
pub mod repair;
pub mod seats;
pub mod signed_tryout;
pub mod tryout;

pub use activation::{Activation, ActivationState, LapseAction};
pub use clock::{Clock, ManualClock, SystemClock, TimeAuthority};
pub use decision::{LicenseState, Rules};
pub use error::{InvalidInput, LicensingError};
pub use ids::{Edition, Feature, SerialNumber, UserId};
pub use leases::{Holder, Lease, LeaseBook, LeasePlan};
pub use license::{Entitlement, LicensePayload, LicenseRejection, SeatModel, SignedLicense};
pub use reconcile::{ReconcileOutcome, ReconcileStatus};
pub use seats::{
    AppliedLicense, AssignPlan, CompactSeat, Licenses, Seat, SeatCheck, SeatFacts, SeatReason,
    SeatSource,
};
pub use signed_tryout::{SignedTryout, TryoutPayload, TryoutRejection};
pub use tryout::{TryoutPolicy, TryoutRecord, TryoutState, TryoutView};

/// Default and largest page sizes of the listing RPCs (`ListSeats`,
/// `ListAuditEvents`).
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page size a listing RPC uses for the `page_size` it was asked for: 0
/// means the default, more than the largest means the largest, a negative one
/// is refused.
pub fn page_size(requested: i32) -> Result<usize, InvalidInput> {
    match requested {
        n if n < 0 => Err(InvalidInput::new("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_cap_and_refuse_negatives() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(i32::MAX), Ok(MAX_PAGE_SIZE));
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }
}
