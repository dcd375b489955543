//! Seats: assigning (idempotent, per pool, against the license), releasing, and
//! concurrent callers that never exceed a pool.

use super::*;

conformance! {
    store: assign_creates_a_seat_and_is_idempotent;
    store: assign_reports_an_exhausted_pool;
    store: purchased_assign_against_another_license_is_refused;
    store: tryout_pool_is_separate_from_purchased_pool;
    store: tryout_seat_is_replaced_by_a_purchased_seat;
    store: purchased_seat_is_kept_under_a_tryout_plan;
    store: release_frees_a_seat_once;
    shared: concurrent_assigns_never_exceed_capacity;
    shared: concurrent_assigns_of_one_user_create_one_seat;
}

// ---------------------------------------------------------------------------
// assign_seat
// ---------------------------------------------------------------------------

async fn assign_creates_a_seat_and_is_idempotent(store: &dyn Store) {
    let lic = with_license(store, "assign").await;
    let plan = purchased(&lic, 5);
    let before = position(store).await;

    let t0 = Utc::now();
    let (seat, change) = created(assign(store, "alice", Feature::User, &plan).await);
    let t1 = Utc::now();
    assert_eq!(seat.user_id, uid("alice"));
    assert_eq!(seat.feature, Feature::User);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(seat.over_capacity_since, None);
    let slack = chrono::Duration::seconds(2);
    assert!(
        seat.assigned_at >= t0 - slack && seat.assigned_at <= t1 + slack,
        "assigned_at {} is not near now ({t0} .. {t1})",
        seat.assigned_at
    );
    assert_eq!(change.version, before.version + 1);

    // Again: the same seat, nothing written.
    assert_eq!(
        assign(store, "alice", Feature::User, &plan).await,
        AssignOutcome::Existing {
            seat: seat.clone(),
            version: current_version(store).await,
        }
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.position.as_ref().unwrap().version, before.version + 1);
    assert_eq!(snap.seats, vec![seat.clone()]);

    // Another feature of the same user is another seat.
    let (ca, _) = created(assign(store, "alice", Feature::CallAssist, &plan).await);
    assert_eq!(ca.feature, Feature::CallAssist);
    assert_eq!(ca.source, SeatSource::Purchased);
    assert_eq!(snapshot(store).await.seats, vec![ca, seat]);
}

async fn assign_reports_an_exhausted_pool(store: &dyn Store) {
    let lic = with_license(store, "exhausted").await;
    let plan = purchased(&lic, 2);
    created(assign(store, "a", Feature::User, &plan).await);
    created(assign(store, "b", Feature::User, &plan).await);
    let full = snapshot(store).await;

    assert_eq!(
        assign(store, "c", Feature::User, &plan).await,
        AssignOutcome::Exhausted {
            capacity: 2,
            in_use: 2
        }
    );
    // Nothing was written.
    assert_eq!(snapshot(store).await, full);
    // A holder still gets its seat back from a full pool.
    assert!(matches!(
        assign(store, "a", Feature::User, &plan).await,
        AssignOutcome::Existing { .. }
    ));
    // A plan below what is in use reports the real count.
    assert_eq!(
        assign(store, "c", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 2
        }
    );
    assert_eq!(
        assign(store, "c", Feature::User, &purchased(&lic, 0)).await,
        AssignOutcome::Exhausted {
            capacity: 0,
            in_use: 2
        }
    );
    // Pools are per feature: call_assist is still empty.
    let (ca, _) = created(assign(store, "c", Feature::CallAssist, &purchased(&lic, 1)).await);
    assert_eq!(ca.feature, Feature::CallAssist);
    // The capacity is the plan's: a bigger plan makes room.
    let (seat, _) = created(assign(store, "c", Feature::User, &purchased(&lic, 3)).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(
        assign(store, "d", Feature::User, &purchased(&lic, 3)).await,
        AssignOutcome::Exhausted {
            capacity: 3,
            in_use: 3
        }
    );
}

async fn purchased_assign_against_another_license_is_refused(store: &dyn Store) {
    // No license stored at all: a purchased plan cannot hold.
    let other = license("never-applied", 10);
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&other, 10)).await,
        AssignOutcome::LicenseChanged
    );

    let stored = with_license(store, "stored").await;
    assert_ne!(stored.id(), other.id());
    let before = snapshot(store).await;
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&other, 10)).await,
        AssignOutcome::LicenseChanged
    );
    assert_eq!(snapshot(store).await, before, "nothing was written");
    // The plan made against the stored document works.
    created(assign(store, "alice", Feature::User, &purchased(&stored, 10)).await);
}

