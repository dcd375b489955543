//! The application service: validated requests in, domain decisions, store writes,
//! mirror reads. Knows nothing of gRPC; the `grpc` module adapts it.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex as AsyncMutex;

use crate::domain::{
    AppliedLicense, Clock, Edition, Entitlement, Feature, InvalidInput, Licenses, LicensingError,
    ReconcileOutcome, ReconcileStatus, Seat, SeatCheck, SeatSource, SerialNumber, SignedLicense,
    TryoutPolicy, TryoutView, UserId, tryout,
};
use crate::mirror::{Mirror, MirrorState};
use crate::store::{AssignOutcome, SeatKey, Store, StoreError, StoredLicense};

/// Default and largest `ListSeats` page sizes.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// How often a write re-plans after finding the mirror out of date before giving up.
const WRITE_ATTEMPTS: usize = 3;

/// The settings the service decides with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub serial: SerialNumber,
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    pub over_capacity_grace: Duration,
    /// The signed license file reconcile reads; `None` when there is none.
    pub license_file: Option<PathBuf>,
    pub vendor_key: Option<VerifyingKey>,
}

/// The answer to `CheckSeat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckAnswer {
    pub check: SeatCheck,
    /// Answered from a copy that may be out of date (store unreachable).
    pub stale: bool,
}

/// One page of seats.
#[derive(Debug, Clone)]
pub struct SeatPage {
    pub seats: Vec<Seat>,
    pub next_page_token: String,
}

/// An entitlement with the seats held of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitlementUse {
    pub entitlement: Entitlement,
    pub in_use: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationState {
    NotInitialized,
    Active,
}

/// The operator's overview.
#[derive(Debug, Clone)]
pub struct Overview {
    pub serial: SerialNumber,
    pub edition: Edition,
    pub activation: ActivationState,
    pub system_activated: bool,
    pub entitlements: Vec<EntitlementUse>,
    pub tryout: TryoutView,
    pub reconcile: ReconcileStatus,
    pub license_source: String,
    /// Why the stored license is not trusted, if it is not.
    pub license_problem: Option<String>,
    /// When activation lapses while the license source stays unreachable; `None`
    /// when not in grace.
    pub grace_ends_at: Option<DateTime<Utc>>,
}

/// What `Reconcile` answers.
#[derive(Debug, Clone)]
pub struct ReconcileReport {
    pub outcome: ReconcileOutcome,
    pub entitlements: Vec<EntitlementUse>,
    pub reconciled_at: DateTime<Utc>,
    pub error: Option<String>,
}

/// The opaque `page_token`: where the next page starts, and for which filter.
#[derive(Debug, Serialize, Deserialize)]
struct PageToken {
    v: u32,
    /// The feature filter the token was made for (`None` = all).
    filter: Option<Feature>,
    feature: Feature,
    user: String,
}

pub struct Licensing {
    store: Arc<dyn Store>,
    mirror: Arc<Mirror>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    // One reconcile at a time in this replica.
    reconcile_lock: AsyncMutex<()>,
}

fn store_error(e: StoreError) -> LicensingError {
    match e {
        StoreError::Unavailable(m) => LicensingError::Unavailable(m),
        StoreError::NotInitialized => LicensingError::Unavailable(
            "seat store is empty or being repaired; retry shortly".into(),
        ),
        StoreError::Corrupt(m) => LicensingError::Internal(m),
    }
}

