//! A PBX's licensing state as a history: every write is a versioned
//! [`Change`] within an epoch ([`Position`]), the whole state at one instant a
//! [`Snapshot`]. Plain data shared by the stores, the replica that follows them
//! and the repair of a store that lost writes ([`crate::repair`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{Feature, UserId};
use crate::initcode::PendingInitialization;
use crate::leases::{Holder, Lease};
use crate::license::SignedLicense;
use crate::reconcile::ReconcileStatus;
use crate::seats::Seat;
use crate::tryout::TryoutRecord;

/// A license document as stored: not trusted until verified again by whoever reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLicense {
    pub signed: SignedLicense,
    pub applied_at: DateTime<Utc>,
}

impl StoredLicense {
    /// The document's identity (its signature).
    pub fn id(&self) -> &str {
        &self.signed.signature
    }
}

/// A point in a store's history. The epoch changes when the store's data was lost
/// (a Redis restarted empty, a FLUSHALL) and re-created; versions only count up
/// within one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub version: u64,
}

/// Everything the store holds, read at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `None` when the store holds no epoch: never initialized, or its data was lost.
    pub position: Option<Position>,
    pub seats: Vec<Seat>,
    pub license: Option<StoredLicense>,
    pub tryout: Option<TryoutRecord>,
    pub reconcile: ReconcileStatus,
    pub initialization: Option<PendingInitialization>,
    /// The license document a re-setup removed (the newest one it had), kept so
    /// that an older document is never applied after a re-setup.
    pub retired_license: Option<StoredLicense>,
    /// The largest time the store has seen (milliseconds since the Unix epoch):
    /// the high-water clock time-based decisions never go back behind.
    pub high_water_ms: i64,
    /// The last repair of lost data, if any.
    pub incident: Option<Incident>,
    /// The leases of concurrent features (live, or expired and not yet reclaimed).
    pub leases: Vec<Lease>,
    /// Stored records that did not parse and were skipped.
    pub corrupt: Vec<String>,
}

/// What a repair of lost data did, kept in the store so every replica reports
/// the same thing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// When the loss was repaired.
    pub at: DateTime<Utc>,
    /// The highest version a replica had seen before the store went back
    /// (0 when the store had lost its epoch).
    pub rolled_back_from: u64,
    /// How many acknowledged writes were written back, and the first of them by name.
    pub restored_total: u32,
    pub restored: Vec<String>,
    /// How many acknowledged writes could not be written back (the pool was
    /// full by then), and the first of them by name, for the audit.
    pub lost_total: u32,
    pub lost: Vec<String>,
}

impl Incident {
    /// How many names an incident keeps of each list.
    pub const NAMES: usize = 50;

    pub fn restored(&mut self, what: String) {
        self.restored_total += 1;
        if self.restored.len() < Self::NAMES {
            self.restored.push(what);
        }
    }

    pub fn lost(&mut self, what: String) {
        self.lost_total += 1;
        if self.lost.len() < Self::NAMES {
            self.lost.push(what);
        }
    }
}

/// What a replica writes back into a store that lost some of its writes; every
/// part is decided by the replica on the snapshot at `expected`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairWrite {
    /// The position the plan was made on; nothing is written when the store
    /// has moved since.
    pub expected: Option<Position>,
    /// The version the repair's own entries start after: above every version a
    /// replica has seen, so every replica following the feed notices the gap.
    pub version_floor: u64,
    pub add_seats: Vec<Seat>,
    pub remove_seats: Vec<(Feature, UserId)>,
    /// Live leases the store lost, written back with their ids and times.
    pub add_leases: Vec<Lease>,
    /// Leases whose release the store lost: removed again (the store's own).
    pub remove_leases: Vec<Lease>,
    pub license: Option<StoredLicense>,
    pub tryout: Option<TryoutRecord>,
    pub reconcile: Option<ReconcileStatus>,
    /// Set this pending initialization (`Some(None)`: remove the pending one).
    pub initialization: Option<Option<PendingInitialization>>,
    pub incident: Incident,
}

/// One write, as the change feed reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: u64,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    SeatAssigned(Seat),
    /// A seat's over-capacity flag was set or cleared.
    SeatFlagged(Seat),
    SeatReleased {
        feature: Feature,
        user_id: UserId,
    },
    LicenseApplied(StoredLicense),
    TryoutChanged(TryoutRecord),
    ReconcileRecorded(ReconcileStatus),
    InitializationIssued(PendingInitialization),
    /// An activation response used the pending initialization.
    InitializationConsumed,
    /// Re-setup: seats, license, reconcile status and pending initialization
    /// removed; the tryout record kept.
    Reset,
    /// Lost writes were written back (or reported lost).
    Repaired(Incident),
    /// A lease was taken, or renewed by a repeated acquisition of its holder;
    /// `reclaimed` are the ids of expired leases of its feature the same step
    /// freed.
    LeaseAcquired {
        lease: Lease,
        reclaimed: Vec<String>,
    },
    /// One renewal of a holder's leases: each of `lease_ids` now expires at
    /// `expires_at`.
    LeasesRenewed {
        holder: Holder,
        lease_ids: Vec<String>,
        expires_at: DateTime<Utc>,
    },
    /// A lease was given back.
    LeaseReleased {
        lease_id: String,
    },
}
