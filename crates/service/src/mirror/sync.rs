//! How a replica's copy follows the store: a snapshot, then the change feed in
//! version order; a resync on any gap, on another epoch and every
//! `resync_interval`; before each resync the lineage check (does the store still
//! hold this copy's history?) and, when it does not, the repair (`repair` plans,
//! `Store::repair` writes). The only part of the replica that reads the store.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Mirror;
use crate::domain::repair;
use crate::store::{Change, Changes, Incident, Position, Snapshot, Store, StoreError};

/// How often a resynchronisation re-reads and re-plans when the store moves
/// under a repair.
const REPAIR_ATTEMPTS: usize = 5;

/// How the store relates to this replica's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lineage {
    /// The store holds everything this copy saw (or the copy saw nothing yet).
    Extends,
    /// The store lost some of it: from the point both share (`common`, `None`:
    /// unknown), after this copy had reached `from`.
    Lost { common: Option<u64>, from: u64 },
}

impl Mirror {
    /// Brings the copy up to the store as it is now (after a write found the
    /// copy out of date, before a scheduled reconcile, before stopping): the
    /// feed up to the store's version when the store still holds this copy's
    /// history, else a full snapshot and the repair ([`Self::refresh`]).
    /// Coalesced: while one runs, every caller that asks meanwhile waits and
    /// shares the next one, which starts after they asked (so each sees the
    /// store as it was at least when it asked). Many writes failing at once cost
    /// two refreshes, not one each.
    pub async fn resync_now(&self) -> Result<(), StoreError> {
        let asked_after = self.resyncs_started.load(Ordering::SeqCst);
        let mut last = self.resync_flight.lock().await;
        if last.0 > asked_after {
            // One started after this call asked, and (the lock is ours) finished.
            return last.1.clone();
        }
        let generation = self.resyncs_started.fetch_add(1, Ordering::SeqCst) + 1;
        let result = self.refresh(self.store.as_ref()).await;
        self.contact(result.is_ok());
        *last = (generation, result.clone());
        result
    }

    /// On-demand refreshes run so far (each a summary and the feed, or a full
    /// snapshot, or two when the store had lost its data).
    pub fn on_demand_resyncs(&self) -> u64 {
        self.resyncs_started.load(Ordering::SeqCst)
    }