impl Licensing {
    pub fn new(
        store: Arc<dyn Store>,
        mirror: Arc<Mirror>,
        clock: Arc<dyn Clock>,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            mirror,
            clock,
            settings,
            reconcile_lock: AsyncMutex::new(()),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn licenses<'a>(&self, state: &'a MirrorState) -> Licenses<'a> {
        Licenses {
            edition: self.settings.edition,
            license: state.license.as_ref(),
            tryout: state.tryout.as_ref(),
            tryout_policy: self.settings.tryout,
            over_capacity_grace: self.settings.over_capacity_grace,
        }
    }

    /// The hot path: answered from the mirror, never waiting for the store.
    pub fn check_seat(&self, user: &UserId, feature: Feature) -> CheckAnswer {
        let now = self.clock.now();
        let check = self.mirror.read(|state| {
            let seat = state
                .seat(feature, user.as_str())
                .map(|s| s.to_seat(user.clone(), feature));
            self.licenses(state).check_seat(seat.as_ref(), now)
        });
        CheckAnswer {
            check,
            stale: self.mirror.is_stale(),
        }
    }

    /// Gives the user a seat; `created` is false when they already held one.
    pub async fn assign_seat(
        &self,
        user: &UserId,
        feature: Feature,
    ) -> Result<(Seat, bool), LicensingError> {
        if !feature.is_seat() {
            return Err(
                InvalidInput::new("feature", format!("{feature} is not a seat feature")).into(),
            );
        }
        for attempt in 0..WRITE_ATTEMPTS {
            let now = self.clock.now();
            let plan = self.mirror.read(|state| {
                self.licenses(state)
                    .plan_assign(feature, now, |f| state.count(f, SeatSource::Purchased))
            });
            let plan = match plan {
                Ok(plan) => plan,
                // The copy may be a moment behind a license applied elsewhere:
                // look once more before refusing.
                Err(e) if attempt == 0 && !matches!(e, LicensingError::InvalidInput(_)) => {
                    self.mirror
                        .resync_now(self.store.as_ref())
                        .await
                        .map_err(store_error)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self
                .store
                .assign_seat(user, feature, &plan)
                .await
                .map_err(store_error)?
            {
                AssignOutcome::Created(change) => {
                    self.mirror.apply_local(&change).await;
                    let crate::store::ChangeKind::SeatAssigned(seat) = change.kind else {
                        return Err(LicensingError::Internal(
                            "assign reported another change".into(),
                        ));
                    };
                    return Ok((seat, true));
                }
                AssignOutcome::Existing(seat) => return Ok((seat, false)),
                AssignOutcome::Exhausted { capacity, in_use } => {
                    return Err(LicensingError::NoFreeSeat {
                        feature,
                        capacity,
                        in_use,
                    });
                }
                AssignOutcome::LicenseChanged => {
                    self.mirror
                        .resync_now(self.store.as_ref())
                        .await
                        .map_err(store_error)?;
                }
            }
        }
        Err(LicensingError::Unavailable(
            "licenses changed during the assignment; retry".into(),
        ))
    }

    /// Frees the user's seat; `false` when there was none.
    pub async fn release_seat(
        &self,
        user: &UserId,
        feature: Feature,
    ) -> Result<bool, LicensingError> {
        match self
            .store
            .release_seat(user, feature)
            .await
            .map_err(store_error)?
        {
            Some(change) => {
                self.mirror.apply_local(&change).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// One page of seats, ordered by feature then user id. `feature` empty lists all.
    pub async fn list_seats(
        &self,
        feature: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<SeatPage, LicensingError> {
        let filter = if feature.is_empty() {
            None
        } else {
            Some(Feature::parse_seat(feature)?)
        };
        let size = match page_size {
            n if n < 0 => {
                return Err(InvalidInput::new("page_size", "must not be negative").into());
            }
            0 => DEFAULT_PAGE_SIZE,
            n => usize::try_from(n)
                .unwrap_or(MAX_PAGE_SIZE)
                .min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token, filter)?)
        };
        let mut seats = self
            .store
            .list_seats(filter, after.as_ref(), size + 1)
            .await
            .map_err(store_error)?;
        let next_page_token = if seats.len() > size {
            seats.truncate(size);
            let last = seats.last().expect("a full page has a last seat");
            encode_token(filter, last)
        } else {
            String::new()
        };
        Ok(SeatPage {
            seats,
            next_page_token,
        })
    }

    pub fn tryout_status(&self) -> TryoutView {
        let now = self.clock.now();
        self.mirror.read(|state| self.tryout_view(state, now))
    }

    fn tryout_view(&self, state: &MirrorState, now: DateTime<Utc>) -> TryoutView {
        tryout::view(
            self.settings.edition,
            state.tryout.as_ref(),
            now,
            self.settings.tryout,
            state.count(Feature::User, SeatSource::Tryout),
        )
    }

    pub async fn start_tryout(&self) -> Result<TryoutView, LicensingError> {
        self.change_tryout(|current, now| {
            tryout::start(self.settings.edition, current, now, self.settings.tryout).map(Some)
        })
        .await
    }

    pub async fn end_tryout(&self) -> Result<TryoutView, LicensingError> {
        self.change_tryout(|current, now| tryout::end(self.settings.edition, current, now))
            .await
    }

    /// Decides a tryout transition on the mirrored record and writes it with
    /// compare-and-set, re-reading when another replica got there first.
    async fn change_tryout(
        &self,
        decide: impl Fn(
            Option<&crate::domain::TryoutRecord>,
            DateTime<Utc>,
        ) -> Result<Option<crate::domain::TryoutRecord>, LicensingError>,
    ) -> Result<TryoutView, LicensingError> {
        for _ in 0..WRITE_ATTEMPTS {
            let now = self.clock.now();
            let current = self.mirror.read(|s| s.tryout.clone());
            let Some(new) = decide(current.as_ref(), now)? else {
                return Ok(self.tryout_status());
            };
            match self
                .store
                .compare_and_set_tryout(current.as_ref(), &new)
                .await
                .map_err(store_error)?
            {
                Some(change) => {
                    self.mirror.apply_local(&change).await;
                    return Ok(self.tryout_status());
                }
                None => self
                    .mirror
                    .resync_now(self.store.as_ref())
                    .await
                    .map_err(store_error)?,
            }
        }
        Err(LicensingError::Unavailable(
            "tryout changed concurrently; retry".into(),
        ))
    }

    fn entitlements(&self, state: &MirrorState) -> Vec<EntitlementUse> {
        state
            .license
            .as_ref()
            .map(|l| {
                l.payload
                    .entitlements
                    .iter()
                    .map(|e| EntitlementUse {
                        entitlement: e.clone(),
                        in_use: if e.feature.is_seat() {
                            state.count(e.feature, SeatSource::Purchased)
                        } else {
                            u32::from(e.quantity > 0)
                        },
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn overview(&self) -> Overview {
        let now = self.clock.now();
        self.mirror.read(|state| Overview {
            serial: self.settings.serial.clone(),
            edition: self.settings.edition,
            activation: if state.license.is_some() {
                ActivationState::Active
            } else {
                ActivationState::NotInitialized
            },
            system_activated: self.licenses(state).system_activated(now),
            entitlements: self.entitlements(state),
            tryout: self.tryout_view(state, now),
            reconcile: state.reconcile.clone(),
            license_source: self.license_source(),
            license_problem: state.license_problem.clone(),
            grace_ends_at: None,
        })
    }

    fn license_source(&self) -> String {
        match &self.settings.license_file {
            Some(path) => format!("license file {}", path.display()),
            None => "none configured".to_owned(),
        }
    }

    /// Reads the license source, verifies it and applies it when it is new.
    pub async fn reconcile(&self) -> Result<ReconcileReport, LicensingError> {
        let _one_at_a_time = self.reconcile_lock.lock().await;
        let now = self.clock.now();
        let (outcome, error) = match self.fetch_license().await {
            Err((outcome, error)) => (outcome, Some(error)),
            Ok(applied) => match self.apply(applied, now).await? {
                Ok(outcome) => (outcome, None),
                Err(error) => (ReconcileOutcome::Rejected, Some(error)),
            },
        };
        crate::metrics::metrics().reconcile(outcome);
        if let Some(error) = &error {
            tracing::warn!(?outcome, %error, "reconcile applied nothing");
        } else {
            tracing::info!(?outcome, "reconciled");
        }
        let previous = self.mirror.read(|s| s.reconcile.clone());
        let status = ReconcileStatus {
            last_success_at: if error.is_none() {
                Some(now)
            } else {
                previous.last_success_at
            },
            last_attempt_at: Some(now),
            last_outcome: Some(outcome),
            last_error: error.clone(),
        };
        let change = self
            .store
            .record_reconcile(&status)
            .await
            .map_err(store_error)?;
        self.mirror.apply_local(&change).await;
        Ok(ReconcileReport {
            outcome,
            entitlements: self.mirror.read(|s| self.entitlements(s)),
            reconciled_at: now,
            error,
        })
    }

    /// Reads and verifies the license file.
    async fn fetch_license(&self) -> Result<AppliedLicense, (ReconcileOutcome, String)> {
        let Some(path) = &self.settings.license_file else {
            return Err((
                ReconcileOutcome::Unreachable,
                "no license source configured (license_file)".into(),
            ));
        };
        let text = tokio::fs::read_to_string(path).await.map_err(|e| {
            (
                ReconcileOutcome::Unreachable,
                format!("read license file {}: {e}", path.display()),
            )
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
        Ok(AppliedLicense {
            signed,
            payload,
            applied_at: self.clock.now(),
        })
    }

    /// Applies a verified document if it is new; the inner `Err` says why it was
    /// not trusted.
    async fn apply(
        &self,
        new: AppliedLicense,
        now: DateTime<Utc>,
    ) -> Result<Result<ReconcileOutcome, String>, LicensingError> {
        for _ in 0..WRITE_ATTEMPTS {
            let (current, tryout_record) =
                self.mirror.read(|s| (s.license.clone(), s.tryout.clone()));
            let current_stored = self.mirror.read(|s| s.stored_license.clone());
            if let Some(current) = &current {
                if current.id() == new.id() {
                    return Ok(Ok(ReconcileOutcome::Unchanged));
                }
                if new.payload.issued_at < current.payload.issued_at {
                    return Ok(Err(format!(
                        "license issued {} is older than the applied one ({})",
                        new.payload.issued_at, current.payload.issued_at
                    )));
                }
            }
            let buys_users = new
                .payload
                .entitlement(Feature::User)
                .is_some_and(|e| e.quantity > 0);
            let tryout_change = buys_users
                .then(|| tryout::on_purchase(self.settings.edition, tryout_record.as_ref(), now))
                .flatten();
            let stored = StoredLicense {
                signed: new.signed.clone(),
                applied_at: now,
            };
            let written = self
                .store
                .apply_license(
                    current_stored.as_ref().map(StoredLicense::id),
                    &stored,
                    tryout_change.as_ref().map(|t| (tryout_record.as_ref(), t)),
                )
                .await
                .map_err(store_error)?;
            match written {
                Some(changes) => {
                    for change in &changes {
                        self.mirror.apply_local(change).await;
                    }
                    return Ok(Ok(ReconcileOutcome::Updated));
                }
                None => self
                    .mirror
                    .resync_now(self.store.as_ref())
                    .await
                    .map_err(store_error)?,
            }
        }
        Err(LicensingError::Unavailable(
            "license changed concurrently; retry".into(),
        ))
    }
}

fn encode_token(filter: Option<Feature>, last: &Seat) -> String {
    let token = PageToken {
        v: 1,
        filter,
        feature: last.feature,
        user: last.user_id.as_str().to_owned(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a page token always serializes"))
}

fn decode_token(raw: &str, filter: Option<Feature>) -> Result<SeatKey, InvalidInput> {
    let bad = || {
        InvalidInput::new(
            "page_token",
            "is not a token from a previous ListSeats response",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if token.v != 1 {
        return Err(bad());
    }
    if token.filter != filter {
        return Err(InvalidInput::new(
            "page_token",
            "was made for another feature filter",
        ));
    }
    Ok(SeatKey {
        feature: token.feature,
        user_id: UserId::parse(&token.user).map_err(|_| bad())?,
    })
}
