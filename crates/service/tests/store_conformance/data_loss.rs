//! A store that lost its data: writes refused until a restore, and what a restore
//! keeps (flags, the pending initialization, growing lease tokens).

use super::*;

conformance! {
    wipe: data_loss_refuses_writes_until_restored;
    wipe: restore_keeps_over_capacity_marks;
    wipe: restore_keeps_the_pending_initialization;
    wipe: lease_tokens_keep_growing_across_data_loss;
}

// ---------------------------------------------------------------------------
// data loss and restore
// ---------------------------------------------------------------------------

async fn data_loss_refuses_writes_until_restored(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    let lic = with_license(store, "loss").await;
    let plan = purchased(&lic, 3);
    let (alice, _) = created(assign(store, "alice", Feature::User, &plan).await);
    created(assign(store, "alice", Feature::CallAssist, &plan).await);
    created(assign(store, "bob", Feature::User, &tryout(3)).await);
    with_the_other_records(store, "loss").await;
    let old = snapshot(store).await;
    let old_pos = old.position.clone().unwrap();
    assert_eq!(old.seats.len(), 3);

    wipe();

    let lost = snapshot(store).await;
    assert_eq!(lost.position, None);
    assert!(lost.seats.is_empty());
    assert_eq!(lost.license, None);
    assert_eq!(lost.tryout, None);
    assert_eq!(lost.initialization, None);
    assert_eq!(
        store
            .changes(&old_pos, Duration::from_millis(50))
            .await
            .unwrap(),
        Changes::Resync
    );

    // Every write is refused: an empty store must not look like "no seats in use".
    assert_eq!(
        store
            .assign_seat(None, &uid("carol"), Feature::User, &plan)
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .assign_seat(None, &uid("carol"), Feature::User, &tryout(3))
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .release_seat(None, &uid("alice"), Feature::User, None)
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .release_seat(None, &uid("alice"), Feature::User, Some((3, "any")))
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .compare_and_set_tryout(None, None, &started_tryout())
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.apply_license(None, plain(None, &lic)).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .apply_license(
                None,
                LicenseWrite {
                    capacities: &[(Feature::User, 0)],
                    ..plain(Some(lic.id()), &lic)
                }
            )
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.set_initialization(None, &pending("lost")).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(store.reset(None,).await, Err(StoreError::NotInitialized));
    assert_eq!(
        store
            .record_reconcile(None, &ReconcileStatus::default())
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        snapshot(store).await.position,
        None,
        "refused writes wrote nothing"
    );

    // Restore from what a replica still holds.
    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    let new_pos = restored.position.clone().expect("restored");
    assert_ne!(new_pos.epoch, old_pos.epoch, "a restore starts a new epoch");
    assert_eq!(restored.seats, old.seats);
    assert_eq!(restored.license, old.license);
    assert_eq!(restored.tryout, old.tryout);
    assert_eq!(restored.reconcile, old.reconcile);
    assert_eq!(restored.initialization, old.initialization);
    assert_eq!(
        store.list_seats(None, None, 100).await.unwrap(),
        old.seats,
        "the seat listing is restored too"
    );
    // Positions of the lost epoch cannot be continued.
    assert_eq!(
        store
            .changes(&old_pos, Duration::from_millis(50))
            .await
            .unwrap(),
        Changes::Resync
    );

    // A second restore (another replica, later) does nothing.
    assert!(!store.restore(&Snapshot::default()).await.unwrap());
    assert!(!store.restore(&old).await.unwrap());
    assert_eq!(snapshot(store).await, restored);

    // The restored store works: capacity counts the restored seats.
    assert_eq!(
        assign(store, "alice", Feature::User, &plan).await,
        AssignOutcome::Existing {
            seat: alice,
            version: current_version(store).await,
        }
    );
    let (_, carol) = created(assign(store, "carol", Feature::User, &plan).await);
    assert_eq!(carol.version, new_pos.version + 1);
    assert_eq!(
        assign(store, "dave", Feature::User, &purchased(&lic, 2)).await,
        AssignOutcome::Exhausted {
            capacity: 2,
            in_use: 2
        }
    );
    assert_eq!(drain(store, &new_pos).await, vec![carol]);
}

async fn restore_keeps_over_capacity_marks(store: &dyn Store, wipe: &(dyn Fn() + Send + Sync)) {
    // A replica's snapshot may hold seats marked over capacity; a restore keeps
    // every field (at the millisecond precision every store keeps).
    let lic = with_license(store, "marks").await;
    let mut old = snapshot(store).await;
    wipe();
    let at = ms_now();
    old.seats = vec![
        Seat {
            user_id: uid("over"),
            feature: Feature::User,
            source: SeatSource::Purchased,
            assigned_at: at - chrono::Duration::hours(2),
            over_capacity_since: Some(at - chrono::Duration::minutes(5)),
        },
        Seat {
            user_id: uid("trial"),
            feature: Feature::User,
            source: SeatSource::Tryout,
            assigned_at: at,
            over_capacity_since: None,
        },
    ];
    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    assert_eq!(restored.seats, old.seats);
    assert_eq!(restored.license, Some(lic.clone()));
    // The tryout seat counts against the tryout pool, the other against purchased.
    assert_eq!(
        assign(store, "x", Feature::User, &tryout(1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    assert_eq!(
        assign(store, "x", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
}

async fn restore_keeps_the_pending_initialization(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    let lic = with_license(store, "restore-init").await;
    let init = pending("restore-init");
    store.set_initialization(None, &init).await.unwrap();
    let old = snapshot(store).await;
    assert_eq!(old.initialization, Some(init.clone()));
    wipe();
    assert_eq!(snapshot(store).await.initialization, None);

    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    assert_eq!(restored.initialization, Some(init.clone()));
    // The restored one is the one an activation consumes.
    let next = license("restore-init-2", 1);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&init),
            ..plain(Some(lic.id()), &next)
        },
    )
    .await
    .expect("the restored initialization is the stored one");
    assert_eq!(changes[1].kind, ChangeKind::InitializationConsumed);
    assert_eq!(snapshot(store).await.initialization, None);

    // A snapshot without one restores none.
    let without = snapshot(store).await;
    wipe();
    assert!(store.restore(&without).await.unwrap());
    assert_eq!(snapshot(store).await.initialization, None);
}

async fn lease_tokens_keep_growing_across_data_loss(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    // A replica that took the lease before the store lost its data may still be
    // writing with its token: no later grant may hand out that token again.
    with_license(store, "lease-loss").await;
    let before = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .expect("a free lease");
    let old = snapshot(store).await;
    wipe();
    assert!(store.restore(&old).await.unwrap());
    let after = acquire_within(store, "replica-b", Duration::from_secs(10)).await;
    assert!(
        after > before,
        "a grant after data loss reuses token {after} (first grant was {before})"
    );
    // The old holder's token is fenced off.
    let lic = old.license.as_ref().unwrap();
    let next = license("lease-loss-2", 1);
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                fence: Some(before),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
}