    /// Brings the copy up to the store as it is now: when the store still holds
    /// this copy's history (one small read), by following the feed up to the
    /// store's version; otherwise by a full resynchronisation (which repairs).
    async fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        if let Verdict::Same { version: target } = self.verify(store).await? {
            loop {
                let Some(position) = self.state.read().position.clone() else {
                    break;
                };
                if position.version >= target {
                    return Ok(());
                }
                let Changes::Events(events) = store.changes(&position, Duration::ZERO).await?
                else {
                    break;
                };
                if events.is_empty() {
                    break; // the feed lacks what the version says: read it all
                }
                let mut state = self.state.write();
                let in_order = events.iter().all(|c| self.apply(&mut state, c).in_order());
                self.publish_version(&state);
                if !in_order {
                    break;
                }
            }
        }
        self.resync(store).await
    }

    /// Reads the store, repairs what it lost of this copy's history, and installs it.
    pub(super) async fn resync(&self, store: &dyn Store) -> Result<(), StoreError> {
        // One at a time. One that waited for another (the sync task's and an
        // on-demand one, both after the same gap) first checks, in one small
        // read, whether the other left the copy current: then it is done.
        let _one = match self.resyncing.try_lock() {
            Ok(one) => one,
            Err(_) => {
                let one = self.resyncing.lock().await;
                if let Verdict::Same { version } = self.verify(store).await?
                    && self.read(|s| s.version()) >= version
                {
                    return Ok(());
                }
                one
            }
        };
        for _ in 0..REPAIR_ATTEMPTS {
            // Where this copy is, before the snapshot: later local writes are newer.
            let before = self.state.read().position.clone();
            // Streamed into the copy (`stream`): its seats are never held
            // twice. `None` once a full snapshot replaced it.
            let (mut snapshot, streamed) = self.read_streamed(store).await?;
            let mut streamed = Some(streamed);
            if snapshot.position.is_none() {
                streamed = None;
                // The store lost its data (or is new): write back what this replica
                // knows, then read again. Another replica may win the race; its
                // copy is then merged with this one below.
                // A copy from the state file may be older than what the store
                // had: never written back (it would invent or undo writes).
                let ours = self.read(|s| {
                    if s.from_disk {
                        Snapshot::default()
                    } else {
                        s.to_snapshot()
                    }
                });
                let seats = ours.seats.len();
                if store.restore(&ours).await? {
                    if let Some(from) = &ours.position {
                        tracing::warn!(
                            seats,
                            "seat store had lost its data; restored it from this replica's last known state"
                        );
                        let restored = store.snapshot().await?;
                        self.report_restore(store, &ours, from.version, restored)
                            .await?;
                    } else {
                        tracing::info!("seat store initialized");
                    }
                }
                snapshot = store.snapshot().await?;
                if snapshot.position.is_none() {
                    return Err(StoreError::NotInitialized);
                }
            }
            match self.lineage(store, before.as_ref(), &snapshot).await? {
                Lineage::Extends => {
                    match streamed {
                        Some(streamed) => {
                            if !self.install_streamed(snapshot, streamed) {
                                // The copy moved under the comparison: read it whole.
                                self.install(store.snapshot().await?);
                            }
                        }
                        None => self.install(snapshot),
                    }
                    return Ok(());
                }
                Lineage::Lost { common, from } => {
                    if streamed.take().is_some() {
                        // The repair plans with the store's seats: read whole.
                        drop(streamed);
                        snapshot = store.snapshot().await?;
                    }
                    if self.repair(store, &snapshot, common, from).await? {
                        self.install(store.snapshot().await?);
                        return Ok(());
                    }
                    // The store moved under the plan: read and plan again.
                }
            }
        }
        Err(StoreError::Moved)
    }

    /// Whether the store still holds this copy's history.
    async fn lineage(
        &self,
        store: &dyn Store,
        before: Option<&Position>,
        snapshot: &Snapshot,
    ) -> Result<Lineage, StoreError> {
        let (Some(mine), Some(theirs)) = (before, snapshot.position.as_ref()) else {
            return Ok(Lineage::Extends);
        };
        if mine.epoch != theirs.epoch {
            return Ok(Lineage::Lost {
                common: None,
                from: mine.version,
            });
        }
        // This copy's write at its version (later local writes may follow it).
        let (first, last) = self.read(|s| {
            (
                s.journal.front().map(|c| c.version),
                s.journal
                    .iter()
                    .rfind(|c| c.version <= mine.version)
                    .cloned(),
            )
        });
        let Some(first) = first else {
            // No change since the last snapshot: only the version can tell.
            return Ok(if theirs.version < mine.version {
                Lineage::Lost {
                    common: None,
                    from: mine.version,
                }
            } else {
                Lineage::Extends
            });
        };
        if theirs.version >= mine.version
            && last.as_ref().is_some_and(|c| c.version == mine.version)
        {
            // The common case, in one small read: the store holds this copy's
            // last write at its version, so it extends this copy's history.
            let summary = store.summary(mine.version).await?;
            if summary.position.as_ref().map(|p| &p.epoch) == Some(&mine.epoch)
                && summary.change_at.is_some()
                && summary.change_at == last
            {
                return Ok(Lineage::Extends);
            }
        }
        let journal: Vec<Change> = self.read(|s| s.journal.iter().cloned().collect());
        let history = store.history(first.saturating_sub(1)).await?;
        if theirs.version >= mine.version {
            let at_mine = history.iter().find(|c| c.version == mine.version);
            let last = journal.iter().rfind(|c| c.version <= mine.version);
            // The feed no longer reaching back this far tells nothing.
            let trimmed = history.first().is_none_or(|h| h.version > mine.version);
            if at_mine == last || (at_mine.is_none() && trimmed) {
                // The same write at this copy's version: the store extends it.
                return Ok(Lineage::Extends);
            }
            // Another write, or none (a repair jumped over this version): the
            // histories parted.
        }
        // The last change both hold is the point the histories share.
        let common = journal
            .iter()
            .rev()
            .find(|c| history.iter().any(|h| h == *c))
            .map_or(first - 1, |c| c.version);
        Ok(Lineage::Lost {
            common: Some(common),
            from: mine.version,
        })
    }

    /// Plans and writes back what the store lost; `false` when it moved meanwhile.
    async fn repair(
        &self,
        store: &dyn Store,
        snapshot: &Snapshot,
        common: Option<u64>,
        from: u64,
    ) -> Result<bool, StoreError> {
        let newer = store.history(common.unwrap_or(0)).await?;
        let store_license = snapshot
            .license
            .as_ref()
            .and_then(|l| self.verifier.verify(l).ok());
        let now = self.read(|s| s.now(self.clock.now()));
        let plan = self.read(|mine| {
            let lost_changes: Vec<Change>;
            let lost = match common {
                Some(c) if mine.journal.front().is_some_and(|f| f.version <= c + 1) => {
                    lost_changes = mine
                        .journal
                        .iter()
                        .filter(|x| x.version > c)
                        .cloned()
                        .collect();
                    repair::Lost::Changes(&lost_changes)
                }
                _ => repair::Lost::Everything,
            };
            repair::plan(&repair::Input {
                mine: &mine.to_snapshot(),
                mine_license: mine.license.as_ref(),
                lost,
                store: snapshot,
                store_license: store_license.as_ref(),
                newer: &newer,
                edition: self.verifier.edition,
                tryout: self.tryout,
                now,
            })
        });
        let theirs = snapshot.position.clone();
        let went_back = theirs.as_ref().is_some_and(|t| t.version < from);
        let plan = match plan {
            Some(plan) => plan,
            // Nothing to write back; a store that went back still jumps above
            // every version seen, so replicas following its feed re-read it.
            None if went_back => crate::store::RepairWrite::default(),
            None => return Ok(true),
        };
        let mut write = plan;
        write.expected = theirs.clone();
        write.version_floor = from.max(theirs.as_ref().map_or(0, |t| t.version));
        write.incident.at = self.clock.now();
        write.incident.rolled_back_from = from;
        let Some(changes) = store.repair(&write).await? else {
            return Ok(false);
        };
        crate::metrics::metrics().store_repair(
            if went_back { "rolled_back" } else { "replaced" },
            write.incident.restored_total,
            write.incident.lost_total,
        );
        report(&write.incident, went_back);
        let mut state = self.state.write();
        for change in &changes {
            self.apply(&mut state, change);
        }
        self.publish_version(&state);
        Ok(true)
    }

    /// Records (in the store, for every replica) that this replica re-created a
    /// store that had lost everything.
    async fn report_restore(
        &self,
        store: &dyn Store,
        ours: &Snapshot,
        from: u64,
        restored: Snapshot,
    ) -> Result<(), StoreError> {
        let mut incident = Incident {
            at: self.clock.now(),
            rolled_back_from: from,
            ..Incident::default()
        };
        for seat in &ours.seats {
            incident.restored(format!("seat {}/{}", seat.feature, seat.user_id.as_str()));
        }
        for (present, what) in [
            (ours.license.is_some(), "license"),
            (ours.tryout.is_some(), "tryout record"),
            (ours.initialization.is_some(), "pending initialization code"),
        ] {
            if present {
                incident.restored(what.into());
            }
        }
        let mut at = restored.position;
        for _ in 0..REPAIR_ATTEMPTS {
            let write = crate::store::RepairWrite {
                version_floor: at.as_ref().map_or(0, |p| p.version),
                expected: at,
                incident: incident.clone(),
                ..Default::default()
            };
            if store.repair(&write).await?.is_some() {
                crate::metrics::metrics().store_repair(
                    "lost_epoch",
                    incident.restored_total,
                    incident.lost_total,
                );
                report(&incident, false);
                return Ok(());
            }
            // Written to meanwhile: record it on the new position.
            at = store.snapshot().await?.position;
        }
        Ok(())
    }

    /// The periodic check: does the store still match this copy? One small
    /// read ([`Store::summary`]), whatever the number of seats; a full resync
    /// only when it does not.
    async fn verify(&self, store: &dyn Store) -> Result<Verdict, StoreError> {
        if self.state.read().from_disk {
            return Ok(Verdict::Differs("the copy comes from the state file"));
        }
        let Some(mine) = self.state.read().position.clone() else {
            return Ok(Verdict::Differs("no copy yet"));
        };
        let summary = store.summary(mine.version).await?;
        let Some(theirs) = summary.position else {
            return Ok(Verdict::Differs("the store holds no epoch"));
        };
        if theirs.epoch != mine.epoch {
            return Ok(Verdict::Differs("another epoch"));
        }
        if theirs.version < mine.version {
            return Ok(Verdict::Differs("the store went back"));
        }
        let (at_mine, seats) = self.read(|s| {
            (
                s.journal
                    .iter()
                    .rfind(|c| c.version <= mine.version)
                    .cloned(),
                (s.seat_total() + s.corrupt_seats) as u64,
            )
        });
        // Another write at this copy's version, or none: after a failover
        // another replica's repair may have jumped over it (the feed then
        // continues right after this copy's version, from another history).
        // A feed trimmed that far back also holds none: the full comparison
        // (`lineage`) tells the two apart.
        if let Some(local) = &at_mine
            && local.version == mine.version
            && summary.change_at.as_ref() != Some(local)
        {
            return Ok(Verdict::Differs(
                "another write at this copy's version, or none",
            ));
        }
        // Counts compare only at the same version (the feed brings the rest).
        if theirs.version == mine.version && summary.seats != seats {
            return Ok(Verdict::Differs("another number of seats"));
        }
        Ok(Verdict::Same {
            version: theirs.version,
        })
    }

    /// Follows the store until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()> + Send) {
        let store = self.store.clone();
        tokio::pin!(shutdown);
        let mut need_resync = true;
        // After an error: check (one small read) before reading everything.
        let mut need_check = false;
        let mut last_check = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            let check =
                !need_resync && (need_check || last_check.elapsed() >= self.config.resync_interval);
            let step = async {
                if need_resync {
                    // After a full read, follow the feed.
                    self.resync(store.as_ref()).await.map(|()| false)
                } else if check {
                    match self.verify(store.as_ref()).await? {
                        Verdict::Same { .. } => Ok(false),
                        Verdict::Differs(why) => {
                            tracing::info!(
                                why,
                                "seat store differs from this replica's copy; reading it again"
                            );
                            Ok(true)
                        }
                    }
                } else {
                    let position = self.state.read().position.clone();
                    let Some(position) = position else {
                        return Ok(true);
                    };
                    match store.changes(&position, self.config.feed_wait).await? {
                        Changes::Events(events) => {
                            let mut state = self.state.write();
                            let in_order =
                                events.iter().all(|c| self.apply(&mut state, c).in_order());
                            self.publish_version(&state);
                            Ok(!in_order)
                        }
                        Changes::Resync => Ok(true),
                    }
                }
            };
            let outcome = tokio::select! {
                outcome = step => outcome,
                () = &mut shutdown => return,
            };
            match outcome {
                Ok(resync_next) => {
                    if need_resync || check {
                        last_check = Instant::now();
                    }
                    need_resync = resync_next;
                    need_check = false;
                    backoff = BACKOFF_MIN;
                    self.contact(true);
                }
                Err(error) => {
                    if self.connected.load(Ordering::Relaxed) {
                        tracing::warn!(%error, "mirror lost the seat store");
                    } else if self.last_error.lock().is_none() {
                        tracing::warn!(%error, source = self.source().as_str(), "seat store not reachable at start");
                    }
                    *self.last_error.lock() = Some(error.to_string());
                    self.contact(false);
                    // After an outage the feed may have moved on without us, or
                    // the store may have gone back: check before following it
                    // (a full resync only when the check finds a difference).
                    need_check = true;
                    // Never sooner than the backoff, with jitter: replicas that
                    // failed together do not come back together.
                    tokio::select! {
                        () = tokio::time::sleep(crate::store::jittered(backoff)) => {}
                        () = &mut shutdown => return,
                    }
                    // Short, so the copy is repaired and current again well
                    // within a second after the store is back.
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// The first pause after a failed read of the store, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What the periodic check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The store holds this copy's history; it is at `version` (the feed
    /// brings what lies between).
    Same {
        version: u64,
    },
    Differs(&'static str),
}

/// Logs a repair: an `audit` line naming what was lost, if anything.
fn report(incident: &Incident, went_back: bool) {
    if incident.lost_total > 0 {
        tracing::error!(
            target: "audit",
            lost = incident.lost_total,
            restored = incident.restored_total,
            what = ?incident.lost,
            "seat store lost acknowledged writes that could not be written back"
        );
    }
    tracing::warn!(
        went_back,
        rolled_back_from = incident.rolled_back_from,
        restored = incident.restored_total,
        lost = incident.lost_total,
        what = ?incident.restored,
        "seat store had lost writes; wrote back what this replica holds"
    );
}
