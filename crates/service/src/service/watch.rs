//! `WatchSeats` in the application service: the state a caller needs to decide
//! `CheckSeat` itself (the same `Rules` and `LicenseState` as
//! [`Licensing::check_seat`]), where a stream starts (a snapshot, or the
//! journal's changes after a version), and the reference time of heartbeats.
//! Everything is read under the mirror's read lock in one short step; the
//! gRPC adapter converts outside it.

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use super::Licensing;
use crate::domain::CompactSeat;
use crate::domain::activation::Activation;
use crate::domain::{
    AppliedLicense, Feature, LicensingError, ReconcileStatus, Rules, TryoutRecord,
};
use crate::mirror::{FeedChange, MirrorState, SeatFeed};

/// Everything a local `CheckSeat` decision reads, at one version of the copy.
#[derive(Debug, Clone)]
pub struct SeatState {
    /// The copy's version (0 for a copy from the state file).
    pub version: u64,
    /// The store's epoch (empty for a copy from the state file).
    pub epoch: String,
    pub serial: String,
    pub rules: Rules,
    /// The seats of the watched features, as the copy keeps them.
    pub seats: Vec<(Feature, compact_str::CompactString, CompactSeat)>,
    /// The leases of the watched features (live or not yet reclaimed).
    pub leases: Vec<crate::domain::Lease>,
    pub license: Option<AppliedLicense>,
    pub tryout: Option<TryoutRecord>,
    pub reconcile: ReconcileStatus,
    /// The activation at `reference_time` (derived; for display).
    pub activation: Activation,
    /// The deployment's reference time (never behind the high-water clock).
    pub reference_time: DateTime<Utc>,
}

/// Where a stream starts.
#[derive(Debug)]
pub enum WatchStart {
    /// The whole state.
    Snapshot(Box<SeatState>),
    /// The changes after the caller's version `after`, in order (perhaps none).
    Changes {
        after: u64,
        changes: Vec<FeedChange>,
    },
}

impl Licensing {
    /// Where a `WatchSeats` stream from `since` starts, and a receiver of every
    /// change after it (subscribed under the same read lock, so nothing falls
    /// in between). `since` 0, a version whose later changes the journal no
    /// longer holds, or a `since_epoch` (when given) that is not the store's
    /// epoch: a snapshot. No state yet: `NO_STATE_YET`.
    pub fn watch_seats(
        &self,
        since: u64,
        since_epoch: &str,
        features: &[Feature],
    ) -> Result<(WatchStart, broadcast::Receiver<SeatFeed>), LicensingError> {
        let node = self.clock.now();
        let (start, feed) = self.mirror.read_and_follow(|state| {
            if !state.has_state() {
                return None;
            }
            let same_epoch = since_epoch.is_empty()
                || state
                    .position
                    .as_ref()
                    .is_some_and(|p| p.epoch == since_epoch);
            let changes = (since > 0 && !state.from_disk && same_epoch)
                .then(|| state.changes_since(since))
                .flatten();
            Some(match changes {
                Some(changes) => Err(changes),
                None => Ok(self.seat_state_of(state, features, node)),
            })
        });
        let start = match start.ok_or_else(|| self.no_state())? {
            Ok(state) => WatchStart::Snapshot(Box::new(state)),
            // Licenses verified again outside the lock (rare, and not free).
            Err(changes) => WatchStart::Changes {
                after: since,
                changes: changes
                    .into_iter()
                    .map(|change| {
                        let license = match &change.kind {
                            crate::store::ChangeKind::LicenseApplied(stored) => {
                                self.mirror.verify_license(stored)
                            }
                            _ => None,
                        };
                        FeedChange { change, license }
                    })
                    .collect(),
            },
        };
        Ok((start, feed))
    }

    /// The whole state now (a stream that lagged, or whose replica re-read the store).
    pub fn seat_state(&self, features: &[Feature]) -> Result<SeatState, LicensingError> {
        let node = self.clock.now();
        self.mirror
            .read(|state| {
                state
                    .has_state()
                    .then(|| self.seat_state_of(state, features, node))
            })
            .ok_or_else(|| self.no_state())
    }

    /// The deployment's reference time now, as decisions use it.
    pub fn reference_time(&self) -> DateTime<Utc> {
        self.now()
    }

    fn seat_state_of(
        &self,
        state: &MirrorState,
        features: &[Feature],
        node: DateTime<Utc>,
    ) -> SeatState {
        let now = state.now(node);
        let rules = self.rules();
        SeatState {
            version: state.position.as_ref().map_or(0, |p| p.version),
            epoch: state
                .position
                .as_ref()
                .map_or_else(String::new, |p| p.epoch.clone()),
            serial: self.settings.serial.as_str().to_owned(),
            rules,
            seats: state.seats_of(features),
            leases: state
                .leases()
                .filter(|l| features.is_empty() || features.contains(&l.feature))
                .cloned()
                .collect(),
            license: state.license.clone(),
            tryout: state.tryout.clone(),
            reconcile: state.reconcile.clone(),
            activation: rules.activation(&state.license_state(), now),
            reference_time: now,
        }
    }
}
