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
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    replica_on(store, clock, source, synced).await
}

/// A replica on `store` (several replicas share one). No sync task runs: the
/// copy moves only with the replica's own writes and its resyncs.
async fn replica_on(
    store: Arc<MemoryStore>,
    clock: &ManualClock,
    source: Option<Arc<dyn LicensingServer>>,
    synced: bool,
) -> Licensing {
    replica_trusting(store, clock, source, synced, None).await
}

/// [`replica_on`], trusting licenses signed by `vendor_key`.
async fn replica_trusting(
    store: Arc<MemoryStore>,
    clock: &ManualClock,
    source: Option<Arc<dyn LicensingServer>>,
    synced: bool,
    vendor_key: Option<ed25519_dalek::VerifyingKey>,
) -> Licensing {
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let serial = SerialNumber::parse(SERIAL).unwrap();
    let time = Arc::new(TimeAuthority::new(clock, 120_000));
    let verifier = Verifier {
        key: vendor_key,
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
        vendor_key,
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
        consistency_max_wait: StdDuration::from_millis(100),
        lease_duration: StdDuration::from_secs(90),
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
        licensing.start_tryout().await.unwrap().value.state,
        TryoutState::Active
    );
    for id in ["alice", "bob", "carol"] {
        let assigned = licensing
            .assign_seat(&user(id), Feature::User)
            .await
            .unwrap();
        assert!(assigned.created);
        assert_eq!(assigned.seat.source, SeatSource::Tryout);
    }
    // Assigning again is idempotent; a fourth user finds the pool full.
    assert!(
        !licensing
            .assign_seat(&alice, Feature::User)
            .await
            .unwrap()
            .created
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
    assert!(
        licensing
            .release_seat(&alice, Feature::User)
            .await
            .unwrap()
            .value
    );
    assert!(
        !licensing
            .release_seat(&alice, Feature::User)
            .await
            .unwrap()
            .value
    );
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

/// Every write answers the version its outcome is visible at, growing; a write
/// that changed nothing answers one at which the existing state is visible
/// (the store's), never 0.
#[tokio::test]
async fn every_write_answers_a_growing_version() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    let licensing = replica_on(store.clone(), &clock, None, true).await;
    let at_store = || {
        let store = store.clone();
        async move { store.snapshot().await.unwrap().position.unwrap().version }
    };
    let mut versions = vec![licensing.start_tryout().await.unwrap().version];
    let alice = user("alice");
    let first = licensing.assign_seat(&alice, Feature::User).await.unwrap();
    assert!(first.created);
    versions.push(first.version);
    versions.push(
        licensing
            .assign_seat(&user("bob"), Feature::User)
            .await
            .unwrap()
            .version,
    );
    // Again: nothing written; the seat is visible at the store's version.
    let again = licensing.assign_seat(&alice, Feature::User).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.version, at_store().await);
    assert!(again.version >= first.version);
    versions.push(again.version);
    let released = licensing.release_seat(&alice, Feature::User).await.unwrap();
    assert!(released.value);
    versions.push(released.version);
    let nothing = licensing.release_seat(&alice, Feature::User).await.unwrap();
    assert!(!nothing.value);
    assert_eq!(nothing.version, at_store().await);
    versions.push(nothing.version);
    versions.push(licensing.end_tryout().await.unwrap().version);
    // Ending it again changes nothing: the record is visible at this copy's version.
    let ended_again = licensing.end_tryout().await.unwrap();
    assert_eq!(ended_again.version, at_store().await);
    versions.push(ended_again.version);
    versions.push(
        licensing
            .create_initialization_code()
            .await
            .unwrap()
            .version,
    );
    versions.push(licensing.reset_activation().await.unwrap().version);
    assert!(versions.iter().all(|v| *v > 0), "{versions:?}");
    assert!(versions.is_sorted(), "{versions:?}");
    assert_eq!(*versions.last().unwrap(), at_store().await);
}

