//! Licenses over time: initialization (code and signed response), re-setup,
//! reconcile with the license source (on demand and on a schedule, one replica
//! at a time), grace and lapse, and the time-driven events.

use std::future::Future;
use std::time::{Duration as StdDuration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Duration, Utc};
use rand::Rng as _;

use super::{
    Attempt, Licensing, Overview, ReconcileReport, Versioned, store_error, upstream_error,
};
use crate::domain::clock;
use crate::domain::initcode::{InitializationCode, PendingInitialization};
use crate::domain::{
    ActivationState, AppliedLicense, Feature, InvalidInput, LapseAction, LicensePayload,
    LicensingError, ReconcileOutcome, ReconcileStatus, SignedLicense, TryoutState, tryout,
};
use crate::events::LicenseEvent;
use crate::metrics::metrics;
use crate::store::{LicenseWrite, StoredLicense};
use crate::upstream::UpstreamError;

/// How far a document's `issued_at` may lie ahead of this clock, and this clock
/// behind the last successful reconcile, before a rollback is suspected.
const CLOCK_TOLERANCE_MINUTES: i64 = 5;

/// How far this node's clock may lie behind the high-water clock before it
/// counts as gone back (small steps of time synchronisation are not).
const CLOCK_ROLLBACK_TOLERANCE_MS: i64 = 2_000;

/// How far the high-water clock moves before it is written to the store again
/// (about every 10 s with a running clock; at once after a jump).
const HIGH_WATER_STEP_MS: i64 = 10_000;

/// How long an on-demand reconcile waits for another replica's reconcile.
const LEASE_WAIT: StdDuration = StdDuration::from_secs(10);

/// Why a fetched document is not applied (the reconcile outcome and its reason).
type Refusal = (ReconcileOutcome, String);

/// Who asked for a reconcile.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    OnDemand,
    /// The schedule, holding the lease with this fencing token.
    Scheduled(u64),
}

impl Licensing {
    /// Makes a new initialization code (serial, edition, fresh nonce, checksum)
    /// and remembers its nonce; an earlier code stops being accepted.
    pub async fn create_initialization_code(&self) -> Result<Versioned<String>, LicensingError> {
        let now = self.now();
        let code = InitializationCode::new(self.settings.serial.clone(), self.settings.edition);
        // Checked: `now` may come from a stored clock, which nothing bounds.
        let expires_at = now.checked_add_signed(self.settings.code_ttl).ok_or_else(|| {
            LicensingError::Internal(format!(
                "the time {now} plus the code's lifetime is beyond the representable range (a broken clock)"
            ))
        })?;
        let pending = PendingInitialization {
            nonce: code.nonce.clone(),
            issued_at: now,
            expires_at,
        };
        let change = self
            .write(|| async {
                let change = self
                    .store
                    .set_initialization(self.mirror.floor().as_ref(), &pending)
                    .await?;
                self.mirror.apply_local(&change).await?;
                Ok(change)
            })
            .await?;
        Ok(Versioned {
            value: code.encode(),
            version: change.version,
        })
    }

