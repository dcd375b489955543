//! The licensing domain, free of I/O: no tonic, prost or redis here. Time comes
//! from an injected [`Clock`]; everything else is plain data and decisions.

pub mod activation;
pub mod audit;
pub mod capacity;
pub mod clock;
pub mod error;
pub mod ids;
pub mod initcode;
pub mod license;
pub mod reconcile;
pub mod seats;
pub mod tryout;

pub use activation::{Activation, ActivationState, LapseAction};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{InvalidInput, LicensingError};
pub use ids::{Edition, Feature, SerialNumber, UserId};
pub use license::{Entitlement, LicensePayload, LicenseRejection, SignedLicense};
pub use reconcile::{ReconcileOutcome, ReconcileStatus};
pub use seats::{AppliedLicense, AssignPlan, Licenses, Seat, SeatCheck, SeatReason, SeatSource};
pub use tryout::{TryoutPolicy, TryoutRecord, TryoutState, TryoutView};
