//! Leases of concurrent features: acquired against a quantity (idempotent per
//! user, feature and holder), renewed as a holder's set, released, expired and
//! reclaimed by the next acquisition, listed; in the feed and the snapshot, and
//! kept through a restore, a repair and a re-setup as seats are.

use super::*;

use comtrexx_licensing::domain::{Holder, Lease, LeasePlan};
use comtrexx_licensing::store::{AcquireOutcome, LeaseAcquire, LeaseReleaseOutcome};

conformance! {
    store: acquire_is_idempotent_per_holder;
    store: acquire_refuses_above_the_quantity_and_counts_busy;
    store: acquire_against_another_license_is_refused;
    store: expired_leases_are_reclaimed_by_the_next_acquisition;
    store: renew_renews_a_holders_set_and_loses_the_rest;
    store: a_large_renewal_renews_every_lease_in_versioned_steps;
    store: release_frees_a_lease_once;
    store: lease_writes_are_versioned_changes_in_the_feed;
    store: a_reset_ends_every_lease;
    store: a_repair_writes_leases_back;
    store: a_repair_releases_a_lease_again;
    wipe: a_restore_brings_the_leases_back;
    shared: concurrent_acquisitions_never_exceed_the_quantity;
}

const LONG: Duration = Duration::from_secs(90);

fn holder(raw: &str) -> Holder {
    Holder::parse(raw).expect("a valid test holder")
}

fn plan(license: &StoredLicense, capacity: u32) -> LeasePlan {
    LeasePlan {
        capacity,
        license_id: license.id().to_owned(),
    }
}

async fn acquire_for(
    store: &dyn Store,
    user: &str,
    by: &str,
    plan: &LeasePlan,
    duration: Duration,
) -> AcquireOutcome {
    let new_id = comtrexx_licensing::domain::leases::new_lease_id();
    store
        .acquire_seat_lease(
            None,
            LeaseAcquire {
                user: &uid(user),
                feature: Feature::User,
                holder: &holder(by),
                plan,
                new_id: &new_id,
                duration,
            },
        )
        .await
        .expect("acquire_seat_lease")
}