    /// Applies the licensing server's signed answer to the latest initialization
    /// code. Anything not trusted is `INVALID_ARGUMENT` and changes nothing.
    pub async fn apply_activation(
        &self,
        response: &str,
    ) -> Result<Versioned<Overview>, LicensingError> {
        let invalid = |m: String| LicensingError::from(InvalidInput::new("activation_response", m));
        let signed = parse_response(response).map_err(invalid)?;
        let key = self.settings.vendor_key.as_ref().ok_or_else(|| {
            LicensingError::precondition(
                "NO_VENDOR_KEY",
                "no vendor_public_key configured: activation responses cannot be verified",
            )
        })?;
        let payload = signed
            .verify(key, &self.settings.serial, self.settings.edition)
            .map_err(|e| invalid(e.to_string()))?;
        let nonce = payload.nonce.clone().ok_or_else(|| {
            invalid("carries no initialization nonce: not an activation response".into())
        })?;
        // Applying the response that is already applied (a retry after an
        // answer was lost) is a success, not a replay.
        let signature = signed.signature.clone();
        let already = |l: &Licensing| {
            l.mirror.read(|s| {
                s.stored_license
                    .as_ref()
                    .is_some_and(|l| l.id() == signature)
            })
        };
        if already(self) {
            return self.overview_after(0).await;
        }
        let now = self.now();
        if let Err((_, why)) = self.check_clock(&payload, now) {
            return Err(invalid(why));
        }
        let applied = AppliedLicense {
            signed,
            payload,
            applied_at: now,
        };
        let (applied, already, nonce) = (&applied, &already, &nonce);
        let applied_here = self
            .with_retries("the licenses", move |attempt| async move {
                // After a resync: another replica may have applied it meanwhile.
                if attempt > 0 && already(self) {
                    return Ok(Attempt::Done(false));
                }
                let pending = self.mirror.read(|s| s.initialization.clone());
                let pending = match pending {
                    Some(p) if &p.nonce == nonce && now < p.expires_at => p,
                    Some(p) if &p.nonce == nonce => {
                        return Err(LicensingError::precondition(
                            "INITIALIZATION_CODE_EXPIRED",
                            format!(
                                "the activation response answers an initialization code that expired at {}; create a new code (CreateInitializationCode) and have it answered again",
                                p.expires_at
                            ),
                        ));
                    }
                    // The code may have been made on another replica a moment ago.
                    _ if attempt == 0 => return Ok(Attempt::Stale),
                    _ => {
                        return Err(invalid(
                            "answers another initialization code (stale, replayed, or for an older code); create a new code"
                                .into(),
                        ));
                    }
                };
                Ok(match self.write_license(applied, Some(&pending), None, now).await {
                    Attempt::Done(()) => Attempt::Done(true),
                    Attempt::Stale => Attempt::Stale,
                    Attempt::Refused(e) => Attempt::Refused(e),
                })
            })
            .await?;
        // Where this call's last write is visible (0: another replica applied it).
        let mut written = 0;
        if applied_here {
            (_, written) = self.record(ReconcileOutcome::Updated, None, now).await?;
            tracing::info!("activation response applied");
            // Fetch whatever else the licensing server holds for this serial.
            if self.source.is_some() {
                match self.reconcile().await {
                    Ok(report) => written = written.max(report.version),
                    Err(error) => tracing::warn!(%error, "reconcile after activation failed"),
                }
            }
        }
        self.overview_after(written).await
    }

    /// Initializes online: makes a code, has the licensing server answer it, and
    /// applies the answer (what an operator does by copy and paste otherwise).
    pub async fn activate_online(&self) -> Result<Versioned<Overview>, LicensingError> {
        let Some(source) = self.source.clone() else {
            return Err(LicensingError::precondition(
                "NO_LICENSE_SOURCE",
                "no licensing server configured (licensing_server.url)",
            ));
        };
        let code = self.create_initialization_code().await?.value;
        let response = self
            .settings
            .backoff
            .retry(|| source.activate(&code))
            .await
            .map_err(|e| upstream_error(e, "the activation", "ACTIVATION_REFUSED"))?;
        self.apply_activation(&response).await
    }

    /// Re-setup (Neuaufsetzen): back to the initial state. Seats, the license and
    /// the reconcile history go; the record that the serial used its tryout stays.
    pub async fn reset_activation(&self) -> Result<Versioned<Overview>, LicensingError> {
        let change = self
            .write(|| async {
                let change = self.store.reset(self.mirror.floor().as_ref()).await?;
                self.mirror.apply_local(&change).await?;
                Ok(change)
            })
            .await?;
        tracing::warn!("activation reset: seats and license removed (tryout record kept)");
        self.overview_after(change.version).await
    }

    /// Reconciles now (operator's request). Waits briefly if another replica is
    /// reconciling, so only one does at a time.
    pub async fn reconcile(&self) -> Result<ReconcileReport, LicensingError> {
        if self.source.is_none() {
            return Err(LicensingError::precondition(
                "NO_LICENSE_SOURCE",
                "no license source configured (licensing_server.url or license_file)",
            ));
        }
        let lease_ttl = self.lease_ttl();
        let started = std::time::Instant::now();
        loop {
            match self
                .store
                .acquire_lease(&self.replica_id, lease_ttl)
                .await
                .map_err(store_error)?
            {
                Some(_) => break,
                None if started.elapsed() < LEASE_WAIT => {
                    tokio::time::sleep(StdDuration::from_millis(100)).await;
                }
                None => {
                    return Err(LicensingError::Aborted(
                        "another replica is reconciling; retry shortly".into(),
                    ));
                }
            }
        }
        let report = self.run_reconcile(Trigger::OnDemand).await;
        if let Err(error) = self.store.release_lease(&self.replica_id).await {
            tracing::debug!(%error, "could not give the reconcile lease back; it expires by itself");
        }
        report
    }

