//! The reconcile lease (exclusive, expiring, fencing license writes) and the
//! recorded reconcile status.

use super::*;

conformance! {
    store: lease_is_exclusive_until_its_holder_releases_it;
    store: lease_expires_after_its_ttl;
    store: apply_license_is_fenced_by_the_latest_lease_grant;
    store: record_reconcile_round_trips;
}

// ---------------------------------------------------------------------------
// the reconcile lease
// ---------------------------------------------------------------------------

async fn lease_is_exclusive_until_its_holder_releases_it(store: &dyn Store) {
    let before = position(store).await;
    let t1 = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .expect("a free lease");
    assert!(t1 > 0);
    // Held: nobody gets it, not even its holder again.
    assert_eq!(store.acquire_lease("replica-b", LONG).await.unwrap(), None);
    assert_eq!(store.acquire_lease("replica-a", LONG).await.unwrap(), None);
    // Another replica's release does not free it.
    store.release_lease("replica-b").await.unwrap();
    assert_eq!(store.acquire_lease("replica-b", LONG).await.unwrap(), None);
    // The holder's does.
    store.release_lease("replica-a").await.unwrap();
    let t2 = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .expect("released by its holder");
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    assert_eq!(store.acquire_lease("replica-a", LONG).await.unwrap(), None);
    // A stale holder's release does not free the new holder's lease.
    store.release_lease("replica-a").await.unwrap();
    assert_eq!(store.acquire_lease("replica-c", LONG).await.unwrap(), None);
    store.release_lease("replica-b").await.unwrap();
    let t3 = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .expect("released by its holder");
    assert!(t3 > t2, "tokens grow: {t2} then {t3}");
    // Releasing twice is harmless.
    store.release_lease("replica-b").await.unwrap();
    store.release_lease("replica-b").await.unwrap();

    // The lease is not data: it writes nothing to the feed.
    assert_eq!(position(store).await, before);
    assert!(drain(store, &before).await.is_empty());
}

async fn lease_expires_after_its_ttl(store: &dyn Store) {
    let ttl = Duration::from_millis(200);
    let start = Instant::now();
    let t1 = store
        .acquire_lease("replica-a", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    let t2 = match store.acquire_lease("replica-b", LONG).await.unwrap() {
        // Held until the ttl is over (unless the machine was too slow to ask in time).
        Some(t) => {
            let waited = start.elapsed();
            assert!(
                waited >= ttl,
                "the lease was granted again (token {t}) {waited:?} after a {ttl:?} grant"
            );
            t
        }
        None => acquire_within(store, "replica-b", Duration::from_secs(10)).await,
    };
    let waited = start.elapsed();
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    assert!(
        waited + Duration::from_millis(20) >= ttl,
        "the lease was held for its ttl, got it after {waited:?}"
    );
    // The expired holder's release does not free the new grant.
    store.release_lease("replica-a").await.unwrap();
    assert_eq!(store.acquire_lease("replica-c", ttl).await.unwrap(), None);
}

async fn apply_license_is_fenced_by_the_latest_lease_grant(store: &dyn Store) {
    let lic = with_license(store, "fence").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    // No grant yet: no fence matches.
    let next = license("fence-2", 1);
    let fenced_write = |fence: u64| LicenseWrite {
        capacities: &[(Feature::User, 1)],
        fence: Some(fence),
        ..plain(Some(lic.id()), &next)
    };
    let snap = snapshot(store).await;
    assert_eq!(apply(store, fenced_write(1)).await, None);
    assert_eq!(snapshot(store).await, snap);

    let old = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .unwrap();
    store.release_lease("replica-a").await.unwrap();
    let newer = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(newer > old);

    // The older holder is fenced off: nothing is written, not even flags.
    assert_eq!(apply(store, fenced_write(old)).await, None);
    assert_eq!(apply(store, fenced_write(newer + 1)).await, None);
    assert_eq!(snapshot(store).await, snap, "nothing was written");

    // The latest grant's token writes, while held and after the release (no
    // newer grant since).
    let changes = apply(store, fenced_write(newer))
        .await
        .expect("the latest grant's token");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["b"]);
    store.release_lease("replica-b").await.unwrap();
    let third = license("fence-3", 1);
    apply(
        store,
        LicenseWrite {
            fence: Some(newer),
            ..plain(Some(next.id()), &third)
        },
    )
    .await
    .expect("no newer grant since");
    // Once another grant happens, the token is stale.
    let newest = store
        .acquire_lease("replica-c", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(newest > newer);
    let fourth = license("fence-4", 1);
    let write = LicenseWrite {
        fence: Some(newer),
        ..plain(Some(third.id()), &fourth)
    };
    assert_eq!(apply(store, write).await, None);
    assert_eq!(snapshot(store).await.license, Some(third));
}

// ---------------------------------------------------------------------------
// record_reconcile
// ---------------------------------------------------------------------------

async fn record_reconcile_round_trips(store: &dyn Store) {
    assert_eq!(snapshot(store).await.reconcile, ReconcileStatus::default());
    let before = position(store).await;
    let failed = ReconcileStatus {
        last_success_at: None,
        last_attempt_at: Some(Utc::now()),
        last_outcome: Some(ReconcileOutcome::Unreachable),
        last_error: Some("licensing server: connection refused — ünïcödé".to_owned()),
        next_reconcile_at: Some(Utc::now() + chrono::Duration::minutes(5)),
    };
    let change = store.record_reconcile(None, &failed).await.unwrap();
    assert_eq!(change.version, before.version + 1);
    assert_eq!(change.kind, ChangeKind::ReconcileRecorded(failed.clone()));
    assert_eq!(snapshot(store).await.reconcile, failed);

    let now = Utc::now();
    let ok = ReconcileStatus {
        last_success_at: Some(now),
        last_attempt_at: Some(now),
        last_outcome: Some(ReconcileOutcome::Updated),
        last_error: None,
        next_reconcile_at: Some(now + chrono::Duration::hours(6)),
    };
    let change = store.record_reconcile(None, &ok).await.unwrap();
    assert_eq!(change.version, before.version + 2);
    assert_eq!(snapshot(store).await.reconcile, ok);

    // An unscheduled status clears the next reconcile time.
    let unscheduled = ReconcileStatus {
        next_reconcile_at: None,
        ..ok.clone()
    };
    let change = store.record_reconcile(None, &unscheduled).await.unwrap();
    assert_eq!(change.version, before.version + 3);
    assert_eq!(
        change.kind,
        ChangeKind::ReconcileRecorded(unscheduled.clone())
    );
    assert_eq!(snapshot(store).await.reconcile, unscheduled);
}
