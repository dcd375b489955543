//! Applying a license (compared against the stored license and tryout), the pending
//! initialization it consumes, and the reset that keeps only the tryout record.

use super::*;

conformance! {
    store: apply_license_compares_license_and_tryout;
    store: set_initialization_round_trips;
    store: apply_license_consumes_the_pending_initialization_once;
    store: apply_license_writes_everything_in_order;
    store: apply_license_with_a_stale_initialization_changes_nothing;
    store: reset_removes_everything_but_the_tryout_record;
}

// ---------------------------------------------------------------------------
// apply_license
// ---------------------------------------------------------------------------

async fn apply_license_compares_license_and_tryout(store: &dyn Store) {
    let first = with_license(store, "first").await;
    let second = license("second", 5);
    let third = license("third", 7);
    let before = snapshot(store).await;
    assert_eq!(before.license.as_ref(), Some(&first));

    // Wrong expected document: nothing changes.
    assert_eq!(
        apply(store, plain(Some("not-the-stored-id"), &second)).await,
        None
    );
    assert_eq!(
        apply(store, plain(None, &second)).await,
        None,
        "expecting no document while one is stored"
    );
    assert_eq!(apply(store, plain(Some(second.id()), &third)).await, None);
    assert_eq!(snapshot(store).await, before);

    // With a tryout change: both are written, as consecutive changes.
    let forfeited = TryoutRecord::Forfeited { at: Utc::now() };
    let v = before.position.as_ref().unwrap().version;
    let changes = apply(
        store,
        LicenseWrite {
            tryout: Some((None, &forfeited)),
            ..plain(Some(first.id()), &second)
        },
    )
    .await
    .expect("expectations hold");
    assert_eq!(
        changes,
        vec![
            Change {
                version: v + 1,
                kind: ChangeKind::LicenseApplied(second.clone()),
            },
            Change {
                version: v + 2,
                kind: ChangeKind::TryoutChanged(forfeited.clone()),
            },
        ]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.license.as_ref(), Some(&second));
    assert_eq!(snap.tryout.as_ref(), Some(&forfeited));
    assert_eq!(snap.position.as_ref().unwrap().version, v + 2);

    // The tryout expectation no longer holds: nothing changes, not even the license.
    let started = started_tryout();
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((None, &started)),
                ..plain(Some(second.id()), &third)
            }
        )
        .await,
        None
    );
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((Some(&started), &started)),
                ..plain(Some(second.id()), &third)
            }
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap);

    // The right expectations, without a tryout change: one change.
    let changes = apply(store, plain(Some(second.id()), &third))
        .await
        .expect("expectations hold");
    assert_eq!(
        changes,
        vec![Change {
            version: v + 3,
            kind: ChangeKind::LicenseApplied(third.clone()),
        }]
    );
    let after = snapshot(store).await;
    assert_eq!(after.license, Some(third));
    assert_eq!(after.tryout, Some(forfeited));
}

// ---------------------------------------------------------------------------
// set_initialization
// ---------------------------------------------------------------------------

async fn set_initialization_round_trips(store: &dyn Store) {
    assert_eq!(snapshot(store).await.initialization, None);
    let before = position(store).await;

    let first = pending("0123456789abcdef0123");
    let c1 = store.set_initialization(None, &first).await.unwrap();
    assert_eq!(
        c1,
        Change {
            version: before.version + 1,
            kind: ChangeKind::InitializationIssued(first.clone()),
        }
    );
    assert_eq!(snapshot(store).await.initialization, Some(first.clone()));

    // A newer one replaces it.
    let second = pending("fedcba9876543210fedc");
    let c2 = store.set_initialization(None, &second).await.unwrap();
    assert_eq!(
        c2,
        Change {
            version: before.version + 2,
            kind: ChangeKind::InitializationIssued(second.clone()),
        }
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.initialization, Some(second));
    assert_eq!(snap.position.unwrap().version, before.version + 2);
    assert_eq!(drain(store, &before).await, vec![c1, c2]);
}

async fn apply_license_consumes_the_pending_initialization_once(store: &dyn Store) {
    let lic = with_license(store, "consume").await;
    let init = pending("consume");
    store.set_initialization(None, &init).await.unwrap();
    let before = position(store).await;

    let activated = license("consume-2", 5);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&init),
            ..plain(Some(lic.id()), &activated)
        },
    )
    .await
    .expect("the pending initialization is the stored one");
    assert_eq!(
        changes,
        vec![
            Change {
                version: before.version + 1,
                kind: ChangeKind::LicenseApplied(activated.clone()),
            },
            Change {
                version: before.version + 2,
                kind: ChangeKind::InitializationConsumed,
            },
        ]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.initialization, None);
    assert_eq!(snap.license, Some(activated.clone()));
    assert_eq!(drain(store, &before).await, changes);

    // The same initialization cannot be used twice.
    let replay = license("consume-3", 5);
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                consume_initialization: Some(&init),
                ..plain(Some(activated.id()), &replay)
            },
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap, "nothing was written");
}

