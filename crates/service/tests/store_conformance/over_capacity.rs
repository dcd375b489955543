//! Over-capacity flags: a smaller license flags the most recent excess, pools it
//! does not list keep theirs, and the order is assignment time, then user id.

use super::*;

conformance! {
    store: capacity_drop_flags_the_most_recent_excess;
    store: capacities_leave_unlisted_pools_untouched;
    wipe: over_capacity_order_is_assignment_time_then_user_id;
}

// ---------------------------------------------------------------------------
// over-capacity flags
// ---------------------------------------------------------------------------

async fn capacity_drop_flags_the_most_recent_excess(store: &dyn Store) {
    let lic = with_license(store, "drop").await;
    assign_in_order(store, &lic, Feature::User, &["u1", "u2", "u3", "u4", "u5"]).await;
    // A tryout seat of the same feature, assigned last: not in the purchased pool.
    let (trial, _) = created(assign(store, "u9", Feature::User, &tryout(5)).await);
    let unflagged = snapshot(store).await;
    assert!(
        unflagged
            .seats
            .iter()
            .all(|s| s.over_capacity_since.is_none())
    );
    let before = position(store).await;

    // Down to 2: the three most recent purchased seats are flagged, now.
    let smaller = license("drop-2", 2);
    let t0 = Utc::now();
    let changes = replace_license(store, &lic, &smaller, &[(Feature::User, 2)]).await;
    let t1 = Utc::now();
    assert_consecutive(&changes, before.version);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(smaller.clone()));
    let flagged = flagged_seats(&changes[1..]);
    assert_eq!(users_of(&flagged), ["u3", "u4", "u5"]);
    for seat in &flagged {
        let old = seat_in(&unflagged, Feature::User, seat.user_id.as_str());
        assert_eq!(
            Seat {
                over_capacity_since: None,
                ..seat.clone()
            },
            old,
            "only the flag changed"
        );
        assert_near(seat.over_capacity_since.expect("flagged"), t0, t1);
    }
    let snap = snapshot(store).await;
    for seat in &flagged {
        assert_eq!(&seat_in(&snap, Feature::User, seat.user_id.as_str()), seat);
    }
    assert_eq!(flagged_users(&snap, Feature::User), ["u3", "u4", "u5"]);
    assert_eq!(seat_in(&snap, Feature::User, "u9"), trial);
    assert_eq!(store.list_seats(None, None, 100).await.unwrap(), snap.seats);
    assert_eq!(drain(store, &before).await, changes);

    // The same capacity again: no flag moves, and flags keep their time.
    let same = license("drop-3", 2);
    let changes = replace_license(store, &smaller, &same, &[(Feature::User, 2)]).await;
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(same.clone()));
    let again = snapshot(store).await;
    assert_eq!(again.seats, snap.seats);

    // Releasing a seat that is not flagged makes room for the oldest flagged one.
    let v = position(store).await.version;
    let changes = release(store, "u1", Feature::User, Some(2))
        .await
        .expect("u1 held a seat");
    assert_consecutive(&changes, v);
    assert_eq!(
        changes[0].kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("u1"),
        }
    );
    let cleared = flagged_seats(&changes[1..]);
    assert_eq!(cleared, vec![seat_in(&unflagged, Feature::User, "u3")]);
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["u4", "u5"]);
    for user in ["u4", "u5"] {
        assert_eq!(
            seat_in(&snap, Feature::User, user),
            seat_in(&again, Feature::User, user),
            "{user} keeps its flag time"
        );
    }

    // Without a capacity, a release leaves the flags as they are.
    let changes = release(store, "u2", Feature::User, None)
        .await
        .expect("u2 held a seat");
    assert_eq!(changes.len(), 1, "only the release: {changes:?}");
    assert_eq!(
        flagged_users(&snapshot(store).await, Feature::User),
        ["u4", "u5"]
    );

    // More capacity clears every flag.
    let bigger = license("drop-4", 10);
    let v = position(store).await.version;
    let changes = replace_license(store, &same, &bigger, &[(Feature::User, 10)]).await;
    assert_consecutive(&changes, v);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(bigger.clone()));
    let cleared = flagged_seats(&changes[1..]);
    assert_eq!(
        cleared,
        vec![
            seat_in(&unflagged, Feature::User, "u4"),
            seat_in(&unflagged, Feature::User, "u5"),
        ]
    );
    let snap = snapshot(store).await;
    assert!(snap.seats.iter().all(|s| s.over_capacity_since.is_none()));
    assert_eq!(
        users_of(&snap.seats),
        ["u3", "u4", "u5", "u9"],
        "flags never delete seats"
    );
}

