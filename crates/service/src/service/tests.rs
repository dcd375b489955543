//! The service's rules against the embedded store and a manual clock: no
//! network, no Redis process, no gRPC.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};

use super::*;
use crate::domain::{ManualClock, SeatReason, TryoutState};
use crate::mirror::{MirrorConfig, Verifier};
use crate::store::memory::MemoryStore;
use crate::upstream::{Backoff, LicensingServer, TryoutClaim, UpstreamError};

const SERIAL: &str = "0123456789AB";

fn t0() -> DateTime<Utc> {
    "2026-03-02T08:00:00Z".parse().unwrap()
}

/// A licensing server that never answers.
struct Unreachable;

#[async_trait::async_trait]
impl LicensingServer for Unreachable {
    async fn activate(&self, _: &str) -> Result<String, UpstreamError> {
        Err(UpstreamError::Transient("connection refused".into()))
    }
    async fn fetch_license(&self, _: &SerialNumber) -> Result<String, UpstreamError> {
        Err(UpstreamError::Transient("connection refused".into()))
    }
    async fn report_tryout(&self, _: &SerialNumber, _: DateTime<Utc>) -> Result<(), UpstreamError> {
        Err(UpstreamError::Transient("connection refused".into()))
    }
    async fn start_tryout(
        &self,
        _: &SerialNumber,
        _: DateTime<Utc>,
        _: &str,
    ) -> Result<Option<TryoutClaim>, UpstreamError> {
        Err(UpstreamError::Transient("connection refused".into()))
    }
    fn describe(&self) -> String {
        "unreachable".into()
    }
}

/// A replica of one VM PBX on the embedded store, with its state read once.
async fn replica(clock: &ManualClock, source: Option<Arc<dyn LicensingServer>>) -> Licensing {
    replica_of(clock, source, true).await
}

/// A replica; `synced`: its state read from the store once (else it has none).
async fn replica_of(
    clock: &ManualClock,
    source: Option<Arc<dyn LicensingServer>>,
    synced: bool,
) -> Licensing {
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let store = Arc::new(MemoryStore::new(clock.clone()));
    let serial = SerialNumber::parse(SERIAL).unwrap();
    let time = Arc::new(TimeAuthority::new(clock, 120_000));
    let verifier = Verifier {
        key: None,
        serial: serial.clone(),
        edition: Edition::Vm,
    };
    let mirror = Arc::new(Mirror::new(
        store.clone(),
        verifier,
        MirrorConfig::default(),
        time.clone(),
    ));
    if synced {
        mirror.resync_now().await.unwrap();
    }
    let settings = Settings {
        serial,
        edition: Edition::Vm,
        tryout: TryoutPolicy::default(),
        over_capacity_grace: Duration::days(7),
        vendor_key: None,
        grace: Duration::days(30),
        lapse_action: LapseAction::DenyNew,
        reconcile_interval: StdDuration::from_secs(3600),
        reconcile_jitter_percent: 0,
        code_ttl: Duration::minutes(10),
        backoff: Backoff {
            first: StdDuration::from_millis(1),
            max: StdDuration::from_millis(2),
            attempts: 2,
        },
        auth_mode: "protected",
        development_installation: false,
    };
    Licensing::new(store, mirror, time, settings, source)
}

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

#[tokio::test]
async fn the_tryout_licenses_three_test_seats_until_it_expires() {
    let clock = ManualClock::new(t0());
    let licensing = replica(&clock, None).await;
    let alice = user("alice");
    let before = licensing.check_seat(&alice, Feature::User).unwrap();
    assert_eq!(
        (before.check.licensed, before.check.reason),
        (false, SeatReason::NotActivated)
    );
    assert_eq!(
        licensing.start_tryout().await.unwrap().state,
        TryoutState::Active
    );
    for id in ["alice", "bob", "carol"] {
        let (seat, created) = licensing
            .assign_seat(&user(id), Feature::User)
            .await
            .unwrap();
        assert!(created);
        assert_eq!(seat.source, SeatSource::Tryout);
    }
    // Assigning again is idempotent; a fourth user finds the pool full.
    assert!(
        !licensing
            .assign_seat(&alice, Feature::User)
            .await
            .unwrap()
            .1
    );
    let full = licensing.assign_seat(&user("dave"), Feature::User).await;
    assert!(
        matches!(full, Err(LicensingError::NoFreeSeat { in_use: 3, .. })),
        "{full:?}"
    );
    let answer = licensing.check_seat(&alice, Feature::User).unwrap();
    assert!(answer.check.licensed && !answer.stale);

    clock.advance(Duration::days(14) + Duration::seconds(1));
    let over = licensing.check_seat(&alice, Feature::User).unwrap();
    assert_eq!(
        (over.check.licensed, over.check.reason),
        (false, SeatReason::TryoutOver)
    );
    assert!(licensing.release_seat(&alice, Feature::User).await.unwrap());
    assert!(!licensing.release_seat(&alice, Feature::User).await.unwrap());
}

#[tokio::test]
async fn a_licensing_server_outage_is_told_apart_from_a_store_outage_and_starts_nothing() {
    let clock = ManualClock::new(t0());
    let licensing = replica(&clock, Some(Arc::new(Unreachable))).await;
    let refused = licensing.start_tryout().await.unwrap_err();
    assert!(
        matches!(refused, LicensingError::LicensingServerUnavailable(_)),
        "{refused:?}"
    );
    assert_eq!(licensing.tryout_status().state, TryoutState::Available);
    let refused = licensing.activate_online().await.unwrap_err();
    assert!(
        matches!(refused, LicensingError::LicensingServerUnavailable(_)),
        "{refused:?}"
    );
    assert!(licensing.overview().entitlements.is_empty());
}

#[tokio::test]
async fn a_replica_without_state_answers_no_state_yet_never_not_licensed() {
    let clock = ManualClock::new(t0());
    let licensing = replica_of(&clock, None, false).await;
    let refused = licensing
        .check_seat(&user("alice"), Feature::User)
        .unwrap_err();
    assert!(
        matches!(refused, LicensingError::NoStateYet(_)),
        "{refused:?}"
    );
}