/// Asserts a lease was acquired; the lease, whether it was created, its change.
#[track_caller]
fn acquired(outcome: AcquireOutcome) -> (Lease, bool, Change) {
    match outcome {
        AcquireOutcome::Acquired {
            change, created, ..
        } => match &change.kind {
            ChangeKind::LeaseAcquired { lease, .. } => (lease.clone(), created, change),
            other => panic!("an acquisition reports LeaseAcquired, got {other:?}"),
        },
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn acquire_is_idempotent_per_holder(store: &dyn Store) {
    let lic = with_license(store, "lease-idem").await;
    let p = plan(&lic, 5);
    let before = position(store).await;
    let t0 = Utc::now();
    let (first, created, change) = acquired(acquire_for(store, "alice", "pod-1", &p, LONG).await);
    assert!(created);
    assert_eq!(change.version, before.version + 1);
    assert_eq!(first.user_id, uid("alice"));
    assert_eq!(first.holder, holder("pod-1"));
    let slack = chrono::Duration::seconds(2);
    assert!(first.acquired_at >= t0 - slack && first.acquired_at <= Utc::now() + slack);
    assert_eq!(
        first.expires_at - first.acquired_at,
        chrono::Duration::seconds(90)
    );

    // The same holder again (a retry, a reconnect): the same lease, renewed.
    let (again, created, change) = acquired(acquire_for(store, "alice", "pod-1", &p, LONG).await);
    assert!(!created);
    assert_eq!(again.lease_id, first.lease_id);
    assert_eq!(again.acquired_at, first.acquired_at);
    assert!(again.expires_at >= first.expires_at);
    assert_eq!(change.version, before.version + 2, "a renewal is a write");

    // Another holder of the same user is another use.
    let (other, created, _) = acquired(acquire_for(store, "alice", "pod-2", &p, LONG).await);
    assert!(created);
    assert_ne!(other.lease_id, first.lease_id);
    let snap = snapshot(store).await;
    assert_eq!(snap.leases, vec![again.clone(), other.clone()]);
    assert_eq!(
        store.list_seat_leases(Some(Feature::User)).await.unwrap(),
        vec![again, other]
    );
    assert!(
        store
            .list_seat_leases(Some(Feature::CallAssist))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn acquire_refuses_above_the_quantity_and_counts_busy(store: &dyn Store) {
    let lic = with_license(store, "lease-full").await;
    let p = plan(&lic, 2);
    acquired(acquire_for(store, "a", "h", &p, LONG).await);
    acquired(acquire_for(store, "b", "h", &p, LONG).await);
    let before = current_version(store).await;
    assert_eq!(
        acquire_for(store, "c", "h", &p, LONG).await,
        AcquireOutcome::Exhausted {
            capacity: 2,
            in_use: 2
        }
    );
    assert_eq!(
        current_version(store).await,
        before,
        "a refusal writes nothing"
    );
    // A holder renewing its own lease is not refused at capacity.
    let (_, created, _) = acquired(acquire_for(store, "a", "h", &p, LONG).await);
    assert!(!created);
    // A capacity drop refuses new ones and lets the existing run.
    let lower = plan(&lic, 1);
    assert!(matches!(
        acquire_for(store, "d", "h", &lower, LONG).await,
        AcquireOutcome::Exhausted {
            capacity: 1,
            in_use: 2
        }
    ));
    assert_eq!(store.list_seat_leases(None).await.unwrap().len(), 2);

    let today = Utc::now().timestamp_millis().div_euclid(86_400_000);
    let usage = store.lease_usage(today - 1).await.unwrap();
    let day = usage
        .iter()
        .find(|u| u.feature == Feature::User)
        .expect("today's usage of user");
    assert_eq!((day.peak, day.busy), (2, 2));
}

async fn acquire_against_another_license_is_refused(store: &dyn Store) {
    let lic = with_license(store, "lease-lic").await;
    let other = license("lease-other", 3);
    assert_eq!(
        acquire_for(store, "a", "h", &plan(&other, 3), LONG).await,
        AcquireOutcome::LicenseChanged
    );
    assert!(snapshot(store).await.leases.is_empty());
    acquired(acquire_for(store, "a", "h", &plan(&lic, 3), LONG).await);
}

async fn expired_leases_are_reclaimed_by_the_next_acquisition(store: &dyn Store) {
    let lic = with_license(store, "lease-expiry").await;
    let p = plan(&lic, 1);
    let short = Duration::from_millis(300);
    let (gone, _, _) = acquired(acquire_for(store, "crashed", "pod-1", &p, short).await);
    assert!(matches!(
        acquire_for(store, "waiting", "pod-2", &p, LONG).await,
        AcquireOutcome::Exhausted { .. }
    ));
    // Free again within one lease length, and no culling job ran.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (taken, change) = loop {
        match acquire_for(store, "waiting", "pod-2", &p, LONG).await {
            AcquireOutcome::Exhausted { .. } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            outcome => {
                let (lease, created, change) = acquired(outcome);
                assert!(created);
                break (lease, change);
            }
        }
    };
    assert!(
        taken.acquired_at >= gone.expires_at,
        "taken only once the first expired"
    );
    match &change.kind {
        ChangeKind::LeaseAcquired { reclaimed, .. } => {
            assert_eq!(reclaimed, &vec![gone.lease_id.clone()]);
        }
        other => panic!("{other:?}"),
    }
    let renewed = store
        .renew_seat_leases(
            None,
            &holder("pod-1"),
            std::slice::from_ref(&gone.lease_id),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(renewed.lost, vec![gone.lease_id]);
    assert_eq!(snapshot(store).await.leases, vec![taken]);
}

async fn renew_renews_a_holders_set_and_loses_the_rest(store: &dyn Store) {
    let lic = with_license(store, "lease-renew").await;
    let p = plan(&lic, 10);
    let (x, _, _) = acquired(acquire_for(store, "x", "pod-1", &p, LONG).await);
    let (y, _, _) = acquired(acquire_for(store, "y", "pod-1", &p, LONG).await);
    let (z, _, _) = acquired(acquire_for(store, "z", "pod-2", &p, LONG).await);
    let before = current_version(store).await;
    let ids = vec![
        x.lease_id.clone(),
        y.lease_id.clone(),
        z.lease_id.clone(),
        "0123456789abcdef0123456789abcdef".to_owned(),
        x.lease_id.clone(),
    ];
    let outcome = store
        .renew_seat_leases(None, &holder("pod-1"), &ids, Duration::from_secs(120))
        .await
        .unwrap();
    let renewed: Vec<&str> = outcome.leases.iter().map(|l| l.lease_id.as_str()).collect();
    assert_eq!(renewed, [x.lease_id.as_str(), y.lease_id.as_str()]);
    assert_eq!(
        outcome.lost,
        [
            z.lease_id.clone(),
            "0123456789abcdef0123456789abcdef".to_owned()
        ],
        "another holder's and unknown ids are lost; a repeated id counts once"
    );
    assert_eq!(outcome.version, before + 1, "one renewal, one write");
    let expires_at = outcome.leases[0].expires_at;
    assert!(expires_at > x.expires_at);
    assert!(outcome.leases.iter().all(|l| l.expires_at == expires_at));
    assert_eq!(outcome.leases[0].acquired_at, x.acquired_at);
    assert_eq!(
        outcome.changes.iter().map(|c| &c.kind).collect::<Vec<_>>(),
        [&ChangeKind::LeasesRenewed {
            holder: holder("pod-1"),
            lease_ids: vec![x.lease_id.clone(), y.lease_id.clone()],
            expires_at,
        }]
    );
    // Nothing to renew: nothing written, the store's version answered.
    let none = store
        .renew_seat_leases(
            None,
            &holder("pod-3"),
            std::slice::from_ref(&x.lease_id),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!((none.changes.is_empty(), none.version), (true, before + 1));
    assert_eq!(none.lost, vec![x.lease_id.clone()]);
    let snap = snapshot(store).await;
    let by_id = |id: &str| snap.leases.iter().find(|l| l.lease_id == id).unwrap();
    assert_eq!(by_id(&x.lease_id).expires_at, expires_at);
    assert_eq!(by_id(&z.lease_id).expires_at, z.expires_at);
}

/// A holder of more leases than one step of the store renews: every one is
/// renewed in one call, the steps are consecutive versions in the feed, and
/// together they name every lease once, in the order asked.
async fn a_large_renewal_renews_every_lease_in_versioned_steps(store: &dyn Store) {
    const HELD: usize = 1_234;
    let lic = with_license(store, "lease-large").await;
    let p = plan(&lic, HELD as u32);
    let mut ids = Vec::new();
    for n in 0..HELD {
        let (lease, _, _) = acquired(acquire_for(store, &format!("u{n}"), "pod-1", &p, LONG).await);
        ids.push(lease.lease_id);
    }
    let since = position(store).await;
    let mut asked = ids.clone();
    asked.push(ids[7].clone());
    asked.push("0123456789abcdef0123456789abcdef".to_owned());
    let outcome = store
        .renew_seat_leases(None, &holder("pod-1"), &asked, Duration::from_secs(120))
        .await
        .unwrap();
    let renewed: Vec<&String> = outcome.leases.iter().map(|l| &l.lease_id).collect();
    assert_eq!(
        renewed,
        ids.iter().collect::<Vec<_>>(),
        "every lease once, in order"
    );
    assert_eq!(outcome.lost, ["0123456789abcdef0123456789abcdef"]);
    assert!(!outcome.changes.is_empty());
    let named: Vec<&String> = outcome
        .changes
        .iter()
        .flat_map(|c| match &c.kind {
            ChangeKind::LeasesRenewed {
                holder: h,
                lease_ids,
                ..
            } if *h == holder("pod-1") => lease_ids.iter(),
            other => panic!("a renewal reports LeasesRenewed, got {other:?}"),
        })
        .collect();
    assert_eq!(named, renewed, "the steps name every renewed lease once");
    let versions: Vec<u64> = outcome.changes.iter().map(|c| c.version).collect();
    let expected: Vec<u64> = (since.version + 1..=since.version + versions.len() as u64).collect();
    assert_eq!(versions, expected, "consecutive versions");
    assert_eq!(outcome.version, *versions.last().unwrap());
    assert_eq!(drain(store, &since).await, outcome.changes);
    let snap = snapshot(store).await;
    assert!(
        snap.leases.iter().all(|l| outcome
            .leases
            .iter()
            .any(|r| r.lease_id == l.lease_id && r.expires_at == l.expires_at)),
        "the store holds every renewed expiry"
    );
}

async fn release_frees_a_lease_once(store: &dyn Store) {
    let lic = with_license(store, "lease-release").await;
    let p = plan(&lic, 1);
    let (lease, _, _) = acquired(acquire_for(store, "a", "h", &p, LONG).await);
    let before = current_version(store).await;
    match store
        .release_seat_lease(None, &lease.lease_id)
        .await
        .unwrap()
    {
        LeaseReleaseOutcome::Released(change) => {
            assert_eq!(change.version, before + 1);
            assert_eq!(
                change.kind,
                ChangeKind::LeaseReleased {
                    lease_id: lease.lease_id.clone()
                }
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .release_seat_lease(None, &lease.lease_id)
            .await
            .unwrap(),
        LeaseReleaseOutcome::NotHeld {
            version: before + 1
        }
    );
    let renew = store
        .renew_seat_leases(
            None,
            &holder("h"),
            std::slice::from_ref(&lease.lease_id),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(renew.lost, vec![lease.lease_id.clone()]);
    assert!(snapshot(store).await.leases.is_empty());
    // The seat is free: someone else takes it; the same key gets a new lease.
    let (next, created, _) = acquired(acquire_for(store, "b", "h", &p, LONG).await);
    assert!(created);
    assert_ne!(next.lease_id, lease.lease_id);
}

async fn lease_writes_are_versioned_changes_in_the_feed(store: &dyn Store) {
    let lic = with_license(store, "lease-feed").await;
    let p = plan(&lic, 3);
    let since = position(store).await;
    let (_, _, acquire) = acquired(acquire_for(store, "a", "h", &p, LONG).await);
    let renew = store
        .renew_seat_leases(None, &holder("h"), &[lease_id_of(&acquire)], LONG)
        .await
        .unwrap()
        .changes
        .into_iter()
        .next()
        .expect("renewed");
    let release = match store
        .release_seat_lease(None, &lease_id_of(&acquire))
        .await
        .unwrap()
    {
        LeaseReleaseOutcome::Released(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(drain(store, &since).await, vec![acquire, renew, release]);
}

fn lease_id_of(change: &Change) -> String {
    match &change.kind {
        ChangeKind::LeaseAcquired { lease, .. } => lease.lease_id.clone(),
        other => panic!("{other:?}"),
    }
}

async fn a_reset_ends_every_lease(store: &dyn Store) {
    let lic = with_license(store, "lease-reset").await;
    let (lease, _, _) = acquired(acquire_for(store, "a", "h", &plan(&lic, 3), LONG).await);
    store.reset(None).await.unwrap();
    assert!(snapshot(store).await.leases.is_empty());
    assert!(store.list_seat_leases(None).await.unwrap().is_empty());
    let renew = store
        .renew_seat_leases(
            None,
            &holder("h"),
            std::slice::from_ref(&lease.lease_id),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(renew.lost, vec![lease.lease_id]);
}

async fn a_repair_writes_leases_back(store: &dyn Store) {
    let lic = with_license(store, "lease-repair").await;
    let at = position(store).await;
    let now = ms_now();
    let lease = Lease {
        lease_id: "00000000000000000000000000000abc".into(),
        user_id: uid("restored"),
        feature: Feature::User,
        holder: holder("pod-9"),
        acquired_at: now,
        expires_at: now + chrono::Duration::seconds(90),
    };
    let write = RepairWrite {
        expected: Some(at.clone()),
        version_floor: at.version,
        add_leases: vec![lease.clone()],
        ..RepairWrite::default()
    };
    let changes = store.repair(&write).await.unwrap().expect("repaired");
    assert_eq!(
        changes[0].kind,
        ChangeKind::LeaseAcquired {
            lease: lease.clone(),
            reclaimed: Vec::new()
        }
    );
    assert_eq!(snapshot(store).await.leases, vec![lease.clone()]);
    // Its holder finds it: renewed, not a second seat.
    let (again, created, _) =
        acquired(acquire_for(store, "restored", "pod-9", &plan(&lic, 1), LONG).await);
    assert!(!created);
    assert_eq!(again.lease_id, lease.lease_id);
}

/// A lease release the store lost (a failover) is done again by a repair: the
/// lease is gone, its key free, its seat counts no more, and the feed says so.
async fn a_repair_releases_a_lease_again(store: &dyn Store) {
    let lic = with_license(store, "lease-unrepair").await;
    let p = plan(&lic, 1);
    let (lease, _, _) = acquired(acquire_for(store, "back", "pod-1", &p, LONG).await);
    let at = position(store).await;
    let write = RepairWrite {
        expected: Some(at.clone()),
        version_floor: at.version,
        remove_leases: vec![lease.clone()],
        ..RepairWrite::default()
    };
    let changes = store.repair(&write).await.unwrap().expect("repaired");
    assert_eq!(
        changes[0],
        Change {
            version: at.version + 1,
            kind: ChangeKind::LeaseReleased {
                lease_id: lease.lease_id.clone()
            }
        }
    );
    assert!(snapshot(store).await.leases.is_empty());
    assert_eq!(drain(store, &at).await, changes);
    // The seat is free: another user takes it; the old key gets a new lease.
    let (other, created, _) = acquired(acquire_for(store, "next", "pod-2", &p, LONG).await);
    assert!(created);
    assert_ne!(other.lease_id, lease.lease_id);
}

async fn a_restore_brings_the_leases_back(store: &dyn Store, wipe: &(dyn Fn() + Send + Sync)) {
    let lic = with_license(store, "lease-restore").await;
    let (lease, _, _) = acquired(acquire_for(store, "a", "pod-1", &plan(&lic, 2), LONG).await);
    let copy = snapshot(store).await;
    wipe();
    assert!(store.restore(&copy).await.unwrap());
    assert_eq!(snapshot(store).await.leases, vec![lease.clone()]);
    let renewed = store
        .renew_seat_leases(
            None,
            &holder("pod-1"),
            std::slice::from_ref(&lease.lease_id),
            LONG,
        )
        .await
        .unwrap();
    assert_eq!(renewed.leases.len(), 1);
    let (again, created, _) =
        acquired(acquire_for(store, "a", "pod-1", &plan(&lic, 2), LONG).await);
    assert!(!created);
    assert_eq!(again.lease_id, lease.lease_id);
}

async fn concurrent_acquisitions_never_exceed_the_quantity(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "lease-race").await;
    let p = plan(&lic, 10);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (store, p) = (Arc::clone(&store), p.clone());
        tasks.push(tokio::spawn(async move {
            // Two holders race for the same user too: one lease each at most.
            let user = format!("u{}", i / 2);
            acquire_for(&*store, &user, &format!("h{}", i % 3), &p, LONG).await
        }));
    }
    let mut granted = 0;
    for t in tasks {
        if let AcquireOutcome::Acquired { created: true, .. } = t.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 10);
    assert_eq!(store.list_seat_leases(None).await.unwrap().len(), 10);
}