async fn capacities_leave_unlisted_pools_untouched(store: &dyn Store) {
    let lic = with_license(store, "unlisted").await;
    assign_in_order(store, &lic, Feature::CallAssist, &["a", "b", "c"]).await;
    assign_in_order(store, &lic, Feature::User, &["a", "b", "c"]).await;

    // Only the user pool is listed: only its flags move.
    let second = license("unlisted-2", 1);
    let changes = replace_license(store, &lic, &second, &[(Feature::User, 1)]).await;
    let flagged = flagged_seats(&changes[1..]);
    assert!(flagged.iter().all(|s| s.feature == Feature::User));
    assert_eq!(users_of(&flagged), ["b", "c"]);
    let snap = snapshot(store).await;
    assert!(flagged_users(&snap, Feature::CallAssist).is_empty());

    // Now only call_assist: the user flags keep their time.
    let third = license("unlisted-3", 1);
    let changes = replace_license(store, &second, &third, &[(Feature::CallAssist, 1)]).await;
    let flagged = flagged_seats(&changes[1..]);
    assert!(flagged.iter().all(|s| s.feature == Feature::CallAssist));
    assert_eq!(users_of(&flagged), ["b", "c"]);
    let after = snapshot(store).await;
    let users_pool = |snap: &Snapshot| -> Vec<Seat> {
        snap.seats
            .iter()
            .filter(|s| s.feature == Feature::User)
            .cloned()
            .collect()
    };
    assert_eq!(users_pool(&after), users_pool(&snap));

    // User capacity grows: the user flags clear, the call_assist ones stay.
    let fourth = license("unlisted-4", 3);
    let changes = replace_license(store, &third, &fourth, &[(Feature::User, 3)]).await;
    let cleared = flagged_seats(&changes[1..]);
    assert!(cleared.iter().all(|s| s.feature == Feature::User));
    assert!(cleared.iter().all(|s| s.over_capacity_since.is_none()));
    assert_eq!(users_of(&cleared), ["b", "c"]);
    let last = snapshot(store).await;
    let call_assist_pool = |snap: &Snapshot| -> Vec<Seat> {
        snap.seats
            .iter()
            .filter(|s| s.feature == Feature::CallAssist)
            .cloned()
            .collect()
    };
    assert_eq!(call_assist_pool(&last), call_assist_pool(&after));
    assert_eq!(flagged_users(&last, Feature::CallAssist), ["b", "c"]);
    assert!(flagged_users(&last, Feature::User).is_empty());

    // No capacities at all: nothing moves.
    let fifth = license("unlisted-5", 0);
    let changes = apply(store, plain(Some(fourth.id()), &fifth))
        .await
        .expect("expectations hold");
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
    let unchanged = snapshot(store).await;
    assert_eq!(unchanged.seats, last.seats);
}

async fn over_capacity_order_is_assignment_time_then_user_id(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    // Seats with chosen times, through a restore: the newest assignment is flagged
    // first whatever its user id; equal times go to the higher user id first; an
    // existing flag keeps its time.
    let lic = with_license(store, "order").await;
    let mut old = snapshot(store).await;
    wipe();
    let t = ms_now() - chrono::Duration::days(1);
    let since = t + chrono::Duration::hours(1);
    let seat = |user: &str, hours_ago: i64, flagged: bool| Seat {
        user_id: uid(user),
        feature: Feature::User,
        source: SeatSource::Purchased,
        assigned_at: t - chrono::Duration::hours(hours_ago),
        over_capacity_since: flagged.then_some(since),
    };
    old.seats = vec![
        seat("zed", 4, false),
        seat("abe", 3, true),
        seat("amy", 2, false),
        seat("bob", 0, false),
        seat("cat", 0, true),
        // A newer tryout seat is not in the purchased pool.
        Seat {
            source: SeatSource::Tryout,
            ..seat("zzz", -1, false)
        },
    ];
    assert!(store.restore(&old).await.unwrap());

    // Newest first: cat, bob (a tie, higher id first), amy, abe, zed. Capacity 2
    // flags cat, bob and amy and clears abe.
    let next = license("order-2", 2);
    let t0 = Utc::now();
    let changes = replace_license(store, &lic, &next, &[(Feature::User, 2)]).await;
    let t1 = Utc::now();
    let moved = flagged_seats(&changes[1..]);
    assert_eq!(users_of(&moved), ["abe", "amy", "bob"]);
    assert_eq!(moved[0], seat("abe", 3, false));
    for s in &moved[1..] {
        assert_near(s.over_capacity_since.expect("flagged"), t0, t1);
    }
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["amy", "bob", "cat"]);
    assert_eq!(
        seat_in(&snap, Feature::User, "cat"),
        seat("cat", 0, true),
        "cat keeps its flag time"
    );
    assert_eq!(seat_in(&snap, Feature::User, "zed"), seat("zed", 4, false));
    assert_eq!(
        seat_in(&snap, Feature::User, "zzz").over_capacity_since,
        None
    );

    // Capacity 4: only the newest stays flagged; of the tie, bob is cleared.
    let wider = license("order-3", 4);
    let changes = replace_license(store, &next, &wider, &[(Feature::User, 4)]).await;
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["amy", "bob"]);
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["cat"]);
    assert_eq!(seat_in(&snap, Feature::User, "cat"), seat("cat", 0, true));

    // Releasing the oldest seat with capacity 4 clears the last flag.
    let changes = release(store, "zed", Feature::User, Some(4))
        .await
        .expect("zed held a seat");
    assert_eq!(flagged_seats(&changes[1..]), vec![seat("cat", 0, false)]);
}
