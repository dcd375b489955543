//! The change feed: every write in order, waiting when idle, a resync for positions
//! of another store, and waking a waiting reader.

use super::*;

conformance! {
    store: change_feed_reports_every_write_in_order;
    store: change_feed_waits_when_idle_and_resyncs_foreign_positions;
    shared: change_feed_wakes_a_waiting_reader;
}

// ---------------------------------------------------------------------------
// changes
// ---------------------------------------------------------------------------

async fn change_feed_reports_every_write_in_order(store: &dyn Store) {
    let start = position(store).await;
    let mut written = Vec::new();

    let lic = license("feed", 1);
    written.extend(apply(store, plain(None, &lic)).await.unwrap());
    let plan = purchased(&lic, 1);
    let (_, c) = created(assign(store, "alice", Feature::User, &plan).await);
    written.push(c);
    // Writes that write nothing report nothing.
    assign(store, "alice", Feature::User, &plan).await;
    assign(store, "bob", Feature::User, &plan).await;
    assert_eq!(release(store, "bob", Feature::User, None).await, None);
    let started = started_tryout();
    written.push(
        store
            .compare_and_set_tryout(None, None, &started)
            .await
            .unwrap()
            .unwrap(),
    );
    let (_, c) = created(assign(store, "bob", Feature::User, &tryout(3)).await);
    written.push(c);
    let (_, c) = created(assign(store, "bob", Feature::CallAssist, &plan).await);
    written.push(c);
    written.push(
        store
            .record_reconcile(None, &reconcile_status(ReconcileOutcome::Unchanged))
            .await
            .unwrap(),
    );
    written.extend(release(store, "alice", Feature::User, None).await.unwrap());
    let bigger = license("feed-2", 2);
    written.extend(
        apply(
            store,
            LicenseWrite {
                tryout: Some((Some(&started), &ended(&started))),
                ..plain(Some(lic.id()), &bigger)
            },
        )
        .await
        .unwrap(),
    );
    let (_, c) = created(assign(store, "bob", Feature::User, &purchased(&bigger, 2)).await);
    written.push(c);
    // The newer kinds: an initialization issued and consumed, flags moved by a
    // license and by a release, a reset.
    let init = pending("feed");
    written.push(store.set_initialization(None, &init).await.unwrap());
    let third = license("feed-3", 2);
    written.extend(
        apply(
            store,
            LicenseWrite {
                capacities: &[(Feature::User, 0)],
                consume_initialization: Some(&init),
                ..plain(Some(bigger.id()), &third)
            },
        )
        .await
        .unwrap(),
    );
    let (_, c) = created(assign(store, "carol", Feature::User, &purchased(&third, 2)).await);
    written.push(c);
    written.extend(
        release(store, "carol", Feature::User, Some(1))
            .await
            .unwrap(),
    );
    written.push(store.reset(None).await.unwrap());

    let versions: Vec<u64> = written.iter().map(|c| c.version).collect();
    let want: Vec<u64> = (start.version + 1..=start.version + written.len() as u64).collect();
    assert_eq!(versions, want, "writes count up one by one");
    let kinds: Vec<&str> = written
        .iter()
        .map(|c| match c.kind {
            ChangeKind::SeatAssigned(_) => "assigned",
            ChangeKind::SeatReleased { .. } => "released",
            ChangeKind::LicenseApplied(_) => "license",
            ChangeKind::TryoutChanged(_) => "tryout",
            ChangeKind::ReconcileRecorded(_) => "reconcile",
            ChangeKind::SeatFlagged(_) => "flagged",
            ChangeKind::InitializationIssued(_) => "init_issued",
            ChangeKind::InitializationConsumed => "init_consumed",
            ChangeKind::Reset => "reset",
            ChangeKind::Repaired(_) => "repaired",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "license",
            "assigned",
            "tryout",
            "assigned",
            "assigned",
            "reconcile",
            "released",
            "license",
            "tryout",
            "assigned",
            "init_issued",
            "license",
            "init_consumed",
            "flagged",
            "assigned",
            "released",
            "flagged",
            "reset",
        ]
    );

    let flags: Vec<(&str, bool)> = written
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::SeatFlagged(seat) => {
                Some((seat.user_id.as_str(), seat.over_capacity_since.is_some()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(flags, [("bob", true), ("bob", false)]);

    // The feed has exactly what the writes returned, in order.
    assert_eq!(drain(store, &start).await, written);
    // From the middle: the rest.
    let mid = Position {
        epoch: start.epoch.clone(),
        version: written[3].version,
    };
    assert_eq!(drain(store, &mid).await, written[4..].to_vec());
    // The snapshot's position is where the feed ends.
    let end = position(store).await;
    assert_eq!(end.epoch, start.epoch);
    assert_eq!(end.version, written.last().unwrap().version);
}

async fn change_feed_waits_when_idle_and_resyncs_foreign_positions(store: &dyn Store) {
    let lic = with_license(store, "idle").await;
    created(assign(store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let pos = position(store).await;
    let wait = Duration::from_millis(50);

    let t = Instant::now();
    assert_eq!(
        store.changes(&pos, wait).await.unwrap(),
        Changes::Events(Vec::new())
    );
    let took = t.elapsed();
    assert!(
        took >= wait / 2 && took < Duration::from_secs(10),
        "an idle feed answers after about the wait, took {took:?}"
    );

    let foreign = Position {
        epoch: format!("{}-other", pos.epoch),
        version: pos.version,
    };
    assert_eq!(
        store.changes(&foreign, wait).await.unwrap(),
        Changes::Resync
    );
    let foreign_behind = Position {
        epoch: "0000000000000000".to_owned(),
        version: 0,
    };
    assert_ne!(foreign_behind.epoch, pos.epoch);
    assert_eq!(
        store.changes(&foreign_behind, wait).await.unwrap(),
        Changes::Resync
    );
    let ahead = Position {
        epoch: pos.epoch.clone(),
        version: pos.version + 5,
    };
    assert_eq!(store.changes(&ahead, wait).await.unwrap(), Changes::Resync);
    let just_ahead = Position {
        epoch: pos.epoch.clone(),
        version: pos.version + 1,
    };
    assert_eq!(
        store.changes(&just_ahead, wait).await.unwrap(),
        Changes::Resync
    );
    // None of this wrote anything.
    assert_eq!(position(store).await, pos);
}

async fn change_feed_wakes_a_waiting_reader(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "wake").await;
    let pos = position(&*store).await;
    let reader = {
        let store = Arc::clone(&store);
        let pos = pos.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let changes = store.changes(&pos, Duration::from_secs(20)).await;
            (changes, t.elapsed())
        })
    };
    let (_, change) = created(assign(&*store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let (changes, took) = reader.await.unwrap();
    assert_eq!(changes.unwrap(), Changes::Events(vec![change]));
    assert!(
        took < Duration::from_secs(10),
        "a write ends the wait, took {took:?}"
    );
}