    /// How long a reconcile lease lasts: enough for the retries of one reconcile.
    fn lease_ttl(&self) -> StdDuration {
        StdDuration::from_secs(30).min(self.settings.reconcile_interval / 2)
    }

    async fn run_reconcile(&self, trigger: Trigger) -> Result<ReconcileReport, LicensingError> {
        let _one_here = self.reconcile_lock.lock().await;
        let now = self.now();
        let fence = match trigger {
            Trigger::Scheduled(f) => Some(f),
            Trigger::OnDemand => None,
        };
        let outcome = match self.fetch().await {
            Err(refusal) => Err(refusal),
            Ok(applied) => self.apply_fetched(applied, fence, now).await?,
        };
        let (outcome, error) = match outcome {
            Ok(outcome) => (outcome, None),
            Err((outcome, error)) => (outcome, Some(error)),
        };
        crate::metrics::metrics().reconcile(outcome);
        match &error {
            Some(error) => tracing::warn!(?outcome, %error, "reconcile applied nothing"),
            None => tracing::info!(?outcome, "reconciled"),
        }
        let (next, version) = self.record(outcome, error.clone(), now).await?;
        Ok(ReconcileReport {
            outcome,
            entitlements: {
                let node = self.clock.now();
                self.mirror.read(|s| self.entitlements(s, s.now(node)))
            },
            reconciled_at: now,
            next_reconcile_at: next,
            error,
            version,
        })
    }

