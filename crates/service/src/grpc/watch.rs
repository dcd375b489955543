//! `WatchSeats`: the seat state streamed to callers that decide `CheckSeat`
//! themselves. A stream starts with a snapshot (or, resumed, with the
//! journal's changes after the caller's version), then sends each change the
//! replica applies, in version order, and a heartbeat whenever nothing was
//! sent for `watch.heartbeat_ms`.
//!
//! Bounded per caller and per stream: the caller's stream slot (shared with
//! `WatchLicenseEvents`), one receiver of the mirror's bounded broadcast, and
//! nothing else. The stream is pulled: it reads the broadcast only when the
//! transport takes a message (HTTP/2 flow control), so a consumer that stops
//! reading holds at most a flow-control window. When it falls more than the
//! broadcast's length behind, its backlog is dropped and it gets a snapshot at
//! the current version instead. No task per stream: dropping the stream frees
//! everything.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast;
use tonic::Status;

use super::pb;
use crate::caller::LongStreamHold;
use crate::domain::{Feature, InvalidInput};
use crate::limits::{Refusal, WatchSlot};
use crate::mirror::{FeedChange, SeatFeed};
use crate::service::{Licensing, SeatState, WatchStart};
use crate::status::{refusal_status, to_status};
use crate::store::ChangeKind;
use comtrexx_licensing_proto::seat_state::{
    activation_state, compact_seat, license, opt_timestamp, reconcile, rules, tryout, watched_seat,
};
use comtrexx_licensing_proto::timestamp;

/// How `WatchSeats` streams run (`watch.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// A heartbeat at least this often while nothing else is sent.
    pub heartbeat: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// The stream a `WatchSeats` call answers with.
pub type SeatStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchSeatsResponse, Status>> + Send + 'static>>;

/// The request's features: empty for all; each a seat feature, else
/// `INVALID_ARGUMENT` naming `features`.
pub fn features(raw: &[String]) -> Result<Vec<Feature>, InvalidInput> {
    let mut out = Vec::with_capacity(raw.len().min(Feature::ALL.len()));
    for name in raw {
        let feature: Feature = name
            .parse()
            .map_err(|e: InvalidInput| InvalidInput::new("features", e.message))?;
        if !feature.is_seat() {
            return Err(InvalidInput::new(
                "features",
                format!("{feature} is not a seat feature (use one of: call_assist, user)"),
            ));
        }
        if !out.contains(&feature) {
            out.push(feature);
        }
    }
    Ok(out)
}

/// What one open stream holds; all of it is dropped with the stream.
pub struct Watcher {
    pub licensing: Arc<Licensing>,
    /// The watched features (empty: all).
    pub features: Vec<Feature>,
    pub start: WatchStart,
    /// Every change the replica applies after `start`.
    pub feed: broadcast::Receiver<SeatFeed>,
    pub heartbeat: Duration,
    /// Resolves when the server drains.
    pub drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The caller's stream slot.
    pub slot: WatchSlot,
    /// Keeps the connection past its maximum age while the stream is open.
    pub hold: Option<LongStreamHold>,
}

/// The running stream's state.
struct Running {
    w: Watcher,
    /// The version the caller holds after the last message sent.
    version: u64,
    /// The start's changes not sent yet (a resumed stream), converted one at a time.
    pending: VecDeque<FeedChange>,
    /// The first message (the snapshot of a stream from 0), not sent yet.
    first: Option<pb::WatchSeatsResponse>,
    /// Fires when a heartbeat is due (reset by every message sent).
    beat: Pin<Box<tokio::time::Sleep>>,
    /// Ended (after the UNAVAILABLE at drain).
    done: bool,
}

/// The messages of one stream, until the server drains (then `UNAVAILABLE`,
/// reason `SHUTTING_DOWN`) or the caller goes away.
pub fn seat_stream(mut w: Watcher) -> SeatStream {
    let start = std::mem::replace(
        &mut w.start,
        WatchStart::Changes {
            after: 0,
            changes: Vec::new(),
        },
    );
    let (first, pending, version) = match start {
        WatchStart::Snapshot(state) => {
            let version = state.version;
            (Some(snapshot(&state)), VecDeque::new(), version)
        }
        WatchStart::Changes { after, changes } => (None, VecDeque::from(changes), after),
    };
    let beat = Box::pin(tokio::time::sleep(w.heartbeat));
    let mut running = Running {
        w,
        version,
        pending,
        first,
        beat,
        done: false,
    };
    if running.first.is_none() && running.pending.is_empty() {
        // Resumed at the replica's version: nothing to catch up; say so at once.
        running.first = Some(running.heartbeat());
    }
    Box::pin(futures::stream::unfold(running, |mut r| async move {
        if r.done {
            return None;
        }
        let item = r.next().await;
        if item.is_err() {
            r.done = true;
        }
        r.beat
            .as_mut()
            .reset(tokio::time::Instant::now() + r.w.heartbeat);
        Some((item, r))
    }))
}

