//! The domain's errors. Callers branch on the variant; `grpc::status` maps each one
//! to exactly one gRPC status code.

use super::ids::Feature;

pub use super::ids::InvalidInput;

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LicensingError {
    #[error("invalid {0}")]
    InvalidInput(#[from] InvalidInput),

    #[error("no free {feature} seat: capacity {capacity}, in use {in_use}")]
    NoFreeSeat {
        feature: Feature,
        capacity: u32,
        in_use: u32,
    },

    /// The operation does not fit the current state (tryout not available, PBX not
    /// activated, ...). `reason` is a stable machine-readable word.
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },

    /// The seat store could not be reached (or did not answer in time); nothing
    /// was written.
    #[error("seat store unavailable: {0}")]
    Unavailable(String),

    /// A write lost a race with a concurrent change (another replica's write,
    /// the reconcile lease held elsewhere) and wrote nothing: retrying is safe.
    #[error("{0}")]
    Aborted(String),

    /// The seat store is still preparing something this write needs, once (the
    /// order of a large pool, built in the background after an upgrade): nothing
    /// was written; retry after about `retry_after`.
    #[error("seat store busy: {message}")]
    StoreBusy {
        message: String,
        retry_after: std::time::Duration,
    },

    /// The vendor's licensing server could not be reached or did not answer in
    /// time; nothing changed here.
    #[error("licensing server unavailable: {0}")]
    LicensingServerUnavailable(String),

    /// The replica knows nothing yet (never reached the store, no state file):
    /// a read that would answer definitely from nothing is refused instead.
    #[error("no state yet: {0}")]
    NoStateYet(String),

    /// A read asked for a version (`min_version`, read your writes) that this
    /// replica's copy did not reach within the wait allowed: nothing was
    /// answered; retry, or ask another replica.
    #[error(
        "this replica's copy is at version {version}, not yet at min_version {min_version} (waited {waited_ms} ms); retry, or ask another replica"
    )]
    NotYetConsistent {
        min_version: u64,
        version: u64,
        waited_ms: u64,
    },

    /// Something that must not happen did (corrupt stored data, a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl LicensingError {
    pub fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            reason,
            message: message.into(),
        }
    }
}
