//! The change feed: every write in order, waiting when idle, a resync for positions
//! of another store, and waking a waiting reader.

use super::*;

conformance! {
    store: change_feed_reports_every_write_in_order;
    store: change_feed_waits_when_idle_and_resyncs_foreign_positions;
    shared: change_feed_wakes_a_waiting_reader;
    shared: a_snapshot_read_during_writes_is_the_store_at_its_version;
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
            ChangeKind::LeaseAcquired { .. } => "lease",
            ChangeKind::LeasesRenewed { .. } => "renewed",
            ChangeKind::LeaseReleased { .. } => "lease_released",
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

/// A snapshot read while writes go on (the Redis store reads it in pages and
/// replays the feed over them) is the store exactly as it was at the snapshot's
/// version: the feed after that version, applied to it, gives what a quiet
/// snapshot reads at the end.
async fn a_snapshot_read_during_writes_is_the_store_at_its_version(store: Arc<dyn Store>) {
    const SEATS: usize = 6000;
    let lic = with_license(&*store, "paged").await;
    let plan = purchased(&lic, u32::try_from(SEATS * 2).unwrap());
    for i in 0..SEATS {
        created(assign(&*store, &format!("user-{i:05}"), Feature::User, &plan).await);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop, plan) = (Arc::clone(&store), Arc::clone(&stop), plan.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 4000 {
                // Releases spread over the whole pool, and new seats.
                let old = format!("user-{:05}", (i * 7919) % SEATS);
                store
                    .release_seat(None, &uid(&old), Feature::User, None)
                    .await
                    .expect("release");
                let new = format!("late-{i:05}");
                store
                    .assign_seat(None, &uid(&new), Feature::User, &plan)
                    .await
                    .expect("assign");
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut taken = Vec::new();
    for _ in 0..5 {
        taken.push(snapshot(&*store).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let quiet = snapshot(&*store).await;
    let quiet_version = quiet.position.as_ref().unwrap().version;
    let want: BTreeSet<(Feature, String, i64)> = quiet
        .seats
        .iter()
        .map(|s| {
            (
                s.feature,
                s.user_id.as_str().to_owned(),
                s.assigned_at.timestamp_millis(),
            )
        })
        .collect();
    for snap in taken {
        let version = snap.position.as_ref().unwrap().version;
        let mut seats: std::collections::BTreeMap<(Feature, String), i64> = snap
            .seats
            .iter()
            .map(|s| {
                (
                    (s.feature, s.user_id.as_str().to_owned()),
                    s.assigned_at.timestamp_millis(),
                )
            })
            .collect();
        assert_eq!(seats.len(), snap.seats.len(), "no seat twice in a snapshot");
        let later = store.history(version).await.unwrap();
        assert_consecutive(&later, version);
        assert_eq!(later.last().map_or(version, |c| c.version), quiet_version);
        for change in &later {
            match &change.kind {
                ChangeKind::SeatAssigned(s) | ChangeKind::SeatFlagged(s) => {
                    seats.insert(
                        (s.feature, s.user_id.as_str().to_owned()),
                        s.assigned_at.timestamp_millis(),
                    );
                }
                ChangeKind::SeatReleased { feature, user_id } => {
                    seats.remove(&(*feature, user_id.as_str().to_owned()));
                }
                other => panic!("no other writes here: {other:?}"),
            }
        }
        let got: BTreeSet<(Feature, String, i64)> =
            seats.into_iter().map(|((f, u), at)| (f, u, at)).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "the snapshot at version {version} plus the feed after it has the quiet store's seats"
        );
        assert!(
            got == want,
            "the snapshot at version {version} differs from the store at it"
        );
    }
}

/// The cases that write into Redis by hand.
mod raw_feed {
    use super::*;

    redis_only! {
        a_version_no_feed_entry_has_is_a_gap;
    }

    /// A version counter ahead of the feed (written by hand, or by a writer that
    /// did not append its entry) is a gap, found by an idle reader too: the
    /// reader reads a snapshot instead of waiting for an entry that never comes.
    async fn a_version_no_feed_entry_has_is_a_gap(subject: &Subject) {
        let store = &*subject.store;
        let lic = with_license(store, "gap").await;
        created(assign(store, "alice", Feature::User, &purchased(&lic, 2)).await);
        let pos = position(store).await;
        assert_eq!(
            store
                .changes(&pos, Duration::from_millis(20))
                .await
                .unwrap(),
            Changes::Events(vec![]),
            "nothing new"
        );
        let _: i64 = redis::cmd("INCR")
            .arg(format!("lic:{{{}}}:version", subject.serial))
            .query(&mut subject.redis.as_ref().unwrap().connection())
            .unwrap();
        assert_eq!(
            store
                .changes(&pos, Duration::from_millis(20))
                .await
                .unwrap(),
            Changes::Resync
        );
    }
}