/// Read your writes across replicas: a write on A, then a read on B with
/// `min_version` answers with it, though B's copy was behind and no feed runs
/// (the nudge brings it); the copy that answered carries its version.
#[tokio::test]
async fn a_read_with_min_version_sees_a_write_made_on_another_replica() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    let a = replica_on(store.clone(), &clock, None, true).await;
    let b = replica_on(store.clone(), &clock, None, true).await;
    a.start_tryout().await.unwrap();
    let alice = user("alice");
    let assigned = a.assign_seat(&alice, Feature::User).await.unwrap();
    // Without min_version, B answers from its copy as it is: behind.
    let behind = b.check_seat(&alice, Feature::User).unwrap();
    assert!(!behind.check.licensed);
    assert!(behind.version < assigned.version);
    // The hot path's answer with a version already reached: at once.
    let now = b
        .check_seat_at(&alice, Feature::User, behind.version)
        .await
        .unwrap();
    assert_eq!(now.version, behind.version);
    let seen = b
        .check_seat_at(&alice, Feature::User, assigned.version)
        .await
        .unwrap();
    assert!(seen.check.licensed, "{seen:?}");
    assert!(seen.version >= assigned.version);
    let tryout = b.tryout_status_at(assigned.version).await.unwrap();
    assert_eq!(tryout.value.seats_used, 1);
    let overview = b.overview_at(assigned.version).await.unwrap();
    assert!(overview.version >= assigned.version);
    let page = b.list_seats("", 10, "", assigned.version).await.unwrap();
    assert_eq!(page.seats.len(), 1);
    assert!(page.version >= assigned.version);
}

/// A version no write answered: `NOT_YET_CONSISTENT` after about
/// `consistency.max_wait_ms`, saying where the copy is; nothing else changes.
#[tokio::test]
async fn a_version_far_ahead_is_not_yet_consistent_after_the_wait() {
    let clock = ManualClock::new(t0());
    let licensing = replica(&clock, None).await;
    let version = licensing.start_tryout().await.unwrap().version;
    let started = std::time::Instant::now();
    let refused = licensing
        .check_seat_at(&user("alice"), Feature::User, version + 1000)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(
            refused,
            LicensingError::NotYetConsistent { min_version, version: at, .. }
                if min_version == version + 1000 && at == version
        ),
        "{refused:?}"
    );
    assert!(waited >= StdDuration::from_millis(90), "{waited:?}");
    assert!(waited < StdDuration::from_secs(2), "{waited:?}");
    for refused in [
        licensing.tryout_status_at(version + 1).await.unwrap_err(),
        licensing.overview_at(version + 1).await.unwrap_err(),
        licensing
            .list_seats("", 10, "", version + 1)
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(refused, LicensingError::NotYetConsistent { .. }));
    }
    // Bad input is refused before any wait.
    assert!(matches!(
        licensing.list_seats("nope", 10, "", u64::MAX).await,
        Err(LicensingError::InvalidInput(_))
    ));
}

/// Versions only grow, also across a store that lost everything: the replica
/// restores it at its own version, and the next write is above every version
/// answered before.
#[tokio::test]
async fn versions_grow_across_a_store_that_lost_its_data() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    let licensing = replica_on(store.clone(), &clock, None, true).await;
    licensing.start_tryout().await.unwrap();
    let before = licensing
        .assign_seat(&user("alice"), Feature::User)
        .await
        .unwrap()
        .version;
    store.wipe();
    licensing.mirror().resync_now().await.unwrap();
    let after = licensing
        .assign_seat(&user("bob"), Feature::User)
        .await
        .unwrap()
        .version;
    assert!(after > before, "{after} after {before}");
    let answer = licensing
        .check_seat_at(&user("alice"), Feature::User, before)
        .await
        .unwrap();
    assert!(answer.check.licensed && answer.version >= after);
}