async fn tryout_pool_is_separate_from_purchased_pool(store: &dyn Store) {
    let lic = with_license(store, "pools").await;
    let bought = purchased(&lic, 1);
    created(assign(store, "p1", Feature::User, &bought).await);
    assert_eq!(
        assign(store, "p2", Feature::User, &bought).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );

    let test = tryout(3);
    for user in ["t1", "t2", "t3"] {
        let (seat, _) = created(assign(store, user, Feature::User, &test).await);
        assert_eq!(seat.source, SeatSource::Tryout);
        assert_eq!(seat.user_id, uid(user));
    }
    assert_eq!(
        assign(store, "t4", Feature::User, &test).await,
        AssignOutcome::Exhausted {
            capacity: 3,
            in_use: 3
        }
    );
    // The tryout seats did not use up purchased capacity, nor the other way round.
    assert_eq!(
        assign(store, "p2", Feature::User, &bought).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    // A tryout holder under a tryout plan gets its seat back.
    match assign(store, "t2", Feature::User, &test).await {
        AssignOutcome::Existing { seat, .. } => {
            assert_eq!(seat.source, SeatSource::Tryout);
            assert_eq!(seat.user_id, uid("t2"));
        }
        other => panic!("expected Existing, got {other:?}"),
    }

    let snap = snapshot(store).await;
    let sources: Vec<_> = snap
        .seats
        .iter()
        .map(|s| (s.user_id.as_str(), s.source))
        .collect();
    assert_eq!(
        sources,
        vec![
            ("p1", SeatSource::Purchased),
            ("t1", SeatSource::Tryout),
            ("t2", SeatSource::Tryout),
            ("t3", SeatSource::Tryout),
        ]
    );
}

async fn tryout_seat_is_replaced_by_a_purchased_seat(store: &dyn Store) {
    let lic = with_license(store, "upgrade").await;
    let (trial, _) = created(assign(store, "alice", Feature::User, &tryout(1)).await);
    assert_eq!(trial.source, SeatSource::Tryout);

    // A full purchased pool leaves the tryout seat as it is.
    created(assign(store, "bob", Feature::User, &purchased(&lic, 1)).await);
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    assert_eq!(
        seats_of(&snapshot(store).await, "alice"),
        vec![&trial],
        "an exhausted purchased pool must not touch the tryout seat"
    );

    // With room, the purchased seat replaces the tryout seat.
    let (seat, _) = created(assign(store, "alice", Feature::User, &purchased(&lic, 2)).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(seat.user_id, uid("alice"));
    assert_eq!(seat.feature, Feature::User);
    let snap = snapshot(store).await;
    assert_eq!(seats_of(&snap, "alice"), vec![&seat]);
    assert!(snap.seats.iter().all(|s| s.source == SeatSource::Purchased));
    let listed = store
        .list_seats(Some(Feature::User), None, 10)
        .await
        .unwrap();
    assert_eq!(listed, snap.seats);

    // The tryout pool has room again: the replaced seat no longer counts.
    let (carol, _) = created(assign(store, "carol", Feature::User, &tryout(1)).await);
    assert_eq!(carol.source, SeatSource::Tryout);
    // And alice keeps her purchased seat under either plan.
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&lic, 2)).await,
        AssignOutcome::Existing {
            seat: seat.clone(),
            version: current_version(store).await,
        }
    );
}