    /// Records a reconcile's outcome with the next scheduled time; returns it
    /// and the version the record is visible at.
    async fn record(
        &self,
        outcome: ReconcileOutcome,
        error: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<(Option<DateTime<Utc>>, u64), LicensingError> {
        let previous = self.mirror.read(|s| s.reconcile.clone());
        let succeeded = error.is_none();
        let next = now + self.next_interval();
        let status = ReconcileStatus {
            last_success_at: if succeeded {
                Some(now)
            } else {
                previous.last_success_at
            },
            last_attempt_at: Some(now),
            last_outcome: Some(outcome),
            last_error: error,
            next_reconcile_at: Some(next),
        };
        let change = self
            .write(|| async {
                let change = self
                    .store
                    .record_reconcile(self.mirror.floor().as_ref(), &status)
                    .await?;
                self.mirror.apply_local(&change).await?;
                Ok(change)
            })
            .await?;
        Ok((Some(next), change.version))
    }

    /// The interval with its random spread (so replicas and PBXs do not align).
    fn next_interval(&self) -> Duration {
        let base = self.settings.reconcile_interval.as_secs_f64();
        let spread = f64::from(self.settings.reconcile_jitter_percent) / 100.0;
        let factor = if spread > 0.0 {
            rand::thread_rng().gen_range(1.0 - spread..=1.0 + spread)
        } else {
            1.0
        };
        Duration::milliseconds((base * factor * 1000.0) as i64)
    }

    /// Fetches and verifies the document of this serial, retrying transient failures.
    async fn fetch(&self) -> Result<AppliedLicense, Refusal> {
        let source = self.source.as_ref().ok_or((
            ReconcileOutcome::Unreachable,
            "no license source configured".to_owned(),
        ))?;
        // The daily peaks of the concurrent features go with every reconcile
        // (the last 7 days: a reconcile that failed for days reports them late).
        let usage = self.usage_report().await;
        let text = self
            .settings
            .backoff
            .retry(|| source.fetch_license_reporting(&self.settings.serial, &usage))
            .await
            .map_err(|e| match e {
                UpstreamError::Transient(m) => (ReconcileOutcome::Unreachable, m),
                UpstreamError::Conclusive(m) => (ReconcileOutcome::Rejected, m),
            })?;
        let key = self.settings.vendor_key.as_ref().ok_or((
            ReconcileOutcome::Rejected,
            "no vendor_public_key configured".to_owned(),
        ))?;
        let reject =
            |e: crate::domain::LicenseRejection| (ReconcileOutcome::Rejected, e.to_string());
        let signed = SignedLicense::from_json(&text).map_err(reject)?;
        let payload = signed
            .verify(key, &self.settings.serial, self.settings.edition)
            .map_err(reject)?;
        let now = self.now();
        self.check_clock(&payload, now)?;
        Ok(AppliedLicense {
            signed,
            payload,
            applied_at: now,
        })
    }

    /// Rollback detection: a document from the future, or a clock that went back
    /// past the last successful reconcile, is not trusted.
    fn check_clock(&self, payload: &LicensePayload, now: DateTime<Utc>) -> Result<(), Refusal> {
        let tolerance = Duration::minutes(CLOCK_TOLERANCE_MINUTES);
        if payload.issued_at > now + tolerance {
            return Err((
                ReconcileOutcome::Rejected,
                format!(
                    "license issued at {} lies in the future of this clock ({now}): clock rolled back?",
                    payload.issued_at
                ),
            ));
        }
        let last = self.mirror.read(|s| s.reconcile.last_success_at);
        if let Some(last) = last
            && now + tolerance < last
        {
            return Err((
                ReconcileOutcome::Rejected,
                format!(
                    "this clock ({now}) is before the last successful reconcile ({last}): clock rolled back?"
                ),
            ));
        }
        Ok(())
    }

    /// Applies a fetched document when it is new.
    async fn apply_fetched(
        &self,
        new: AppliedLicense,
        fence: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<Result<ReconcileOutcome, Refusal>, LicensingError> {
        let new = &new;
        self.with_retries("the license", move |_| async move {
            // Checked again on every attempt: a resync may have brought a newer
            // document. An older one is refused also after a re-setup removed
            // the newer one (it is kept as the retired license).
            let (current, newest) = self
                .mirror
                .read(|s| (s.license.clone(), s.newest_license_issued_at()));
            if current.as_ref().is_some_and(|c| c.id() == new.id()) {
                return Ok(Attempt::Done(Ok(ReconcileOutcome::Unchanged)));
            }
            if let Some(newest) = newest
                && new.payload.issued_at < newest
            {
                return Ok(Attempt::Done(Err((
                    ReconcileOutcome::Rejected,
                    format!(
                        "license issued {} is older than one applied before ({newest})",
                        new.payload.issued_at
                    ),
                ))));
            }
            match self.write_license(new, None, fence, now).await {
                Attempt::Done(()) => Ok(Attempt::Done(Ok(ReconcileOutcome::Updated))),
                // Our lease ran out and another replica holds it now: leave
                // the outcome to that replica (nothing is recorded).
                Attempt::Stale if fence.is_some() => Err(LicensingError::Aborted(
                    "the reconcile lease passed to another replica, which records the outcome"
                        .into(),
                )),
                Attempt::Stale => Ok(Attempt::Stale),
                Attempt::Refused(e) => Ok(Attempt::Refused(e)),
            }
        })
        .await
    }

    /// Writes a verified document with its consequences (tryout end, capacity
    /// flags, a consumed initialization) in one step; `Stale` when the stored
    /// state moved meanwhile, `Refused` when the store did not take it.
    async fn write_license(
        &self,
        new: &AppliedLicense,
        consume: Option<&PendingInitialization>,
        fence: Option<u64>,
        now: DateTime<Utc>,
    ) -> Attempt<()> {
        let (current_id, tryout_record) = self.mirror.read(|s| {
            (
                s.stored_license.as_ref().map(|l| l.id().to_owned()),
                s.tryout.clone(),
            )
        });
        let buys_users = new
            .payload
            .entitlement(Feature::User)
            .is_some_and(|e| e.quantity > 0);
        let tryout_change = buys_users
            .then(|| tryout::on_purchase(self.settings.edition, tryout_record.as_ref(), now))
            .flatten();
        let capacities: Vec<(Feature, u32)> = Feature::SEATS
            .into_iter()
            .map(|f| {
                let q = new
                    .payload
                    .entitlement(f)
                    .filter(|e| e.is_current(now))
                    .map_or(0, |e| e.quantity);
                (f, q)
            })
            .collect();
        let stored = StoredLicense {
            signed: new.signed.clone(),
            applied_at: now,
        };
        let written = self
            .store
            .apply_license(
                self.mirror.floor().as_ref(),
                LicenseWrite {
                    expected_id: current_id.as_deref(),
                    license: &stored,
                    tryout: tryout_change.as_ref().map(|t| (tryout_record.as_ref(), t)),
                    capacities: &capacities,
                    consume_initialization: consume,
                    fence,
                },
            )
            .await;
        let changes = match written {
            Ok(Some(changes)) => changes,
            Ok(None) => return Attempt::Stale,
            Err(e) => return Attempt::Refused(e),
        };
        for change in &changes {
            if let Err(e) = self.mirror.apply_local(change).await {
                return Attempt::Refused(e);
            }
        }
        Attempt::Done(())
    }

    /// Runs the schedule until `stopped`: reconciles when due (one replica, under
    /// the lease), performs the lapse action, and announces time-driven events.
    pub async fn run_schedule(&self, tick: StdDuration, stopped: impl Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut seen = TimeState::default();
        loop {
            self.tick(&mut seen).await;
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = &mut stopped => return,
            }
        }
    }

    async fn tick(&self, seen: &mut TimeState) {
        self.keep_high_water(seen).await;
        let now = self.now();
        self.announce_time_events(seen, now);
        // Today's lease usage for the overview and the metrics: the store's
        // record (every replica's acquisitions), read every 30 s while a
        // feature is sold for concurrent use.
        let concurrent = self.mirror.read(|s| {
            s.license.as_ref().is_some_and(|l| {
                l.payload
                    .entitlements
                    .iter()
                    .any(|e| e.seat_model == crate::domain::SeatModel::Concurrent)
            })
        });
        if concurrent
            && seen
                .usage_read
                .is_none_or(|at| at.elapsed() >= StdDuration::from_secs(30))
        {
            seen.usage_read = Some(Instant::now());
            if let Err(error) = self.refresh_usage(1).await {
                tracing::debug!(%error, "lease usage not read");
            }
        }
        // Before the reference was ever read this clock is unchecked: nothing it
        // would stamp into the shared reconcile record (when it ran, when the
        // next is due) is written yet.
        if self.source.is_none() || self.mirror.is_stale() || self.time.skew_ms().is_none() {
            return;
        }
        let (due, lapsed) = self.mirror.read(|s| {
            let due = self.schedule_due(s, now);
            let a = self.activation(s, now);
            (
                due,
                a.state == ActivationState::Lapsed && s.license.is_some(),
            )
        });
        let reset = lapsed && self.settings.lapse_action == LapseAction::Reset;
        if !due && !reset {
            return;
        }
        let fence = match self
            .store
            .acquire_lease(&self.replica_id, self.lease_ttl())
            .await
        {
            Ok(Some(fence)) => fence,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(%error, "reconcile schedule: lease not available");
                return;
            }
        };
        self.scheduled(fence, reset).await;
        if let Err(error) = self.store.release_lease(&self.replica_id).await {
            tracing::debug!(%error, "could not give the reconcile lease back; it expires by itself");
        }
    }

