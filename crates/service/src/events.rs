//! License events for `WatchLicenseEvents`: what changed, as each replica learns
//! it from the store's change feed (so a subscriber on any replica sees changes
//! made on every replica), plus time-driven events (tryout expiring, grace).
//! Delivered through a bounded broadcast: a slow subscriber never blocks the
//! writer or other subscribers; it gets a `lagged_resync` event instead.

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::domain::{Feature, ReconcileOutcome, ReconcileStatus, Seat, TryoutRecord, UserId};
use crate::store::ChangeKind;

/// How many events a subscriber may fall behind before it is told to resync.
pub const BUFFER: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseEvent {
    /// What happened: `seat_assigned`, `seat_released`, `over_capacity`,
    /// `within_capacity`, `entitlements_changed`, `tryout_started`,
    /// `tryout_expiring`, `tryout_expired`, `tryout_ended`, `tryout_forfeited`,
    /// `reconcile_succeeded`, `reconcile_failed`, `grace_entered`,
    /// `activation_lapsed`, `initialization_code_created`, `activation_applied`,
    /// `reset`, `resync`, `lagged_resync`, `store_repaired` (the store had lost
    /// writes; they were written back), `data_lost` (acknowledged writes could
    /// not be written back; `detail` names them), `clock_rolled_back`,
    /// `lease_acquired` (a lease taken, or taken again by its holder; `detail`
    /// names the holder), `lease_released`, `lease_at_capacity` (a concurrent
    /// feature's live leases reached its quantity: further acquisitions are
    /// refused until one ends; `detail` has the counts).
    pub kind: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub user_id: Option<UserId>,
    pub feature: Option<Feature>,
    /// The seat as it is now (assigned, flagged).
    pub seat: Option<Seat>,
    /// Human-readable detail (an error, days left).
    pub detail: String,
    /// Days left, for `tryout_expiring` and `grace_entered`.
    pub days_remaining: Option<u32>,
}

impl LicenseEvent {
    pub fn new(kind: &'static str, occurred_at: DateTime<Utc>) -> Self {
        Self {
            kind,
            occurred_at,
            user_id: None,
            feature: None,
            seat: None,
            detail: String::new(),
            days_remaining: None,
        }
    }

    fn for_seat(kind: &'static str, at: DateTime<Utc>, seat: &Seat) -> Self {
        Self {
            user_id: Some(seat.user_id.clone()),
            feature: Some(seat.feature),
            seat: Some(seat.clone()),
            ..Self::new(kind, at)
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// The event a store change means, if any.
pub fn from_change(kind: &ChangeKind, at: DateTime<Utc>) -> Option<LicenseEvent> {
    Some(match kind {
        ChangeKind::SeatAssigned(seat) => LicenseEvent::for_seat("seat_assigned", at, seat),
        ChangeKind::SeatReleased { feature, user_id } => LicenseEvent {
            user_id: Some(user_id.clone()),
            feature: Some(*feature),
            ..LicenseEvent::new("seat_released", at)
        },
        ChangeKind::SeatFlagged(seat) => LicenseEvent::for_seat(
            if seat.over_capacity_since.is_some() {
                "over_capacity"
            } else {
                "within_capacity"
            },
            at,
            seat,
        ),
        ChangeKind::LicenseApplied(_) => LicenseEvent::new("entitlements_changed", at),
        ChangeKind::TryoutChanged(record) => LicenseEvent::new(
            match record {
                TryoutRecord::Started { ended: None, .. } => "tryout_started",
                TryoutRecord::Started { ended: Some(_), .. } => "tryout_ended",
                TryoutRecord::Forfeited { .. } => "tryout_forfeited",
            },
            at,
        ),
        ChangeKind::ReconcileRecorded(status) => reconcile_event(status, at),
        ChangeKind::InitializationIssued(_) => LicenseEvent::new("initialization_code_created", at),
        ChangeKind::InitializationConsumed => LicenseEvent::new("activation_applied", at),
        ChangeKind::Reset => LicenseEvent::new("reset", at),
        ChangeKind::Repaired(incident) if incident.lost_total > 0 => {
            LicenseEvent::new("data_lost", at).detail(format!(
                "{} acknowledged writes lost: {}",
                incident.lost_total,
                incident.lost.join(", ")
            ))
        }
        ChangeKind::Repaired(incident) => LicenseEvent::new("store_repaired", at)
            .detail(format!("{} writes restored", incident.restored_total)),
        ChangeKind::LeaseAcquired { lease, .. } => LicenseEvent {
            user_id: Some(lease.user_id.clone()),
            feature: Some(lease.feature),
            ..LicenseEvent::new("lease_acquired", at)
        }
        .detail(format!("lease {} held by {}", lease.lease_id, lease.holder)),
        // Renewals are the heartbeat of every use: not an event each.
        ChangeKind::LeasesRenewed { .. } => return None,
        ChangeKind::LeaseReleased { lease_id } => {
            LicenseEvent::new("lease_released", at).detail(format!("lease {lease_id}"))
        }
    })
}

fn reconcile_event(status: &ReconcileStatus, at: DateTime<Utc>) -> LicenseEvent {
    match status.last_outcome {
        Some(ReconcileOutcome::Updated | ReconcileOutcome::Unchanged) => {
            LicenseEvent::new("reconcile_succeeded", at)
        }
        _ => LicenseEvent::new("reconcile_failed", at)
            .detail(status.last_error.clone().unwrap_or_default()),
    }
}

/// A broadcast of events to any number of subscribers.
#[derive(Debug, Clone)]
pub struct EventHub {
    tx: broadcast::Sender<LicenseEvent>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BUFFER).0,
        }
    }
}

impl EventHub {
    /// Sends to whoever listens; nobody listening is fine.
    pub fn publish(&self, event: LicenseEvent) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LicenseEvent> {
        self.tx.subscribe()
    }

    /// Subscribers listening now (open `WatchLicenseEvents` streams and any
    /// internal listener).
    pub fn receiver_count(&self) -> usize {
        self.tx.receiver_count()
    }
}
