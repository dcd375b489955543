//! Integrity: the writer's floor, repair writes, the release guard, and the high-
//! water clock.

use super::*;

conformance! {
    store: writes_below_the_floor_are_refused;
    store: repair_writes_back_only_where_it_was_planned;
    store: release_reflag_is_guarded_by_the_stored_license;
    store: high_water_clock_only_grows;
    store: high_water_clock_never_passes_the_store_time;
    wipe: restore_caps_the_high_water_clock;
}

// ---------------------------------------------------------------------------
// integrity: the writer's floor, repair, the release guard, the high-water clock
// ---------------------------------------------------------------------------

async fn writes_below_the_floor_are_refused(store: &dyn Store) {
    created(assign(store, "a", Feature::User, &tryout(5)).await);
    let at = position(store).await;
    // A writer that has seen a later version: the store went back behind it.
    let ahead = Position {
        epoch: at.epoch.clone(),
        version: at.version + 1,
    };
    let floor = Some(&ahead);
    assert_eq!(
        store
            .assign_seat(floor, &uid("b"), Feature::User, &tryout(5))
            .await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store
            .release_seat(floor, &uid("a"), Feature::User, None)
            .await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store
            .record_reconcile(floor, &ReconcileStatus::default())
            .await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store
            .compare_and_set_tryout(floor, None, &started_tryout())
            .await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store.set_initialization(floor, &pending("floor")).await,
        Err(StoreError::Moved)
    );
    // A writer that knows another epoch.
    let elsewhere = Position {
        epoch: "another".into(),
        version: 0,
    };
    assert_eq!(store.reset(Some(&elsewhere)).await, Err(StoreError::Moved));
    assert_eq!(position(store).await, at, "nothing was written");
    // At or below the store's version: written; no floor: no check.
    assert!(matches!(
        store
            .assign_seat(Some(&at), &uid("b"), Feature::User, &tryout(5))
            .await,
        Ok(AssignOutcome::Created(_))
    ));
    created(assign(store, "c", Feature::User, &tryout(5)).await);
}

async fn repair_writes_back_only_where_it_was_planned(store: &dyn Store) {
    created(assign(store, "keep", Feature::User, &tryout(5)).await);
    created(assign(store, "gone", Feature::User, &tryout(5)).await);
    let at = position(store).await;
    let tryout_record = started_tryout();
    let lost = Seat {
        user_id: uid("lost"),
        feature: Feature::User,
        source: SeatSource::Tryout,
        assigned_at: ms_now(),
        over_capacity_since: None,
    };
    let mut incident = Incident {
        at: ms_now(),
        rolled_back_from: at.version + 5,
        ..Incident::default()
    };
    incident.restored("seat user/lost".into());
    incident.lost("seat user/full".into());
    let write = RepairWrite {
        expected: Some(Position {
            epoch: at.epoch.clone(),
            version: at.version + 1,
        }),
        version_floor: at.version + 5,
        add_seats: vec![lost.clone()],
        remove_seats: vec![(Feature::User, uid("gone"))],
        tryout: Some(tryout_record.clone()),
        incident: incident.clone(),
        ..RepairWrite::default()
    };
    // Planned on another position: nothing written.
    assert_eq!(store.repair(&write).await, Ok(None));
    assert_eq!(position(store).await, at);

    let write = RepairWrite {
        expected: Some(at.clone()),
        ..write
    };
    let changes = store.repair(&write).await.unwrap().expect("repaired");
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            ChangeKind::SeatAssigned(lost.clone()),
            ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: uid("gone"),
            },
            ChangeKind::TryoutChanged(tryout_record.clone()),
            ChangeKind::Repaired(incident.clone()),
        ]
    );
    // The versions jump above every version a replica saw, then count up.
    assert_consecutive(&changes, at.version + 5);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["keep", "lost"]);
    assert_eq!(snap.incident, Some(incident));
    assert_eq!(snap.tryout, Some(tryout_record.clone()));
    // The feed holds the repair's entries after the jump.
    let history = store.history(at.version).await.unwrap();
    assert_eq!(history, changes);
    // A follower at the old position sees a gap (and re-reads).
    match store.changes(&at, Duration::from_millis(50)).await.unwrap() {
        Changes::Resync => {}
        Changes::Events(events) => assert_ne!(events[0].version, at.version + 1),
    }
}

async fn release_reflag_is_guarded_by_the_stored_license(store: &dyn Store) {
    let lic = with_license(store, "guard").await;
    created(assign(store, "a", Feature::User, &purchased(&lic, 5)).await);
    let other = license("other", 1);
    assert_eq!(
        store
            .release_seat(None, &uid("a"), Feature::User, Some((1, other.id())))
            .await,
        Err(StoreError::Moved),
        "capacity read from another license"
    );
    assert_eq!(users_of(&snapshot(store).await.seats), ["a"]);
    assert!(matches!(
        store
            .release_seat(None, &uid("a"), Feature::User, Some((1, lic.id())))
            .await
            .unwrap(),
        ReleaseOutcome::Released(_)
    ));
}

async fn high_water_clock_only_grows(store: &dyn Store) {
    let start = snapshot(store).await.high_water_ms;
    let t = start.max(1_767_225_600_000) + 1000;
    assert_eq!(store.advance_clock(t).await.unwrap().high_water_ms, t);
    assert_eq!(store.advance_clock(t - 500).await.unwrap().high_water_ms, t);
    // 0 only reads.
    assert_eq!(store.advance_clock(0).await.unwrap().high_water_ms, t);
    assert_eq!(snapshot(store).await.high_water_ms, t);
}

/// Days in ms, for clocks that leap.
const DAY_MS: i64 = 86_400_000;

/// A replica's clock 90 days ahead cannot carry the shared mark with it: the
/// store raises it at most to its own time, which it reports as the reference.
async fn high_water_clock_never_passes_the_store_time(store: &dyn Store) {
    let wall = chrono::Utc::now().timestamp_millis();
    let reading = store.advance_clock(wall + 90 * DAY_MS).await.unwrap();
    // The reference is the store's clock (Redis TIME, or this process's own
    // clock for the embedded store): here, the same host's.
    assert!(
        (reading.reference_ms - wall).abs() < 60_000,
        "{reading:?} vs {wall}"
    );
    assert!(reading.high_water_ms <= reading.reference_ms, "{reading:?}");
    assert!(snapshot(store).await.high_water_ms <= reading.reference_ms);
}

/// A restore writes back the replica's mark, but not beyond the store's time.
async fn restore_caps_the_high_water_clock(store: &dyn Store, wipe: &(dyn Fn() + Send + Sync)) {
    let mut old = snapshot(store).await;
    let wall = chrono::Utc::now().timestamp_millis();
    old.high_water_ms = wall + 90 * DAY_MS;
    wipe();
    assert!(store.restore(&old).await.unwrap());
    let reference = store.advance_clock(0).await.unwrap().reference_ms;
    assert!(snapshot(store).await.high_water_ms <= reference);
}