    /// Keeps time on each tick (the time authority). Reads the deployment's
    /// reference (the store's own time, Redis `TIME`) together with the shared
    /// high-water mark, judges this node's clock against it (`clock::judge`),
    /// and decides from then on at the corrected time. A node clock beyond
    /// `clock.max_skew_ms` from the reference is reported once (event, metric,
    /// log) and moves nobody's time: it writes no mark, and the store caps every
    /// mark at its own time anyway. A node clock that went back behind the mark
    /// is reported too (`clock_rolled_back`); decisions keep the mark. Every few
    /// ticks the mark goes to the store, where every replica (and a restarted
    /// one) finds it.
    async fn keep_high_water(&self, seen: &mut TimeState) {
        // Only an agreeing clock offers its time to the shared mark, and only
        // what the store would take (up to its time): not a write every tick.
        let mine = self.mirror.read(|s| s.high_water_ms);
        let takes = seen.reference.map_or(mine, |(at, read)| {
            mine.min(at.saturating_add(elapsed_ms(read)))
        });
        let offer = if !self.time.skewed() && takes - seen.high_water_stored >= HIGH_WATER_STEP_MS {
            mine
        } else {
            0
        };
        match self.store.advance_clock(offer).await {
            Ok(reading) => {
                seen.high_water_stored = reading.high_water_ms;
                seen.reference = Some((reading.reference_ms, Instant::now()));
                self.mirror.raise_high_water(reading.high_water_ms);
            }
            Err(error) => {
                tracing::debug!(%error, "reference time not read; keeping the last reading")
            }
        }
        let node = self.time.node_now();
        let (previous_mark_ms, signed_floor_ms) = self.mirror.read(|s| {
            (
                s.high_water_ms,
                s.newest_license_issued_at().map(|t| t.timestamp_millis()),
            )
        });
        let verdict = clock::judge(clock::TimeInputs {
            node_ms: node.timestamp_millis(),
            reference: seen.reference.map(|(at_ms, read)| clock::Reference {
                at_ms,
                elapsed_ms: elapsed_ms(read),
            }),
            previous_mark_ms,
            signed_floor_ms,
            max_skew_ms: self.time.max_skew_ms(),
        });
        self.time.adopt(&verdict);
        self.mirror.raise_high_water(verdict.mark_ms);
        let skew = verdict.skew_ms.unwrap_or(0);
        if verdict.skewed && !seen.clock_skewed {
            metrics().clock_skew();
            tracing::error!(
                skew_ms = skew,
                max_skew_ms = self.time.max_skew_ms(),
                "this node's clock disagrees with the reference time (the seat store's clock); time-based decisions use the reference until it agrees"
            );
            self.mirror
                .events()
                .publish(
                    LicenseEvent::new("clock_skewed", self.now()).detail(format!(
                        "node clock {skew} ms from the reference time (tolerance {} ms)",
                        self.time.max_skew_ms()
                    )),
                );
        } else if !verdict.skewed && seen.clock_skewed {
            tracing::info!(
                skew_ms = skew,
                "this node's clock agrees with the reference time again"
            );
        }
        seen.clock_skewed = verdict.skewed;
        let behind = previous_mark_ms - node.timestamp_millis();
        let rolled_back = behind > CLOCK_ROLLBACK_TOLERANCE_MS;
        if rolled_back && !seen.clock_rolled_back {
            metrics().clock_rollback();
            tracing::error!(
                behind_ms = behind,
                "this node's clock went back behind the largest time seen; time-based decisions keep the high-water time"
            );
            self.mirror
                .events()
                .publish(LicenseEvent::new("clock_rolled_back", node).detail(format!(
                    "node clock {behind} ms behind the high-water clock"
                )));
        }
        seen.clock_rolled_back = rolled_back;
    }