/// A replica trusting the test vendor key, with a license applied that sells
/// `users` user licenses for concurrent use (call_assist: none).
async fn concurrent_replica(clock: &ManualClock, store: Arc<MemoryStore>, users: u32) -> Licensing {
    use crate::domain::license::testing::{key, payload};
    let mut p = payload(SERIAL, users);
    p.entitlements[0].seat_model = crate::domain::SeatModel::Concurrent;
    let stored = crate::store::StoredLicense {
        signed: crate::domain::SignedLicense::sign(&p, &key(1)),
        applied_at: clock.now(),
    };
    if store.snapshot().await.unwrap().license.is_none() {
        store
            .apply_license(
                None,
                crate::store::LicenseWrite {
                    expected_id: None,
                    license: &stored,
                    tryout: None,
                    capacities: &[],
                    consume_initialization: None,
                    fence: None,
                },
            )
            .await
            .unwrap()
            .unwrap();
    }
    replica_trusting(store, clock, None, true, Some(key(1).verifying_key())).await
}

#[tokio::test]
async fn a_lease_licenses_its_user_until_it_expires_and_is_then_reclaimed() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    let licensing = concurrent_replica(&clock, store.clone(), 1).await;
    let other = concurrent_replica(&clock, store, 1).await;
    let (alice, bob) = (user("alice"), user("bob"));
    let pod = crate::domain::Holder::parse("pod-1").unwrap();

    let before = licensing.check_seat(&alice, Feature::User).unwrap();
    assert_eq!(before.check.reason, SeatReason::NoLease);
    let err = licensing
        .assign_seat(&alice, Feature::User)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        LicensingError::FailedPrecondition {
            reason: "WRONG_SEAT_MODEL",
            ..
        }
    ));

    let taken = licensing
        .acquire_lease(&alice, Feature::User, &pod)
        .await
        .unwrap();
    assert!(taken.created);
    assert_eq!(taken.lease.expires_at, t0() + Duration::seconds(90));
    let check = licensing.check_seat(&alice, Feature::User).unwrap();
    assert!(check.check.licensed);
    assert_eq!(check.check.valid_until, Some(taken.lease.expires_at));
    // The other replica sees it at the version the write answered.
    let seen = other
        .check_seat_at(&alice, Feature::User, taken.version)
        .await
        .unwrap();
    assert!(seen.check.licensed);
    // Full: refused on either replica, counted busy.
    assert!(matches!(
        other.acquire_lease(&bob, Feature::User, &pod).await,
        Err(LicensingError::NoFreeSeat {
            capacity: 1,
            in_use: 1,
            ..
        })
    ));

    // The holder stops renewing: at its end the lease licenses nothing, on
    // every replica, before anyone reclaims it.
    clock.advance(Duration::seconds(90));
    for replica in [&licensing, &other] {
        let check = replica.check_seat(&alice, Feature::User).unwrap();
        assert_eq!(
            (check.check.licensed, check.check.reason),
            (false, SeatReason::NoLease)
        );
    }
    // The next acquisition reclaims it; the old holder's renewal finds it lost.
    let next = other
        .acquire_lease(&bob, Feature::User, &pod)
        .await
        .unwrap();
    assert!(next.created);
    let renewed = licensing
        .renew_leases(&pod, std::slice::from_ref(&taken.lease.lease_id))
        .await
        .unwrap();
    assert_eq!(renewed.lost, vec![taken.lease.lease_id.clone()]);
    let page = licensing
        .list_leases("", 0, "", next.version)
        .await
        .unwrap();
    assert_eq!(page.leases, vec![next.lease.clone()]);

    // The overview: capacity, in use, today's peak and the one busy refusal.
    let o = other.overview();
    assert_eq!(o.concurrent.len(), 1);
    let use_ = &o.concurrent[0];
    assert_eq!(
        (use_.capacity, use_.in_use, use_.peak_today, use_.busy_today),
        (1, 1, 1, 1)
    );
    // Released: free at once.
    assert!(
        other
            .release_lease(&next.lease.lease_id)
            .await
            .unwrap()
            .value
    );
    assert!(
        !other
            .release_lease(&next.lease.lease_id)
            .await
            .unwrap()
            .value
    );
    let check = other.check_seat(&bob, Feature::User).unwrap();
    assert_eq!(check.check.reason, SeatReason::NoLease);
}