impl Running {
    async fn next(&mut self) -> Result<pb::WatchSeatsResponse, Status> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        if let Some(change) = self.pending.pop_front() {
            return Ok(self.change(&change));
        }
        loop {
            tokio::select! {
                biased;
                () = &mut self.w.drained => return Err(refusal_status(&Refusal::ShuttingDown)),
                received = self.w.feed.recv() => match received {
                    Ok(SeatFeed::Change(change)) => {
                        let version = change.change.version;
                        if version <= self.version {
                            continue; // already in what the caller holds
                        }
                        if version == self.version + 1 {
                            return Ok(self.change(&change));
                        }
                        // Not the next one (a copy replaced meanwhile): whole again.
                        return self.snapshot();
                    }
                    Ok(SeatFeed::Resync) => return self.snapshot(),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "WatchSeats consumer fell behind; sending a snapshot");
                        return self.snapshot();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(refusal_status(&Refusal::ShuttingDown));
                    }
                },
                () = &mut self.beat => return Ok(self.heartbeat()),
            }
        }
    }

    /// The whole state at the replica's current version. Changes still in the
    /// receiver up to that version are skipped when they come.
    fn snapshot(&mut self) -> Result<pb::WatchSeatsResponse, Status> {
        let state = self
            .w
            .licensing
            .seat_state(&self.w.features)
            .map_err(to_status)?;
        self.version = state.version;
        Ok(snapshot(&state))
    }

    fn change(&mut self, change: &FeedChange) -> pb::WatchSeatsResponse {
        self.version = change.change.version;
        pb::WatchSeatsResponse {
            version: self.version,
            kind: Some(pb::watch_seats_response::Kind::Change(seat_change(
                change,
                &self.w.features,
            ))),
        }
    }

    fn heartbeat(&self) -> pb::WatchSeatsResponse {
        pb::WatchSeatsResponse {
            version: self.version,
            kind: Some(pb::watch_seats_response::Kind::Heartbeat(
                pb::WatchSeatsHeartbeat {
                    reference_time: Some(timestamp(self.w.licensing.reference_time())),
                },
            )),
        }
    }
}

/// A snapshot message.
pub fn snapshot(state: &SeatState) -> pb::WatchSeatsResponse {
    pb::WatchSeatsResponse {
        version: state.version,
        kind: Some(pb::watch_seats_response::Kind::Snapshot(
            pb::SeatStateSnapshot {
                serial_number: state.serial.clone(),
                rules: Some(rules(&state.rules)),
                seats: state
                    .seats
                    .iter()
                    .map(|(feature, user, seat)| compact_seat(*feature, user, *seat))
                    .collect(),
                license: state.license.as_ref().map(license),
                tryout: state.tryout.as_ref().map(tryout),
                reconcile: Some(reconcile(&state.reconcile)),
                activation_state: activation_state(state.activation.state).into(),
                grace_ends_at: opt_timestamp(state.activation.grace_ends_at),
                reference_time: Some(timestamp(state.reference_time)),
                epoch: state.epoch.clone(),
                leases: state
                    .leases
                    .iter()
                    .map(comtrexx_licensing_proto::seat_state::lease)
                    .collect(),
            },
        )),
    }
}

/// One change; a seat of a feature not watched, and changes that decide
/// nothing, are `other` (only the version moves).
fn seat_change(c: &FeedChange, features: &[Feature]) -> pb::SeatStateChange {
    use pb::seat_state_change::Kind;
    let watched = |f: Feature| features.is_empty() || features.contains(&f);
    let kind = match &c.change.kind {
        ChangeKind::SeatAssigned(seat) | ChangeKind::SeatFlagged(seat) if watched(seat.feature) => {
            Kind::SeatPut(watched_seat(seat))
        }
        ChangeKind::SeatReleased { feature, user_id } if watched(*feature) => {
            Kind::SeatRemoved(pb::SeatRemoved {
                user_id: user_id.as_str().to_owned(),
                feature: feature.as_str().to_owned(),
            })
        }
        ChangeKind::SeatAssigned(_)
        | ChangeKind::SeatFlagged(_)
        | ChangeKind::SeatReleased { .. } => Kind::Other("seat of a feature not watched".into()),
        ChangeKind::LicenseApplied(_) => match &c.license {
            Some(l) => Kind::LicenseApplied(license(l)),
            None => Kind::LicenseRemoved(pb::LicenseRemoved {}),
        },
        ChangeKind::TryoutChanged(record) => Kind::TryoutChanged(tryout(record)),
        ChangeKind::ReconcileRecorded(status) => Kind::ReconcileRecorded(reconcile(status)),
        ChangeKind::Reset => Kind::Reset(pb::StateReset {}),
        ChangeKind::InitializationIssued(_) => Kind::Other("initialization_issued".into()),
        ChangeKind::InitializationConsumed => Kind::Other("initialization_consumed".into()),
        ChangeKind::Repaired(_) => Kind::Other("store_repaired".into()),
        ChangeKind::LeaseAcquired {
            lease: l,
            reclaimed,
        } if watched(l.feature) => Kind::LeasePut(pb::LeasePut {
            lease: Some(comtrexx_licensing_proto::seat_state::lease(l)),
            reclaimed: reclaimed.clone(),
        }),
        ChangeKind::LeaseAcquired { .. } => Kind::Other("lease of a feature not watched".into()),
        // A renewal names ids only: a stream that never got the lease
        // ignores them.
        ChangeKind::LeasesRenewed {
            holder,
            lease_ids,
            expires_at,
        } => Kind::LeasesRenewed(pb::LeasesRenewed {
            holder: holder.as_str().to_owned(),
            lease_ids: lease_ids.clone(),
            expires_at: Some(timestamp(*expires_at)),
        }),
        ChangeKind::LeaseReleased { lease_id } => Kind::LeaseReleased(lease_id.clone()),
    };
    pb::SeatStateChange { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_seat_features_named_in_the_field() {
        assert_eq!(features(&[]).unwrap(), Vec::<Feature>::new());
        assert_eq!(
            features(&["user".into(), "user".into(), "call_assist".into()]).unwrap(),
            vec![Feature::User, Feature::CallAssist]
        );
        for bad in ["", "users", "system_activation"] {
            let e = features(&[bad.into()]).unwrap_err();
            assert_eq!(e.field, "features", "{bad}");
        }
    }
}