    /// Whether this node's clock is behind the high-water clock now.
    pub(crate) fn clock_rolled_back(&self) -> bool {
        let node = self.time.node_now().timestamp_millis();
        self.mirror.read(|s| s.high_water_ms) - node > CLOCK_ROLLBACK_TOLERANCE_MS
    }

    /// What the schedule does while holding the lease. The copy may be a moment
    /// behind another replica that just reconciled: read the store again before
    /// deciding, so one reconcile happens per interval, not one per replica.
    async fn scheduled(&self, fence: u64, reset: bool) {
        if let Err(error) = self.mirror.resync_now().await {
            tracing::debug!(%error, "reconcile schedule: store not readable");
            return;
        }
        let now = self.now();
        let (due, lapsed) = self.mirror.read(|s| {
            (
                self.schedule_due(s, now),
                self.activation(s, now).state == ActivationState::Lapsed && s.license.is_some(),
            )
        });
        if reset && lapsed {
            tracing::warn!(
                "activation lapsed and lapse_action is reset: returning to the initial state"
            );
            if let Err(error) = self.reset_activation().await {
                tracing::warn!(%error, "lapse reset failed");
            }
            return;
        }
        if !due {
            return;
        }
        let span = tracing::info_span!("reconcile", serial_number = %self.settings.serial, trigger = "schedule");
        let _ =
            tracing::Instrument::instrument(self.run_reconcile(Trigger::Scheduled(fence)), span)
                .await
                .inspect_err(|error| tracing::warn!(%error, "scheduled reconcile failed"));
    }

    /// Whether a scheduled reconcile is due: when the schedule says, and, for a
    /// licensing server, only once the PBX is initialized.
    fn schedule_due(&self, state: &crate::mirror::MirrorState, now: DateTime<Utc>) -> bool {
        let initialized = state.license.is_some()
            || self
                .source
                .as_ref()
                .is_some_and(|s| !s.requires_activation());
        initialized && state.reconcile.next_reconcile_at.is_none_or(|t| now >= t)
    }