async fn apply_license_writes_everything_in_order(store: &dyn Store) {
    let lic = with_license(store, "everything").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b", "c"]).await;
    let started = started_tryout();
    store
        .compare_and_set_tryout(None, None, &started)
        .await
        .unwrap()
        .unwrap();
    let init = pending("everything");
    store.set_initialization(None, &init).await.unwrap();
    let before = position(store).await;

    let done = ended(&started);
    let next = license("everything-2", 1);
    let changes = apply(
        store,
        LicenseWrite {
            expected_id: Some(lic.id()),
            license: &next,
            tryout: Some((Some(&started), &done)),
            capacities: &[(Feature::User, 1), (Feature::CallAssist, 1)],
            consume_initialization: Some(&init),
            fence: None,
        },
    )
    .await
    .expect("every expectation holds");
    assert_consecutive(&changes, before.version);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(changes[1].kind, ChangeKind::TryoutChanged(done.clone()));
    assert_eq!(changes[2].kind, ChangeKind::InitializationConsumed);
    assert_eq!(users_of(&flagged_seats(&changes[3..])), ["b", "c"]);
    let snap = snapshot(store).await;
    assert_eq!(snap.license, Some(next));
    assert_eq!(snap.tryout, Some(done));
    assert_eq!(snap.initialization, None);
    assert_eq!(flagged_users(&snap, Feature::User), ["b", "c"]);
    assert_eq!(drain(store, &before).await, changes);
}

async fn apply_license_with_a_stale_initialization_changes_nothing(store: &dyn Store) {
    let lic = with_license(store, "stale").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    let old = pending("stale-old");
    store.set_initialization(None, &old).await.unwrap();
    let current = pending("stale-new");
    store.set_initialization(None, &current).await.unwrap();
    let snap = snapshot(store).await;

    // An activation answering the replaced initialization writes nothing at all:
    // no license, no tryout change, no flags.
    let next = license("stale-2", 0);
    let forfeited = TryoutRecord::Forfeited { at: Utc::now() };
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((None, &forfeited)),
                capacities: &[(Feature::User, 0)],
                consume_initialization: Some(&old),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
    // Nor one with the right nonce but other times.
    let altered = PendingInitialization {
        expires_at: current.expires_at + chrono::Duration::seconds(1),
        ..current.clone()
    };
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                consume_initialization: Some(&altered),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap, "nothing was written");

    // The current one is accepted.
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&current),
            ..plain(Some(lic.id()), &next)
        },
    )
    .await
    .expect("the current initialization");
    assert_eq!(changes[1].kind, ChangeKind::InitializationConsumed);
    assert_eq!(snapshot(store).await.initialization, None);
}

// ---------------------------------------------------------------------------
// reset
// ---------------------------------------------------------------------------

async fn reset_removes_everything_but_the_tryout_record(store: &dyn Store) {
    let lic = with_license(store, "reset").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    assign_in_order(store, &lic, Feature::CallAssist, &["a"]).await;
    created(assign(store, "t", Feature::User, &tryout(1)).await);
    let started = with_the_other_records(store, "reset").await;
    apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 1)],
            ..plain(Some(lic.id()), &lic)
        },
    )
    .await
    .expect("re-applying the stored document with a capacity drop");
    let before = snapshot(store).await;
    let before_pos = before.position.clone().unwrap();
    assert_eq!(before.seats.len(), 4);
    assert_eq!(flagged_users(&before, Feature::User), ["b"]);

    let change = store.reset(None).await.unwrap();
    assert_eq!(
        change,
        Change {
            version: before_pos.version + 1,
            kind: ChangeKind::Reset,
        }
    );
    let snap = snapshot(store).await;
    assert_eq!(
        snap,
        Snapshot {
            position: Some(Position {
                epoch: before_pos.epoch.clone(),
                version: before_pos.version + 1,
            }),
            seats: Vec::new(),
            license: None,
            tryout: Some(started.clone()),
            reconcile: ReconcileStatus::default(),
            initialization: None,
            // Kept, so an older document is never applied after the re-setup.
            retired_license: Some(lic.clone()),
            ..Snapshot::default()
        }
    );
    assert!(store.list_seats(None, None, 100).await.unwrap().is_empty());
    for feature in Feature::SEATS {
        assert!(
            store
                .list_seats(Some(feature), None, 100)
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(drain(store, &before_pos).await, vec![change.clone()]);

    // Writes are accepted afterwards, against the emptied state.
    assert_eq!(
        assign(store, "a", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::LicenseChanged,
        "the license is gone"
    );
    let next = license("reset-2", 1);
    apply(store, plain(None, &next))
        .await
        .expect("no license is stored after a reset");
    let (seat, _) = created(assign(store, "z", Feature::User, &purchased(&next, 1)).await);
    assert_eq!(seat.over_capacity_since, None);
    created(assign(store, "y", Feature::User, &tryout(1)).await);
    store
        .compare_and_set_tryout(None, Some(&started), &ended(&started))
        .await
        .unwrap()
        .expect("the kept tryout record is the expectation");
    store
        .set_initialization(None, &pending("again"))
        .await
        .unwrap();
    store
        .record_reconcile(None, &reconcile_status(ReconcileOutcome::Unchanged))
        .await
        .unwrap();
    assert_eq!(
        keys_of(&store.list_seats(None, None, 100).await.unwrap()),
        vec![
            (Feature::User, "y".to_owned()),
            (Feature::User, "z".to_owned())
        ]
    );
    // A second reset on the emptied store works too.
    store.reset(None).await.unwrap();
    assert!(snapshot(store).await.seats.is_empty());
}