async fn purchased_seat_is_kept_under_a_tryout_plan(store: &dyn Store) {
    let lic = with_license(store, "keep").await;
    let (seat, _) = created(assign(store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let before = snapshot(store).await;
    assert_eq!(
        assign(store, "alice", Feature::User, &tryout(3)).await,
        AssignOutcome::Existing {
            seat: seat.clone(),
            version: current_version(store).await,
        }
    );
    // Even with the purchased plan's document gone stale or the pool full.
    assert_eq!(
        assign(store, "alice", Feature::User, &tryout(0)).await,
        AssignOutcome::Existing {
            seat: seat.clone(),
            version: current_version(store).await,
        }
    );
    assert_eq!(
        assign(
            store,
            "alice",
            Feature::User,
            &purchased(&license("x", 1), 0)
        )
        .await,
        AssignOutcome::Existing {
            seat,
            version: current_version(store).await,
        }
    );
    assert_eq!(snapshot(store).await, before, "nothing was written");
}

// ---------------------------------------------------------------------------
// release_seat
// ---------------------------------------------------------------------------

async fn release_frees_a_seat_once(store: &dyn Store) {
    let lic = with_license(store, "release").await;
    let plan = purchased(&lic, 1);
    created(assign(store, "alice", Feature::User, &plan).await);
    created(assign(store, "alice", Feature::CallAssist, &plan).await);
    let (bob, _) = created(assign(store, "bob", Feature::User, &tryout(3)).await);
    let before = position(store).await;

    // Nothing to release: no change, with or without a capacity.
    assert_eq!(release(store, "nobody", Feature::User, None).await, None);
    assert_eq!(release(store, "nobody", Feature::User, Some(0)).await, None);
    assert_eq!(position(store).await, before);

    let changes = release(store, "alice", Feature::User, None)
        .await
        .expect("alice held a seat");
    assert_eq!(changes.len(), 1, "only the release: {changes:?}");
    let change = &changes[0];
    assert_eq!(change.version, before.version + 1);
    assert_eq!(
        change.kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("alice"),
        }
    );
    assert_eq!(release(store, "alice", Feature::User, None).await, None);

    let snap = snapshot(store).await;
    assert_eq!(snap.position.as_ref().unwrap().version, before.version + 1);
    assert_eq!(
        keys_of(&snap.seats),
        vec![
            (Feature::CallAssist, "alice".to_owned()),
            (Feature::User, "bob".to_owned()),
        ]
    );
    let listed = store.list_seats(None, None, 100).await.unwrap();
    assert_eq!(listed, snap.seats);
    // The released seat leaves no gap in a limited listing either.
    assert_eq!(
        keys_of(
            &store
                .list_seats(Some(Feature::User), None, 1)
                .await
                .unwrap()
        ),
        vec![(Feature::User, "bob".to_owned())]
    );

    // A tryout seat is released the same way; with a capacity nothing is over,
    // so no flag moves.
    let changes = release(store, "bob", Feature::User, Some(1))
        .await
        .expect("bob held a tryout seat");
    assert_eq!(
        changes,
        vec![Change {
            version: before.version + 2,
            kind: ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: bob.user_id,
            },
        }]
    );
    assert!(
        store
            .list_seats(Some(Feature::User), None, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // The freed seat can be taken again.
    created(assign(store, "carol", Feature::User, &plan).await);
    created(assign(store, "dave", Feature::User, &tryout(1)).await);
}

// ---------------------------------------------------------------------------
// concurrency
// ---------------------------------------------------------------------------

async fn concurrent_assigns_never_exceed_capacity(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "race").await;
    let plan = purchased(&lic, 10);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(&store);
            let plan = plan.clone();
            tokio::spawn(async move {
                store
                    .assign_seat(None, &uid(&format!("user-{i:03}")), Feature::User, &plan)
                    .await
            })
        })
        .collect();
    let mut created_versions = BTreeSet::new();
    let mut exhausted = 0;
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            AssignOutcome::Created(change) => {
                assert!(
                    created_versions.insert(change.version),
                    "versions are unique"
                );
            }
            AssignOutcome::Exhausted { capacity, in_use } => {
                assert_eq!((capacity, in_use), (10, 10));
                exhausted += 1;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_versions.len(), 10);
    assert_eq!(exhausted, 190);
    let snap = snapshot(&*store).await;
    assert_eq!(snap.seats.len(), 10);
    assert!(snap.seats.iter().all(|s| s.source == SeatSource::Purchased));
    assert_eq!(
        snap.position.unwrap().version,
        *created_versions.last().unwrap()
    );
}

async fn concurrent_assigns_of_one_user_create_one_seat(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "same-user").await;
    let plan = purchased(&lic, 10);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = Arc::clone(&store);
            let plan = plan.clone();
            tokio::spawn(async move {
                store
                    .assign_seat(None, &uid("alice"), Feature::User, &plan)
                    .await
            })
        })
        .collect();
    let mut created_seats = Vec::new();
    let mut existing = Vec::new();
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            outcome @ AssignOutcome::Created(_) => created_seats.push(created(outcome).0),
            AssignOutcome::Existing { seat, .. } => existing.push(seat),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_seats.len(), 1);
    assert_eq!(existing.len(), 49);
    assert!(existing.iter().all(|s| *s == created_seats[0]));
    assert_eq!(snapshot(&*store).await.seats, created_seats);

    // The same with a tryout pool.
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .assign_seat(
                        None,
                        &uid(&format!("t{}", i % 5)),
                        Feature::User,
                        &tryout(3),
                    )
                    .await
            })
        })
        .collect();
    let mut created_count = 0;
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            AssignOutcome::Created(_) => created_count += 1,
            AssignOutcome::Existing { seat, .. } => assert_eq!(seat.source, SeatSource::Tryout),
            AssignOutcome::Exhausted { capacity, in_use } => {
                assert_eq!((capacity, in_use), (3, 3));
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_count, 3);
    let tryout_seats = snapshot(&*store)
        .await
        .seats
        .into_iter()
        .filter(|s| s.source == SeatSource::Tryout)
        .count();
    assert_eq!(tryout_seats, 3);
}