    /// Announces transitions that happen by time alone: tryout expiring (7, 3, 1
    /// days left) and expired, grace entered, activation lapsed.
    fn announce_time_events(&self, seen: &mut TimeState, now: DateTime<Utc>) {
        let (tryout, activation) = self
            .mirror
            .read(|s| (self.tryout_view(s, now), self.activation(s, now)));
        let events = self.mirror.events();
        if tryout.state == TryoutState::Active {
            for threshold in [7, 3, 1] {
                if tryout.days_remaining <= threshold
                    && seen.tryout_warned.is_none_or(|w| w > threshold)
                    && seen.tryout_state.is_some()
                {
                    let mut e = LicenseEvent::new("tryout_expiring", now)
                        .detail(format!("{} days left", tryout.days_remaining));
                    e.days_remaining = Some(tryout.days_remaining);
                    events.publish(e);
                    seen.tryout_warned = Some(threshold);
                    break;
                }
            }
            if seen.tryout_state.is_none() {
                // First look: remember where we are without announcing the past.
                seen.tryout_warned = [7, 3, 1]
                    .into_iter()
                    .filter(|t| tryout.days_remaining <= *t)
                    .min();
            }
        } else {
            seen.tryout_warned = None;
        }
        if seen.tryout_state == Some(TryoutState::Active) && tryout.state == TryoutState::Expired {
            events.publish(LicenseEvent::new("tryout_expired", now));
        }
        seen.tryout_state = Some(tryout.state);
        if seen.activation.is_some_and(|a| a != activation.state) {
            match activation.state {
                ActivationState::Grace => {
                    let mut e = LicenseEvent::new("grace_entered", now);
                    if let Some(end) = activation.grace_ends_at {
                        e.days_remaining = Some(days_until(end, now));
                        e.detail = format!("grace ends at {end}");
                    }
                    events.publish(e);
                }
                ActivationState::Lapsed => {
                    events.publish(LicenseEvent::new("activation_lapsed", now))
                }
                _ => {}
            }
        }
        seen.activation = Some(activation.state);
    }
}

/// What the schedule last saw, to announce only transitions.
#[derive(Debug, Default)]
struct TimeState {
    tryout_state: Option<TryoutState>,
    /// The smallest "days left" threshold already announced.
    tryout_warned: Option<u32>,
    activation: Option<ActivationState>,
    /// Whether the node clock was behind the high-water clock at the last tick.
    clock_rolled_back: bool,
    /// Whether the node clock disagreed with the reference at the last tick.
    clock_skewed: bool,
    /// The high-water clock as last stored.
    high_water_stored: i64,
    /// The reference time last read (ms), and when by the monotonic clock: the
    /// reference now is that plus the real time passed, also while the store
    /// does not answer.
    reference: Option<(i64, Instant)>,
    /// When the lease usage (today's peaks and busy counts) was last read.
    usage_read: Option<Instant>,
}

/// Real time passed since `since` (ms), by the monotonic clock.
fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

fn days_until(end: DateTime<Utc>, now: DateTime<Utc>) -> u32 {
    u32::try_from(((end - now).num_seconds().max(0) + 86_399) / 86_400).unwrap_or(u32::MAX)
}

/// Reads an activation response as an operator pastes it: the signed document's
/// JSON, or that JSON in base64; surrounding white space and line breaks ignored.
pub fn parse_response(text: &str) -> Result<SignedLicense, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("must not be empty".into());
    }
    if trimmed.starts_with('{') {
        return SignedLicense::from_json(trimmed).map_err(|e| e.to_string());
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = B64
        .decode(compact.as_bytes())
        .map_err(|_| "is neither a signed license document (JSON) nor base64 of one".to_owned())?;
    let json =
        String::from_utf8(bytes).map_err(|_| "decodes to something that is not text".to_owned())?;
    SignedLicense::from_json(&json).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::license::testing::{key, payload};

    #[test]
    fn responses_are_read_as_pasted() {
        let signed = SignedLicense::sign(&payload("S", 1), &key(1));
        let json = signed.to_json();
        assert_eq!(parse_response(&format!("\n  {json}\n")).unwrap(), signed);
        let b64 = B64.encode(json.as_bytes());
        let wrapped: String = b64
            .as_bytes()
            .chunks(60)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(parse_response(&wrapped).unwrap(), signed);
        assert!(parse_response("").is_err());
        assert!(parse_response("not a response").is_err());
        assert!(parse_response("{\"format\":\"x\"}").is_err());
    }

    #[test]
    fn days_round_up() {
        let now: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(days_until(now + Duration::hours(1), now), 1);
        assert_eq!(days_until(now + Duration::days(7), now), 7);
        assert_eq!(days_until(now - Duration::days(1), now), 0);
    }
}
